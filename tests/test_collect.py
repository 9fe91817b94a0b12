"""launch/collect.py and the end-of-sweep collection (the trackers, logger=…: tests/test_loggers.py)."""

from __future__ import annotations

import json
import shutil
import time

import pandas as pd
import pytest

from pathlib import Path

from coupled_net import review
from coupled_net.collect import LEADING, collect
from coupled_net.report import write_summary
from helpers import REPO, make_run, run_cli

COLLECT = REPO / "launch" / "collect.py"
FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10", "trainer.epochs=1"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Real sweeps: 2 alphas x 2 seeds in a/; in b/x and b/y the same alpha=4 run labelled +label=x
    and +label=y (labels are not part of a run's identity: in one sweep they would be one run)."""
    base = tmp_path_factory.mktemp("sweeps")
    first = run_cli("-m", *FAST, "coupling.alpha=0,2", "seed=1,2", f"hydra.sweep.dir={base / 'a'}",
                    f"dataset.root={base}", cwd=base)
    assert first.returncode == 0, first.stderr[-3000:]
    for label in ("x", "y"):
        labelled = run_cli("-m", *FAST, "coupling.alpha=4", f"+label={label}", f"hydra.sweep.dir={base / 'b' / label}",
                           f"dataset.root={base}", cwd=base)
        assert labelled.returncode == 0, labelled.stderr[-3000:]
    return base, first


def copy_sweep(src, dst):
    shutil.copytree(src, dst)
    for summary in dst.rglob("summary.*"):
        summary.unlink()
    return dst


@pytest.mark.slow
def test_a_local_sweep_collects_itself_when_it_ends(sweeps):
    base, first = sweeps
    sweep = base / "a"
    for name in ("summary.csv", "summary_groups.csv", "summary_delta.csv", "summary.md", "summary.tex",
                 "summary_test_top1_vs_alpha.png", "summary_delta_vs_alpha.png", "summary_learning_curves.png"):
        assert (sweep / name).is_file(), name
    headline = (sweep / "summary.md").read_text().split("\n\n## Groups")[0]
    assert headline.startswith("## What coupling costs (small_cnn on synthetic_letters: 4 finished runs in 2 groups")
    assert headline in first.stdout  # the headline table is printed at the end


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
    assert md.split("\n\n## Groups")[0] in proc.stdout  # the headline
    headline = [line.split("|")[1:4] for line in md.split("\n\n## Groups")[0].splitlines() if line.startswith("| ")]
    top1 = df.groupby("alpha")["test_top1"]
    assert [[c.strip() for c in cells] for cells in headline[1:]] == [
        [str(a), "2", f"{top1.mean()[a]:.2f} ± {top1.std()[a]:.2f}"] for a in (0, 2)]  # two alphas, 2 seeds each
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
    summary = write_summary([sweep])
    df = summary.runs
    status = dict(zip(df["run_dir"], df["status"]))
    assert status[str(runs[0])] == "no results" and status[str(runs[1])] == "unreadable"
    assert status[str(runs[2])] == status[str(runs[3])] == "done"
    # the runs without results still show what their epochs.csv says
    assert df.set_index("run_dir").loc[str(runs[0]), "last_val_acc"] > 0
    # runs 0 and 1 (alpha 0, seeds 1 and 2) leave the aggregate; alpha 2 keeps both seeds
    groups = review.summarize(df)
    assert (list(groups["coupling.alpha"]), list(groups["n"])) == ([2], [2])
    assert runs[0].name in summary.markdown and runs[1].name in summary.markdown


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
    df = write_summary([tmp_path / "tree"]).runs
    print(f"collected {len(df)} runs in {time.perf_counter() - start:.2f} s")
    assert len(df) == 100 and set(df["status"]) == {"done"}


# ---- statuses that tell the truth, runs counted once (SPEC §5, §6): crafted run directories -------

def crafted_run(run_dir, *, status="done", test_top1=50.0, fingerprint="f" * 16, labels=None, owner=None,
                heartbeat_at=None, epoch_time_s=10.0, alpha=2, seed=1):
    return make_run(run_dir, status=status, test_top1=test_top1, fingerprint=fingerprint, labels=labels,
                    epochs=((40.0, 39.0, epoch_time_s, 1.0),), coupling__alpha=alpha, seed=seed,
                    results={"owner": owner, "heartbeat_at": heartbeat_at})


def iso(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds_ago))


def test_a_run_found_twice_is_counted_once_with_a_warning_naming_both(tmp_path, caplog):
    first = crafted_run(tmp_path / "a" / "run", test_top1=60.0)
    again = crafted_run(tmp_path / "b" / "run", test_top1=70.0)  # the same run copied into another sweep
    labelled = crafted_run(tmp_path / "c" / "run", test_top1=80.0, labels={"note": "rerun"})  # not a repeat
    summary = write_summary([tmp_path], tmp_path / "out")
    df = summary.runs
    assert list(df["duplicate_of"].fillna("")) == ["", str(first), ""]
    assert f"{again} holds the same run as {first} (same fingerprint and labels): counted once" in caplog.text
    groups = review.summarize(df)
    assert list(zip(groups["note"].fillna(""), groups["n"], groups["test_top1_mean"])) == [("rerun", 1, 80.0),
                                                                                          ("", 1, 60.0)]
    assert str(labelled) not in set(df["duplicate_of"].dropna())
    assert f"| {again} | done" in summary.markdown  # listed below the table, not silently dropped


def test_a_running_run_whose_process_is_gone_is_stale_not_running(tmp_path):
    import os
    import socket
    import subprocess

    import psutil

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "process_started": psutil.Process().create_time(), "slurm_job_id": None}
    crafted_run(tmp_path / "dead", status="running", owner={"host": host, "pid": gone.pid, "slurm_job_id": None},
                heartbeat_at=iso(5))
    crafted_run(tmp_path / "alive", status="running", owner=me, heartbeat_at=iso(5), seed=2)
    crafted_run(tmp_path / "reused_pid", status="running", owner={**me, "process_started": 1.0}, heartbeat_at=iso(5),
                seed=3)
    elsewhere = {"host": "node-17", "pid": 4242, "slurm_job_id": None}
    crafted_run(tmp_path / "silent", status="running", owner=elsewhere, heartbeat_at=iso(16 * 60), seed=4)
    crafted_run(tmp_path / "slow_epochs", status="running", owner=elsewhere, heartbeat_at=iso(16 * 60),
                epoch_time_s=400.0, seed=5)  # 3 x 400 s > 16 min: still within its heartbeat allowance
    crafted_run(tmp_path / "interrupted", status="interrupted", owner=elsewhere, heartbeat_at=iso(5), seed=6)
    df = collect([tmp_path]).set_index("run_dir")
    status = {Path(k).name: v for k, v in df["status"].items()}
    assert status == {"dead": "stale", "alive": "running", "reused_pid": "stale", "silent": "stale",
                      "slow_epochs": "running", "interrupted": "interrupted"}
    assert df.loc[str(tmp_path / "dead"), "error"] == (
        f"pid {gone.pid} on {host} is gone: it ended without recording why; the same command resumes it")
    assert df.loc[str(tmp_path / "silent"), "error"].startswith("no heartbeat for 16 min")


def test_a_running_slurm_run_is_stale_once_slurm_no_longer_knows_its_job():
    from coupled_net.liveness import owner_gone

    res = {"status": "running", "owner": {"host": "node-3", "pid": 1, "slurm_job_id": "41_2"}, "heartbeat_at": iso(3600)}
    none = None  # no epoch yet
    assert owner_gone(res, none, {"41_2": ("PENDING", "BeginTime")}) is None  # requeued, waiting: alive
    assert owner_gone(res, none, {"41_3": ("RUNNING", "None")}) == "SLURM job 41_2 is no longer known"
    assert owner_gone(res, none, None) == "no heartbeat for 60 min"  # no squeue here: the heartbeat decides


def test_a_slurm_sweep_collected_by_a_relative_path_or_after_a_move_counts_each_of_its_runs_once(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    runs = [crafted_run(sweep / f"coupling.alpha={a}", alpha=a, fingerprint=f"{a:016x}") for a in (0, 8)]
    jobs = [{"job_id": f"7_{i}", "job_num": i, "run_dir": str(r), "executor": "slurm"} for i, r in enumerate(runs)]
    (sweep / "manifest.json").write_text(json.dumps({"sweep_dir": str(sweep), "jobs": jobs}))
    monkeypatch.chdir(tmp_path)
    df = collect(["sweep"])  # relative, as typed
    assert list(df["run_dir"]) == [str(r) for r in runs] and df["duplicate_of"].isna().all()
    assert list(df["slurm_job_id"]) == ["7_0", "7_1"]
    moved = tmp_path / "moved"
    shutil.copytree(sweep, moved)
    df = collect([moved])  # its manifest still names the original's directories
    assert list(df["run_dir"]) == [str(moved / r.name) for r in runs] and df["duplicate_of"].isna().all()
    assert list(df["slurm_job_id"]) == ["7_0", "7_1"]


def test_a_job_of_submitits_local_executor_is_not_a_slurm_job(monkeypatch):
    import submitit

    from coupled_net.machine import slurm_job_id

    class Env:
        def __init__(self, cluster):
            self.cluster, self.job_id = cluster, "31337_0"
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: Env("local"))
    assert slurm_job_id() is None  # its owner is then judged by host and pid, not by squeue
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: Env("slurm"))
    assert slurm_job_id() == "31337_0"


@pytest.mark.parametrize("finished_first", [True, False], ids=["finished copy first", "finished copy second"])
def test_a_run_found_twice_keeps_the_finished_copy_whatever_the_paths_order(tmp_path, finished_first):
    done_at, failed_at = ("a", "b") if finished_first else ("b", "a")
    done = crafted_run(tmp_path / done_at / "run", test_top1=60.0)
    failed = crafted_run(tmp_path / failed_at / "run", status="failed", test_top1=None)  # the same fingerprint
    df = collect([tmp_path]).set_index("run_dir")
    assert df.loc[str(failed), "duplicate_of"] == str(done)
    assert pd.isna(df.loc[str(done), "duplicate_of"])
    counted = review.counted(df.reset_index())
    assert list(counted["run_dir"]) == [str(done)] and list(counted["test_top1"]) == [60.0]


def test_best_val_acc_is_the_highest_val_accuracy_of_a_curve_that_peaks_early(tmp_path):
    from coupled_net.results import epoch_fields

    # (val_acc, ke_val_acc, epoch_time_s, ke_eval_time_s): val top-1 peaks at epoch 1; the best
    # epoch (selected by validation loss) is 2; the last epoch is the lowest
    epochs = ((72.0, 70.0, 10.0, 1.0), (65.0, 64.5, 10.0, 1.0), (60.0, 62.0, 10.0, 1.0))
    run = make_run(tmp_path / "run", epochs=epochs, best_epoch=2)
    row = collect([tmp_path]).iloc[0]
    assert row["best_epoch"] == 2
    assert row["best_val_acc"] == 72.0       # the highest val top-1 of any epoch (epoch 1)
    assert row["best_ke_val_acc"] == 70.0    # the highest after KE (epoch 1)
    assert row["last_val_acc"] == 60.0
    assert row["ke_drop_best"] == pytest.approx(65.0 - 64.5)  # at the best epoch, 2
    assert row["ke_drop_mean"] == pytest.approx(((72 - 70) + (65 - 64.5) + (60 - 62)) / 3)
    assert epoch_fields(run)["best_val_acc"] == 72.0 and epoch_fields(run)["best_ke_val_acc"] == 70.0  # results.json
    write_summary([tmp_path])
    written = pd.read_csv(tmp_path / "summary.csv").iloc[0]
    assert (written["run_dir"], written["best_val_acc"], written["best_ke_val_acc"]) == (str(run), 72.0, 70.0)
    assert pd.read_csv(tmp_path / "summary_groups.csv").iloc[0]["best_val_acc_mean"] == 72.0
