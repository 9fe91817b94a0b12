"""`python launch/collect.py DIR --status` (coupled_net.status, issue 21): counts per status, a line per
running/stale/failed run, the ETA computed by hand, and that it writes nothing. Hand-made run
directories with known epoch times and heartbeats; no training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from coupled_net.status import eta, eta_line, epoch_tail, makespan, render, view
from helpers import REPO, make_run, run_cli

COLLECT = REPO / "launch" / "collect.py"
HOST = socket.gethostname()
ME = {"host": HOST, "pid": os.getpid(), "process_started": psutil.Process().create_time(), "slurm_job_id": None}
ELSEWHERE = {"host": "node-17", "pid": 4242, "slurm_job_id": None}


def iso(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds_ago))


def run(path: Path, status: str, times=(10.0,), *, planned: int = 10, patience: int = 3, owner=None,
        heartbeat_s: float = 5.0, error=None, seed: int = 1) -> Path:
    """A run directory whose epochs took `times` seconds each, planning `planned` epochs."""
    return make_run(path, status=status, epochs=tuple((40.0, 39.0, t, 1.0) for t in times), seed=seed,
                    trainer__epochs=planned, trainer__patience=patience,
                    results={"owner": owner, "heartbeat_at": iso(heartbeat_s), "error": error})


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_lanes_take_the_longest_runs_first():
    # 60 s and 50 s start at once; 40 s goes on the lane that frees first (50 s): it ends at 90 s
    assert makespan([50.0, 40.0, 60.0], 2) == 90.0
    assert makespan([50.0, 40.0, 60.0], 1) == 150.0
    assert makespan([50.0, 40.0, 60.0], 3) == 60.0
    # 30+20 | 30+20, then the last 20 on either: 70 s (what a launch that starts the next run as one ends does,
    # although 30+30 | 20+20+20 would take 60 s)
    assert makespan([30.0, 30.0, 20.0, 20.0, 20.0], 2) == 70.0
    assert makespan([], 4) == 0.0


def test_the_counts_line_and_a_line_per_running_stale_and_failed_run(tmp_path):
    sweep = tmp_path / "sweep"
    run(sweep / "a_done", "done", (10.0,) * 10)
    run(sweep / "b_done", "done", (10.0,) * 10, seed=2)
    run(sweep / "c_running", "running", (10.0,) * 7, planned=30, owner=ME, heartbeat_s=12, seed=3)
    pid = dead_pid()
    run(sweep / "d_dead", "running", (10.0,) * 2, owner={"host": HOST, "pid": pid, "slurm_job_id": None}, seed=4)
    run(sweep / "e_failed", "failed", (10.0,) * 3, planned=30, error="RuntimeError: " + "x" * 200, seed=5)
    run(sweep / "f_silent", "running", (10.0,), owner=ELSEWHERE, heartbeat_s=16 * 60, seed=6)
    run(sweep / "g_interrupted", "interrupted", (10.0,), owner=ELSEWHERE, seed=7)
    lines = render(view(sweep, queue=None)).splitlines()
    assert lines[0] == f"{sweep}: 7 runs: 2 done, 1 running, 2 stale, 1 failed, 1 interrupted"
    running = lines[1].split("heartbeat ")
    assert running[0] == "  running  c_running  epoch 7/30  "
    assert 11 <= int(running[1].removesuffix(" s ago")) <= 20
    resumes = "it ended without recording why; the same command resumes it"
    assert lines[2] == "  stale    d_dead  epoch 2/10  " + f"pid {pid} on {HOST} is gone: {resumes}"[:120]
    assert lines[3] == "  failed   e_failed  epoch 3/30  RuntimeError: " + "x" * (120 - len("RuntimeError: "))
    assert lines[4] == f"  stale    f_silent  epoch 1/10  no heartbeat for 16 min: {resumes}"
    assert len(lines) == 6 and lines[5].startswith("ETA: ")  # the interrupted run gets no line


def test_the_eta_schedules_each_runs_epochs_left_on_the_launchs_lanes(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "launch.json").write_text(json.dumps({"executor": "local", "parallel": 2, "planned": 4, "launched": 4}))
    run(sweep / "done", "done", (999.0,) * 10)  # finished: nothing left, its slow epochs change nothing
    run(sweep / "a", "running", (100.0,) * 5, owner=ME, seed=2)     # 5 left x 100 s = 500 s
    run(sweep / "b", "running", (200.0,) * 8, owner=ME, seed=3)     # 2 left x 200 s = 400 s
    run(sweep / "c", "running", (300.0,) * 8, owner=ME, seed=4)     # 2 left x 300 s = 600 s
    v = view(sweep, queue=None)
    e = eta(v)
    assert (e.seconds, e.runs_left, e.at_once, e.at_most) == (900.0, 3, 2, True)  # 600 | 500 then 400: 900 s
    now = time.mktime((2026, 12, 3, 14, 0, 0, 0, 0, -1))
    assert eta_line(e, now) == "ETA: ~15m (at most; 3 runs left, 2 at once) — about 14:15"
    assert render(v, now).splitlines()[-1] == "ETA: ~15m (at most; 3 runs left, 2 at once) — about 14:15"


def test_a_warm_up_epoch_does_not_skew_a_runs_epoch_time(tmp_path):
    run(tmp_path / "r", "running", (60.0, 10.0, 10.0), planned=8, patience=20, owner=ME)
    e = eta(view(tmp_path / "r", queue=None))
    assert (e.seconds, e.at_most) == (50.0, False)  # 5 epochs x the median 10 s (the mean would say 133 s)


def test_a_run_without_an_epoch_takes_the_median_over_every_runs_epochs(tmp_path):
    run(tmp_path / "done1", "done", (10.0, 10.0, 40.0))
    run(tmp_path / "done2", "done", (20.0, 20.0), seed=2)
    make_run(tmp_path / "new", status="running", epochs=(), trainer__epochs=4, seed=3,
             results={"owner": ME, "heartbeat_at": iso(1)})
    e = eta(view(tmp_path, queue=None))
    assert (e.seconds, e.runs_left, e.at_once) == (80.0, 1, 1)  # median of 10,10,40,20,20 = 20 s x 4 epochs


def test_without_any_epoch_the_eta_is_unknown(tmp_path):
    make_run(tmp_path / "new", status="running", epochs=(), trainer__epochs=4,
             results={"owner": ME, "heartbeat_at": iso(1)})
    assert render(view(tmp_path, queue=None)).splitlines()[-1] == "ETA: unknown (no epoch has ended yet)"


def test_the_planned_epochs_come_from_the_hydra_config_when_results_json_has_none(tmp_path):
    rd = tmp_path / "r"
    (rd / ".hydra").mkdir(parents=True)
    (rd / ".hydra" / "config.yaml").write_text("model:\n  name: small_cnn\ntrainer:\n  epochs: 12\n  patience: 30\n")
    (rd / "epochs.csv").write_text("epoch,epoch_time_s\n1,4.0\n2,6.0\n3,5.0\n")
    v = view(rd, queue=None)
    assert [(r.status, r.epochs_done, r.planned) for r in v.runs] == [("no results", 3, 12)]
    assert (eta(v).seconds, eta(v).at_most) == (45.0, False)  # 9 epochs x 5 s; patience 30 cannot stop it


def test_epoch_tail_reads_the_last_whole_rows_from_the_end(tmp_path):
    path = tmp_path / "epochs.csv"
    rows = "".join(f"{e},0.1,{e * 1.5}\n" for e in range(1, 1001))
    path.write_text("epoch,lr,epoch_time_s\n" + rows + "1001,0.1,9")  # the last row is being written
    tail = epoch_tail(path, tail_bytes=64)
    assert tail[-1] == (1000, 1500.0) and tail[0][0] > 990  # only the end was read, its first part-line dropped
    assert [e for e, _ in tail] == list(range(tail[0][0], 1001))
    assert epoch_tail(tmp_path / "absent.csv") == []


def test_a_slurm_sweep_shows_submitted_runs_without_a_directory_as_pending(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    jobs = [{"job_id": f"7_{i}", "run_dir": f"/elsewhere/seed={i}", "executor": "slurm"} for i in range(3)]
    (sweep / "manifest.json").write_text(json.dumps({"jobs": jobs}))
    (sweep / "multirun.yaml").write_text("hydra:\n  launcher:\n    _target_: hydra_plugins.coupled_net_launcher."
                                         "launcher.SlurmLauncher\n    array_parallelism: 2\n    runs_per_task: 1\n")
    slurm = {"host": "node-3", "pid": 99, "slurm_job_id": "7_0"}
    run(sweep / "seed=0", "running", (10.0,) * 4, owner=slurm)                   # 6 left x 10 s
    run(sweep / "seed=1", "running", (10.0,) * 4, owner={**slurm, "slurm_job_id": "7_1"}, seed=2)  # job gone
    v = view(sweep, queue={"7_0": ("RUNNING", "None"), "7_2": ("PENDING", "Priority")})
    assert {r.run_dir.name: r.status for r in v.runs} == {"seed=0": "running", "seed=1": "stale", "seed=2": "pending"}
    assert render(v).splitlines()[0] == f"{sweep}: 3 runs: 1 running, 1 stale, 1 pending"
    e = eta(v)
    assert (e.seconds, e.runs_left, e.at_once) == (100.0, 2, 2)  # seed=2: 10 epochs x the median 10 s
    # seed=2's task starts: SLURM runs it before it has written anything
    started = view(sweep, queue={"7_0": ("RUNNING", "None"), "7_2": ("RUNNING", "None")})
    assert {r.run_dir.name: r.status for r in started.runs}["seed=2"] == "running"


def test_a_sweep_stopped_by_fail_fast_shows_its_reason_and_what_it_did_not_start(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "fail_fast.json").write_text(json.dumps({
        "limit": 2, "failures": 2, "error": "RuntimeError: boom", "at": iso(0),
        "reason": "fail-fast: 2 runs failed (RuntimeError: boom); 2 not started",
        "not_started": [str(sweep / "seed=4"), str(sweep / "seed=5")]}))
    run(sweep / "seed=1", "failed", (10.0,), error="RuntimeError: boom")
    run(sweep / "seed=2", "failed", (10.0,), error="RuntimeError: boom", seed=2)
    (sweep / "seed=4" / ".hydra").mkdir(parents=True)  # made, never trained
    (sweep / "seed=4" / ".hydra" / "config.yaml").write_text("trainer:\n  epochs: 3\n")
    lines = render(view(sweep, queue=None)).splitlines()
    assert lines[0] == f"{sweep}: 4 runs: 2 failed, 2 not_started"
    assert lines[3] == "fail-fast (sweep): fail-fast: 2 runs failed (RuntimeError: boom); 2 not started"
    assert lines[4] == "ETA: nothing left to run"


@pytest.mark.parametrize("launcher, parallel", [
    ("_target_: hydra_plugins.coupled_net_launcher.launcher.SlurmLauncher\n    array_parallelism: 3\n"
     "    runs_per_task: 2", 6),
    ("_target_: hydra_plugins.coupled_net_launcher.launcher.LocalLauncher\n    max_parallel: 4", 4),
    ("_target_: hydra_plugins.coupled_net_launcher.launcher.LocalLauncher\n    max_parallel: null", 1),
    ("_target_: hydra._internal.core_plugins.basic_launcher.BasicLauncher", 1),
])
def test_the_lanes_come_from_the_sweeps_launcher(tmp_path, launcher, parallel):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(f"hydra:\n  launcher:\n    {launcher}\n")
    run(sweep / "r", "done")
    assert view(sweep, queue=None).lanes[sweep] == parallel
    (sweep / "launch.json").write_text(json.dumps({"executor": "local", "parallel": 5}))
    assert view(sweep, queue=None).lanes[sweep] == 5  # what the launch recorded wins


def test_at_most_fifty_run_lines(tmp_path):
    for i in range(53):
        run(tmp_path / f"r{i:02d}", "failed", (1.0,), error="boom", seed=i)
    lines = render(view(tmp_path, queue=None)).splitlines()
    assert lines[1] == "  failed   r00  epoch 1/10  boom" and lines[50] == "  failed   r49  epoch 1/10  boom"
    assert lines[51] == "  … and 3 more"


def listing(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path below `root`, folders included: (is a folder, size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} | {".": (True, 0, root.stat().st_mtime_ns)}


def test_the_command_writes_nothing_and_prints_one_block_per_directory(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one / "a", "done", (10.0, 10.0))
    run(one / "b", "running", (10.0,), owner=ELSEWHERE, heartbeat_s=3, seed=2)
    run(two / "c", "failed", (10.0,), error="ValueError: bad", seed=3)
    before = listing(tmp_path)
    time.sleep(0.01)
    proc = run_cli(str(one), str(two), "--status", script=COLLECT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == before
    blocks = proc.stdout.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [f"{one}: 2 runs: 1 done, 1 running", f"{two}: 1 run: 1 failed"]
    running = blocks[0].splitlines()[1].split("heartbeat ")
    assert running[0] == "  running  b  epoch 1/10  " and 2 <= int(running[1].removesuffix(" s ago")) <= 15
    # b: 9 epochs left x 10 s = 90 s, to the nearest minute
    assert blocks[0].splitlines()[-1].startswith("ETA: ~2m (at most; 1 run left, 1 at once) — about ")
    assert blocks[1].splitlines()[1:] == ["  failed   c  epoch 1/10  ValueError: bad", "ETA: nothing left to run"]


def test_status_takes_no_other_option(tmp_path):
    proc = run_cli(str(tmp_path), "--status", "--out", str(tmp_path / "x"), script=COLLECT, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "collect.py: error: --status takes no --out or --baseline: it writes nothing and compares nothing")
    assert not (tmp_path / "x").exists()
