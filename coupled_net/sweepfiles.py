"""A sweep directory's own records (beside its run directories), written by the launch and read by
the review (coupled_net.collect), the status view (coupled_net.status) and the sweep's verdict:

    launch.json      what the current launch runs and how many at once (for the ETA)
    fail_fast.json   why the launch stopped starting runs (hydra.sweeper.fail_fast) and which it did not start

Light on purpose (the status view answers in under a second): no pandas, no torch."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from .storage import read_json, write_json

FAIL_FAST_FILE = "fail_fast.json"
LAUNCH_FILE = "launch.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_launch(sweep_dir: Path, executor: str, parallel: int, planned: int, launched: int,
                 fail_fast: int | None) -> dict:
    """launch.json: what this launch runs and how, for a view of the sweep's progress."""
    record = {"executor": executor, "parallel": int(parallel), "planned": planned, "launched": launched,
              "started_at": _now(), "fail_fast": fail_fast}
    write_json(Path(sweep_dir) / LAUNCH_FILE, record)
    return record


def read_launch(sweep_dir: Path) -> dict | None:
    return read_json(Path(sweep_dir) / LAUNCH_FILE)


def most_common_error(failures: Sequence[dict]) -> str:
    """The error most failures share; of a tie, the one that came first."""
    counts = Counter(f["error"] for f in failures)
    return max(counts, key=lambda e: counts[e]) if counts else ""  # max keeps the first of equals


def fail_fast_reason(limit: int, failures: Sequence[dict]) -> str:
    return (f"fail-fast: {len(failures)} runs failed (hydra.sweeper.fail_fast={limit}); most failed with: "
            f"{most_common_error(failures)}")


def fail_fast_line(limit: int, failures: Sequence[dict]) -> str:
    """The console's one line when fail-fast trips."""
    return (f"fail-fast: {len(failures)} runs failed (hydra.sweeper.fail_fast={limit}); starting no more runs; "
            f"most failed with: {most_common_error(failures)}")


def write_fail_fast(sweep_dir: Path, limit: int, failures: Sequence[dict], not_started: Sequence[str]) -> dict:
    """fail_fast.json: why this launch stopped starting runs, and which it did not start."""
    record = {"limit": limit, "failures": [dict(f) for f in failures], "error": most_common_error(failures),
              "reason": fail_fast_reason(limit, failures), "not_started": [str(r) for r in not_started],
              "at": _now()}
    write_json(Path(sweep_dir) / FAIL_FAST_FILE, record)
    return record


def read_fail_fast(sweep_dir: Path) -> dict | None:
    return read_json(Path(sweep_dir) / FAIL_FAST_FILE)
