"""launch/collect.py and the end-of-sweep collection, launch/evaluate.py, and logger=tensorboard."""

from __future__ import annotations

import json
import shutil
import time

import pandas as pd
import pytest

from coupled_net.collect import LEADING, aggregate, write_summary
from coupled_net.run import run
from conftest import REPO, compose_cfg, run_cli

COLLECT = REPO / "launch" / "collect.py"
EVALUATE = REPO / "launch" / "evaluate.py"
FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10", "trainer.epochs=1"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Two real sweeps: 2 alphas x 2 seeds, and a +label swept over 2 values."""
    base = tmp_path_factory.mktemp("sweeps")
    first = run_cli("-m", *FAST, "coupling.alpha=0,2", "seed=1,2", f"hydra.sweep.dir={base / 'a'}",
                    f"dataset.root={base}", cwd=base)
    second = run_cli("-m", *FAST, "coupling.alpha=4", "+label=x,y", f"hydra.sweep.dir={base / 'b'}",
                     f"dataset.root={base}", cwd=base)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    return base, first


def copy_sweep(src, dst):
    shutil.copytree(src, dst)
    for name in ("summary.csv", "summary.md", "summary.tex"):
        (dst / name).unlink(missing_ok=True)
    return dst


@pytest.mark.slow
def test_a_local_sweep_collects_itself_when_it_ends(sweeps):
    base, first = sweeps
    sweep = base / "a"
    for name in ("summary.csv", "summary.md", "summary.tex", "summary_test_top1_vs_alpha.png",
                 "summary_learning_curves.png"):
        assert (sweep / name).is_file(), name
    assert "Finished runs (mean ± std over seeds" in first.stdout  # the table is printed at the end


@pytest.mark.slow
def test_collect_one_sweep(sweeps, tmp_path):
    sweep = copy_sweep(sweeps[0] / "a", tmp_path / "a")
    proc = run_cli(str(sweep), script=COLLECT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(sweep / "summary.csv")
    assert list(df.columns[:len(LEADING)]) == LEADING
    assert list(df.columns[len(LEADING):len(LEADING) + 2]) == ["coupling_mode", "coupling_schedule"]
    assert sorted(zip(df["alpha"], df["seed"])) == [(0, 1), (0, 2), (2, 1), (2, 2)]
    assert set(df["status"]) == {"done"}
    for row in df.itertuples():
        res = json.loads((sweep.parent / "a" / row.run_dir.split("/")[-1] / "results.json").read_text())
        assert (row.test_top1, row.val_top5) == (res["metrics"]["test"]["top1"], res["metrics"]["val"]["top5"])
    md = (sweep / "summary.md").read_text()
    assert md in proc.stdout
    table = [line for line in md.splitlines() if line.startswith("| small_cnn")]
    assert len(table) == 2 and all("±" in line for line in table)  # two alphas, each over 2 seeds
    assert all("|   2 |" in line for line in table)
    tex = (sweep / "summary.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    for name in ("summary_test_top1_vs_alpha.png", "summary_learning_curves.png"):
        blob = (sweep / name).read_bytes()
        assert blob.startswith(PNG) and len(blob) > 5000


@pytest.mark.slow
def test_missing_and_corrupt_results_are_listed_not_aggregated(sweeps, tmp_path):
    sweep = copy_sweep(sweeps[0] / "a", tmp_path / "a")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    (runs[0] / "results.json").unlink()
    (runs[1] / "results.json").write_text('{"status": "do')
    df, md = write_summary([sweep])
    status = dict(zip(df["run_dir"], df["status"]))
    assert status[str(runs[0])] == "no results" and status[str(runs[1])] == "unreadable"
    assert status[str(runs[2])] == status[str(runs[3])] == "done"
    # the runs without results still show what their epochs.csv says
    assert df.set_index("run_dir").loc[str(runs[0]), "last_val_acc"] > 0
    # runs 0 and 1 (alpha 0, seeds 1 and 2) leave the aggregate; alpha 2 keeps both seeds
    agg = aggregate(df)
    assert (list(agg["alpha"]), list(agg["n"])) == (["2"], [2])
    assert runs[0].name in md and runs[1].name in md


@pytest.mark.slow
def test_two_sweeps_make_one_table_with_the_label_as_a_column(sweeps, tmp_path):
    a, b = copy_sweep(sweeps[0] / "a", tmp_path / "a"), copy_sweep(sweeps[0] / "b", tmp_path / "b")
    proc = run_cli(str(a), str(b), "--out", str(tmp_path / "out"), script=COLLECT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert len(df) == 6
    assert sorted(df["label"].dropna()) == ["x", "y"]
    assert sorted(df["alpha"]) == [0, 0, 2, 2, 4, 4]


def test_a_path_without_runs_is_an_error(tmp_path):
    proc = run_cli(str(tmp_path), script=COLLECT, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"collect: error: no run directories below {tmp_path}"]


def test_collecting_a_hundred_runs_is_quick(sweeps, tmp_path):
    runs = sorted(p for p in (sweeps[0] / "a").iterdir() if p.is_dir())
    for i in range(100):
        shutil.copytree(runs[i % 4], tmp_path / "tree" / f"{i}_run", ignore=shutil.ignore_patterns("*.pt"))
    start = time.perf_counter()
    df, _ = write_summary([tmp_path / "tree"])
    print(f"collected {len(df)} runs in {time.perf_counter() - start:.2f} s")
    assert len(df) == 100 and set(df["status"]) == {"done"}


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_test_metrics(sweeps, tmp_path):
    run_dir = next(p for p in (sweeps[0] / "a").iterdir() if p.name.startswith("2_coupling.alpha=2"))
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    proc = run_cli(str(run_dir), "--split", "test", script=EVALUATE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((run_dir / "results.json").read_text())["metrics"]["test"]
    got = json.loads((run_dir / "evaluation.json").read_text())["splits"]
    assert list(got) == ["test"]
    assert got["test"]["after_ke"] == pytest.approx(expected, rel=1e-9)
    assert f"{expected['top1']:8.2f}" in proc.stdout


def test_tensorboard_logger_writes_the_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(*FAST, "trainer.epochs=2", "logger=tensorboard", "dataset.train_per_class=8",
                      f"dataset.root={tmp_path}")
    run(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = pd.read_csv(tmp_path / "run" / "epochs.csv")
    for tag, column in (("accuracy/val_after_ke", "ke_val_acc"), ("loss/train", "train_loss"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx(list(rows[column]), rel=1e-6)


def test_no_logger_writes_no_tensorboard_files(tmp_path):
    run(compose_cfg(*FAST, "dataset.train_per_class=8", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists()
