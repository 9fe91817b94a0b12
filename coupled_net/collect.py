"""Merge the runs below some directories into one table (SPEC §6): summary.csv, summary.md (seeds
aggregated as mean ± std), summary.tex and summary_*.png plots."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .identity import is_non_identity, run_key
from .results import read_json

log = logging.getLogger(__name__)

LEADING = ["model", "dataset", "alpha", "seed", "status", "epochs_run", "best_epoch", "val_top1", "val_top5",
           "test_top1", "test_top5", "best_val_acc", "best_ke_val_acc", "ke_time_s_mean", "epoch_time_s_mean",
           "total_time_s", "device", "run_dir"]
IDENTITY = ["coupling_mode", "coupling_schedule"]
# config keys already shown under another name
SHOWN = {"model.name": "model", "dataset.name": "dataset", "coupling.alpha": "alpha", "seed": "seed",
         "coupling.mode": "coupling_mode", "coupling.schedule": "coupling_schedule"}
TRAILING = ["last_val_acc", "error"]  # what a run that is not done shows instead of metrics
BOOKKEEPING = ["slurm_job_id", "slurm_state", "duplicate_of"]
STALE_AFTER_S = 15 * 60
METRICS = ["val_top1", "val_top5", "test_top1", "test_top5", "best_val_acc", "best_ke_val_acc", "epochs_run",
           "ke_time_s_mean", "epoch_time_s_mean", "total_time_s"]


def find_runs(paths) -> list[Path]:
    """Every run directory at or below `paths`: one with a Hydra config, results.json or epochs.csv."""
    found = set()
    for root in (Path(p).absolute() for p in paths):
        for marker in ("results.json", "epochs.csv", ".hydra/config.yaml"):
            if (root / marker).is_file():
                found.add(root)
            found.update(p.parents[marker.count("/")] for p in root.rglob(marker))
    return sorted(found)


def _flatten(node, prefix="") -> dict:
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out


def run_config(run_dir: Path, res: dict | None = None) -> dict:
    """The keys that tell this run from others: its identity keys and +labels (SPEC §5), from
    results.json, else from .hydra/config.yaml without the keys that only say where it ran."""
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
    import psutil

    try:
        proc = psutil.Process(int(owner["pid"]))
        started = owner.get("process_started")
        return started is None or abs(proc.create_time() - float(started)) < 1.0  # not a reused pid
    except (psutil.Error, ValueError, TypeError):
        return False


def _age_s(iso: str | None) -> float | None:
    from datetime import datetime

    try:
        return (datetime.now().astimezone() - datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z")).total_seconds()
    except (TypeError, ValueError):
        return None


def owner_gone(res: dict, epochs: pd.DataFrame, queue: dict | None) -> str | None:
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
    mean_epoch = float(epochs["epoch_time_s"].mean()) if len(epochs) and "epoch_time_s" in epochs else 0.0
    limit = max(STALE_AFTER_S, 3 * mean_epoch)
    if age is not None and age > limit:
        return f"no heartbeat for {age / 60:.0f} min"
    return None


def epoch_rows(run_dir: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(run_dir / "epochs.csv")
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def read_results(run_dir: Path) -> dict | None:
    res = read_json(run_dir / "results.json")
    return res if isinstance(res, dict) else None


def run_row(run_dir: Path, cfg: dict, res: dict | None, queue: dict | None = None) -> dict:
    epochs = epoch_rows(run_dir)
    error = None
    if res is None:
        status = "unreadable" if (run_dir / "results.json").exists() else "no results"
        res = {}
    else:
        status = res.get("status", "unknown")
        if status == "running":
            gone = owner_gone(res, epochs, queue)
            if gone:
                status, error = "stale", f"{gone}: it ended without recording why; the same command resumes it"
    metrics = res.get("metrics") or {}
    row = {
        "model": res.get("model", cfg.get("model.name")), "dataset": res.get("dataset", cfg.get("dataset.name")),
        "alpha": res.get("alpha", cfg.get("coupling.alpha")), "seed": res.get("seed", cfg.get("seed")),
        "status": status,
        "epochs_run": res.get("epochs_run", int(epochs["epoch"].max()) if len(epochs) else 0),
        "best_epoch": res.get("best_epoch"),
        "best_val_acc": float(epochs["val_acc"].max()) if len(epochs) else None,
        "best_ke_val_acc": float(epochs["ke_val_acc"].max()) if len(epochs) else None,
        "last_val_acc": float(epochs["val_acc"].iloc[-1]) if len(epochs) else None,
        "ke_time_s_mean": res.get("ke_time_s_mean"), "epoch_time_s_mean": res.get("epoch_time_s_mean"),
        "total_time_s": res.get("total_time_s"), "device": (res.get("provenance") or {}).get("device"),
        "run_dir": str(run_dir), "error": error or res.get("error"),
        "coupling_mode": res.get("coupling_mode", cfg.get("coupling.mode")),
        "coupling_schedule": res.get("coupling_schedule", cfg.get("coupling.schedule")),
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
    import subprocess

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
        key = run_key(res["fingerprint"], res.get("labels"))
        if key in seen:
            repeats[runs[i]] = seen[key]
        else:
            seen[key] = runs[i]
    return repeats


def collect(paths) -> pd.DataFrame:
    """One row per run below `paths`: SPEC §6's columns, then coupling mode/schedule and every
    identity key or +label that varies across the runs (and the SLURM state of detached sweeps).
    A run found twice (same fingerprint and labels) is marked `duplicate_of` and counted once."""
    jobs = manifest_jobs(paths)
    runs = sorted(set(find_runs(paths)) | {Path(r) for r in jobs})  # submitted runs may not have a dir yet
    results = [read_results(r) for r in runs]
    configs = [run_config(r, res) for r, res in zip(runs, results)]
    owners = [(res or {}).get("owner") or {} for res in results]
    queue = squeue_states() if jobs or any(o.get("slurm_job_id") for o in owners) else None
    rows = [run_row(r, c, res, queue) for r, c, res in zip(runs, configs, results)]
    keys = sorted({k for c in configs for k in c} - SHOWN.keys())
    varying = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    df = pd.DataFrame(rows, columns=LEADING + IDENTITY + TRAILING)
    for k in varying:
        df[k] = [c.get(k) for c in configs]
    repeats = duplicates(runs, results)
    for run_dir, first in repeats.items():
        log.warning("%s holds the same run as %s (same fingerprint and labels): counted once", run_dir, first)
    df["duplicate_of"] = [str(repeats[r]) if r in repeats else None for r in runs]
    slurm = []
    if jobs:
        df["slurm_job_id"] = [jobs.get(r) for r in df["run_dir"]]
        df["slurm_state"] = [slurm_state(j, s, queue or {}) if j else None
                             for j, s in zip(df["slurm_job_id"], df["status"])]
        slurm = ["slurm_job_id", "slurm_state"]
    return df[LEADING + IDENTITY + slurm + varying + TRAILING + ["duplicate_of"]]


def _mean_std(values: pd.Series) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return ""
    if values.abs().max() < 0.1:  # timings such as ke_time_s: significant digits, not decimals
        fmt = ".3g"
    else:
        fmt = ".0f" if (values == values.round()).all() and len(values) == 1 else ".2f"
    if len(values) == 1:
        return format(values.iloc[0], fmt)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=1), fmt)}"


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Finished runs that differ only by seed, as mean ± std with n; timings never mix devices."""
    done = df[(df["status"] == "done") & df.get("duplicate_of", pd.Series(None, index=df.index)).isna()]
    if done.empty:
        return pd.DataFrame()
    extra = [c for c in df.columns if c not in LEADING + IDENTITY + TRAILING + BOOKKEEPING]
    group = ["model", "dataset", "alpha", *IDENTITY, *extra, "device"]
    rows = []
    for key, g in done.groupby([done[c].astype(str) for c in group], sort=False, dropna=False):
        row = dict(zip(group, key))
        row["n"] = len(g)
        row.update({m: _mean_std(g[m]) for m in METRICS})
        rows.append(row)
    out = pd.DataFrame(rows)
    out["alpha_num"] = pd.to_numeric(out["alpha"], errors="coerce")
    return out.sort_values(["model", "dataset", "alpha_num"]).drop(columns="alpha_num").reset_index(drop=True)


def not_aggregated(df: pd.DataFrame) -> pd.DataFrame:
    """Runs not done, and done runs that repeat another (duplicate_of)."""
    cols = ["run_dir", "status", *[c for c in ("slurm_job_id", "slurm_state") if c in df], "epochs_run",
            "last_val_acc", "error", *[c for c in ("duplicate_of",) if c in df]]
    repeated = df["duplicate_of"].notna() if "duplicate_of" in df else False
    return df.loc[(df["status"] != "done") | repeated, cols]


def markdown(df: pd.DataFrame) -> str:
    agg = aggregate(df)
    parts = ["## Finished runs (mean ± std over seeds, n runs)\n",
             agg.to_markdown(index=False) if not agg.empty else "_none_"]
    others = not_aggregated(df)
    if not others.empty:
        parts += ["\n\n## Runs not in the aggregate\n", others.to_markdown(index=False)]
    return "".join(parts) + "\n"


def latex(df: pd.DataFrame) -> str:
    agg = aggregate(df)
    table = agg if not agg.empty else df[["model", "dataset", "alpha", "seed", "status"]]
    return table.to_latex(index=False, escape=True)


def plots(df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    df = df[df["duplicate_of"].isna()] if "duplicate_of" in df else df  # a repeated run is drawn once
    done = df[df["status"] == "done"].copy()
    if not done.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (model, dataset), g in done.groupby(["model", "dataset"]):
            stats = g.groupby("alpha")["test_top1"].agg(["mean", "std"]).reset_index().sort_values("alpha")
            ax.errorbar(stats["alpha"], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                        label=f"{model} / {dataset}")
        written.append(_save(fig, ax, out / "summary_test_top1_vs_alpha.png", "alpha (coupled filter pairs)",
                             "test top-1 (%)", "Test accuracy vs coupling (mean ± std over seeds)"))

    curves = [(row, epoch_rows(Path(row["run_dir"]))) for _, row in df.iterrows()]
    curves = [(row, e) for row, e in curves if len(e)]
    if curves:
        alphas = sorted(pd.to_numeric(df["alpha"], errors="coerce").dropna().astype(int).unique())
        cmap = plt.get_cmap("viridis", max(2, len(alphas)))
        colour = {a: cmap(i) for i, a in enumerate(alphas)}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labelled = set()
        for row, e in curves:
            c = colour.get(row["alpha"], "grey")
            label = f"alpha={row['alpha']}" if row["alpha"] not in labelled else None
            labelled.add(row["alpha"])
            ax.plot(e["epoch"], e["val_acc"], color=c, label=label)
            ax.plot(e["epoch"], e["ke_val_acc"], color=c, linestyle="--")
        written.append(_save(fig, ax, out / "summary_learning_curves.png", "epoch", "val top-1 (%)",
                             "Validation accuracy: before KE (solid), after KE (dashed)"))
    return written


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label the axes, then write the figure atomically."""
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and alphas are whole numbers
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_summary(paths, out: Path | None = None) -> tuple[pd.DataFrame, str]:
    """Collect, write summary.{csv,md,tex} and the plots into `out` (default: the first path)."""
    from .results import atomic_write

    df = collect(paths)
    if df.empty:
        raise FileNotFoundError(f"no run directories below {', '.join(map(str, paths))}")
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(df)
    atomic_write(out / "summary.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    atomic_write(out / "summary.md", lambda f: f.write(md.encode()))
    atomic_write(out / "summary.tex", lambda f: f.write(latex(df).encode()))
    plots(df, out)
    return df, md
