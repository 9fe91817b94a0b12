"""Is a `running` run's owner still alive (SPEC §5)? The rule the review (coupled_net.collect) and the
status view (coupled_net.status) both apply, light enough for the status view's start-up: no pandas,
no torch."""

from __future__ import annotations

import socket
import subprocess
import time
from datetime import datetime

import psutil

STALE_AFTER_S = 15 * 60


def age_s(iso) -> float | None:
    """Seconds since an ISO time of results.json (`2026-12-03T14:36:35+0000`); None if it is not one."""
    if not isinstance(iso, str):
        return None
    try:
        when = datetime.fromisoformat(iso)  # fast; Python 3.10's does not take `+0000`
    except ValueError:
        try:
            when = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return None
    if when.tzinfo is None:
        return None
    return time.time() - when.timestamp()


def pid_alive(owner: dict) -> bool:
    try:
        proc = psutil.Process(int(owner["pid"]))
        started = owner.get("process_started")
        return started is None or abs(proc.create_time() - float(started)) < 1.0  # not a reused pid
    except (psutil.Error, ValueError, TypeError):
        return False


def owner_gone(res: dict, mean_epoch_s: float | None, queue: dict | None) -> str | None:
    """Why a `running` run's owner is gone (a short reason), or None while it may be alive: the SLURM
    job is no longer known (when squeue answers: `queue`), else its pid is dead on this host, else its
    heartbeat is older than max(15 min, 3 x its mean epoch time)."""
    owner = res.get("owner") or {}
    job = owner.get("slurm_job_id")
    if job and queue is not None:
        return None if str(job) in queue else f"SLURM job {job} is no longer known"
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        return None if pid_alive(owner) else f"pid {owner['pid']} on {owner['host']} is gone"
    age = age_s(res.get("heartbeat_at"))
    if age is not None and age > max(STALE_AFTER_S, 3 * (mean_epoch_s or 0.0)):
        return f"no heartbeat for {age / 60:.0f} min"
    return None


def squeue_states() -> dict[str, tuple[str, str]] | None:
    """job id -> (state, reason) of every job SLURM still knows about; None without SLURM."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id.strip()] = (state.strip(), reason.strip())
    return states
