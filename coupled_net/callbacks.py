"""Hydra callbacks registered in conf/train.yaml."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("coupled_net")


class SweepReport(Callback):
    """At the end of a sweep: collect its runs into summary.{csv,md,tex} + plots in the sweep
    directory and print the table; then exit non-zero naming the failed runs, if any. Reads the
    run directories, so it also works when the runs executed elsewhere (SLURM)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .collect import write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df, md = write_summary([sweep_dir])
        except FileNotFoundError:
            log.warning("sweep %s: no run directories to collect", sweep_dir)
            return
        print(md, flush=True)
        log.info("sweep summary written to %s/summary.{csv,md,tex} and summary_*.png", sweep_dir)
        if config.hydra.launcher.get("detach", False):
            log.info("detached sweep: its runs go on in SLURM; `python launch/collect.py %s` shows their state",
                     sweep_dir)
            return
        bad = df[~df["status"].isin(["done", "diverged"])]
        if len(bad):
            names = "; ".join(f"{Path(r.run_dir).name} ({r.status}: {r.error})" for r in bad.itertuples())
            print(f"coupled_net: error: {len(bad)} of {len(df)} runs failed in {sweep_dir}: {names}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
