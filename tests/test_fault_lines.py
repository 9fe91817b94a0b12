"""Faults told in one line, and nothing waits forever (issue 18, items 7-9): a full disk found down the
exception chain (torch 2.14 raises its C++ writer's "unexpected pos" with the ENOSPC only as the
context), on a real full tmpfs where the test can mount one; a user's model that fails on its first
real batch; a results.json that is a FIFO."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from coupled_net import checkpoint
from coupled_net.lifecycle import execute_run
from coupled_net.storage import DiskFull, disk_full
from helpers import REPO, compose_cfg, make_run, read_results, run_cli

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.batch_size=16",
        "trainer.limit_batches=1"]
COLLECT = REPO / "launch" / "collect.py"
UNEXPECTED_POS = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
Usage = namedtuple("Usage", "total used free")


# ---- a full disk ---------------------------------------------------------------------------------

def torch_writer_error(chained_by: str) -> RuntimeError:
    """torch.save's RuntimeError raised while handling an ENOSPC OSError (`__context__`), or from it (`__cause__`)."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as full:
            if chained_by == "__cause__":
                raise RuntimeError(UNEXPECTED_POS) from full
            raise RuntimeError(UNEXPECTED_POS)
    except RuntimeError as e:
        assert getattr(e, chained_by).errno == errno.ENOSPC and "No space" not in str(e)
        return e


@pytest.mark.parametrize("chained_by", ["__context__", "__cause__"])
def test_a_full_disk_is_found_down_the_exception_chain_of_torchs_writer_error(tmp_path, monkeypatch, chained_by):
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10 << 30, (10 << 30) - 3 * 1024, 3 * 1024))
    target = tmp_path / "checkpoints" / "last.pt"
    assert disk_full(torch_writer_error(chained_by), target) == \
        f"No space left on device writing {target} (3.0 KiB free there)"


def test_a_writer_error_without_enospc_anywhere_in_its_chain_is_not_a_full_disk(tmp_path):
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied")
        except OSError:
            raise RuntimeError(UNEXPECTED_POS)
    except RuntimeError as e:
        e.__context__.__context__ = e  # a cycle in the chain ends the walk too
        assert disk_full(e, tmp_path / "last.pt") is None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at tmp_path/small (root only: skipped elsewhere, with the reason)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> None:
    """Write a file into `folder` until its file system has no byte left."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    assert shutil.disk_usage(folder).free == 0


def mib_free(folder: Path) -> str:
    return f"{shutil.disk_usage(folder).free / 1024 ** 2:.1f} MiB"


def test_a_checkpoint_that_fills_a_real_disk_raises_one_line_naming_it_and_the_space_left(small_tmpfs):
    last = small_tmpfs / "checkpoints" / "last.pt"
    with pytest.raises(DiskFull) as full:
        checkpoint.save_torch(last, {"weights": torch.zeros(1 << 20)})  # 4 MiB onto 1 MiB
    assert list(last.parent.iterdir()) == []  # the temp file is gone: the whole MiB is free again
    assert str(full.value) == f"No space left on device writing {last} ({mib_free(small_tmpfs)} free there)"


def test_a_run_whose_checkpoint_fills_a_real_disk_fails_with_that_line(tmp_path, small_tmpfs):
    res = execute_run(compose_cfg(*TINY, "trainer.epochs=1", f"dataset.root={tmp_path}"), small_tmpfs / "run")
    last = small_tmpfs / "run" / "checkpoints" / "last.pt"  # the small CNN's 1.7 MB: more than the whole tmpfs
    assert res["status"] == "failed"
    prefix, free = f"No space left on device writing {last} (", " free there)"
    assert res["error"].startswith(prefix) and res["error"].endswith(free), res["error"]
    amount, unit = res["error"][len(prefix):-len(free)].split()
    assert unit in ("B", "KiB", "MiB") and float(amount) <= 1024
    assert read_results(small_tmpfs / "run")["error"] == res["error"]


def test_collect_onto_a_full_disk_ends_with_one_line_naming_the_file(tmp_path, small_tmpfs):
    make_run(tmp_path / "sweep" / "a")
    make_run(tmp_path / "sweep" / "b", coupling__alpha=2)
    fill(small_tmpfs)
    out = small_tmpfs / "summary"
    proc = run_cli(str(tmp_path / "sweep"), "--out", str(out), cwd=tmp_path, script=COLLECT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"collect: error: No space left on device writing {out / 'summary.csv'} (0 B free there)"]


# ---- a model that fails on real data -------------------------------------------------------------

def test_a_model_that_fails_on_its_first_real_batch_is_reported_with_its_own_error(tmp_path):
    try:
        torch.zeros(1, 8).view(1, 10)  # what FailsOnRealData's forward does to one image's 8 features
    except RuntimeError as e:
        own = f"RuntimeError: {e}"
    expected = f"model forward failed on a 1x1x28x28 batch: {own}"  # one synthetic letter: 1 channel, 28 px
    proc = run_cli(*TINY, "trainer.epochs=1", "model._target_=helpers.ownmodels.FailsOnRealData", "model.width=8",
                   f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}", cwd=tmp_path,
                   env={"PYTHONPATH": str(REPO / "tests")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"coupled_net: error: {expected}"
    assert "torchinfo" not in proc.stdout + proc.stderr
    res = read_results(tmp_path / "run")
    assert (res["status"], res["error"]) == ("failed", expected)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "h = h.view(x.size(0), self.width + 2)" in log  # the model's own traceback, in the run's log


# ---- a results.json that is a FIFO ---------------------------------------------------------------

def test_collect_names_a_results_json_that_is_a_fifo_and_finishes_without_reading_it(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "a", test_top1=60.0)
    make_run(sweep / "b", seed=2, test_top1=70.0)
    stuck = make_run(sweep / "c", seed=3)
    (stuck / "results.json").unlink()
    os.mkfifo(stuck / "results.json")  # opened for reading, it would wait for a writer forever
    (make_run(sweep / "d", seed=4) / "epochs.csv").unlink()
    os.mkfifo(sweep / "d" / "epochs.csv")
    os.mkfifo(sweep / "manifest.json")
    # a regression hangs: the timeout makes it fail instead
    proc = run_cli(str(sweep), cwd=tmp_path, script=COLLECT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fifo = "a FIFO, not a regular file: not read"
    assert proc.stderr.strip().splitlines() == [
        f"collect: WARNING: {stuck / 'results.json'} is {fifo}; its run is shown as unreadable"]
    assert f"not in the table: {stuck} (unreadable: results.json is {fifo})" in proc.stdout.splitlines()
    assert f"not in the table: {sweep / 'd'} (unreadable: epochs.csv: {sweep / 'd' / 'epochs.csv'} is {fifo})" \
        in proc.stdout.splitlines()
    with open(sweep / "summary.csv", newline="") as f:
        status = {Path(r["run_dir"]).name: r["status"] for r in csv.DictReader(f)}
    assert status == {"a": "done", "b": "done", "c": "unreadable", "d": "unreadable"}
