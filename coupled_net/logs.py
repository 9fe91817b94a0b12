"""train.log, written only by the process that owns the run directory.

Hydra configures job logging (and would create `train.log`) before the task runs, i.e. before the
run knows whether its directory holds another run or is in use. This handler holds the records
back until `claim_file_logs(run_dir)` is called by the directory's owner, then writes them and
everything after; a process that is refused never writes a byte there (the console still shows
everything)."""

from __future__ import annotations

import logging
from pathlib import Path


class RunLogHandler(logging.FileHandler):
    """A FileHandler (append mode) that opens its file only once the run directory is claimed."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None):
        super().__init__(filename, mode=mode, encoding=encoding, delay=True)
        self.claimed = False
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.claimed:
            super().emit(record)
        elif len(self.held) < 10_000:
            self.held.append(record)

    def claim(self) -> None:
        self.claimed = True
        held, self.held = self.held, []
        for record in held:
            super().emit(record)
        self.flush()


def _run_handlers(run_dir: Path):
    run_dir = Path(run_dir).resolve()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler) and Path(handler.baseFilename).parent == run_dir:
            yield handler


def claim_file_logs(run_dir: Path) -> None:
    """This process owns `run_dir`: its train.log may be written."""
    for handler in _run_handlers(run_dir):
        handler.claim()


# A record logged with extra=FILE_ONLY goes to train.log only (a traceback, or an error the entry
# point prints itself as its last line); one with extra=CONSOLE_ONLY to the terminal only. Without
# either it goes to both, as usual. conf/hydra/job_logging/coupled_net.yaml puts the filter on both.
FILE_ONLY = {"to": "file"}
CONSOLE_ONLY = {"to": "console"}


class Destination(logging.Filter):
    """A handler filter: pass records meant for `where` (console or file) or for everyone."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "to", self.where) == self.where
