"""Fail-fast (hydra.sweeper.fail_fast=N): a sweep whose runs fail for one shared reason (a bug, a bad
node) should not spend the cluster on all of them: once N runs of a launch have failed, it starts no
more, says so in one line naming the error most of them share, and on SLURM cancels the sweep's
tasks that have not started (running ones finish). Failures are counted per launch, like the
unavailable datasets of coupled_net.sweep: in this process (the basic launcher; the local launcher
counts its pool's outcomes, hydra_plugins' LocalProgress) and, for the tasks of one SLURM array, one
file per failure in `.failures.<array id>/` (one file each: concurrent tasks never write the same
file). A re-launch starts counting from zero; its record is coupled_net.sweepfiles' fail_fast.json."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from .errors import one_line
from .machine import slurm_array_job_id
from .storage import read_json, write_json
from .sweepfiles import FAIL_FAST_FILE, fail_fast_line, fail_fast_reason, read_fail_fast, write_fail_fast

log = logging.getLogger(__name__)

_failures: list[dict] = []  # {"run_dir", "error"} of this launch's failed runs, in the order they failed
_ran: set[str] = set()  # run dirs of this process's launch that started (fail_fast.json's not_started: the others)


def fail_fast_limit(sweeper_cfg) -> int | None:
    """hydra.sweeper.fail_fast (None: off, or a sweeper without the key: a search's)."""
    value = (sweeper_cfg or {}).get("fail_fast")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def start_launch(sweep_dir: Path) -> None:
    """A new launch counts its own failures: the last launch's verdict and records are dropped."""
    _failures.clear()
    _ran.clear()
    sweep_dir = Path(sweep_dir)
    (sweep_dir / FAIL_FAST_FILE).unlink(missing_ok=True)
    for old in sweep_dir.glob(".failures.*") if sweep_dir.is_dir() else ():
        shutil.rmtree(old, ignore_errors=True)


def _failures_dir(sweep_dir: Path) -> Path | None:
    array = slurm_array_job_id()
    return Path(sweep_dir) / f".failures.{array}" if array else None


def note_failure(sweep_dir: Path, run_dir: Path, error: str) -> None:
    """A run of this launch ended `failed`."""
    record = {"run_dir": str(run_dir), "error": str(error)}
    _failures.append(record)
    folder = _failures_dir(sweep_dir)
    if folder is not None:
        try:
            write_json(folder / f"{Path(run_dir).name}.json", record)
        except OSError:
            log.warning("could not record the failure of %s in %s: fail-fast counts only this task's", run_dir,
                        folder)


def launch_failures(sweep_dir: Path) -> list[dict]:
    """This launch's failed runs, each once: this process's, then those the other array tasks recorded
    (in the order they were recorded)."""
    found = {r["run_dir"]: r for r in _failures}
    folder = _failures_dir(sweep_dir)
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder and folder.is_dir() else []
    for path in files:
        record = read_json(path)
        if record and record.get("run_dir"):
            found.setdefault(record["run_dir"], {"run_dir": record["run_dir"], "error": str(record.get("error"))})
    return list(found.values())


def fail_fast_stop(sweep_dir: Path, limit: int | None, run_dir: Path, planned=()) -> str | None:
    """Before a job of the basic launcher or of a SLURM array starts: the reason it must not (this launch
    has `limit` failures), else None. The first job to find the limit reached writes fail_fast.json —
    listing itself and, in this process, the planned jobs after it; in an array, the tasks it cancels —
    and logs the one line."""
    if limit is None:
        return None
    failures = launch_failures(sweep_dir)
    if len(failures) < limit:
        return None
    if read_fail_fast(sweep_dir) is None:
        # this process's launch (the basic launcher runs its jobs in turn here): every planned run not yet started
        mine = [str(run_dir)] + [str(j.run_dir) for j in planned or ()
                                 if j.done_in is None and str(j.run_dir) not in _ran]
        cancelled = cancel_pending(sweep_dir) if slurm_array_job_id() else []
        log.error("%s", fail_fast_line(limit, failures))
        try:
            write_fail_fast(sweep_dir, limit, failures, list(dict.fromkeys(mine + cancelled)))
        except OSError as e:
            log.warning("could not write %s: %s", Path(sweep_dir) / FAIL_FAST_FILE, e)
    return fail_fast_reason(limit, failures)


def note_started(run_dir: Path) -> None:
    _ran.add(str(run_dir))


def cancellable(squeue_out: str) -> list[str]:
    """The pending array tasks (`squeue -h -r -t PENDING -o "%i|%r"` lines) to cancel: all but those
    waiting on BeginTime (a requeued task that already ran: it resumes its run)."""
    ids = []
    for line in squeue_out.splitlines():
        task, _, reason = line.strip().partition("|")
        if task and reason.strip() != "BeginTime":
            ids.append(task.strip())
    return ids


def cancel_pending(sweep_dir: Path) -> list[str]:
    """Cancel the sweep's array tasks that have not started (the arrays listed in manifest.json);
    returns their run dirs. Running tasks finish. No squeue/scancel here: one warning, nothing cancelled."""
    jobs = (read_json(Path(sweep_dir) / "manifest.json") or {}).get("jobs") or []
    runs: dict[str, list[str]] = {}
    for job in jobs:
        runs.setdefault(str(job.get("job_id")), []).append(str(job.get("run_dir")))
    arrays = sorted({j.split("_")[0] for j in runs})
    if not arrays:
        return []
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-t", "PENDING", "-o", "%i|%r"],
                             capture_output=True, text=True, timeout=60)
        ids = cancellable(out.stdout) if out.returncode == 0 else []
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fail-fast could not cancel the sweep's pending SLURM tasks (%s): they will start and stop at "
                    "once", one_line(e))
        return []
    if ids:
        log.warning("fail-fast: cancelled %d pending SLURM task(s): %s", len(ids), " ".join(ids))
    return [run for task in ids for run in runs.get(task, [])]
