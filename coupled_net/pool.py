"""A small pool of run processes over slots (coupled_net.slots): the scheduler of hydra/launcher=local
and of a packed SLURM task (hydra.launcher.runs_per_task).

Each job is a pickled callable run by `python -m coupled_net.poolchild JOB RESULT` in its own process,
started with its slot's environment (one physical GPU as CUDA_VISIBLE_DEVICES, COUPLED_NET_SLOT)
and CPU affinity, in its own session (a terminal's Ctrl-C reaches the pool, which passes exactly one
SIGINT to each run: a second Ctrl-C is passed on as the second signal that stops a run at once),
and with a parent-death signal (the runs do not outlive a killed pool). At most one run per slot is
alive; the next job takes the lowest free slot when a run ends, whatever its end (done, failed,
diverged, refused, killed). A run's output goes to `<folder>/<num>_log.out`; the pool logs one line
when a run starts and one when it ends.

Why not submitit's local executor: it starts every job at once and takes CUDA_VISIBLE_DEVICES and
the CPU affinity from the launching process, so a queue over slots would have to change the
launcher's own environment and affinity around each submission; and a packed SLURM task needs the
same pool inside a job, where that executor cannot run. The job's callable and its return value
still travel as submitit does it (cloudpickle)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cloudpickle

from .slots import Gpu, Slot, slot_environment

log = logging.getLogger(__name__)
POLL_S = 0.1
STOP_WAIT_S = 300  # after a stop: how long the pool waits for its runs to save last.pt and end
NO_RESULT = object()


@dataclass
class PoolJob:
    num: int
    label: str  # shown in the pool's log lines (the job's overrides)
    function: Callable[[], Any]  # picklable; its return value comes back in Outcome.value


@dataclass
class Outcome:
    num: int
    slot: Slot
    returncode: Optional[int] = None
    value: Any = NO_RESULT  # what the job's function returned (NO_RESULT: the process ended without one)
    error: Optional[str] = None  # the function raised: its one-line description
    started: float = 0.0
    ended: float = 0.0
    log_path: Optional[Path] = None


@dataclass
class _Running:
    job: PoolJob
    proc: subprocess.Popen
    outcome: Outcome
    result_path: Path
    signalled: int = 0


@dataclass
class Pool:
    """`run(jobs)` starts `jobs` in order over `slots`; returns one Outcome per job (in `jobs`'
    order; a job never started because the pool was stopped has none). `gpus`: physical index ->
    Gpu, for the runs' provenance. `timeout_s`: a run alive longer is stopped (SIGTERM: `interrupted`)."""

    slots: Sequence[Slot]
    folder: Path
    gpus: dict[int, Gpu] = field(default_factory=dict)
    timeout_s: Optional[float] = None
    stop_requested: Optional[int] = None  # a signal number: start nothing more, pass it on to the runs
    running: dict[int, _Running] = field(default_factory=dict)
    # called as each run ends: a reason (fail-fast) makes the pool start nothing more, running runs
    # left to finish (unlike a stop signal); on_stop then gets the reason and the jobs it will not start
    should_stop: Optional[Callable[[Outcome], Optional[str]]] = None
    on_stop: Optional[Callable[[str, list[PoolJob]], None]] = None
    stopped_by: Optional[str] = None

    def run(self, jobs: Sequence[PoolJob]) -> list[Outcome]:
        self.folder.mkdir(parents=True, exist_ok=True)
        queue, free, done = deque(jobs), list(self.slots), {}
        try:
            while queue or self.running:
                if self.stop_requested is not None:
                    queue.clear()
                    self._pass_on(self.stop_requested)
                while queue and free:
                    self._start(queue.popleft(), free.pop(0))
                time.sleep(POLL_S)
                for ended in self._reap():
                    done[ended.num] = ended
                    free.append(ended.slot)
                    free.sort(key=lambda s: s.number)
                    self._check(ended, queue)
        except KeyboardInterrupt:
            log.warning("stopping the %d running run(s): each saves a checkpoint at the end of its step and records "
                        "`interrupted`; %d not started", len(self.running), len(queue))
            self.stop(signal.SIGINT)
            self._wait_all(done)
            raise
        return [done[j.num] for j in jobs if j.num in done]

    def _check(self, ended: Outcome, queue: deque) -> None:
        why = self.should_stop(ended) if self.should_stop is not None else None
        if why and self.stopped_by is None:
            self.stopped_by = why
            left = list(queue)
            queue.clear()
            if self.on_stop is not None:
                self.on_stop(why, left)

    def stop(self, signum: int) -> None:
        """Start nothing more; each running run gets `signum` once (again: once more)."""
        self.stop_requested = signum
        for running in self.running.values():
            running.signalled = 0
        self._pass_on(signum)

    def _pass_on(self, signum: int) -> None:
        for running in self.running.values():
            if not running.signalled:
                _signal(running.proc, signum)
                running.signalled = signum

    def _wait_all(self, done: dict) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        while self.running and time.monotonic() < deadline:
            try:
                time.sleep(POLL_S)
                for ended in self._reap():
                    done[ended.num] = ended
            except KeyboardInterrupt:  # again: each run gets a second signal and stops at once
                log.warning("stopping the %d run(s) still saving, at once", len(self.running))
                for running in self.running.values():
                    _signal(running.proc, signal.SIGINT)

    def _start(self, job: PoolJob, slot: Slot) -> None:
        job_path = self.folder / f"{job.num}_job.pkl"
        result_path = self.folder / f"{job.num}_result.pkl"
        result_path.unlink(missing_ok=True)
        job_path.write_bytes(cloudpickle.dumps(job.function))
        log_path = self.folder / f"{job.num}_log.out"
        env = {**os.environ, **slot_environment(slot, self.gpus.get(slot.gpu)), "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "coupled_net.poolchild", str(job_path), str(result_path)],
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_child_setup(slot.cpus))
        outcome = Outcome(job.num, slot, started=time.time(), log_path=log_path)
        self.running[job.num] = _Running(job, proc, outcome, result_path)
        where = "CPU only" if slot.gpu is None else f"GPU {slot.gpu} (with {slot.shared_by - 1} other run(s))" \
            if slot.shared_by > 1 else f"GPU {slot.gpu}"
        log.info("#%d started: %s, cores %s: %s", job.num, where, _ranges(slot.cpus), job.label)

    def _reap(self) -> list[Outcome]:
        ended = []
        for num, running in list(self.running.items()):
            code = running.proc.poll()
            if code is None:
                if self.timeout_s and not running.signalled and time.time() - running.outcome.started > self.timeout_s:
                    log.warning("#%d: running longer than %.0f min (hydra.launcher.timeout_min): stopping it", num,
                                self.timeout_s / 60)
                    _signal(running.proc, signal.SIGTERM)
                    running.signalled = signal.SIGTERM
                continue
            outcome = running.outcome
            outcome.returncode, outcome.ended = code, time.time()
            if running.result_path.is_file():
                try:
                    kind, payload = cloudpickle.loads(running.result_path.read_bytes())
                except Exception as e:  # noqa: BLE001 - a torn result: as good as none
                    kind, payload = "error", f"its result could not be read ({e})"
                if kind == "value":
                    outcome.value = payload
                else:
                    outcome.error = payload
            del self.running[num]
            how = "ended" if code == 0 else f"ended with exit code {code}"
            log.info("#%d %s after %.1f s", num, how, outcome.ended - outcome.started)
            ended.append(outcome)
        return ended


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except OSError:
        pass


def _ranges(cpus: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for c in sorted(cpus):
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = c
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(out)


def _child_setup(cpus: Sequence[int]) -> Callable[[], None]:
    """Runs in the child between fork and exec: its cores, and SIGTERM when the pool dies."""
    def setup() -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return setup
