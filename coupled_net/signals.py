"""Signals that stop a run, and where it stops.

- SLURM's pre-timeout / preemption signal (SIGUSR1/2, handled by submitit, which checkpoints the
  job's callable, requeues it and exits at once): held back until the training loop reaches a safe
  point (the end of the current step), last.pt is saved there, then submitit requeues. At most one
  step is lost and the task never returns as if it had finished.
- SIGINT / SIGTERM outside that path (Ctrl-C, `kill`, a container stop): the same checkpoint at the
  end of the current step, then the run ends with `status: interrupted` and one line; the same
  command resumes it. A second signal stops at once (the run resumes from the last epoch). Inside a
  SLURM job SIGTERM stays submitit's (it ignores it: SLURM sends it before a requeue too).

Under DDP the ranks agree at every STOP_CHECK_EVERY-th step (coupled_net.trainer) whether any of
them holds a signal, so all stop at the same step boundary whichever rank was signalled; rank 0
saves last.pt there, then each acts on its own signal (a rank that got none ends with
RunInterrupted; a rank other than 0 leaves the requeue to rank 0 and waits for its kill).

A run packed into a SLURM task (hydra.launcher.runs_per_task, coupled_net.pool) treats SLURM's
requeue signal as a stop (last.pt at the step's end, `interrupted`); its task requeues once every
run it holds has ended, and the requeued task resumes them.

Outside the training loop (building, final evaluation) a stop signal ends the run at once."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

from .machine import slurm_job_id, this_slot

log = logging.getLogger(__name__)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """A stop signal ended the run (BaseException, like KeyboardInterrupt: a sweep stops too)."""

    def __init__(self, signum: int, where: str = ""):
        self.signum, self.where = signum, where
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}{f' {where}' if where else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _is_submitit_handler(handler) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


def _is_default(sig: int, handler) -> bool:
    return handler is signal.default_int_handler if sig == signal.SIGINT else handler in (signal.SIG_DFL, None)


def _outside_slurm(handler) -> bool:
    """submitit's SIGTERM bypass is SLURM's business; in submitit's local executor (hydra/launcher=local)
    SIGTERM comes from its controller stopping the job: a stop like any other."""
    return _is_submitit_handler(handler) and slurm_job_id() is None


def _bypass(signum, frame) -> None:
    log.warning("%s ignored: inside a SLURM task it comes before the kill of a requeue or a cancel",
                signal.Signals(signum).name)


class StopGuard:
    """`with StopGuard() as guard:` for a run's lifetime; `with guard.deferred():` around the
    training loop, which polls `guard.pending` at each step and calls `guard.release(where)`."""

    def __init__(self):
        self.previous: dict[int, object] = {}
        self.requeue_handlers: dict[int, object] = {}
        self.pending: tuple | None = None  # (kind, signum, frame), kind: requeue | interrupt
        self.deferring = False

    def __enter__(self) -> "StopGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        packed = (this_slot() or {}).get("packed_in") == "slurm task"
        for sig in REQUEUE_SIGNALS:
            handler = signal.getsignal(sig)
            if _is_submitit_handler(handler):
                self.requeue_handlers[sig] = handler
                self._install(sig, self._hold_requeue)
            elif packed:
                self._install(sig, self._stop_for_task)
        for sig in STOP_SIGNALS:
            handler = signal.getsignal(sig)
            if sig == signal.SIGTERM and packed:  # as submitit does for a run alone in its task: SLURM
                self._install(sig, _bypass)  # sends SIGTERM before a requeue's or a cancel's kill too
            elif _is_default(sig, handler) or sig == signal.SIGTERM and _outside_slurm(handler):
                self._install(sig, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _install(self, sig: int, handler) -> None:
        self.previous.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    @property
    def armed(self) -> bool:
        return bool(self.requeue_handlers)

    @contextmanager
    def deferred(self):
        """Signals arriving inside are acted on at the next safe point the loop reaches."""
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False

    def _hold_requeue(self, signum, frame) -> None:
        if not self.deferring:
            self.requeue_handlers[signum](signum, frame)  # nothing to save: let submitit requeue now
            return
        log.warning("caught %s: saving a checkpoint at the end of this step, then requeueing",
                    signal.Signals(signum).name)
        self.pending = ("requeue", signum, frame)

    def _stop(self, signum, frame) -> None:
        if self.deferring and self.pending is None:
            log.warning("caught %s: stopping at the end of this training step, or of this epoch's validation "
                        "(send it again to stop at once)", signal.Signals(signum).name)
            self.pending = ("interrupt", signum, frame)
            return
        raise RunInterrupted(signum, "(stopped at once)" if self.deferring else "")

    def _stop_for_task(self, signum, frame) -> None:
        """A run packed into a SLURM task: the task (coupled_net.pool) requeues once its runs have
        ended; SLURM signals the task's processes and the task passes it on, so take it once."""
        if self.pending is not None:
            return
        if not self.deferring:
            raise RunInterrupted(signum, "(its SLURM task requeues it)")
        log.warning("caught %s: saving a checkpoint at the end of this step; this run's SLURM task requeues it",
                    signal.Signals(signum).name)
        self.pending = ("interrupt", signum, frame)

    def release(self, where: str = "") -> None:
        """At a safe point, last.pt saved: requeue through submitit, or end the run (RunInterrupted)."""
        kind, signum, frame = self.pending
        self.pending = None
        if kind == "interrupt":
            raise RunInterrupted(signum, where)
        log.info("checkpoint saved; handing %s to submitit to requeue", signal.Signals(signum).name)
        handler = self.requeue_handlers[signum]
        self.restore()
        handler(signum, frame)
