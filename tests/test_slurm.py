"""The sweep as SLURM jobs on a real one-node cluster (.ci/slurm_up.sh brings it up; no mocked
sbatch): run dirs like a local sweep's, hard requeue, the pre-timeout signal, finishing a sweep,
detached mode; and DistributedDataParallel with 2 gloo ranks, from torchrun and from SLURM tasks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from coupled_net.collect import collect
from helpers import REPO, TRAIN, read_results, run_cli, run_dirs, snapshot, wait_for

pytestmark = pytest.mark.slow

SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_per_cpu=1G", "hydra.launcher.timeout_min=20"]
FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The real one-node SLURM cluster (started here if .ci/run has not already)."""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm_up.sh")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


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
    for s, l in zip(run_dirs(tmp_path / "slurm"), run_dirs(tmp_path / "local")):
        assert s.name == l.name
        files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
        assert files(s) == files(l)
        rs, rl = read_results(s), read_results(l)
        assert rs.keys() == rl.keys() and rs["status"] == "done" and rs["epochs_run"] == 2
        assert list(pd.read_csv(s / "epochs.csv").columns) == list(pd.read_csv(l / "epochs.csv").columns)
        assert rs["provenance"]["slurm_job_id"] == jobs[str(s)] and rl["provenance"]["slurm_job_id"] is None
    assert (tmp_path / "slurm" / "summary.md").is_file()


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
    ea = pd.read_csv(a / "epochs.csv").drop(columns=["epoch_time_s", "ke_time_s", "ke_eval_time_s"])
    eb = pd.read_csv(b / "epochs.csv").drop(columns=["epoch_time_s", "ke_time_s", "ke_eval_time_s"])
    pd.testing.assert_frame_equal(ea, eb)


def test_relaunching_a_slurm_sweep_submits_only_unfinished_runs_and_refuses_another_config(tmp_path):
    preset = tmp_path / "conf" / "experiment" / "mine.yaml"  # a user's own preset (--config-dir)
    preset.parent.mkdir(parents=True)
    preset.write_text((REPO / "conf" / "experiment" / "quickstart.yaml").read_text())
    args = ["-cd", str(tmp_path / "conf"), *SLURM, "experiment=mine", *FAST[1:], "trainer.epochs=2", "coupling.alpha=0,2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"dataset.root={tmp_path}"]
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
    assert lines[-1] == f"coupled_net: error: 2 conflict(s) in sweep {tmp_path / 'sweep'} (listed above): nothing was " \
                        "started or submitted"
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
