"""The process of one job of a pool (coupled_net.pool): `python -m coupled_net.poolchild JOB RESULT`
runs the pickled callable in JOB and leaves what came of it in RESULT (atomically: the pool reads it
once the process has ended). Its own module, on the bottom floor, so that a job starts without the
pool's imports (torch) and brings only what its callable needs."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import cloudpickle

from .storage import atomic_write


def main(job_path: str, result_path: str) -> int:
    """A pool's child: run the job's function, leave ("value", v) or ("error", line) in `result_path`.
    A SystemExit (a run's one-line end: interrupted, ...) ends the process with its code, no result."""
    function = cloudpickle.loads(Path(job_path).read_bytes())
    try:
        result = ("value", function())
    except Exception as e:  # noqa: BLE001 - the pool reports it
        traceback.print_exc()
        result = ("error", f"{type(e).__name__}: {e}")
    try:
        data = cloudpickle.dumps(result)
    except Exception as e:  # noqa: BLE001 - an unpicklable value: say so rather than lose the end
        data = cloudpickle.dumps(("error", f"its return value could not be pickled ({e})"))
    atomic_write(Path(result_path), lambda f: f.write(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
