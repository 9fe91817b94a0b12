"""Errors that end a run with one line for the user instead of a traceback, and the exit policy of
the entry points: library code raises these; `fail` and `interrupted` (used only by launch/*.py,
coupled_net.cli and the Hydra callbacks and plugins) turn them into one line and an exit code."""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path


class AsTyped(str):
    """A value shown as typed (`0.1,0.2`, not `'0.1,0.2'`)."""

    def __repr__(self) -> str:
        return str(self)


class ConfigError(ValueError):
    """A config value the project cannot run with: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class DatasetUnavailable(RuntimeError):
    """A dataset that is not on disk and could not be downloaded."""


class RunFault(RuntimeError):
    """A run that cannot go on, explained in one line (a full disk, a checkpoint of another model)."""


class RunRefused(RuntimeError):
    """This process may not run in this directory: it holds a run of another config, or is in use."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """`Type: message` with the message's whitespace (newlines included) folded, cut at `limit`; an
    exception without a message (a bare `assert` in a library) says where it was raised."""
    message = " ".join(str(e).split())
    if not message and e.__traceback__ is not None:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        message = f"(no message) at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return f"{type(e).__name__}: {message}"[:limit]


# ---- the exit policy of the entry points ------------------------------------------------------------

log = logging.getLogger("coupled_net")


def fail(message: str, code: int = 2, details: list[str] = (), to_file: bool = True):
    """End the process with one line on stderr (the last thing printed), after `details`, if any;
    `to_file`: the line also goes to train.log (False where the run logged it there already)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers if to_file else ():  # inside Hydra: train.log (only there)
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    sys.stderr.flush()
    for line in details:
        print(f"coupled_net: error: {line}", file=sys.stderr)
    print(f"coupled_net: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextmanager
def interrupted():
    """Ctrl-C outside a run (composing, planning, waiting for SLURM jobs): one line, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ncoupled_net: error: interrupted (SIGINT); runs already started keep their state: the same "
              "command resumes them", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
