"""DistributedDataParallel under SLURM's pre-timeout signal (issue 11, item 7): a 2-task job (2 gloo
ranks) signalled mid-epoch checkpoints at one step boundary on every rank, is requeued, resumes at
that step and ends with the metrics of an uninterrupted job. On the real one-node cluster
(.ci/slurm_up.sh)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import TRAIN, epoch_numbers, metric_table, read_results, run_cli, run_dirs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

SLURM_DDP = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_per_cpu=1G", "hydra.launcher.timeout_min=20", "hydra.launcher.tasks_per_node=2"]
# about 50 training steps of 0.15 s an epoch per rank here
DDP = ["experiment=quickstart", "dataset.train_per_class=300", "dataset.test_per_class=10", "trainer.epochs=2",
       "coupling.alpha=2", "trainer.device=cpu"]


def squeue(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True)
    return out.stdout.strip()


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "epochs.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_a_ddp_job_signalled_mid_epoch_requeues_resumes_at_that_step_and_matches_an_uninterrupted_job(tmp_path):
    whole = run_cli("-m", *SLURM_DDP, *DDP, f"hydra.sweep.dir={tmp_path / 'a'}", f"dataset.root={tmp_path}",
                    cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    (reference,) = run_dirs(tmp_path / "a")

    sweep = tmp_path / "b"  # the cluster's 2 CPUs hold one 2-task job at a time: after a, not beside it
    proc = subprocess.Popen([sys.executable, str(TRAIN), "-m", *SLURM_DDP, *DDP, f"hydra.sweep.dir={sweep}",
                             f"dataset.root={tmp_path}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job = wait_for(lambda: (sweep / "manifest.json").exists() and json.loads((sweep / "manifest.json").read_text()),
                   what="the manifest")["jobs"][0]
    run_dir = Path(job["run_dir"])
    wait_for(lambda: epochs_done(run_dir) >= 1, what="the first epoch")
    time.sleep(1.5)  # a few steps into epoch 2's training
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)  # what SLURM sends before a timeout
    # requeued jobs are held ~2 min (BeginTime): release it once the hold has settled (KillWait is 2 s here)
    wait_for(lambda: squeue(job["job_id"]) == "PENDING|BeginTime", every=0.2, what="the job requeued and held")
    time.sleep(4)
    subprocess.run(["scontrol", "update", f"JobId={job['job_id']}", "StartTime=now"], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]

    log = (run_dir / "train.log").read_text()
    assert "caught SIGUSR2: saving a checkpoint at the end of this step" in log
    resumed = re.search(r"after step (\d+) of epoch 2 \(resume #1\)", log)
    assert resumed and 0 < int(resumed[1]) < 50, log[-3000:]  # mid-epoch, at the step it stopped at
    res, ref = read_results(run_dir), read_results(reference)
    assert (res["status"], res["resumes"], res["world_size"]) == ("done", 1, 2)
    assert epoch_numbers(run_dir) == [1, 2]
    pd.testing.assert_frame_equal(metric_table(run_dir), metric_table(reference))
    assert res["metrics"] == ref["metrics"]
