"""SPEC §8: bad input refused before training with one line naming the key; kill-safe resume;
unreadable checkpoints; divergence and failures isolated within a sweep."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from coupled_net.collect import collect
from coupled_net.run import run
from coupled_net.trainer import Trainer
from helpers import TRAIN, compose_cfg, epoch_numbers, metric_table, read_results, run_cli, run_sweep

FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10"]

BAD_INPUT = [
    (["coupling.alpha=1000"], "coupling.alpha=1000: at most "),
    (["coupling.alpha=-1"], "coupling.alpha=-1: must be an integer >= 0"),
    (["coupling.layer=no.such.layer"], "coupling.layer='no.such.layer': not a Conv2d of this model"),
    (["coupling.mode=sideways"], "coupling.mode='sideways': allowed: copy, mean"),
    (["trainer.batch_size=-5"], "trainer.batch_size=-5: must be an integer >= 1"),
    (["dataset.val_fraction=1.5"], "dataset.val_fraction=1.5: must be a number strictly between 0 and 1"),
    (["dataset=image_folder", "dataset.root=/nonexistent/data"], "dataset.root='/nonexistent/data': must be a readable directory"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be an integer >= 1"),
    (["model=no_such_model"], "model='no_such_model': allowed: alexnet, resnet18, small_cnn, vgg11"),
    (["model=alexnet", "model.input_size=28"], "model.input_size=28: alexnet needs images of at least 63 pixels"),
    (["trainer.device=cuda"], "trainer.device='cuda': no CUDA GPU is visible to this process"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be a number > 0"),
    (["dataset=no_such_data"], "dataset='no_such_data': allowed: cifar10, emnist_letters"),
]


@pytest.mark.slow
@pytest.mark.parametrize("preset", [[], ["experiment=quickstart"]], ids=["default", "quickstart"])
@pytest.mark.parametrize("overrides, message", BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_is_refused_with_one_line_before_training(tmp_path, preset, overrides, message):
    if "model=alexnet" in overrides and preset == []:
        overrides = overrides[1:]  # alexnet is the default model
    start = time.perf_counter()
    proc = run_cli(*preset, *overrides, f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path / 'data'}"
                   if "dataset=image_folder" not in overrides else "seed=42", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"coupled_net: error: {message}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "epochs.csv").exists()
    assert not (tmp_path / "data").exists()  # nothing was downloaded or generated into the root
    print(f"{' '.join(preset + overrides)}: exit {proc.returncode} after {time.perf_counter() - start:.1f}s: {last}")


@pytest.mark.slow
def test_sigkill_after_the_second_epoch_then_the_same_command_finishes_it(tmp_path):
    common = [*FAST, "dataset.train_per_class=150", "trainer.epochs=4", "coupling.alpha=2",
              f"dataset.root={tmp_path}"]
    whole = run_cli(*common, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]

    args = [sys.executable, str(TRAIN), *common, f"hydra.run.dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = tmp_path / "killed" / "epochs.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if rows.exists() and len(rows.read_text().splitlines()) >= 3:  # header + epochs 1 and 2
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert read_results(tmp_path / "killed")["status"] == "running"  # it could not say otherwise
    assert collect([tmp_path / "killed"]).iloc[0]["status"] == "stale"  # its owner is gone: never shown as running

    again = run_cli(*common, f"hydra.run.dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    killed = read_results(tmp_path / "killed")
    assert (killed["status"], killed["resumes"]) == ("done", 1)
    assert epoch_numbers(tmp_path / "killed") == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(metric_table(tmp_path / "killed"), metric_table(tmp_path / "whole"))
    assert killed["metrics"] == read_results(tmp_path / "whole")["metrics"]


def crash_after_epoch(monkeypatch, epoch):
    real_save = Trainer._save_last

    def save_then_die(self, progress):
        real_save(self, progress)
        if progress.epoch == epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_save_last", save_then_die)
    return real_save


@pytest.mark.parametrize("damage", ["last", "all"])
def test_an_unreadable_last_checkpoint_falls_back_instead_of_crashing(tmp_path, monkeypatch, caplog, damage):
    caplog.set_level(logging.INFO)
    overrides = (*FAST, "trainer.epochs=3", "trainer.checkpoint_every=1", f"dataset.root={tmp_path}")
    whole = run(compose_cfg(*overrides), tmp_path / "whole")
    real_save = crash_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(*overrides), tmp_path / "run")
    monkeypatch.setattr(Trainer, "_save_last", real_save)
    ckpts = tmp_path / "run" / "checkpoints"
    targets = [ckpts / "last.pt"] + (sorted(ckpts.glob("epoch_*.pt")) if damage == "all" else [])
    for path in targets:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated mid-write

    res = run(compose_cfg(*overrides), tmp_path / "run")
    assert "checkpoint" in caplog.text and "is unreadable" in caplog.text
    assert res["status"] == "done"
    assert epoch_numbers(tmp_path / "run") == [1, 2, 3]
    if damage == "last":
        assert res["resumes"] == 1 and "resuming from" in caplog.text and "epoch_002.pt" in caplog.text
    else:
        assert res["resumes"] == 0 and "starting from scratch" in caplog.text
    assert res["metrics"] == whole["metrics"]  # either way, the same result as an uninterrupted run


@pytest.mark.slow
def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc, sweep, runs = run_sweep(tmp_path, *FAST, "trainer.epochs=2", "optimizer.lr=1e9,0.01")
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_lr = {float(p.name.split("optimizer.lr=")[1].split(",")[0]): read_results(p) for p in runs}
    diverged, done = by_lr[1e9], by_lr[0.01]
    assert (diverged["status"], diverged["epochs_run"]) == ("diverged", 1)
    assert diverged["error"] == "training loss became non-finite at epoch 1"
    assert (done["status"], done["epochs_run"]) == ("done", 2)
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["status"]) == ["diverged", "done"]


@pytest.mark.slow
@pytest.mark.parametrize("bad, error", [
    ("optimizer.momentum=-1", "ValueError: Invalid momentum value: -1"),          # raises while building the run
    ("coupling.alpha=17", "coupling.alpha=17: at most 16: layer features.0 has 32 filters"),  # bad input
], ids=["raises", "bad-input"])
def test_a_failing_run_is_recorded_and_the_sweep_exits_non_zero_naming_it(tmp_path, bad, error):
    key, value = bad.split("=")
    good = "0.9" if key == "optimizer.momentum" else "2"
    proc, sweep, runs = run_sweep(tmp_path, *FAST, "trainer.epochs=1", f"{key}={value},{good}")
    (failed_dir,) = [p for p in runs if f"{key}={value}," in p.name]
    (done_dir,) = [p for p in runs if f"{key}={good}," in p.name]
    assert proc.returncode == 1
    failed = read_results(failed_dir)
    assert (failed["status"], failed["error"]) == ("failed", error)
    if key == "optimizer.momentum":
        assert "Traceback" in (failed_dir / "train.log").read_text()
    assert read_results(done_dir)["status"] == "done"  # ran after the failure
    assert sorted(pd.read_csv(sweep / "summary.csv")["status"]) == ["done", "failed"]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"coupled_net: error: 1 of 2 runs failed in {sweep}: {failed_dir.name} (failed: {error})"
