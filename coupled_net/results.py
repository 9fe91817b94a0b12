"""A run directory's files (SPEC §5) and the one place the `results.json` schema is made: its
statuses, the record a run starts with, what it takes from epochs.csv when it ends, and the reader
the review uses (which says why a record cannot be used)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .epochlog import epoch_log, epoch_summary, read_epochs
from .identity import model_name
from .storage import NotAFile, read_bytes, read_json, write_json

log = logging.getLogger(__name__)

STATUSES = ("running", "done", "diverged", "failed", "interrupted")
FINISHED = ("done", "diverged")  # a run in one of these is never trained again: starting it does nothing
# what results.json reports from epochs.csv once a run ends (coupled_net.epochlog.epoch_summary has more)
EPOCH_FIELDS = ("ke_time_s_mean", "epoch_time_s_mean", "best_val_acc", "best_ke_val_acc")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_results(cfg, identity, *, owner: dict, resumes: int, world_size: int, provenance: dict) -> dict:
    """The record a run starts with (`status: running`); coupled_net.lifecycle fills in the rest as it goes."""
    return {
        "status": "running", "stopped_early": False, "epochs_run": 0, "best_epoch": None, "resumes": resumes,
        "model": model_name(cfg.model), "dataset": cfg.dataset.get("name"), "alpha": cfg.coupling.get("alpha"),
        "coupling_mode": cfg.coupling.get("mode"), "coupling_schedule": cfg.coupling.get("schedule"),
        "seed": cfg.get("seed"), "coupled_layers": None, "metrics": None,
        "ke_time_s_mean": None, "epoch_time_s_mean": None, "total_time_s": None,
        "best_val_acc": None, "best_ke_val_acc": None, "error": None,
        "callbacks": {},  # training-loop callbacks' on_fit_end results, by callback name (coupled_net.loopcallbacks)
        **identity.record(),  # fingerprint, identity (the keys it digests), labels
        "owner": owner, "heartbeat_at": now_iso(), "started_at": now_iso(), "finished_at": None,
        "world_size": world_size, "provenance": provenance,
    }


def epoch_fields(run_dir: Path) -> dict:
    """What results.json reports from the run's epochs.csv once it ends."""
    summary = epoch_summary(read_epochs(run_dir)[0])
    return {key: summary[key] for key in EPOCH_FIELDS}


def load_results(run_dir: Path) -> tuple[dict | None, str | None]:
    """results.json, read and parsed once: (its record, None), or (None, why it cannot be used), or
    (None, None) where there is none. One that is not a regular file (a FIFO) is not opened: a warning
    line names it."""
    path = Path(run_dir) / "results.json"
    try:
        res = json.loads(read_bytes(path))
    except FileNotFoundError:
        return None, None
    except NotAFile as e:  # a FIFO (never waited on): named once, its run shown as unreadable
        log.warning("%s; its run is shown as unreadable", e)
        return None, f"results.json is {e.kind}, not a regular file: not read"
    except (OSError, ValueError) as e:
        return None, f"results.json: not valid JSON ({' '.join(str(e).split())[:120]})"
    if not isinstance(res, dict):
        return None, f"results.json: a JSON {type(res).__name__}, not an object"
    if not isinstance(res.get("metrics") or {}, dict) or not isinstance(res.get("provenance") or {}, dict):
        return None, "results.json: `metrics` or `provenance` is not an object"
    return res, None


class RunFiles:
    """Paths of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.results = self.dir / "results.json"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.summary = self.dir / "model_summary.txt"
        self.epochs = epoch_log(self.dir)

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def hydra(self) -> Path:
        return self.dir / ".hydra"

    def periodic(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    def read_results(self) -> dict | None:
        return read_json(self.results)

    def write_results(self, results: dict) -> None:
        write_json(self.results, results)
