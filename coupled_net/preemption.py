"""SLURM sends a signal shortly before a timeout or a preemption; submitit's handler checkpoints
the job's callable, requeues it and exits at once. This guard holds that handler back until the
training loop reaches a safe point (the end of the current step), saves last.pt there, then lets
submitit requeue: at most one step is lost, and the task never returns as if it had finished."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


def _is_submitit_handler(handler) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


class PreemptionGuard:
    def __init__(self):
        self.deferred: dict[int, object] = {}
        self.pending: tuple | None = None
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            handler = signal.getsignal(sig)
            if _is_submitit_handler(handler):
                self.deferred[sig] = handler
                signal.signal(sig, self._hold)

    @property
    def armed(self) -> bool:
        return bool(self.deferred)

    def _hold(self, signum, frame) -> None:
        log.warning("caught %s: saving a checkpoint at the end of this step, then requeueing",
                    signal.Signals(signum).name)
        self.pending = (signum, frame)

    def release(self) -> None:
        """Hand the held signal to submitit (which requeues the job and exits)."""
        signum, frame = self.pending
        self.restore()
        self.pending = None
        log.info("checkpoint saved; handing %s to submitit to requeue", signal.Signals(signum).name)
        handler = signal.getsignal(signum)
        handler(signum, frame)

    def restore(self) -> None:
        for sig, handler in self.deferred.items():
            signal.signal(sig, handler)
        self.deferred = {}
