"""Fail-fast for sweeps (hydra.sweeper.fail_fast=N: a launch with N failed runs starts no more), the
local sweep's `run k/N ended ... ETA` line, launch.json, and hydra.sweep.mode (issue 21)."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coupled_net import failfast, sweep, sweepfiles
from coupled_net.callbacks import run_statuses, verdict
from coupled_net.pool import Outcome, Pool, PoolJob
from coupled_net.slots import plan_slots
from coupled_net.failfast import cancel_pending, cancellable, fail_fast_stop, launch_failures, note_failure, start_launch
from coupled_net.sweep import PlannedJob, eta_s, hms
from coupled_net.sweepfiles import most_common_error, read_fail_fast
from helpers import make_run, run_cli, run_dirs
from hydra_plugins.coupled_net_launcher.launcher import LocalLauncher, LocalProgress
from hydra_plugins.coupled_net_launcher.sweeper import check_fail_fast

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.epochs=1",
        "trainer.limit_batches=2", "trainer.batch_size=16", "trainer.device=cpu", "trainer.threads=1",
        "trainer.num_workers=0"]
INJECTED = "RuntimeError: injected fault"

# A fault for the runs whose seed is in $FAULT_SEEDS, in every Python process that inherits the
# environment (the sweep's, a SLURM task's): raised once the run has claimed its directory and starts
# building (after every check), so the run ends `failed` as a bug would end it.
SITECUSTOMIZE = """\
import os

if os.environ.get("FAULT_SEEDS"):
    import coupled_net.lifecycle as lifecycle

    real = lifecycle.resolve

    def resolve(cfg, world):
        if str(cfg.seed) in os.environ["FAULT_SEEDS"].split(","):
            raise RuntimeError("injected fault")
        return real(cfg, world)

    lifecycle.resolve = resolve
"""


def fault_env(tmp_path: Path, seeds: str) -> dict:
    folder = tmp_path / "fault"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"FAULT_SEEDS": seeds, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder),
                                                                              os.environ.get("PYTHONPATH")]))}


def ended_lines(out: str) -> list[str]:
    """The `run k/N ended …` lines of a sweep's console, without their log prefix."""
    return [m.group(0) for m in map(re.compile(r"run \d+/\d+ ended \(#.*").search, out.splitlines()) if m]


@pytest.fixture(autouse=True)
def fresh_launch():
    """The in-process records are module state: each test starts (and leaves) a clean launch."""
    failfast._failures.clear()
    failfast._ran.clear()
    sweep.not_started.clear()
    yield
    failfast._failures.clear()
    failfast._ran.clear()
    sweep.not_started.clear()


def failure(run: str, error: str) -> dict:
    return {"run_dir": run, "error": error}


# ---- the pure parts ------------------------------------------------------------------------------------

def test_the_eta_is_the_mean_duration_times_the_rounds_left():
    assert eta_s([10.0, 20.0], 3, 2) == 30.0  # mean 15 s x ceil(3 / 2) = 2 rounds
    assert eta_s([10.0, 20.0], 0, 2) == 0.0  # nothing left
    assert eta_s([12.0], 1, 4) == 12.0  # fewer left than slots: one round
    assert eta_s([1.0, 1.0, 100.0], 5, 2) == 102.0  # one slow run pulls the mean to 34 s; 3 rounds
    assert eta_s([], 4, 2) is None  # nothing ended yet: no estimate
    assert [hms(3725.4), hms(0.0), hms(None), hms(100 * 3600)] == ["01:02:05", "00:00:00", "?", "100:00:00"]


def test_the_basic_launcher_numbers_the_runs_it_launches_in_planned_order_and_estimates_what_is_left(tmp_path):
    planned = [PlannedJob(i, [f"seed={i}"], tmp_path / f"r{i}", None) for i in range(4)]
    planned[1].done_in = planned[1].run_dir  # finished before: not launched, not counted
    sweep.remember(planned)
    start_launch(tmp_path)
    assert sweep.ended_line(tmp_path / "r0", "failed", 20.4) == \
        "run 1/3 ended (#0, failed) after 20 s; ETA ~ 00:00:41 (2 left, 1 at once)"  # 20.4 s x 2
    assert sweep.ended_line(tmp_path / "r2", "done", 10.0) == \
        "run 2/3 ended (#2, done) after 10 s; ETA ~ 00:00:15 (1 left, 1 at once)"
    assert sweep.ended_line(tmp_path / "elsewhere", "done", 1.0) is None  # not a run of this launch
    sweep.remember(None)
    assert sweep.ended_line(tmp_path / "r3", "done", 1.0) is None  # no launch in this process (a SLURM task)


def test_the_most_common_error_wins_and_a_tie_goes_to_the_earliest():
    assert most_common_error([failure("a", "X"), failure("b", "Y"), failure("c", "Y")]) == "Y"
    assert most_common_error([failure("a", "X"), failure("b", "Y"), failure("c", "Y"), failure("d", "X"),
                              failure("e", "Z")]) == "X"
    assert most_common_error([]) == ""


def test_squeue_lines_select_every_pending_task_but_a_requeued_one():
    out = "123_4|JobArrayTaskLimit\n123_5|BeginTime\n124_0|Dependency\n\n124_1|Priority\n"
    assert cancellable(out) == ["123_4", "124_0", "124_1"]
    assert cancellable("") == []


def test_failures_are_counted_per_launch_and_the_first_job_past_the_limit_writes_fail_fast_json(tmp_path):
    s = tmp_path / "s"
    planned = [PlannedJob(i, [f"seed={i}"], s / f"r{i}", None) for i in range(4)]
    start_launch(s)
    failfast.note_started(s / "r0")
    note_failure(s, s / "r0", "E1")
    assert fail_fast_stop(s, 2, s / "r1") is None  # 1 failure < 2
    failfast.note_started(s / "r1")
    note_failure(s, s / "r1", "E2")
    assert fail_fast_stop(s, None, s / "r2") is None  # off
    reason = "fail-fast: 2 runs failed (hydra.sweeper.fail_fast=2); most failed with: E1"
    assert fail_fast_stop(s, 2, s / "r2", planned) == reason
    record = read_fail_fast(s)
    assert (record["limit"], record["error"], record["reason"]) == (2, "E1", reason)
    assert record["failures"] == [failure(str(s / "r0"), "E1"), failure(str(s / "r1"), "E2")]
    assert record["not_started"] == [str(s / "r2"), str(s / "r3")]  # itself, and the planned runs after it
    time.strptime(record["at"], "%Y-%m-%dT%H:%M:%S%z")
    assert fail_fast_stop(s, 2, s / "r3", planned) == reason
    assert read_fail_fast(s) == record  # only the first one writes it
    start_launch(s)  # a re-launch: counts from zero, the old verdict gone
    assert read_fail_fast(s) is None and launch_failures(s) == []
    assert fail_fast_stop(s, 2, s / "r0", planned) is None


def test_the_tasks_of_one_slurm_array_count_each_others_failures_through_files(tmp_path, monkeypatch):
    s = tmp_path / "s"
    s.mkdir()
    (s / ".failures.41").mkdir()  # an earlier launch's array
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    start_launch(s)
    assert not (s / ".failures.41").exists()
    note_failure(s, s / "r0", "E1")  # task A
    assert json.loads((s / ".failures.77" / "r0.json").read_text()) == failure(str(s / "r0"), "E1")
    failfast._failures.clear()  # task B: another process
    assert launch_failures(s) == [failure(str(s / "r0"), "E1")]
    assert fail_fast_stop(s, 1, s / "r5") == "fail-fast: 1 runs failed (hydra.sweeper.fail_fast=1); most failed " \
                                             "with: E1"
    assert read_fail_fast(s)["not_started"] == [str(s / "r5")]  # no manifest: nothing to cancel
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "78")  # another launch's array: its own count
    failfast._failures.clear()
    assert launch_failures(s) == []


def fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_fail_fast_cancels_the_pending_tasks_of_the_sweeps_arrays_but_not_a_requeued_one(tmp_path, monkeypatch):
    s = tmp_path / "s"
    s.mkdir()
    jobs = [{"job_id": f"900_{i}", "run_dir": str(s / f"r{i}")} for i in range(3)] + \
        [{"job_id": "901_0", "run_dir": str(s / "r3")}, {"job_id": "901_0", "run_dir": str(s / "r4")}]  # packed
    (s / "manifest.json").write_text(json.dumps({"sweep_dir": str(s), "jobs": jobs}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "squeue", f'echo "$@" > {tmp_path}/squeue.args\n'
              'printf "900_1|BeginTime\\n900_2|JobArrayTaskLimit\\n901_0|Dependency\\n"\n')
    fake_tool(bin_dir, "scancel", f'echo "$@" > {tmp_path}/scancel.args\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert cancel_pending(s) == [str(s / "r2"), str(s / "r3"), str(s / "r4")]
    assert (tmp_path / "squeue.args").read_text().split() == ["-h", "-r", "-j", "900,901", "-t", "PENDING", "-o",
                                                              "%i|%r"]
    assert (tmp_path / "scancel.args").read_text().split() == ["900_2", "901_0"]


def test_without_squeue_fail_fast_warns_once_and_cancels_nothing(tmp_path, monkeypatch, caplog):
    s = tmp_path / "s"
    s.mkdir()
    (s / "manifest.json").write_text(json.dumps({"jobs": [{"job_id": "900_0", "run_dir": str(s / "r0")}]}))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with caplog.at_level(logging.WARNING, logger="coupled_net.sweep"):
        assert cancel_pending(s) == []
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "fail-fast could not cancel the sweep's pending SLURM tasks"]


def test_the_verdict_names_never_started_runs_not_started_with_the_fail_fast_reason(tmp_path):
    s = tmp_path / "s"
    failed = make_run(s / "a", status="failed", results={"error": "ValueError: boom"})
    never = s / "b"
    sweepfiles.write_fail_fast(s, 1, [failure(str(failed), "ValueError: boom")], [str(never)])
    lines = verdict(run_statuses(s), [PlannedJob(0, ["seed=0"], failed, None), PlannedJob(1, ["seed=1"], never, None)],
                    s)
    assert lines == [f"2 of 2 runs failed in {s}: a (failed: ValueError: boom); b (not_started: fail-fast: 1 runs "
                     "failed (hydra.sweeper.fail_fast=1); most failed with: ValueError: boom)"]


# ---- the local launcher: its pool and the line per ended run --------------------------------------------

def sleeper(seconds: float, fail: bool = False):
    def job():
        import os as _os
        import signal as _signal
        import time as _time

        got = []
        _signal.signal(_signal.SIGTERM, lambda s, f: got.append(s))
        _signal.signal(_signal.SIGINT, lambda s, f: got.append(s))
        _time.sleep(seconds)
        if fail:
            raise ValueError("boom")
        return {"pid": _os.getpid(), "signals": got}
    return job


def test_a_pool_told_to_stop_starts_no_more_and_lets_the_running_runs_finish_unsignalled(tmp_path):
    slots = plan_slots(gpus=[], present=[], runs_per_gpu=1, max_parallel=2, cpus_per_run=None,
                       cores=sorted(os.sched_getaffinity(0)))
    jobs = [PoolJob(0, "fails", sleeper(0.1, fail=True)), PoolJob(1, "long", sleeper(1.5)),
            PoolJob(2, "queued", sleeper(0.1)), PoolJob(3, "queued", sleeper(0.1))]
    told = []
    pool = Pool(slots, tmp_path / "pool", should_stop=lambda o: "enough" if o.error else None,
                on_stop=lambda why, left: told.append((why, [j.num for j in left])))
    outcomes = pool.run(jobs)
    assert [o.num for o in outcomes] == [0, 1]  # 2 and 3 never started
    assert told == [("enough", [2, 3])] and pool.stopped_by == "enough"
    assert outcomes[1].value["signals"] == [] and outcomes[1].returncode == 0  # finished, not stopped
    assert not (tmp_path / "pool" / "2_job.pkl").exists()


def test_the_local_launcher_says_run_k_of_n_with_an_eta_and_trips_fail_fast_at_the_limit(tmp_path, caplog):
    s = tmp_path / "s"
    runs = {n: s / f"r{n}" for n in range(5)}
    make_run(runs[0], status="failed", results={"error": "E"})
    make_run(runs[1])
    make_run(runs[2], status="failed", results={"error": "E"})
    progress = LocalProgress(s, runs, parallel=2, limit=2)

    def ended(num: int, seconds: float, code: int = 0) -> str | None:
        return progress.ended(Outcome(num, None, returncode=code, started=1000.0, ended=1000.0 + seconds))

    with caplog.at_level(logging.INFO, logger="hydra_plugins.coupled_net_launcher.launcher"):
        assert ended(0, 10) is None
        assert ended(1, 20) is None
        reason = ended(2, 60)
        progress.stopped(reason, [PoolJob(3, "", print), PoolJob(4, "", print)])
    assert [r.getMessage() for r in caplog.records] == [
        "run 1/5 ended (#0, failed) after 10 s; ETA ~ 00:00:20 (4 left, 2 at once)",
        "run 2/5 ended (#1, done) after 20 s; ETA ~ 00:00:30 (3 left, 2 at once)",
        "run 3/5 ended (#2, failed) after 60 s; ETA ~ 00:00:30 (2 left, 2 at once)",
        "fail-fast: 2 runs failed (hydra.sweeper.fail_fast=2); starting no more runs; most failed with: E"]
    assert reason == "fail-fast: 2 runs failed (hydra.sweeper.fail_fast=2); most failed with: E"
    record = read_fail_fast(s)
    assert record["not_started"] == [str(runs[3]), str(runs[4])] and record["limit"] == 2
    assert record["failures"] == [failure(str(runs[0]), "E"), failure(str(runs[2]), "E")]


def test_a_run_whose_process_left_no_results_shows_its_exit_code(tmp_path, caplog):
    progress = LocalProgress(tmp_path, {7: tmp_path / "r7"}, parallel=1, limit=None)
    with caplog.at_level(logging.INFO, logger="hydra_plugins.coupled_net_launcher.launcher"):
        assert progress.ended(Outcome(7, None, returncode=-9, started=0.0, ended=4.0)) is None
    assert caplog.records[-1].getMessage() == ("run 1/1 ended (#7, exit -9) after 4 s; ETA ~ 00:00:00 (0 left, "
                                               "1 at once)")


def test_the_sweep_directory_gets_hydra_sweep_mode_as_upstream_gives_it(tmp_path):
    launcher = LocalLauncher.__new__(LocalLauncher)
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "s"), "mode": 750}}})
    launcher.run_dir = lambda overrides, num: tmp_path / "s" / "r"
    launcher._run_here = lambda todo, sweep_dir: []
    launcher.launch([["seed=1"]], initial_job_idx=0)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o750


# ---- through the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -3, 2.5, True, "2"])
def test_a_fail_fast_that_is_not_a_positive_integer_is_refused_at_setup(value, capsys):
    with pytest.raises(SystemExit) as refused:  # CoupledSweeper.setup's first step: nothing built or written
        check_fail_fast(value)
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"coupled_net: error: hydra.sweeper.fail_fast={value!r}: an integer >= 1, or null (off)"]


def test_a_bad_fail_fast_on_the_command_line_is_refused_in_one_line_before_anything_is_written(tmp_path):
    proc = run_cli("-m", *TINY, "hydra.sweeper.fail_fast=many", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "coupled_net: error: hydra.sweeper.fail_fast='many': an integer >= 1, or null (off)"]
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # 5 tiny runs trained in the re-launch, ~40 s on 2 cores
def test_a_sweep_stops_after_fail_fast_failures_and_the_same_command_resumes_it(tmp_path):
    """5 runs, the first 3 failing: 2 fail, 3 are not started; without the fault, the re-launch runs all 5."""
    s = tmp_path / "s"
    args = ["-m", *TINY, "seed=1,2,3,4,5", "hydra.sweeper.fail_fast=2", f"hydra.sweep.dir={s}",
            f"dataset.root={tmp_path}"]
    proc = run_cli(*args, cwd=tmp_path, env=fault_env(tmp_path, "1,2,3"))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout + proc.stderr
    line = f"fail-fast: 2 runs failed (hydra.sweeper.fail_fast=2); starting no more runs; most failed with: {INJECTED}"
    assert out.count(line) == 1
    names = [f"dataset.test_per_class=2,dataset.train_per_class=4,experiment=quickstart,seed={n},"
             "trainer.batch_size=16,trainer.epochs=1,trainer.limit_batches=2" for n in range(1, 6)]
    assert [d.name for d in run_dirs(s)] == names  # Hydra made every job's directory; three stay empty
    status = [json.loads((s / n / "results.json").read_text())["status"] if (s / n / "results.json").is_file()
              else None for n in names]
    assert status == ["failed", "failed", None, None, None]
    for name in names[2:]:
        assert f"{name}: not started: fail-fast (2 failed runs in this launch)" in out
    assert [re.sub(r"after \d+ s; ETA ~ \d\d:\d\d:\d\d", "after X s; ETA ~ T", e) for e in ended_lines(out)] == [
        "run 1/5 ended (#0, failed) after X s; ETA ~ T (4 left, 1 at once)",
        "run 2/5 ended (#1, failed) after X s; ETA ~ T (3 left, 1 at once)"]  # the others never started
    record = json.loads((s / "fail_fast.json").read_text())
    reason = f"fail-fast: 2 runs failed (hydra.sweeper.fail_fast=2); most failed with: {INJECTED}"
    assert (record["limit"], record["error"], record["reason"]) == (2, INJECTED, reason)
    assert record["failures"] == [failure(str(s / n), INJECTED) for n in names[:2]]
    assert record["not_started"] == [str(s / n) for n in names[2:]]
    assert proc.stderr.strip().splitlines()[-1] == f"coupled_net: error: 5 of 5 runs failed in {s}: " + "; ".join(
        [f"{n} (failed: {INJECTED})" for n in names[:2]] + [f"{n} (not_started: {reason})" for n in names[2:]])
    launch = json.loads((s / "launch.json").read_text())
    time.strptime(launch.pop("started_at"), "%Y-%m-%dT%H:%M:%S%z")
    assert launch == {"executor": "basic", "parallel": 1, "planned": 5, "launched": 5, "fail_fast": 2}

    again = run_cli(*args, cwd=tmp_path)  # the fault cleared
    assert again.returncode == 0, again.stderr
    assert not (s / "fail_fast.json").exists()
    assert ended_lines(again.stdout + again.stderr)[-1].endswith("ETA ~ 00:00:00 (0 left, 1 at once)")
    assert [e.split(" ended")[0] for e in ended_lines(again.stdout + again.stderr)] == [f"run {k}/5"
                                                                                        for k in range(1, 6)]
    assert [json.loads((s / n / "results.json").read_text())["status"] for n in names] == ["done"] * 5


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_on_slurm_fail_fast_cancels_the_arrays_pending_tasks_and_lists_them_not_started(tmp_path):
    """4 runs, one task at a time, the first failing, fail_fast=1: the second task finds the limit
    reached, starts nothing and cancels the two still pending; the waiting sweep ends with its verdict."""
    s = tmp_path / "s"
    proc = run_cli("-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
                   "hydra.launcher.mem_per_cpu=1G", "hydra.launcher.timeout_min=20",
                   "hydra.launcher.array_parallelism=1", *TINY, "seed=1,2,3,4", "hydra.sweeper.fail_fast=1",
                   f"hydra.sweep.dir={s}", f"dataset.root={tmp_path}", cwd=tmp_path, env=fault_env(tmp_path, "1"),
                   timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {job["job_num"]: job["run_dir"] for job in json.loads((s / "manifest.json").read_text())["jobs"]}
    record = json.loads((s / "fail_fast.json").read_text())
    assert record["failures"] == [failure(runs[0], INJECTED)]
    assert record["not_started"] == [runs[1], runs[2], runs[3]]  # the tripping task's own run, then the cancelled
    assert [(Path(r) / "results.json").is_file() for r in (runs[1], runs[2], runs[3])] == [False] * 3
    launch = json.loads((s / "launch.json").read_text())
    assert (launch["executor"], launch["parallel"], launch["planned"]) == ("slurm", 1, 4)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"coupled_net: error: 4 of 4 runs failed in {s}: ")


@pytest.mark.slow  # two run processes start (torch each): ~40 s on 2 cores
def test_a_local_sweep_says_run_k_of_n_and_its_pool_stops_starting_runs_at_the_fail_fast_limit(tmp_path):
    s = tmp_path / "s"
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.max_parallel=1", *TINY, "seed=1,2,3,4",
                   "hydra.sweeper.fail_fast=2", f"hydra.sweep.dir={s}", f"dataset.root={tmp_path}", cwd=tmp_path,
                   env=fault_env(tmp_path, "1,2"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert [re.sub(r"after \d+ s; ETA ~ \d\d:\d\d:\d\d", "after X s; ETA ~ T", e) for e in ended_lines(out)] == [
        "run 1/4 ended (#0, failed) after X s; ETA ~ T (3 left, 1 at once)",
        "run 2/4 ended (#1, failed) after X s; ETA ~ T (2 left, 1 at once)"]
    assert out.count(f"fail-fast: 2 runs failed (hydra.sweeper.fail_fast=2); starting no more runs; most failed "
                     f"with: {INJECTED}") == 1
    runs = {int(d.name.split("seed=")[1].split(",")[0]): d for d in run_dirs(s)}
    assert sorted(runs) == [1, 2]  # the pool never started 3 and 4: Hydra made no directory for them
    record = json.loads((s / "fail_fast.json").read_text())
    assert [Path(r).name for r in record["not_started"]] == [runs[1].name.replace("seed=1", f"seed={n}")
                                                               for n in (3, 4)]
    launch = json.loads((s / "launch.json").read_text())
    assert (launch["executor"], launch["parallel"], launch["launched"], launch["fail_fast"]) == ("local", 1, 4, 2)
