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
    """At the end of a sweep: collect its runs into the summary files (coupled_net.report) in the
    sweep directory and print the headline table; then exit non-zero naming the failed runs, if
    any. Reads the run directories, so it also works when the runs executed elsewhere (SLURM)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .report import write_summary
        from .sweep import launched

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary = write_summary([sweep_dir])
        except FileNotFoundError:
            log.warning("sweep %s: no run directories to collect", sweep_dir)
            return
        print(summary.headline, flush=True)
        log.info("sweep summary written to %s/summary*.{csv,md,tex,png}", sweep_dir)
        df = summary.runs
        if config.hydra.launcher.get("detach", False):
            log.info("detached sweep: its runs go on in SLURM; `python launch/collect.py %s` shows their state",
                     sweep_dir)
            return
        bad = unfinished(df, launched())
        if len(bad):
            names = "; ".join(f"{Path(r.run_dir).name} ({r.status}: {r.detail})" for r in bad.itertuples())
            total = len(launched() or df)
            print(f"coupled_net: error: {len(bad)} of {total} runs failed in {sweep_dir}: {names}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)


def unfinished(df, planned=None):
    """The runs of this launch (`planned`; all of `df` without a plan) that did not finish, with what
    stopped them: their error, or who holds a run still in progress."""
    import pandas as pd

    from .run import describe_owner
    from .sweep import not_started

    if planned is not None:
        mine = {str(job.done_in or job.run_dir) for job in planned}
        missing = sorted(mine - set(df["run_dir"]))  # never started: no directory to collect
        df = pd.concat([df[df["run_dir"].isin(mine)], pd.DataFrame(
            {"run_dir": missing, "status": "not started", "error": [not_started.get(r) for r in missing]})])
    bad = df[~df["status"].isin(["done", "diverged"])].copy()
    owners = {}
    for run_dir in bad["run_dir"]:
        res = read_json(Path(run_dir) / "results.json") or {}
        owners[run_dir] = f"in use by {describe_owner(res.get('owner'))}" if res.get("status") == "running" else None
    bad["detail"] = [owners.get(r.run_dir) or r.error for r in bad.itertuples()]
    return bad
