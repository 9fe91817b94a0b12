"""The collector at scale (issue 21): its fast reading path (one os.scandir walk, reader threads, plain
YAML where a config has no interpolation) gives the frame the reference path (Path.rglob per marker,
OmegaConf per config) gives; the synthetic run tree the collect bench builds; runs a fail-fast stop
did not start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from coupled_net import collect as collect_module
from coupled_net import bench, epochlog, review
from coupled_net.benchtree import DEAD_PID, make_tree
from coupled_net.collect import collect
from coupled_net.epochlog import read_epochs, read_epochs_fast
from coupled_net.tables import not_aggregated
from helpers import make_run

# a config as a user might write one by hand: no interpolation (the plain YAML path), OmegaConf's float
# syntax (1e-3 is a float to OmegaConf, a string to YAML 1.1), a date (a string to OmegaConf), a list,
# a float seed
PLAIN_CONFIG = """model:
  name: small_cnn
  width: 16
dataset:
  name: synthetic_letters
  mean:
  - 0.5
  - 0.25
optimizer:
  lr: 1e-3
coupling:
  alpha: 2
  mode: copy
  schedule: epoch
trainer:
  device: cpu
started: 2026-01-01
seed: 1.0
"""


def _reference_config(path: Path):
    """How .hydra/config.yaml was read before issue 21: OmegaConf for every file."""
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve
        return OmegaConf.to_container(cfg, resolve=False)


def _reference_walk(root: Path):
    """How the run dirs and sweep records were found before issue 21: Path.rglob once per marker."""
    runs = set()
    for marker in ("results.json", "epochs.csv", ".hydra/config.yaml"):
        if (root / marker).is_file():
            runs.add(root)
        runs.update(p.parents[marker.count("/")] for p in root.rglob(marker))
    return runs, [root / "manifest.json", *root.rglob("*/manifest.json")], list(root.rglob("fail_fast.json"))


@pytest.fixture
def awkward_tree(tmp_path):
    """60 synthetic runs, then what makes reading them awkward: runs without results.json whose config is
    read instead (one with interpolations, one plain), one with no config at all, one whose results.json
    is not JSON (the tree's last), a SLURM manifest one level down, and a nested sweep's run."""
    root = tmp_path / "tree"
    runs = make_tree(root, 60)
    (runs[3] / "results.json").unlink()  # its config has ${dataset.channels} and ${oc.env:...}
    (runs[4] / "results.json").unlink()
    (runs[4] / ".hydra" / "config.yaml").write_text(PLAIN_CONFIG)
    (runs[5] / "results.json").unlink()
    shutil.rmtree(runs[5] / ".hydra")  # epochs.csv alone
    (root / "alexnet" / "manifest.json").write_text(json.dumps(
        {"jobs": [{"run_dir": "/elsewhere/run_09999", "job_id": "4242_1"}]}))
    make_run(root / "nested" / "sweep" / "0", coupling__alpha=4, seed=7)
    return root, runs


def test_the_fast_reading_path_gives_the_reference_paths_frame(awkward_tree, monkeypatch):
    root, runs = awkward_tree
    monkeypatch.setattr(collect_module, "squeue_states", lambda: None)  # no SLURM here, whatever the host
    fast = review.runs([root])
    with monkeypatch.context() as m:
        m.setattr(collect_module, "_load_config", _reference_config)
        m.setattr(collect_module, "_walk", _reference_walk)
        m.setattr(collect_module, "READERS", 1)
        reference = review.runs([root])
    pd.testing.assert_frame_equal(fast, reference)
    assert len(fast) == 62  # 60 + the manifest's not yet started run + the nested sweep's run
    plain = fast.set_index("run_dir").loc[str(runs[4])]
    # OmegaConf's values, not YAML 1.1's: 1e-3 a float, the date a string, the list as one cell, seed 1.0
    assert (plain["optimizer.lr"], plain["started"], plain["dataset.mean"], plain["seed"]) == \
        (0.001, "2026-01-01", "0.5,0.25", 1.0)
    interpolated = fast.set_index("run_dir").loc[str(runs[3])]
    assert (interpolated["model.name"], interpolated["model.in_channels"], interpolated["status"]) == \
        ("small_cnn", 1, "no results")
    assert fast.set_index("run_dir").loc[str(runs[59]), "status"] == "unreadable"
    assert fast.set_index("run_dir").loc[str(root / "alexnet" / "run_09999"), "slurm_job_id"] == "4242_1"


def test_the_synthetic_tree_has_the_statuses_it_promises(tmp_path):
    runs = make_tree(tmp_path, 100)
    df = collect([tmp_path]).set_index("run_dir")
    # run i: failed where i % 50 == 7, interrupted where i % 100 == 13, running (owner gone) where
    # i % 100 == 29, the last one's results.json cut short, the other 95 done
    assert df["status"].value_counts().to_dict() == {"done": 95, "failed": 2, "interrupted": 1, "stale": 1,
                                                     "unreadable": 1}
    assert [df.at[str(runs[i]), "status"] for i in (7, 57, 13, 29, 99)] == \
        ["failed", "failed", "interrupted", "stale", "unreadable"]
    assert df.at[str(runs[29]), "error"].startswith(f"pid {DEAD_PID} on ")
    # model cycles fastest, then alpha, then the seed: run 22 is alexnet (22 % 3 = 1), alpha 8 ((22 // 3) % 4 = 3),
    # seed 2 (22 // 12 + 1)
    assert tuple(df.loc[str(runs[22]), ["model", "alpha", "seed", "epochs_run"]]) == ("alexnet", 8, 2, 10)


def test_runs_a_fail_fast_stop_did_not_start_are_not_started_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(collect_module, "squeue_states", lambda: None)  # SLURM no longer lists the task
    sweep, other = tmp_path / "sweep", tmp_path / "other"
    make_run(sweep / "0", seed=1)
    make_run(sweep / "1", seed=2, status="failed", test_top1=None)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # its directory made, its run never started
    (sweep / "2" / ".hydra" / "config.yaml").write_text("seed: 3\n")
    (other / "0" / ".hydra").mkdir(parents=True)  # no fail-fast record there: still `no results`
    (other / "0" / ".hydra" / "config.yaml").write_text("seed: 4\n")
    reason = "fail-fast: 1 failed run (limit 1), most with: RuntimeError: boom"
    (sweep / "fail_fast.json").write_text(json.dumps({
        "limit": 1, "failures": [str(sweep / "1")], "error": "RuntimeError: boom", "reason": reason,
        "not_started": [str(sweep / "2"), str(sweep / "3")], "at": "2026-12-03T15:00:00+0000"}))
    (sweep / "manifest.json").write_text(json.dumps({"jobs": [{"run_dir": str(sweep / "3"), "job_id": "77_3"}]}))
    df = collect([sweep, other]).set_index("run_dir")
    assert df.at[str(sweep / "3"), "slurm_state"] == "cancelled"  # fail-fast cancelled its pending task
    assert df["status"].to_dict() == {str(other / "0"): "no results", str(sweep / "0"): "done",
                                      str(sweep / "1"): "failed", str(sweep / "2"): "not_started",
                                      str(sweep / "3"): "not_started"}
    assert df.loc[[str(sweep / "2"), str(sweep / "3")], "error"].tolist() == [reason, reason]
    left_out = not_aggregated(review.runs([sweep]))
    assert left_out.set_index("run_dir")["status"].to_dict() == {
        str(sweep / "1"): "failed", str(sweep / "2"): "not_started", str(sweep / "3"): "not_started"}


HEADER = "epoch,lr,train_loss,train_acc,val_loss,val_acc,ke_val_loss,ke_val_acc,epoch_time_s,ke_time_s,ke_eval_time_s"
ROW = "1,0.1,1.0,50.0,1.0,40.0,1.1,39.0,10.0,0.001,1.0"


@pytest.mark.parametrize("text", [
    f"{HEADER}\n{ROW}\n2,0.1,nan,50,inf,41,1.1,40,9.5,0.001,1.0\n",  # a diverged loss: nan is a number
    f"{HEADER},checkpoint_time_s\n{ROW},\n{ROW.replace('1,', '2,', 1)},0.03\n",  # an empty optional cell
    f"{HEADER}\n{ROW}\n\n   \n",  # blank lines hold no row
    f"{HEADER}\n{ROW}\n2,0.1,1.0,50",  # the last line cut short
    f"{HEADER}\n{ROW}\n{ROW},7\n",  # a stray cell
    f"{HEADER}\n1.0,0.1,1.0,50.0,1.0,40.0,1.1,39.0,10.0,0.001,1.0\n",  # epoch not an integer
    f"{HEADER}\n{ROW.replace('40.0', 'nan')}\n",  # nan in a required column
    f"{HEADER}\n{ROW.replace('0.1', 'x')}\n",  # not a number
    f'{HEADER}\n{ROW.replace("0.1", chr(34) + "0.1" + chr(34))}\n',  # a quoted cell
    f"{HEADER}\r\n{ROW}\r\n",  # Windows line ends
    f"{HEADER}\n{ROW}\x0b\n",  # a character splitlines ends a line at
    f"{HEADER.replace('val_acc,', '')}\n",  # a header without a required column
    f"{HEADER}\n", "", "epoch,lr\x00\n",
], ids=["nan-loss", "optional", "blank", "cut", "stray", "float-epoch", "nan-required", "text", "quoted", "crlf",
        "vt", "no-column", "header-only", "empty", "nul"])
def test_the_fast_epochs_reader_reads_what_read_epochs_reads(tmp_path, text):
    (tmp_path / "epochs.csv").write_bytes(text.encode())
    fast, reference = read_epochs_fast(tmp_path), read_epochs(tmp_path)
    assert repr(fast) == repr(reference)  # repr: nan equals nan


def test_the_fast_epochs_reader_reads_a_whole_file_itself(tmp_path, monkeypatch):
    (tmp_path / "epochs.csv").write_text(f"{HEADER}\n{ROW}\n")
    expected = read_epochs(tmp_path)
    monkeypatch.setattr(epochlog, "read_epochs", lambda run_dir: pytest.fail("fell back to read_epochs"))
    assert read_epochs_fast(tmp_path) == expected
    assert expected[0][0]["epoch"] == 1 and expected[0][0]["val_acc"] == 40.0 and expected[1] is None


def test_the_collect_bench_rows_give_seconds_memory_and_growth_per_1000_runs(monkeypatch):
    made = []

    def fake_once(tree, out):  # (wall s, CPU s, peak MB) of a collect over the tree just built
        made.append(len(list(Path(tree).glob("*/run_*"))))
        return {2: (2.0, 1.5, 150.0), 4: (6.0, 5.0, 180.0)}[made[-1]]

    monkeypatch.setattr(bench, "collect_once", fake_once)
    rows = bench.collect_rows((2, 4))
    assert made == [2, 4]
    # growth: none for the first size; then (6.0 - 2.0) s / (4 - 2) runs = 2,000 s per 1,000 runs
    assert [tuple(map(str, r)) if not isinstance(r, bench.Header) else "header" for r in rows] == [
        "header", ("2 runs (CPU 1.5 s)", "2.0", "150.0", "None"), ("4 runs (CPU 5.0 s)", "6.0", "180.0", "2000.0")]
    text = bench.table(rows, torch.device("cpu"), 0)
    assert "| 4 runs (CPU 5.0 s) | 6.000 s | 180 MB | 2000.000 s |" in text


def test_the_collect_bench_sizes_must_ascend(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--only", "collect", "--collect-sizes", "2000,100"])
    assert stop.value.code == 2
    assert "--collect-sizes: '2000,100': ascending positive run counts, e.g. 100,2000,10000" in capsys.readouterr().err


@pytest.mark.slow
def test_the_collect_bench_times_launch_collect_in_its_own_process(tmp_path):
    make_tree(tmp_path / "tree", 6)
    seconds, cpu, peak_mb = bench.collect_once(tmp_path / "tree", tmp_path / "out")
    assert 0 < cpu and 0 < seconds and 50 < peak_mb < 1024  # its own peak: pandas and matplotlib, not the bench's
    assert len(pd.read_csv(tmp_path / "out" / "summary.csv")) == 6
