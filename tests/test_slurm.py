"""The sweep as SLURM jobs on a real one-node cluster (.ci/slurm_up.sh brings it up; no mocked
sbatch): run dirs like a local sweep's, hard requeue, the pre-timeout signal, finishing a sweep,
detached mode, sweeps larger than the cluster's MaxArraySize, what sbatch would refuse refused in one
line; and DistributedDataParallel with 2 gloo ranks, from torchrun and from SLURM tasks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from coupled_net.collect import collect
from helpers import REPO, TRAIN, metric_table, read_results, run_cli, run_dirs, run_sweep, snapshot, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_per_cpu=1G", "hydra.launcher.timeout_min=20"]
FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10"]


def manifest(sweep):
    return json.loads((sweep / "manifest.json").read_text())


def squeue(job_id):
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True)
    return out.stdout.strip()


def epochs_done(run_dir) -> int:
    path = run_dir / "epochs.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def release_requeued(job_id):
    """A requeued job waits ~2 min (BeginTime) unless released. Released while its previous run is
    still being torn down, SLURM kills the new start ("Job credential revoked"), so wait for the
    requeue hold to settle (KillWait is 2 s on the test cluster) before releasing it."""
    wait_for(lambda: squeue(job_id) == "PENDING|BeginTime", every=0.2, what=f"{job_id} requeued and held")
    time.sleep(4)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def start_sweep(*args, cwd):
    return subprocess.Popen([sys.executable, str(TRAIN), "-m", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_slurm_sweep_gives_the_run_dirs_of_a_local_sweep(tmp_path):
    common = [*FAST, "trainer.epochs=2", "coupling.alpha=0,2", f"dataset.root={tmp_path}"]
    slurm = run_cli("-m", *SLURM, *common, f"hydra.sweep.dir={tmp_path / 'slurm'}", cwd=tmp_path)
    assert slurm.returncode == 0, slurm.stdout[-3000:] + slurm.stderr[-3000:]
    local = run_cli("-m", *common, f"hydra.sweep.dir={tmp_path / 'local'}", cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    jobs = {j["run_dir"]: j["job_id"] for j in manifest(tmp_path / "slurm")["jobs"]}
    for s, loc in zip(run_dirs(tmp_path / "slurm"), run_dirs(tmp_path / "local")):
        assert s.name == loc.name
        files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
        assert files(s) == files(loc)
        rs, rl = read_results(s), read_results(loc)
        assert rs.keys() == rl.keys() and rs["status"] == "done" and rs["epochs_run"] == 2
        assert list(pd.read_csv(s / "epochs.csv").columns) == list(pd.read_csv(loc / "epochs.csv").columns)
        assert rs["provenance"]["slurm_job_id"] == jobs[str(s)] and rl["provenance"]["slurm_job_id"] is None
    assert (tmp_path / "slurm" / "summary.md").is_file()


def test_a_job_num_subdir_sweep_gives_the_run_dirs_of_the_basic_launcher_and_keeps_them_when_relaunched(tmp_path):
    """`hydra.sweep.subdir=run_${hydra.job.num}` (Hydra's default): the SLURM launcher's setup resolved it
    before any job had a number (MissingMandatoryValue). A re-launch that leaves the finished run_0 out
    gives the unfinished job its number in the whole sweep, #1 (its directory run_1), with either launcher."""
    common = [*FAST, "trainer.epochs=1", "coupling.alpha=0,2", "hydra.sweep.subdir=run_${hydra.job.num}",
              f"dataset.root={tmp_path}"]
    sweeps = {"slurm": [*SLURM, *common], "basic": common}
    for name, args in sweeps.items():
        proc = run_cli("-m", *args, f"hydra.sweep.dir={tmp_path / name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in sweeps:
        runs = run_dirs(tmp_path / name)
        assert [r.name for r in runs] == ["run_0", "run_1"]
        assert [(read_results(r)["status"], read_results(r)["alpha"]) for r in runs] == \
            [("done", 0), ("done", 2)]
    assert [(j["job_num"], Path(j["run_dir"]).name) for j in manifest(tmp_path / "slurm")["jobs"]] == \
        [(0, "run_0"), (1, "run_1")]

    for name, args in sweeps.items():  # run_1 left unfinished (as a job killed before its end leaves it)
        unfinished = tmp_path / name / "run_1"
        res = read_results(unfinished)
        (unfinished / "results.json").write_text(json.dumps({**res, "status": "running"}))
        before = snapshot(tmp_path / name / "run_0")
        again = run_cli("-m", *args, f"hydra.sweep.dir={tmp_path / name}", cwd=tmp_path)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "already done (run_0), not run again" in again.stdout + again.stderr
        assert (read_results(unfinished)["status"], read_results(unfinished)["resumes"]) == ("done", 1)
        assert snapshot(tmp_path / name / "run_0") == before
    assert [(j["job_num"], Path(j["run_dir"]).name) for j in manifest(tmp_path / "slurm")["jobs"]][2:] == \
        [(1, "run_1")]


def start_twins(tmp_path, *overrides):
    """The same run as two SLURM sweeps (a/ and b/, one job each: within one sweep they would be one
    run); returns both processes, a's run dir, and b's manifest entry and run dir (the one a test
    interrupts)."""
    procs = [start_sweep(*SLURM, *FAST, *overrides, f"hydra.sweep.dir={tmp_path / name}", f"dataset.root={tmp_path}",
                         cwd=tmp_path) for name in ("a", "b")]
    a, b = (wait_for(lambda s=s: (tmp_path / s / "manifest.json").exists() and manifest(tmp_path / s),
                     what="manifest")["jobs"][0] for s in ("a", "b"))
    return procs, Path(a["run_dir"]), b, Path(b["run_dir"])


def finish(procs):
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]


def test_a_hard_requeued_job_resumes_and_matches_its_twin(tmp_path):
    procs, a, twin, b = start_twins(tmp_path, "dataset.train_per_class=150", "trainer.epochs=4")
    wait_for(lambda: epochs_done(b) >= 2, what="two epochs")
    subprocess.run(["scontrol", "requeue", twin["job_id"]], check=True)
    release_requeued(twin["job_id"])
    finish(procs)
    ra, rb = read_results(a), read_results(b)
    assert (rb["status"], ra["resumes"]) == ("done", 0) and rb["resumes"] >= 1
    assert list(pd.read_csv(b / "epochs.csv")["epoch"]) == [1, 2, 3, 4]
    assert rb["metrics"] == ra["metrics"]


def test_the_pre_timeout_signal_saves_mid_epoch_and_the_requeued_job_finishes_the_same(tmp_path):
    procs, a, twin, b = start_twins(tmp_path, "dataset.train_per_class=300", "trainer.epochs=3")
    wait_for(lambda: epochs_done(b) >= 1, what="one epoch")
    time.sleep(1.0)  # into epoch 2
    subprocess.run(["scancel", "--signal=USR2", twin["job_id"]], check=True)  # what SLURM sends before a timeout
    release_requeued(twin["job_id"])
    finish(procs)
    log = (b / "train.log").read_text()
    assert "caught SIGUSR2: saving a checkpoint at the end of this step" in log
    assert "of epoch 2 (resume #1)" in log  # resumed mid-epoch, from the step it stopped at
    ra, rb = read_results(a), read_results(b)
    assert (rb["status"], rb["resumes"]) == ("done", 1)
    assert list(pd.read_csv(b / "epochs.csv")["epoch"]) == [1, 2, 3]
    assert rb["metrics"] == ra["metrics"]
    pd.testing.assert_frame_equal(metric_table(a), metric_table(b))


def test_relaunching_a_slurm_sweep_submits_only_unfinished_runs_and_refuses_another_config(tmp_path):
    preset = tmp_path / "conf" / "experiment" / "mine.yaml"  # a user's own preset (--config-dir)
    preset.parent.mkdir(parents=True)
    preset.write_text((REPO / "conf" / "experiment" / "quickstart.yaml").read_text())
    args = ["-cd", str(tmp_path / "conf"), *SLURM, "experiment=mine", *FAST[1:], "trainer.epochs=2",
            "coupling.alpha=0,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"dataset.root={tmp_path}"]
    first = run_cli("-m", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done, unfinished = run_dirs(tmp_path / "sweep")
    res = read_results(unfinished)
    res["status"] = "running"  # as a job killed before its final evaluation leaves it
    (unfinished / "results.json").write_text(json.dumps(res))
    before = snapshot(done)

    # another data root (not part of a run's identity): the finished run is skipped by its fingerprint
    (tmp_path / "copy").mkdir()
    again = run_cli("-m", *args, f"dataset.root={tmp_path / 'copy'}", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    jobs = manifest(tmp_path / "sweep")["jobs"]
    assert [j["run_dir"] for j in jobs] == [str(done), str(unfinished), str(unfinished)]  # only the unfinished one
    assert f"already done ({done.name}), not run again" in again.stdout + again.stderr
    assert snapshot(done) == before
    assert (read_results(unfinished)["status"], read_results(unfinished)["resumes"]) == ("done", 1)

    # the preset edited (a key the directory names do not show): refused before anything is submitted
    preset.write_text(preset.read_text().replace("lr: 0.05", "lr: 0.02"))
    whole = snapshot(tmp_path / "sweep")
    refused = run_cli("-m", *args, cwd=tmp_path)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines[-1] == (f"coupled_net: error: 2 conflict(s) in sweep {tmp_path / 'sweep'} (listed above): "
                         "nothing was started or submitted")
    for run_dir in (done, unfinished):
        assert f"coupled_net: error: {run_dir}: results.json is a run of another config: optimizer.lr: 0.05 → 0.02; " \
               "choose another hydra.sweep.dir, or launch with the config it was made with" in lines
    assert snapshot(tmp_path / "sweep") == whole  # manifest.json and multirun.yaml included


def test_detached_mode_returns_at_once_and_collect_follows_the_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    start = time.perf_counter()
    proc = run_cli("-m", *SLURM, "hydra.launcher.detach=true", *FAST, "trainer.epochs=3", "coupling.alpha=0,2",
                   f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = manifest(sweep)["jobs"]
    assert len(jobs) == 2 and all(j["job_id"] and j["run_dir"] and j["submitted_at"] for j in jobs)
    early = collect([sweep])
    assert elapsed < 60 and not (early["status"] == "done").all()
    assert set(early["slurm_state"]) <= {"pending", "running", "completed"}
    assert set(early["slurm_state"]) & {"pending", "running"}
    for job in jobs:
        wait_for(lambda: (json.loads(open(f"{job['run_dir']}/results.json").read()) if
                          (sweep / job["run_dir"].split("/")[-1] / "results.json").exists() else {})
                 .get("status") == "done", timeout=300, what="the detached runs to finish")
    late = collect([sweep])
    assert list(late["slurm_state"]) == ["completed", "completed"]
    assert list(late["slurm_job_id"]) == [j["job_id"] for j in jobs]


def jobs_submitted_from(cwd) -> list[str]:
    """The ids of the jobs SLURM knows that were submitted from `cwd` (their working directory)."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%Z"], capture_output=True, text=True, check=True)
    return [line.split("|")[0] for line in out.stdout.splitlines() if line.split("|", 1)[1] == str(cwd)]


def cluster_fact(command, pattern) -> str:
    return re.search(pattern, subprocess.run(command, capture_output=True, text=True, check=True).stdout, re.M)[1]


def show_job(job_id) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout


def node_cpus() -> str:
    return cluster_fact(["sinfo", "-h", "-o", "%c"], r"^(\d+)")


REFUSED = {  # overrides after hydra/launcher=slurm -> the line (the test cluster: partition debug, no GPUs)
    "gpus on a cluster without any": (
        ["hydra.launcher.cpus_per_task=1"],
        "hydra.launcher.gpus_per_node=1: this cluster has no GPUs (no gres/gpu on any node): add "
        "hydra.launcher.gpus_per_node=0"),
    "two memory keys": (
        ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_per_cpu=1G",
         "hydra.launcher.mem_gb=2"],
        "hydra.launcher.mem_gb=2: conflicts with hydra.launcher.mem_per_cpu='1G': sbatch takes one memory key "
        "(mem_gb per node, mem_per_cpu or mem_per_gpu): set only one"),
    "an unknown partition": (
        ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.partition=nope"],
        "hydra.launcher.partition='nope': not a partition of this cluster: allowed: debug"),
    "more cpus than a node has": (
        ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1000"],
        "hydra.launcher.cpus_per_task=1000: the largest node of partition debug (the default) has {cpus} CPUs: "
        "set hydra.launcher.cpus_per_task={cpus} or less"),
    "no SLURM client on this machine": (
        ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1"],
        "hydra/launcher='slurm': sbatch and srun not on PATH (no SLURM client on this machine): launch from the "
        "cluster's login node, or leave out hydra/launcher=slurm to run the sweep here"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_sbatch_would_refuse_is_refused_in_one_line_before_anything_is_written_or_submitted(tmp_path, case):
    overrides, line = REFUSED[case]
    env = {"PATH": str(tmp_path / "bin")} if case == "no SLURM client on this machine" else None
    proc = run_cli("-m", "hydra/launcher=slurm", *overrides, *FAST, "coupling.alpha=0,2",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", f"dataset.root={tmp_path}", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"coupled_net: error: {line.format(cpus=node_cpus())}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no sweep dir, no multirun.yaml, no .submitit
    assert jobs_submitted_from(tmp_path) == []


def test_an_option_sbatch_refuses_ends_the_launch_in_one_line_with_sbatch_s_reason_and_submits_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *SLURM, "+hydra.launcher.additional_parameters.begin=garbage", *FAST, "coupling.alpha=0,2",
                   f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "coupled_net: error: sbatch refused jobs #0-#1: sbatch: error: Invalid --begin specification: check the "
        "sbatch options hydra.launcher sets (additional_parameters included) against `man sbatch` and the cluster "
        "(`sinfo`, `scontrol show config`); nothing was submitted"]
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]  # no manifest, no submitit pickles
    assert jobs_submitted_from(tmp_path) == []


def test_a_detached_sweep_larger_than_max_array_size_is_submitted_as_arrays_that_keep_the_users_sbatch_keys(
        tmp_path):
    """Held (--hold, through additional_parameters), so that nothing runs: what SLURM was given is
    read back with scontrol, then the jobs are cancelled."""
    sweep = tmp_path / "sweep"
    limit = int(cluster_fact(["scontrol", "show", "config"], r"^MaxArraySize\s*=\s*(\d+)"))
    seeds = ",".join(str(s) for s in range(1, limit + 3))  # limit + 2 runs: more than one array holds
    args = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",  # hydra-submitit-launcher's key: replaces our default mem_per_cpu
            "hydra.launcher.array_parallelism=1", "hydra.launcher.detach=true",
            "+hydra.launcher.additional_parameters.mail_type=END", "+hydra.launcher.additional_parameters.hold=true",
            *FAST, f"seed={seeds}", f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}"]
    proc = run_cli("-m", *args, cwd=tmp_path)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        jobs = manifest(sweep)["jobs"]
        assert sorted(o for j in jobs for o in j["overrides"] if o.startswith("seed=")) == \
            sorted(f"seed={s}" for s in range(1, limit + 3))
        assert len({j["run_dir"] for j in jobs}) == limit + 2
        arrays = {}
        for job in jobs:
            array, task = job["job_id"].split("_")
            arrays.setdefault(array, []).append(int(task))
        first, second = sorted(arrays, key=int)
        assert (arrays[first], arrays[second]) == (list(range(limit)), [0, 1])
        shown = {array: show_job(array) for array in arrays}
        for text in shown.values():
            assert re.search(r"JobName=(\S+)", text)[1] == "coupled_net:quickstart" and "MailType=END" in text
            assert "MinMemoryNode=1G" in text and "JobState=PENDING Reason=JobHeldUser" in text
            assert "ArrayTaskThrottle=1" in text  # array_parallelism=1 over the whole sweep: one at a time, ...
        assert f"Dependency=afterany:{first}_*" in shown[second]  # ... so the second array waits for the first
    finally:
        subprocess.run(["scancel", *jobs_submitted_from(tmp_path)], check=False)


def test_a_sweep_larger_than_max_array_size_runs_every_run_to_the_end(tmp_path):
    limit = int(cluster_fact(["scontrol", "show", "config"], r"^MaxArraySize\s*=\s*(\d+)"))
    seeds = list(range(1, limit + 2))  # one array of `limit` tasks, then a single job
    proc, sweep, runs = run_sweep(tmp_path, *SLURM, *FAST, "trainer.epochs=1", f"seed={','.join(map(str, seeds))}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(int(re.search(r"seed=(\d+)", r.name)[1]) for r in runs) == seeds
    assert [read_results(r)["status"] for r in runs] == ["done"] * len(seeds)
    jobs = manifest(sweep)["jobs"]
    assert sorted(j["run_dir"] for j in jobs) == sorted(str(r) for r in runs)
    assert len({j["job_id"].split("_")[0] for j in jobs}) == 2 and len({j["job_id"] for j in jobs}) == len(seeds)
    assert list(collect([sweep])["slurm_state"]) == ["completed"] * len(seeds)


def ddp_checks(run_dir):
    res = read_results(run_dir)
    assert (res["status"], res["world_size"]) == ("done", 2)
    digests = res["coupled_layer_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # KE kept the ranks' coupled layers identical
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1, 2]  # one row per epoch: rank 0 writes
    import torch

    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    w = best["features.0.weight"]
    assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3]) and not torch.equal(w[4], w[5])
    return res


def test_ddp_with_two_gloo_ranks_from_torchrun(tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(TRAIN), *FAST,
            "trainer.epochs=2", "coupling.alpha=2", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
            f"dataset.root={tmp_path}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = ddp_checks(tmp_path / "run")
    assert res["metrics"]["val"]["top1"] >= 0


def test_ddp_with_two_slurm_tasks(tmp_path):
    proc = run_cli("-m", *SLURM, "hydra.launcher.tasks_per_node=2", *FAST, "trainer.epochs=2", "coupling.alpha=2",
                   "trainer.device=cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"dataset.root={tmp_path}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "sweep")
    ddp_checks(run_dir)
