"""Whole runs: the quickstart sweep through the real CLI, the run directory's contract, bad input,
"already done", determinism and resume."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from coupled_net.identify import identity_of
from coupled_net.epochlog import EPOCH_COLUMNS
from coupled_net.errors import RunRefused
from coupled_net.lifecycle import execute_run
from coupled_net.monitor import COLUMNS
from coupled_net.trainer import Trainer
from helpers import compose_cfg, run_cli, run_sweep

FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10"]
RESULT_KEYS = {"status", "stopped_early", "epochs_run", "best_epoch", "resumes", "model", "dataset", "alpha",
               "coupling_mode", "coupling_schedule", "seed", "metrics", "ke_time_s_mean", "epoch_time_s_mean",
               "total_time_s", "error", "provenance", "fingerprint", "identity", "labels", "owner", "heartbeat_at",
               "peak_memory_mb", "peak_reserved_mb"}
PROVENANCE_KEYS = {"git_commit", "git_dirty", "python", "torch", "torchvision", "device", "host", "slurm_job_id"}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def proc_pid(run_dir):
    """The pid that owned `run_dir`, as its .lock file recorded it."""
    return json.loads((run_dir / ".lock").read_text())["pid"]


def metric_rows(run_dir):
    """epochs.csv without the timing columns."""
    rows = read_rows(run_dir / "epochs.csv")
    keep = [i for i, c in enumerate(rows[0]) if not c.endswith("_time_s")]
    return [[row[i] for i in keep] for row in rows]


@pytest.mark.slow
def test_quickstart_sweep_through_the_cli(tmp_path):
    proc, sweep, run_dirs = run_sweep(tmp_path, *FAST, "coupling.alpha=0,2", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run's identity overrides, sorted by key; no job number, dataset.root (where, not what) left out
    common = "dataset.test_per_class=10,dataset.train_per_class=40,experiment=quickstart,trainer.epochs=2"
    assert [p.name for p in run_dirs] == [f"coupling.alpha=0,{common}", f"coupling.alpha=2,{common}"]
    for alpha, run_dir in zip((0, 2), run_dirs):
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "epochs.csv", "results.json",
                     "system.csv", "model_summary.txt", "checkpoints/last.pt", "checkpoints/best.pt",
                     "checkpoints/epoch_002.pt"):
            assert (run_dir / name).is_file(), name
        rows = read_rows(run_dir / "epochs.csv")
        assert rows[0][:len(EPOCH_COLUMNS)] == EPOCH_COLUMNS
        assert [r[0] for r in rows[1:]] == ["1", "2"]
        res = json.loads((run_dir / "results.json").read_text())
        assert RESULT_KEYS <= res.keys() and PROVENANCE_KEYS <= res["provenance"].keys()
        # its identity, in results.json and in every checkpoint
        cfg = compose_cfg(*FAST, f"coupling.alpha={alpha}", "trainer.epochs=2", f"dataset.root={tmp_path}")
        assert res["fingerprint"] == identity_of(cfg).fingerprint and res["identity"]["coupling.alpha"] == alpha
        for name in ("last.pt", "epoch_002.pt"):
            assert torch.load(run_dir / "checkpoints" / name, weights_only=False)["fingerprint"] == res["fingerprint"]
        best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
        assert best._metadata["coupled_net"] == {"fingerprint": res["fingerprint"], "epoch": res["best_epoch"]}
        assert (res["owner"]["host"], res["owner"]["slurm_job_id"]) == (res["provenance"]["host"], None)
        assert res["owner"]["pid"] == proc_pid(run_dir) and res["heartbeat_at"] >= res["started_at"]
        assert (res["status"], res["alpha"], res["epochs_run"], res["resumes"]) == ("done", alpha, 2, 0)
        assert (res["model"], res["dataset"], res["seed"]) == ("small_cnn", "synthetic_letters", 42)
        for split in ("val", "test"):
            m = res["metrics"][split]
            assert 0 <= m["top1"] <= m["top5"] <= 100 and m["loss"] > 0
        system = read_rows(run_dir / "system.csv")
        assert system[0] == ["epoch", "time"] + COLUMNS and [r[0] for r in system[1:]] == ["1", "2"]  # one row an epoch
        for row in (dict(zip(system[0], r)) for r in system[1:]):
            assert int(row["samples"]) >= 2 and 0 <= float(row["cpu_percent_mean"]) <= 100
            assert row["gpu_util_percent_max"] == row["peak_memory_mb"] == ""  # no GPU here: empty cells
        assert (res["peak_memory_mb"], res["provenance"]["gpu"]) == (None, None)
        summary = (run_dir / "model_summary.txt").read_text()
        assert "Total params" in summary and f"alpha={alpha}" in summary
        assert "epoch 2/2" in (run_dir / "train.log").read_text()


def test_alpha_too_large_is_refused_before_training(tmp_path):
    proc = run_cli(*FAST, "coupling.alpha=17", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "coupled_net: error: coupling.alpha=17: at most 16: layer features.0 has 32 filters"
    assert not (tmp_path / "run" / "epochs.csv").exists()
    assert "Traceback" not in proc.stderr


def test_a_finished_run_is_not_run_again(tmp_path):
    args = (*FAST, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}")
    first = run_cli(*args, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: (tmp_path / "run" / p).read_bytes() for p in ("epochs.csv", "results.json", "checkpoints/best.pt")}
    second = run_cli(*args, cwd=tmp_path, timeout=300)
    assert second.returncode == 0
    assert "already holds a finished run (status: done); nothing to do" in second.stdout
    assert {p: (tmp_path / "run" / p).read_bytes() for p in before} == before


def test_same_config_and_seed_give_identical_epoch_tables(tmp_path):
    overrides = (*FAST, "coupling.alpha=2", "trainer.epochs=2", f"dataset.root={tmp_path}")
    execute_run(compose_cfg(*overrides), tmp_path / "a")
    execute_run(compose_cfg(*overrides), tmp_path / "b")
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    execute_run(compose_cfg(*overrides, "seed=7"), tmp_path / "c")
    assert metric_rows(tmp_path / "a") != metric_rows(tmp_path / "c")


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    overrides = (*FAST, "coupling.alpha=2", "trainer.epochs=3", "trainer.checkpoint_every=1",
                 f"dataset.root={tmp_path}")
    whole = execute_run(compose_cfg(*overrides), tmp_path / "whole")

    real_save = Trainer._save_last

    def save_then_die(self, progress, *args, **kwargs):
        real_save(self, progress, *args, **kwargs)
        if progress.epoch == 2:
            raise KeyboardInterrupt  # like a kill: not caught by the run
    monkeypatch.setattr(Trainer, "_save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*overrides), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["status"] == "running"
    monkeypatch.setattr(Trainer, "_save_last", real_save)

    resumed = execute_run(compose_cfg(*overrides), tmp_path / "resumed")
    assert (resumed["status"], resumed["resumes"], resumed["epochs_run"]) == ("done", 1, 3)
    assert [r[0] for r in read_rows(tmp_path / "resumed" / "epochs.csv")[1:]] == ["1", "2", "3"]
    assert metric_rows(tmp_path / "resumed") == metric_rows(tmp_path / "whole")
    assert resumed["metrics"] == whole["metrics"]
    best_a = torch.load(tmp_path / "whole" / "checkpoints" / "best.pt", weights_only=True)
    best_b = torch.load(tmp_path / "resumed" / "checkpoints" / "best.pt", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_rows_written_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, monkeypatch):
    # last.pt every 2 epochs: epoch 3's row is written with no checkpoint after epoch 2's
    overrides = (*FAST, "trainer.epochs=4", "trainer.last_every=2", "trainer.checkpoint_every=null",
                 f"dataset.root={tmp_path}")
    real_save = Trainer._save_last
    saved = []

    def die_before_fourth_checkpoint(self, progress, *args, **kwargs):
        if progress.epoch == 4:
            raise KeyboardInterrupt  # epoch 3's row is on disk, no checkpoint of epoch 3 or 4 is
        saved.append(progress.epoch)
        real_save(self, progress, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_save_last", die_before_fourth_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*overrides), tmp_path / "run")
    assert saved == [2]  # last.pt at the last_every-th epoch only
    assert [r[0] for r in read_rows(tmp_path / "run" / "epochs.csv")[1:]] == ["1", "2", "3"]
    monkeypatch.setattr(Trainer, "_save_last", real_save)
    res = execute_run(compose_cfg(*overrides), tmp_path / "run")
    assert (res["status"], res["resumes"], res["epochs_run"]) == ("done", 1, 4)
    assert [r[0] for r in read_rows(tmp_path / "run" / "epochs.csv")[1:]] == ["1", "2", "3", "4"]  # 3 once: replayed


def test_a_dataset_that_cannot_be_downloaded_fails_at_once_with_the_ways_out(tmp_path):
    closed = "http://127.0.0.1:9"  # nothing listens there: every download fails immediately, network or not
    proc = run_cli("dataset=mnist", "model=small_cnn", f"dataset.root={tmp_path / 'data'}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120,
                   env={"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"coupled_net: error: dataset=mnist: not found in {tmp_path / 'data'}")
    assert "launch/prepare.py dataset=mnist" in last and "dataset.root=" in last and "dataset=synthetic_letters" in last
    assert not (tmp_path / "run" / "epochs.csv").exists()


def test_a_directory_whose_run_failed_before_training_is_taken_over_by_another_config(tmp_path, monkeypatch):
    from coupled_net.models import SmallCNN

    def broken(self, epoch, progress):
        raise RuntimeError("the first step failed")
    real = Trainer.train_one_epoch
    monkeypatch.setattr(Trainer, "train_one_epoch", broken)
    failed = execute_run(compose_cfg(*FAST, "coupling.alpha=2", "trainer.epochs=1", f"dataset.root={tmp_path}"),
                 tmp_path / "run")
    assert (failed["status"], failed["epochs_run"], failed["error"]) == ("failed", 0, "RuntimeError: the first step failed")
    assert (tmp_path / "run" / "model_summary.txt").exists()  # it got that far; nothing was trained
    monkeypatch.setattr(Trainer, "train_one_epoch", real)

    fixed = execute_run(compose_cfg(*FAST, "coupling.alpha=2", "model.width=16", "trainer.epochs=1", f"dataset.root={tmp_path}"),
                tmp_path / "run")
    assert (fixed["status"], fixed["resumes"], fixed["identity"]["model.width"]) == ("done", 0, 16)
    params = sum(p.numel() for p in SmallCNN(1, 26, 16).parameters())
    assert f"Total params: {params:,}" in (tmp_path / "run" / "model_summary.txt").read_text()  # its own summary
    assert [r[0] for r in read_rows(tmp_path / "run" / "system.csv")[1:]] == ["1"]  # the fixed run's epoch (the failed start wrote none)
    with pytest.raises(RunRefused, match="coupling.alpha: 2 → 3"):  # but a trained run is never taken over
        execute_run(compose_cfg(*FAST, "coupling.alpha=3", "trainer.epochs=1", f"dataset.root={tmp_path}"), tmp_path / "run")


def test_the_heartbeat_is_refreshed_while_a_run_lives(tmp_path, monkeypatch):
    import coupled_net.rundir as run_module
    from coupled_net.results import RunFiles

    monkeypatch.setattr(run_module, "HEARTBEAT_S", 0.05)
    writes, during_fit = [], []
    real_write, real_fit = RunFiles.write_results, Trainer.fit
    monkeypatch.setattr(RunFiles, "write_results", lambda self, r: (writes.append(r["heartbeat_at"]), real_write(self, r)))

    def slow_fit(self, progress):  # half a second in which the run itself writes nothing
        before = len(writes)
        time.sleep(0.5)
        during_fit.append(len(writes) - before)
        return real_fit(self, progress)
    monkeypatch.setattr(Trainer, "fit", slow_fit)
    execute_run(compose_cfg(*FAST, "trainer.epochs=1", "dataset.train_per_class=4", "trainer.batch_size=88",
                    f"dataset.root={tmp_path}"), tmp_path / "run")
    assert during_fit[0] >= 3  # the heartbeat thread's writes, every 0.05 s
    assert json.loads((tmp_path / "run" / "results.json").read_text())["heartbeat_at"] == writes[-1]
