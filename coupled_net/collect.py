"""Read the runs below some directories into one frame, one row per run (SPEC §6 and §11): what each
run's results.json, epochs.csv and config say, whether a `running` run's owner is gone, the SLURM state
of a detached sweep's jobs, and which runs repeat another. `coupled_net.review` builds its tables from
this frame; `coupled_net.report` writes the summary files."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
from datetime import datetime
from pathlib import Path

import pandas as pd
import psutil
from omegaconf import OmegaConf

from .epochlog import epoch_summary, read_epochs
from .identity import NEUTRAL, flatten, is_non_identity, model_name, run_key
from .results import load_results
from .storage import read_json

log = logging.getLogger(__name__)

LEADING = ["model", "dataset", "alpha", "seed", "status", "epochs_run", "best_epoch", "val_top1", "val_top5",
           "test_top1", "test_top5", "best_val_acc", "best_ke_val_acc", "ke_time_s_mean", "epoch_time_s_mean",
           "total_time_s", "device", "run_dir"]
IDENTITY = ["coupling_mode", "coupling_schedule"]
# per run, from epochs.csv (SPEC §11): val top-1 lost at each equalization, and what the second
# validation costs next to an epoch, and the mean time an epoch's checkpoint writes took
DERIVED = ["ke_drop_mean", "ke_drop_best", "ke_eval_time_s_mean", "ke_overhead", "checkpoint_time_s_mean"]
TRAILING = ["last_val_acc", "error"]  # what a run that is not done shows instead of metrics
# shared_by: how many runs shared the run's GPU (or, without one, ran beside it), from the slot it was
# started in (coupled_net.slots); 1 for a run alone. Its timings are only compared with runs alike.
BOOKKEEPING = ["slurm_job_id", "slurm_state", "duplicate_of", "shared_by"]
# every column of collect()'s frame that is not a config key; the rest are the runs' config keys
RUN_COLUMNS = LEADING + IDENTITY + DERIVED + TRAILING + BOOKKEEPING
# config keys already shown under another name
SHOWN = {"model.name": "model", "dataset.name": "dataset", "coupling.alpha": "alpha", "seed": "seed",
         "coupling.mode": "coupling_mode", "coupling.schedule": "coupling_schedule"}
NUMERIC = ["alpha", "seed", "epochs_run", "best_epoch", "val_top1", "val_top5", "test_top1", "test_top5",
           "best_val_acc", "best_ke_val_acc", "ke_time_s_mean", "epoch_time_s_mean", "total_time_s",
           *DERIVED, "last_val_acc"]
STALE_AFTER_S = 15 * 60


def find_runs(paths) -> list[Path]:
    """Every run directory at or below `paths`: one with a Hydra config, results.json or epochs.csv."""
    found = set()
    for root in (Path(p).absolute() for p in paths):
        for marker in ("results.json", "epochs.csv", ".hydra/config.yaml"):
            if (root / marker).is_file():
                found.add(root)
            found.update(p.parents[marker.count("/")] for p in root.rglob(marker))
    return sorted(found)


def _flatten(node) -> dict:
    """A config as the review's columns: dotted keys, lists as one text (`0.8,1.2`)."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flatten(node).items() if v != {}}


def run_config(run_dir: Path, res: dict | None = None) -> dict:
    """The keys that tell this run from others: its identity keys and +labels (SPEC §5), from
    results.json, else from .hydra/config.yaml without the keys that only say where it ran. A key
    the fingerprint leaves out at its neutral value (identity.NEUTRAL) is shown with that value, and
    `model.name` is the model's display name whatever its config (model=torchvision: its arch)."""
    return _completed(_run_config(run_dir, res))


def _completed(cfg: dict) -> dict:
    if not cfg:
        return cfg
    for key, value in _flatten(NEUTRAL).items():
        cfg.setdefault(key, value)
    model = {k[len("model."):]: v for k, v in cfg.items() if k.startswith("model.")}
    if model and "model.name" not in cfg:
        cfg["model.name"] = model_name(model)
    return cfg


def _run_config(run_dir: Path, res: dict | None) -> dict:
    if res and isinstance(res.get("identity"), dict):
        return _flatten({**res["identity"], **(res.get("labels") or {})})
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = OmegaConf.load(path)
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve
            plain = OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # noqa: BLE001
        return {}
    plain.pop("hydra", None)
    return {k: v for k, v in _flatten(plain).items() if not is_non_identity(k)}


# ---- is a `running` run still alive? (SPEC §5) ---------------------------------------------------

def _pid_alive(owner: dict) -> bool:
    try:
        proc = psutil.Process(int(owner["pid"]))
        started = owner.get("process_started")
        return started is None or abs(proc.create_time() - float(started)) < 1.0  # not a reused pid
    except (psutil.Error, ValueError, TypeError):
        return False


def _age_s(iso: str | None) -> float | None:
    try:
        return (datetime.now().astimezone() - datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z")).total_seconds()
    except (TypeError, ValueError):
        return None


def owner_gone(res: dict, epochs: list[dict], queue: dict | None) -> str | None:
    """Why a `running` run's owner is gone (a short reason), or None while it may be alive: the SLURM
    job is no longer known (when squeue answers), else its pid is dead on this host, else its
    heartbeat is older than max(15 min, 3 x its mean epoch time)."""
    owner = res.get("owner") or {}
    job = owner.get("slurm_job_id")
    if job and queue is not None:
        return None if str(job) in queue else f"SLURM job {job} is no longer known"
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        return None if _pid_alive(owner) else f"pid {owner['pid']} on {owner['host']} is gone"
    age = _age_s(res.get("heartbeat_at"))
    mean_epoch = epoch_summary(epochs)["epoch_time_s_mean"] or 0.0
    limit = max(STALE_AFTER_S, 3 * mean_epoch)
    if age is not None and age > limit:
        return f"no heartbeat for {age / 60:.0f} min"
    return None


def epoch_rows(run_dir: Path) -> pd.DataFrame:
    """epochs.csv's whole rows (coupled_net.epochlog.read_epochs) as numbers, one row per epoch."""
    return pd.DataFrame(read_epochs(run_dir)[0])


def run_row(run_dir: Path, cfg: dict, res: dict | None, queue: dict | None = None,
            problem: str | None = None) -> dict:
    """One run's row (`problem`: why its results.json cannot be used, coupled_net.results.load_results); a run
    whose files cannot be read is `unreadable`, with the file and why."""
    try:
        return _run_row(run_dir, cfg, res, queue, problem)
    except Exception as e:  # noqa: BLE001 - one bad directory never stops the review of the others
        return {"run_dir": str(run_dir), "status": "unreadable", "error": f"{type(e).__name__}: {e}"[:300]}


def _run_row(run_dir: Path, cfg: dict, res: dict | None, queue: dict | None, problem: str | None) -> dict:
    rows, bad_epochs = read_epochs(run_dir)
    error = None
    if res is None:
        error = problem
        status = "unreadable" if error else "no results"
        res = {}
    else:
        status = res.get("status", "unknown")
        if status == "running":
            gone = owner_gone(res, rows, queue)
            if gone:
                status, error = "stale", f"{gone}: it ended without recording why; the same command resumes it"
    if bad_epochs:
        status, error = "unreadable", bad_epochs
    metrics = res.get("metrics") or {}
    row = {
        "model": res.get("model", cfg.get("model.name")), "dataset": res.get("dataset", cfg.get("dataset.name")),
        "alpha": res.get("alpha", cfg.get("coupling.alpha")), "seed": res.get("seed", cfg.get("seed")),
        "status": status,
        "epochs_run": res.get("epochs_run", max(r["epoch"] for r in rows) if rows else 0),
        "best_epoch": res.get("best_epoch"),
        "total_time_s": res.get("total_time_s"), "device": (res.get("provenance") or {}).get("device"),
        "shared_by": int(((res.get("provenance") or {}).get("sharing") or {}).get("shared_by") or 1),
        "run_dir": str(run_dir), "error": error or res.get("error"),
        "coupling_mode": res.get("coupling_mode", cfg.get("coupling.mode")),
        "coupling_schedule": res.get("coupling_schedule", cfg.get("coupling.schedule")),
        **epoch_summary(rows, res.get("best_epoch")),
    }
    for split in ("val", "test"):
        for k in ("top1", "top5"):
            row[f"{split}_{k}"] = (metrics.get(split) or {}).get(k)
    return row


def manifest_jobs(paths) -> dict[str, str]:
    """run_dir -> SLURM job id, from the manifest.json of every sweep at or below `paths`. A run
    directory is taken as a child of the manifest's own directory (so a copied or moved sweep names
    its own runs, not the original's)."""
    jobs = {}
    for root in (Path(p).absolute() for p in paths):
        for manifest in [root / "manifest.json", *root.rglob("*/manifest.json")]:
            for job in (read_json(manifest) or {}).get("jobs", []):
                if job.get("executor", "slurm") != "slurm":
                    continue  # the local executor's job ids are not SLURM's
                run_dir = manifest.parent / Path(job["run_dir"]).name
                jobs[str(run_dir)] = job["job_id"]  # a later submission of the same run wins
    return jobs


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


def slurm_state(job_id: str, status: str, queue: dict) -> str:
    """A finished run's own record first; else pending / running / requeued from squeue while SLURM
    knows the job; else what the run dir says."""
    if status == "done":
        return "completed"
    if status == "interrupted":
        return "interrupted"
    if status in ("failed", "diverged", "unreadable", "stale"):
        return "failed"
    if job_id in queue:
        state, reason = queue[job_id]
        if state in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") or (state == "PENDING" and reason == "BeginTime"):
            return "requeued"
        return {"PENDING": "pending", "RUNNING": "running", "COMPLETING": "running",
                "CONFIGURING": "running", "SUSPENDED": "suspended"}.get(state, state.lower())
    return "pending" if status == "no results" else "failed"  # running, but SLURM no longer has it


def duplicates(runs: list[Path], results: list[dict | None]) -> dict[Path, Path]:
    """run dir -> the run dir it repeats: two directories holding the same fingerprint and labels are
    one run twice (SPEC §6). The one kept is a finished one if any, else the first by path."""
    seen: dict[str, Path] = {}
    order = sorted(range(len(runs)), key=lambda i: ((results[i] or {}).get("status") != "done", str(runs[i])))
    repeats = {}
    for i in order:
        res = results[i] or {}
        if not res.get("fingerprint"):
            continue
        key = run_key(res)
        if key in seen:
            repeats[runs[i]] = seen[key]
        else:
            seen[key] = runs[i]
    return repeats


def collect(paths) -> pd.DataFrame:
    """One row per run below `paths` (several sweeps at once are fine): RUN_COLUMNS (SPEC §6's
    columns, the derived metrics, what a run that is not done shows, the SLURM state of detached
    sweeps, `duplicate_of`), then every config key of the runs (identity keys and +labels, dotted).
    A run found twice (same fingerprint and labels) is marked `duplicate_of` and warned about."""
    jobs = manifest_jobs(paths)
    runs = sorted(set(find_runs(paths)) | {Path(r) for r in jobs})  # submitted runs may not have a dir yet
    loaded = [load_results(r) for r in runs]
    results = [res for res, _ in loaded]
    configs = [run_config(r, res) for r, res in zip(runs, results)]
    owners = [(res or {}).get("owner") or {} for res in results]
    queue = squeue_states() if jobs or any(o.get("slurm_job_id") for o in owners) else None
    rows = [run_row(r, c, res, queue, problem) for r, c, (res, problem) in zip(runs, configs, loaded)]
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for column in NUMERIC:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    repeats = duplicates(runs, results)
    for run_dir, first in repeats.items():
        log.warning("%s holds the same run as %s (same fingerprint and labels): counted once", run_dir, first)
    df["duplicate_of"] = [str(repeats[r]) if r in repeats else None for r in runs]
    df["slurm_job_id"] = [jobs.get(str(r)) for r in runs]
    df["slurm_state"] = [slurm_state(job, status, queue or {}) if job else None
                         for job, status in zip(df["slurm_job_id"], df["status"])]
    keys = sorted({k for c in configs for k in c} - set(RUN_COLUMNS))
    config = pd.DataFrame([[c.get(k) for k in keys] for c in configs], columns=keys, index=df.index)
    return pd.concat([df, config], axis=1)


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns of a collect() frame that are config keys (identity keys and +labels)."""
    return [c for c in df.columns if c not in RUN_COLUMNS or c == "seed"]


def varying(df: pd.DataFrame, columns) -> list[str]:
    """The columns whose value is not the same in every row (None counts as a value)."""
    return [c for c in columns if len({repr(v) for v in df[c].map(comparable)}) > 1]


def comparable(value):
    """A value as comparable across runs: NaN and None alike, 2.0 as 2."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
