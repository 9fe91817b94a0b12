"""Hydra callbacks registered in conf/train.yaml."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .results import read_json

log = logging.getLogger("coupled_net")


class SweepReport(Callback):
    """At the end of a sweep: one line per run's status; a non-zero exit naming the failed runs.
    Reads the run directories, so it also works when the runs executed elsewhere (SLURM)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
        failed = []
        for run_dir in runs:
            res = read_json(run_dir / "results.json") or {"status": "unreadable"}
            if res.get("status") not in ("done", "diverged"):
                failed.append(f"{run_dir.name} ({res.get('status')}: {res.get('error')})")
        log.info("sweep %s: %d runs, %d failed", sweep_dir, len(runs), len(failed))
        if failed:
            print(f"coupled_net: error: {len(failed)} of {len(runs)} runs failed in {sweep_dir}: "
                  + "; ".join(failed), file=sys.stderr, flush=True)
            raise SystemExit(1)
