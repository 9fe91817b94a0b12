"""The pool behind hydra/launcher=local and packed SLURM tasks (coupled_net.pool), with jobs that only
report what their process received: its GPU, its cores, when it ran. No training: fast."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from coupled_net.pool import NO_RESULT, Pool, PoolJob
from coupled_net.slots import plan_slots


def reporter(out: Path, seconds: float = 0.3, fail: bool = False, on_sigint: bool = False):
    """A job that writes what its process saw to `out` (a closure: cloudpickle carries it by value)."""
    def job():
        import json as _json
        import os as _os
        import signal as _signal
        import time as _time

        got = []
        if on_sigint:
            _signal.signal(_signal.SIGINT, lambda s, f: got.append(s))
            out.with_suffix(".ready").touch()
        start = _time.time()
        deadline = start + seconds
        while _time.time() < deadline and not got:
            _time.sleep(0.02)
        if got:
            _time.sleep(0.3)  # a second SIGINT would arrive here
        seen = {"cuda": _os.environ.get("CUDA_VISIBLE_DEVICES"), "cpus": sorted(_os.sched_getaffinity(0)),
                "slot": _json.loads(_os.environ["COUPLED_NET_SLOT"]), "start": start, "end": _time.time(),
                "sigints": len(got), "pid": _os.getpid()}
        out.write_text(_json.dumps(seen))
        if fail:
            raise ValueError("boom")
        if got:
            raise SystemExit(130)
        return {"answer": 42}
    return job


def cpu_slots(n: int):
    return plan_slots(gpus=[], present=[], runs_per_gpu=1, max_parallel=n, cpus_per_run=None,
                      cores=sorted(os.sched_getaffinity(0)))


def most_at_once(spans) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    return max(sum(d for _, d in events[:i + 1]) for i in range(len(events)))


def seen(tmp_path: Path, num: int) -> dict:
    return json.loads((tmp_path / f"seen{num}.json").read_text())


def test_each_run_gets_its_slots_gpu_and_cores_and_the_queue_keeps_at_most_max_parallel_alive(tmp_path):
    slots = plan_slots(gpus=[3, 5], present=[3, 5], runs_per_gpu=1, max_parallel=None, cpus_per_run=None,
                       cores=sorted(os.sched_getaffinity(0)))
    jobs = [PoolJob(n, f"job {n}", reporter(tmp_path / f"seen{n}.json", 0.4)) for n in range(5)]
    outcomes = Pool(slots, tmp_path / "pool").run(jobs)
    assert [o.num for o in outcomes] == [0, 1, 2, 3, 4] and all(o.returncode == 0 for o in outcomes)
    assert [o.value for o in outcomes] == [{"answer": 42}] * 5
    runs = [seen(tmp_path, n) for n in range(5)]
    assert [r["cuda"] for r in runs[:2]] == ["3", "5"]  # the first two fill both GPUs
    assert {r["cuda"] for r in runs} == {"3", "5"}
    for r in runs:  # what each process saw agrees with the slot it was told about
        assert r["cuda"] == str(r["slot"]["gpu"]) and r["cpus"] == r["slot"]["cpus"]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(runs[0]["cpus"]) & set(runs[1]["cpus"])  # concurrent runs: disjoint cores
    assert most_at_once([(r["start"], r["end"]) for r in runs]) <= 2  # by the runs' own clocks
    assert most_at_once([(o.started, o.ended) for o in outcomes]) == 2  # and the pool did fill both slots
    assert runs[2]["start"] >= min(runs[0]["end"], runs[1]["end"])  # the third waited for a slot
    started = [o.started for o in outcomes]
    assert started == sorted(started)  # in the queue's order


def test_a_failing_run_frees_its_slot_and_the_others_go_on(tmp_path):
    jobs = [PoolJob(0, "fails", reporter(tmp_path / "seen0.json", 0.1, fail=True)),
            PoolJob(1, "next", reporter(tmp_path / "seen1.json", 0.1)),
            PoolJob(2, "last", reporter(tmp_path / "seen2.json", 0.1))]
    outcomes = Pool(cpu_slots(1), tmp_path / "pool").run(jobs)
    assert outcomes[0].error == "ValueError: boom" and outcomes[0].value is NO_RESULT
    assert [o.value for o in outcomes[1:]] == [{"answer": 42}] * 2
    assert seen(tmp_path, 1)["start"] >= seen(tmp_path, 0)["end"]
    assert "ValueError: boom" in (tmp_path / "pool" / "0_log.out").read_text()  # the traceback is kept


def test_a_run_whose_process_dies_ends_without_a_result_and_its_slot_is_reused(tmp_path):
    def dies():
        os._exit(9)

    outcomes = Pool(cpu_slots(1), tmp_path / "pool").run(
        [PoolJob(0, "dies", dies), PoolJob(1, "after", reporter(tmp_path / "seen1.json", 0.1))])
    assert (outcomes[0].returncode, outcomes[0].value, outcomes[0].error) == (9, NO_RESULT, None)
    assert outcomes[1].value == {"answer": 42}


def test_ctrl_c_passes_one_sigint_to_each_running_run_and_starts_no_more(tmp_path):
    jobs = [PoolJob(n, f"job {n}", reporter(tmp_path / f"seen{n}.json", 30, on_sigint=True)) for n in range(4)]
    pool = Pool(cpu_slots(2), tmp_path / "pool")

    def interrupt():
        while not all((tmp_path / f"seen{n}.ready").exists() for n in (0, 1)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C reaches the launcher

    threading.Thread(target=interrupt, daemon=True).start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        pool.run(jobs)
    assert time.time() - started < 20  # the runs stopped, nobody waited for their 30 s
    assert [seen(tmp_path, n)["sigints"] for n in (0, 1)] == [1, 1]  # once: a second would stop at once
    assert not (tmp_path / "seen2.json").exists() and not (tmp_path / "seen3.json").exists()
    assert not pool.running


def test_a_run_past_the_timeout_is_stopped_like_a_ctrl_c(tmp_path):
    outcomes = Pool(cpu_slots(1), tmp_path / "pool", timeout_s=0.5).run(
        [PoolJob(0, "slow", reporter(tmp_path / "seen0.json", 30, on_sigint=False))])
    assert outcomes[0].returncode == -signal.SIGTERM  # a run handles SIGTERM: saves, ends `interrupted`
