"""Run directories written by hand, with known numbers, for the collector and review tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss", "ke_val_acc",
                 "epoch_time_s", "ke_time_s", "ke_eval_time_s"]
BASE = {"model.name": "small_cnn", "dataset.name": "synthetic_letters", "coupling.alpha": 0, "coupling.mode": "copy",
        "coupling.schedule": "epoch", "optimizer.lr": 0.05, "seed": 1}


def make_run(run_dir: Path, *, status: str = "done", test_top1: float | None = 50.0, val_top1: float = 40.0,
             epochs=((40.0, 39.0, 10.0, 1.0),), best_epoch: int | None = 1, device: str = "cpu (test)",
             labels: dict | None = None, fingerprint: str | None = None, results: dict | None = None,
             **identity) -> Path:
    """results.json and epochs.csv of one run. `identity`: config keys by their dotted names with `.`
    spelt `__` (coupling__alpha=4), over BASE. `epochs`: (val_acc, ke_val_acc, epoch_time_s,
    ke_eval_time_s[, checkpoint_time_s]) per epoch (with a fifth number the file has that column: None
    writes an empty cell). `results`: more results.json keys (owner, heartbeat_at …)."""
    keys = {**BASE, **{k.replace("__", "."): v for k, v in identity.items()}}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    timed = any(len(e) > 4 for e in epochs)
    lines = [",".join(EPOCH_COLUMNS + ["checkpoint_time_s"] * timed)]
    for i, (val, ke_val, epoch_s, ke_eval_s, *ckpt) in enumerate(epochs, start=1):
        row = [i, 0.1, 1.0, 50.0, 1.0, val, 1.1, ke_val, epoch_s, ke_eval_s / 1000, ke_eval_s]
        if timed:
            row.append("" if not ckpt or ckpt[0] is None else ckpt[0])
        lines.append(",".join(map(str, row)))
    (run_dir / "epochs.csv").write_text("\n".join(lines) + "\n")
    metrics = {"val": {"top1": val_top1, "top5": 90.0, "loss": 1.0},
               "test": {"top1": test_top1, "top5": 95.0, "loss": 1.0}}
    res = {"status": status, "epochs_run": len(epochs), "best_epoch": best_epoch, "model": keys["model.name"],
           "dataset": keys["dataset.name"], "alpha": keys["coupling.alpha"], "seed": keys["seed"],
           "coupling_mode": keys["coupling.mode"], "coupling_schedule": keys["coupling.schedule"],
           "metrics": metrics if status == "done" else None,
           "fingerprint": fingerprint or hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16],
           "identity": keys, "labels": labels or {}, "owner": None, "heartbeat_at": None, "error": None,
           "provenance": {"device": device}, **(results or {})}
    (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir
