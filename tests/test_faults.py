"""Faults reported in one line, nothing lost (issue 11, item 4): a full disk, a run directory that is a
file, a checkpoint of another version of the model, a dataset no run of a sweep can have, errors
printed once, and the review never stopped by one bad run directory."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch

from coupled_net.errors import RunFault
from coupled_net.report import write_summary
from coupled_net.lifecycle import execute_run
from helpers import compose_cfg, make_run, run_cli, snapshot

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.batch_size=16"]
TORCH_DISK_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                   "file write failed")
Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_fails_the_run_with_one_line_naming_the_file_and_the_space_left(tmp_path, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10 << 30, (10 << 30) - 1536 * 1024, 1536 * 1024))
    res = execute_run(compose_cfg(*TINY, "trainer.epochs=1", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "failed"
    # the first torch.save of the run is last.pt at the end of epoch 1 (written before best.pt)
    assert res["error"] == f"No space left on device writing {tmp_path / 'run' / 'checkpoints' / 'last.pt'} " \
                           "(1.5 MiB free there)"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["error"] == res["error"]
    tracebacks = [r for r in caplog.records if "inline_container" in r.getMessage()]
    assert [getattr(r, "to", None) for r in tracebacks] == ["file"]  # the traceback: train.log, not the terminal
    assert list((tmp_path / "run" / "checkpoints").glob(".*tmp")) == []  # no half-written temp file left


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_on_resume_with_the_reason(tmp_path):
    cfg = compose_cfg(*TINY, "trainer.epochs=2", f"dataset.root={tmp_path}")
    execute_run(cfg, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3, 3)  # the same run, as another version of the model code saved it
    torch.save(ckpt, last)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (tmp_path / "run" / "results.json").write_text(json.dumps({**results, "status": "interrupted"}))
    with pytest.raises(RunFault) as refused:
        execute_run(cfg, tmp_path / "run")
    assert str(refused.value).startswith(f"{last} cannot be loaded into this model (")
    assert name in str(refused.value) and "\n" not in str(refused.value)
    after = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (after["status"], after["error"]) == ("failed", str(refused.value))


def test_a_single_run_prints_its_error_once_as_the_last_line(tmp_path):
    proc = run_cli(*TINY, "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}",
                   cwd=tmp_path)
    assert proc.returncode == 2
    message = "optimizer.lr=-1: must be a number > 0"
    assert proc.stderr.strip().splitlines() == [f"coupled_net: error: {message}"]
    assert message not in proc.stdout  # not logged to the terminal as well
    assert (proc.stdout + proc.stderr).count(message) == 1
    assert not (tmp_path / "run").exists()  # refused before its directory was made


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_directory_that_is_a_file_is_refused_in_one_line(tmp_path, key):
    afile = tmp_path / "results"
    afile.write_text("my notes\n")
    before = snapshot(tmp_path)
    multirun = ["-m"] if key == "hydra.sweep.dir" else []
    for target, where in ((afile, "is a file"), (afile / "run", f"{afile} is a file")):
        proc = run_cli(*multirun, *TINY, f"{key}={target}", cwd=tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"coupled_net: error: {key}={target}: {where}, not a directory: choose another {key}"]
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_sweep_stops_trying_a_dataset_that_an_earlier_run_found_unavailable(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("-m", "experiment=quickstart", "dataset=mnist", f"dataset.root={tmp_path / 'empty'}",
                   "dataset.download=false", "coupling.alpha=0,2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 1
    tried = [line for line in proc.stdout.splitlines() if line.startswith("[") and "not found in" in line]
    assert len(tried) == 1  # one run looked for the data; the summary and the verdict below repeat its line
    for alpha in (2, 4):
        assert (f"coupling.alpha={alpha},dataset=mnist,experiment=quickstart: not started: its dataset is "
                "unavailable (an earlier run of this sweep found it so)") in proc.stdout
    verdict = proc.stderr.strip().splitlines()[-1]
    assert verdict.startswith(f"coupled_net: error: 3 of 3 runs failed in {tmp_path / 'sweep'}: ")
    assert verdict.count("(not_started: its dataset was unavailable to an earlier run of this sweep)") == 2
    results = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/results.json"))
    assert results == ["coupling.alpha=0,dataset=mnist,experiment=quickstart"]  # only the first one ran


def test_the_review_lists_a_bad_run_directory_as_unreadable_and_summarizes_the_others(tmp_path):
    make_run(tmp_path / "good", test_top1=70.0)
    garbage = make_run(tmp_path / "garbage", seed=2)
    with open(garbage / "epochs.csv", "a") as f:
        f.write("2,0.1,1.0,50,1.0,4x.0,1.1,39.0,10,0.001,1\n3,0.1,1.\n")  # a bad number; a line cut short
    (make_run(tmp_path / "list", seed=3) / "results.json").write_text("[1, 2]")
    wide = make_run(tmp_path / "wide", seed=4)
    with open(wide / "epochs.csv", "a") as f:
        f.write("2,0.1,1.0,50,1.0,40.0,1.1,39.0,10,0.001,1,7,8\n")
    bare = make_run(tmp_path / "bare", seed=5)
    (bare / "results.json").unlink()  # started, never recorded anything: no error to show either
    s = write_summary([tmp_path])
    status = {r.run_dir.rsplit("/", 1)[-1]: (r.status, r.error if isinstance(r.error, str) else None)
              for r in s.runs.itertuples()}
    assert status["good"] == ("done", None)
    assert status["garbage"] == ("unreadable", "epochs.csv: lines 3, 4 not numbers")
    assert status["list"] == ("unreadable", "results.json: a JSON list, not an object")
    assert status["wide"] == ("unreadable", "epochs.csv: line 3 more cells than its header")
    assert list(s.groups["n"]) == [1] and list(s.groups["test_top1_mean"]) == [70.0]
    assert f"not in the table: {tmp_path / 'list'} (unreadable: results.json: a JSON list, not an object)" \
        in s.headline
    assert f"not in the table: {bare} (no results)" in s.headline.splitlines()
