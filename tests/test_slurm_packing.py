"""Several runs per SLURM array task (hydra.launcher.runs_per_task, issue 19) on the real one-node
cluster: each packed run is a run like any other (its directory, lock, results, resume), trained at
once with its task-mates on the task's allocation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TRAIN, read_results, run_cli, run_dirs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_per_cpu=1G",
         "hydra.launcher.timeout_min=20"]
RUNS = ["experiment=quickstart", "dataset.train_per_class=100", "dataset.test_per_class=10", "trainer.epochs=3",
        "coupling.alpha=0,2", "seed=0,1"]


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "epochs.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T|%r"], capture_output=True,
                          text=True).stdout.strip()


def release(task: str) -> None:
    """A requeued task is held ~2 min (BeginTime) unless released; KillWait is 2 s: let the old
    incarnation go first (see tests/test_slurm.py)."""
    wait_for(lambda: squeue(task) == "PENDING|BeginTime", every=0.2, what=f"{task} requeued and held")
    time.sleep(4)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)


def test_four_runs_packed_two_per_task_survive_a_requeue_and_a_preemption_and_equal_the_runs_alone(tmp_path):
    packed = tmp_path / "packed"
    proc = subprocess.Popen([sys.executable, str(TRAIN), "-m", *SLURM, "hydra.launcher.cpus_per_task=2",
                             "hydra.launcher.runs_per_task=2", *RUNS, f"hydra.sweep.dir={packed}",
                             f"dataset.root={tmp_path}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    jobs = wait_for(lambda: (packed / "manifest.json").exists() and json.loads(
        (packed / "manifest.json").read_text())["jobs"], what="the manifest")
    tasks = sorted({j["job_id"] for j in jobs})
    assert len(jobs) == 4 and len(tasks) == 2  # 4 runs, 2 array tasks
    runs_of = {t: [Path(j["run_dir"]) for j in jobs if j["job_id"] == t] for t in tasks}
    assert [len(r) for r in runs_of.values()] == [2, 2]
    # the first task: a hard requeue (a node failure, as SLURM sees it) once both runs have an epoch
    wait_for(lambda: all(epochs_done(d) >= 1 for d in runs_of[tasks[0]]), what="an epoch of the first task's runs")
    subprocess.run(["scontrol", "requeue", tasks[0]], check=True)
    release(tasks[0])
    # the second: SLURM's pre-timeout / preemption signal, which each run takes at its step's end
    wait_for(lambda: all(epochs_done(d) >= 1 for d in runs_of[tasks[1]]), what="an epoch of the second task's runs")
    subprocess.run(["scancel", "--signal=USR2", tasks[1]], check=True)
    release(tasks[1])
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    for run_dir in runs_of[tasks[1]]:
        assert "caught SIGUSR2: saving a checkpoint at the end of this step; this run's SLURM task requeues it" \
            in (run_dir / "train.log").read_text()

    alone = tmp_path / "alone"
    solo = run_cli("-m", *SLURM, "hydra.launcher.cpus_per_task=1", *RUNS, f"hydra.sweep.dir={alone}",
                   f"dataset.root={tmp_path}", cwd=tmp_path)
    assert solo.returncode == 0, solo.stdout[-3000:] + solo.stderr[-3000:]
    assert len({j["job_id"] for j in json.loads((alone / "manifest.json").read_text())["jobs"]}) == 4

    for p, a in zip(run_dirs(packed), run_dirs(alone), strict=True):
        rp, ra = read_results(p), read_results(a)
        assert p.name == a.name and (rp["status"], ra["status"]) == ("done", "done")
        assert rp["metrics"] == ra["metrics"]  # one thread each, packed or not, interrupted or not
        sharing = rp["provenance"]["sharing"]
        assert (sharing["shared_by"], sharing["packed_in"]) == (2, "slurm task")
        assert ra["provenance"]["sharing"]["packed_in"] is None
        assert rp["owner"]["slurm_job_id"] == next(j["job_id"] for j in jobs if j["run_dir"] == str(p))
        assert (rp["resumes"], ra["resumes"], rp["epochs_run"]) == (1, 0, 3)


def test_a_run_failing_inside_a_task_leaves_its_task_mate_done(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *SLURM, "hydra.launcher.cpus_per_task=2", "hydra.launcher.runs_per_task=2",
                   "experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10",
                   "trainer.epochs=1", "coupling.alpha=0", "model.width=8",
                   "model._target_=helpers.ownmodels.FailsOnRealData,coupled_net.models.build_model",
                   f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path,
                   env={"PYTHONPATH": f"{REPO / 'tests'}:{REPO}"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len({j["job_id"] for j in json.loads((sweep / "manifest.json").read_text())["jobs"]}) == 1
    statuses = {"FailsOnRealData" in d.name: read_results(d)["status"] for d in run_dirs(sweep)}
    assert statuses == {True: "failed", False: "done"}
    assert "1 of 2 runs failed in" in proc.stderr
