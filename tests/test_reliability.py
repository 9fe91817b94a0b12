"""SPEC §8: bad input refused before training with one line naming the key; kill-safe resume;
unreadable checkpoints; divergence and failures isolated within a sweep; files consistent after a
kill at any point (system.csv rows, best.pt against last.pt, garbage lines in epochs.csv); under
DDP a stop signal to one rank stops all of them at one step boundary."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from coupled_net.collect import collect
from coupled_net.lifecycle import execute_run
from coupled_net.signals import RunInterrupted
from coupled_net.trainer import Trainer
from helpers import TRAIN, compose_cfg, epoch_numbers, metric_table, read_results, run_cli, run_sweep, wait_for

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
    (["model=no_such_model"], "model='no_such_model': allowed: alexnet, resnet18, small_cnn, timm, torchvision, vgg11"),
    (["model=alexnet", "model.input_size=28"], "model.input_size=28: alexnet needs images of at least 63 pixels"),
    (["trainer.device=cuda"], "trainer.device='cuda': no CUDA GPU is visible to this process"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be a number > 0"),
    (["dataset=no_such_data"], "dataset='no_such_data': allowed: cifar10, cifar100, emnist_letters"),
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

    def save_then_die(self, progress, *args, **kwargs):
        real_save(self, progress, *args, **kwargs)
        if progress.epoch == epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_save_last", save_then_die)
    return real_save


def kill_after_epoch(monkeypatch, epoch):
    """A kill once `epoch` is wholly done: its checkpoints and its epochs.csv row are written."""
    real = Trainer._one_epoch

    def one_epoch_then_die(self, progress):
        real(self, progress)
        if progress.epoch == epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_one_epoch", one_epoch_then_die)


@pytest.mark.parametrize("damage", ["last", "all"])
def test_an_unreadable_last_checkpoint_falls_back_instead_of_crashing(tmp_path, monkeypatch, caplog, damage):
    caplog.set_level(logging.INFO)
    overrides = (*FAST, "trainer.epochs=3", "trainer.checkpoint_every=1", f"dataset.root={tmp_path}")
    whole = execute_run(compose_cfg(*overrides), tmp_path / "whole")
    real_save = crash_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*overrides), tmp_path / "run")
    monkeypatch.setattr(Trainer, "_save_last", real_save)
    ckpts = tmp_path / "run" / "checkpoints"
    targets = [ckpts / "last.pt"] + (sorted(ckpts.glob("epoch_*.pt")) if damage == "all" else [])
    for path in targets:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated mid-write

    res = execute_run(compose_cfg(*overrides), tmp_path / "run")
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
@pytest.mark.parametrize("files, error", [
    ({}, "dataset=mnist: not found in"),                                    # bad input, found in the run
    ({"MNIST/raw/" + f: b"garbage!" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
     "AssertionError: (no message) at mnist.py:"),                          # raises while loading the data
], ids=["bad-input", "raises"])
def test_a_failing_run_is_recorded_and_the_sweep_exits_non_zero_naming_it(tmp_path, files, error):
    for name, blob in files.items():  # run_sweep's data root is tmp_path
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    # every config of the sweep is valid: the mnist run finds out only when it loads its data
    proc, sweep, runs = run_sweep(tmp_path, "experiment=quickstart", "trainer.epochs=1", "dataset.download=false",
                                  "dataset=mnist,synthetic_letters")
    (failed_dir,) = [p for p in runs if "dataset=mnist" in p.name]
    (done_dir,) = [p for p in runs if "dataset=synthetic_letters" in p.name]
    assert proc.returncode == 1
    failed = read_results(failed_dir)
    assert failed["status"] == "failed" and failed["error"].startswith(error), failed["error"]
    if files:
        assert "Traceback" in (failed_dir / "train.log").read_text()
        assert "Traceback" not in proc.stdout + proc.stderr  # the terminal gets one line
    assert read_results(done_dir)["status"] == "done"  # ran after the failure
    assert sorted(pd.read_csv(sweep / "summary.csv")["status"]) == ["done", "failed"]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"coupled_net: error: 1 of 2 runs failed in {sweep}: {failed_dir.name} (failed: {failed['error']})"


# ---- files consistent after any kill (issue 11, item 8) ------------------------------------------

SMALL = (*FAST, "dataset.train_per_class=12", "dataset.test_per_class=4", "trainer.batch_size=32", "trainer.epochs=3",
         "trainer.checkpoint_every=1")  # 265 training images: 9 steps an epoch


def system_rows(run_dir):
    with open(run_dir / "system.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_cpu_system_rows(run_dir, whole_epochs):
    """system.csv of a CPU run: one row an epoch, each the monitor's readings from the epoch's start
    to its end (at least those two), the GPU's cells empty; an epoch trained in one go (`whole_epochs`)
    lasted at least its training, validations and equalization (epochs.csv's times)."""
    rows = system_rows(run_dir)
    with open(run_dir / "epochs.csv", newline="") as f:
        epochs = {int(r["epoch"]): r for r in csv.DictReader(f)}
    assert [int(r["epoch"]) for r in rows] == sorted(epochs)
    for r in rows:
        assert int(r["samples"]) >= 2 and float(r["duration_s"]) > 0
        assert 0 <= float(r["cpu_percent_mean"]) <= 100 and 0 < float(r["ram_percent_max"]) <= 100
        assert {k: v for k, v in r.items() if k.startswith("gpu_") or k.startswith("peak_")} == {
            "gpu_util_percent_mean": "", "gpu_util_percent_max": "", "gpu_mem_used_mb_mean": "",
            "gpu_mem_used_mb_max": "", "gpu_mem_total_mb": "", "gpu_temp_c_max": "", "peak_memory_mb": "",
            "peak_reserved_mb": ""}
    for epoch in whole_epochs:
        e = epochs[epoch]
        assert float(rows[epoch - 1]["duration_s"]) >= float(e["epoch_time_s"]) + float(e["ke_eval_time_s"]) - 0.002


def best_pt(run_dir):
    """best.pt's tensors and the epoch its metadata records."""
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    return dict(state), state._metadata["coupled_net"]["epoch"]


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sigint_at(monkeypatch, epoch, step):
    """A real SIGINT to this process once `step` of `epoch` has finished training."""
    real_train, real_agreed = Trainer.train_one_epoch, Trainer._stop_agreed
    now = {}

    def train(self, e, progress):
        now["epoch"] = e
        return real_train(self, e, progress)

    def agreed(self, s):
        if (now["epoch"], s) == (epoch, step):
            signal.raise_signal(signal.SIGINT)
        return real_agreed(self, s)
    monkeypatch.setattr(Trainer, "train_one_epoch", train)
    monkeypatch.setattr(Trainer, "_stop_agreed", agreed)


def kill_before_last_pt(monkeypatch, epoch):
    real = Trainer._save_last

    def die(self, progress, *args, **kwargs):
        if progress.epoch == epoch and not progress.partial:
            raise KeyboardInterrupt  # the epoch trained, its checkpoint (and so its epochs.csv row) is not written
        real(self, progress, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_save_last", die)


@pytest.fixture(scope="module")
def small_whole(tmp_path_factory):
    """SMALL run uninterrupted: (run dir, results)."""
    base = tmp_path_factory.mktemp("small")
    return base / "run", execute_run(compose_cfg(*SMALL, f"dataset.root={base}"), base / "run")


@pytest.mark.parametrize("kill", ["before last.pt of epoch 2", "after last.pt of epoch 2",
                                  "SIGINT at step 3 of epoch 2"])
def test_system_csv_has_one_row_per_epoch_after_a_resume(tmp_path, monkeypatch, small_whole, kill):
    cfg = compose_cfg(*SMALL, f"dataset.root={tmp_path}")
    with monkeypatch.context() as m:
        if kill.startswith("SIGINT"):
            sigint_at(m, epoch=2, step=3)
        elif kill.startswith("before"):
            kill_before_last_pt(m, epoch=2)
        else:
            crash_after_epoch(m, 2)
        with pytest.raises((KeyboardInterrupt, RunInterrupted)):
            execute_run(cfg, tmp_path / "run")
    if kill.startswith("SIGINT"):
        assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["progress"]["partial"][
            "step"] == 3
    res = execute_run(cfg, tmp_path / "run")
    assert (res["status"], res["resumes"]) == ("done", 1)
    assert [r["epoch"] for r in system_rows(tmp_path / "run")] == ["1", "2", "3"]
    assert_cpu_system_rows(tmp_path / "run", whole_epochs=[1, 3] if kill.startswith("SIGINT") else [1, 2, 3])
    assert (res["peak_memory_mb"], res["peak_reserved_mb"]) == (None, None)  # no GPU: torch allocated none
    assert epoch_numbers(tmp_path / "run") == [1, 2, 3]
    whole_dir, whole = small_whole
    pd.testing.assert_frame_equal(metric_table(tmp_path / "run"), metric_table(whole_dir))
    assert res["metrics"] == whole["metrics"]
    assert best_pt(tmp_path / "run")[1] == res["best_epoch"] == whole["best_epoch"]


def test_a_kill_between_last_pt_and_best_pt_leaves_best_pt_of_the_best_epoch(tmp_path, monkeypatch, caplog,
                                                                             small_whole):
    cfg = compose_cfg(*SMALL, f"dataset.root={tmp_path}")
    whole_dir, whole = small_whole
    assert whole["best_epoch"] == 3  # this setup improves every epoch: epoch 3 writes best.pt
    real = Trainer._save_best

    def die_at_epoch_3(self, epoch, *args, **kwargs):
        if epoch == 3:
            raise KeyboardInterrupt  # last.pt of epoch 3 is written; best.pt still holds epoch 2
        real(self, epoch, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_best", die_at_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            execute_run(cfg, tmp_path / "run")
    assert best_pt(tmp_path / "run")[1] == 2
    caplog.set_level(logging.WARNING)
    res = execute_run(cfg, tmp_path / "run")
    assert (res["status"], res["best_epoch"], res["resumes"]) == ("done", 3, 1)
    assert "best.pt holds epoch 2" in caplog.text and "rewritten" in caplog.text
    weights, epoch = best_pt(tmp_path / "run")
    assert epoch == 3 and same_tensors(weights, best_pt(whole_dir)[0])
    assert res["metrics"] == whole["metrics"]


def scripted_val_loss(monkeypatch, losses):
    """Validation during training reports losses[epoch - 1] (losses may be changed between runs)."""
    real_eval = Trainer.evaluate_split

    def scripted(self, name, desc=""):
        if name == "val" and desc.startswith("epoch"):
            return {"loss": losses[int(desc.split()[1]) - 1], "top1": 50.0, "top5": 90.0}
        return real_eval(self, name, desc)
    monkeypatch.setattr(Trainer, "evaluate_split", scripted)


def test_a_best_pt_newer_than_the_checkpoint_is_not_kept_when_the_replay_does_not_beat_it(tmp_path, monkeypatch,
                                                                                         caplog):
    # the first attempt finds epoch 2 best; the replay of epoch 2 is worse than epoch 1
    cfg = compose_cfg(*SMALL, "trainer.epochs=2", f"dataset.root={tmp_path}")
    losses = [2.0, 1.0]
    scripted_val_loss(monkeypatch, losses)
    execute_run(cfg, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert best_pt(tmp_path / "run")[1] == 2
    # as a kill after best.pt of epoch 2 and before its last.pt would leave it
    shutil.copyfile(ckpts / "epoch_001.pt", ckpts / "last.pt")
    (ckpts / "epoch_002.pt").unlink()
    results = read_results(tmp_path / "run")
    results.update(status="running", epochs_run=1, best_epoch=1)
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    epoch_1 = torch.load(ckpts / "epoch_001.pt", weights_only=False)["model"]

    losses[1] = 3.0
    caplog.set_level(logging.WARNING)
    res = execute_run(cfg, tmp_path / "run")
    assert (res["status"], res["best_epoch"], res["epochs_run"]) == ("done", 1, 2)
    assert "best.pt holds epoch 2" in caplog.text
    weights, epoch = best_pt(tmp_path / "run")
    assert epoch == 1 and same_tensors(weights, epoch_1)  # epoch 1's weights, from its checkpoint


def test_when_the_best_weights_are_in_no_file_the_best_is_chosen_again_from_the_epochs_still_to_run(
        tmp_path, monkeypatch, caplog):
    cfg = compose_cfg(*SMALL, f"dataset.root={tmp_path}")
    scripted_val_loss(monkeypatch, [1.0, 2.0, 3.0])  # epoch 1 is best
    with monkeypatch.context() as m:
        crash_after_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            execute_run(cfg, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "best.pt").unlink()  # lost (deleted, or a write that never landed)
    caplog.set_level(logging.WARNING)
    res = execute_run(cfg, tmp_path / "run")
    assert "the weights of best epoch 1 are in no file: the best is chosen again from epoch 3 on" in caplog.text
    assert (res["status"], res["best_epoch"]) == ("done", 3)
    weights, epoch = best_pt(tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert epoch == 3 and same_tensors(weights, last["model"])  # epoch 3's weights, as its checkpoint holds them


GARBAGE = {
    "a line cut short": "3,0.0497,2.9",
    "NUL bytes of a full disk": "\0" * 40,
    "cells that are not numbers": "2,0.05,abc,50,1,50,1,50,1,0,0\n",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_garbage_line_in_epochs_csv_is_dropped_with_a_warning_and_the_run_finishes(tmp_path, monkeypatch, caplog,
                                                                                    small_whole, garbage):
    cfg = compose_cfg(*SMALL, f"dataset.root={tmp_path}")
    with monkeypatch.context() as m:
        kill_after_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            execute_run(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "epochs.csv", "a") as f:
        f.write(garbage)
    caplog.set_level(logging.WARNING)
    res = execute_run(cfg, tmp_path / "run")
    assert (res["status"], res["resumes"]) == ("done", 1)
    (line,) = [r.getMessage() for r in caplog.records if "not a whole row" in r.getMessage()]
    assert f"{tmp_path / 'run' / 'epochs.csv'}: 1 line(s) not a whole row, dropped (line 4: " in line
    assert epoch_numbers(tmp_path / "run") == [1, 2, 3]
    pd.testing.assert_frame_equal(metric_table(tmp_path / "run"), metric_table(small_whole[0]))
    assert res["metrics"] == small_whole[1]["metrics"]


# ---- DDP: a stop signal to any rank, acted on at one step boundary by all (issue 11, item 7) ---------

DDP = [*FAST, "dataset.train_per_class=300", "trainer.epochs=2", "coupling.alpha=2", "trainer.device=cpu"]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(TRAIN), *args]


@pytest.mark.slow
def test_ddp_a_signal_to_one_rank_mid_epoch_stops_both_at_one_step_and_the_resume_matches(tmp_path):
    import psutil

    common = [*DDP, f"dataset.root={tmp_path}"]
    whole = subprocess.run(torchrun(*common, f"hydra.run.dir={tmp_path / 'whole'}"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(*common, f"hydra.run.dir={run_dir}"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: epoch_rows(run_dir) >= 1, what="the first epoch")
    time.sleep(1.5)  # a few steps into epoch 2's training (about 50 steps of 0.15 s here)
    rank0 = read_results(run_dir)["owner"]["pid"]
    (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.pid != rank0 and str(TRAIN) in p.cmdline()]
    rank1.send_signal(signal.SIGINT)  # rank 1 alone: rank 0 writes the checkpoint all the same
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stops = re.findall(r"interrupted by SIGINT at step (\d+) of epoch 2( \(signalled on another rank\))?", err)
    assert {told for _, told in stops} == {"", " (signalled on another rank)"}, err[-3000:]  # rank 1, rank 0
    (step,) = {int(s) for s, _ in stops}  # both at the same step
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert (last["progress"]["epoch"], last["progress"]["partial"]["step"]) == (1, step)
    assert 0 < step < 50  # mid-epoch, not at its end
    assert read_results(run_dir)["error"].startswith(
        f"interrupted by SIGINT at step {step} of epoch 2 (signalled on another rank)")

    again = subprocess.run(torchrun(*common, f"hydra.run.dir={run_dir}"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after step {step} of epoch 2 (resume #1)" in (run_dir / "train.log").read_text()
    res = read_results(run_dir)
    assert (res["status"], res["resumes"], res["world_size"]) == ("done", 1, 2)
    assert epoch_numbers(run_dir) == [1, 2]
    pd.testing.assert_frame_equal(metric_table(run_dir), metric_table(tmp_path / "whole"))
    assert res["metrics"] == read_results(tmp_path / "whole")["metrics"]


def epoch_rows(run_dir) -> int:
    path = run_dir / "epochs.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_a_row_appended_after_a_line_cut_short_is_not_glued_to_it(tmp_path):
    from coupled_net.epochlog import CsvLog

    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\r\n1,0.5\r\n2,0.")  # a kill cut the second row
    log = CsvLog(path, ["epoch", "loss"])
    log.append({"epoch": 2, "loss": 0.25})
    assert read_csv(path) == [["epoch", "loss"], ["1", "0.5"], ["2", "0.25"]]


def test_system_csv_of_an_earlier_version_continued_by_this_one_keeps_every_value_under_its_header(tmp_path):
    from coupled_net.epochlog import CsvLog
    from coupled_net.monitor import COLUMNS

    path = tmp_path / "system.csv"
    old = ["epoch", "phase", "time", "cpu_percent", "gpu0_util_percent"]  # a start and an end row an epoch
    CsvLog(path, old, numeric=["epoch"]).append({"epoch": 1, "phase": "start", "time": 10, "cpu_percent": 5,
                                                 "gpu0_util_percent": 70})
    new = CsvLog(path, ["epoch", "time"] + COLUMNS, numeric=["epoch", "time"])  # as coupled_net.trainer writes it
    new.append({"epoch": 2, "time": 20, **dict.fromkeys(COLUMNS, ""), "samples": 3, "gpu_util_percent_max": 90})
    header = old + COLUMNS
    cells = dict.fromkeys(header, "")
    assert read_csv(path) == [header, list({**cells, "epoch": "1", "phase": "start", "time": "10", "cpu_percent": "5",
                                            "gpu0_util_percent": "70"}.values()),
                              list({**cells, "epoch": "2", "time": "20", "samples": "3",
                                    "gpu_util_percent_max": "90"}.values())]
    new.keep_epochs_upto(2)  # a resume keeps both: each is a whole row
    assert [r["epoch"] for r in new.rows()] == ["1", "2"]


def test_a_rank_the_requeue_signal_has_not_reached_yet_hands_it_to_submitit_all_the_same(monkeypatch):
    """SLURM signals every task, but not at the same instant: the ranks agreed to stop on SIGUSR2
    that this rank has not received yet; it must still go through submitit's requeue handler."""
    import coupled_net.trainer as trainer_module
    from coupled_net.distributed import World
    from coupled_net.signals import StopGuard

    handed = []
    guard = StopGuard()
    guard.requeue_handlers[signal.SIGUSR2] = lambda signum, frame: handed.append(signum)  # submitit's, on rank 1
    trainer = Trainer.__new__(Trainer)  # only the stop logic is exercised
    trainer.guard, trainer.world, trainer._agreed_signal = guard, World(rank=1, size=2), signal.SIGUSR2
    monkeypatch.setattr(trainer_module, "REQUEUE_WAIT_S", 0)  # the wait for rank 0's requeue to kill this task
    with pytest.raises(RunInterrupted, match="interrupted by SIGUSR2 at step 8 of epoch 2"):
        trainer._act_on_stop("at step 8 of epoch 2")
    assert handed == [signal.SIGUSR2]
