"""Hydra callbacks registered in conf/train.yaml: a single run's config is refused before Hydra
makes its directory (RefuseBadConfig); a search's config is checked before its first trial, and a
sweep ends with its review and a verdict that names its failed runs (SweepReport). They run where
the entry point does, so they end the process with one line (coupled_net.errors.fail)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, fail, one_line
from .objectives import direction
from .results import FINISHED, RunFiles
from .rundir import RunLock, describe_owner
from .storage import disk_full
from .sweep import STUDY_FILE, best_trial, launched, not_started, searching
from .sweepfiles import read_fail_fast
from .validation import check_config, validate

log = logging.getLogger("coupled_net")


class RefuseBadConfig(Callback):
    """conf/train.yaml's first callback: a single run's config is validated before Hydra makes its
    run directory, so a refusal leaves nothing on disk; the result is kept for the run's build, which
    does not validate it again. (A sweep's jobs: coupled_net.sweep.plan.)"""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            validate(config, keep=True)
        except ConfigError as e:
            fail(str(e))


class SweepReport(Callback):
    """Before a search (hparams_search=optuna_lr): check its config. At the end of a sweep: collect its
    runs into the summary files (coupled_net.report) in the sweep directory and print the headline
    table (after a search, its best trial too); then exit non-zero naming the failed runs, if any.
    Reads the run directories, so it also works when the runs executed elsewhere (SLURM)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """A search (hparams_search=optuna_lr) checks its config before the first trial: coupled_net's
        own sweeper checks every job's config when it plans the sweep, a search has no plan to check
        (its trials are sampled one by one), and a mistake would otherwise fail every trial."""
        if not searching(config.hydra.sweeper):
            return
        # optuna's storage module imports alembic, whose plugins each log a line at INFO ("setup plugin
        # alembic.autogenerate...") through Hydra's root handler: seven lines of noise before every study
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            # the config every trial starts from (the sampled parameters are not in it); what only the
            # machine a trial runs on can tell (its device, its memory) is left to the trial, as the plan does
            check_config(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
            wanted, given = direction(config.optimized_metric), config.hydra.sweeper.get("direction")
            if isinstance(given, str) and given != wanted:
                raise ConfigError("hydra.sweeper.direction", given, f"optimized_metric={config.optimized_metric} "
                                  f"is to {wanted}: set hydra.sweeper.direction={wanted}, or leave it out (it "
                                  "follows optimized_metric)")
        except ConfigError as e:
            fail(str(e))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """The summary, then the verdict. Hydra turns an exception raised here into a warning (and exit
        status 0), so nothing may escape but SystemExit: a summary that cannot be written is one line,
        and the verdict — the failed runs, the exit status — is read from the runs without it."""
        from .report import write_summary  # pandas, scipy and matplotlib: imported when a sweep ends, not at start

        sweep_dir = Path(config.hydra.sweep.dir)
        summary, problem = None, None
        try:
            summary = write_summary([sweep_dir])
        except FileNotFoundError:
            log.warning("sweep %s: no run directories to collect", sweep_dir)
            return
        except Exception as e:  # noqa: BLE001 - a full disk, a summary.md that is a directory, ...
            log.debug("the sweep summary failed", exc_info=True)
            problem = f"the sweep summary could not be written into {sweep_dir}: {disk_full(e) or one_line(e)}"
        if summary is not None:
            print(summary.headline, flush=True)
            log.info("sweep summary written to %s/summary*.{csv,md,tex,png}", sweep_dir)
        say_best_trial(config, sweep_dir)
        if config.hydra.launcher.get("detach", False):
            log.info("detached sweep: its runs go on in SLURM; `python launch/collect.py %s` shows their state",
                     sweep_dir)
            lines = []
        else:
            lines = verdict(summary.runs if summary is not None else run_statuses(sweep_dir), launched(), sweep_dir)
        if problem:
            lines.append(problem)
        for line in lines:
            print(f"coupled_net: error: {line}", file=sys.stderr, flush=True)
        if lines:
            raise SystemExit(1)


def run_statuses(sweep_dir: Path):
    """run_dir, status, error of every run directory directly below `sweep_dir`, from results.json
    alone: the verdict's input when the summary (which collects much more) could not be made."""
    import pandas as pd  # only where a sweep ends: Hydra instantiates these callbacks before every run

    rows = []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else ():
        res = RunFiles(run_dir).read_results() or {}
        rows.append({"run_dir": str(run_dir), "status": res.get("status", "no results"), "error": res.get("error")})
    return pd.DataFrame(rows, columns=["run_dir", "status", "error"])


def verdict(df, planned, sweep_dir: Path) -> list[str]:
    """The lines that say this launch's runs did not all finish (none: they did): those that failed
    or never started, and those still running in another process (a second launch into the sweep),
    naming who runs them."""
    bad = unfinished(df, planned, sweep_dir)
    total = len(planned) if planned else len(df)
    running = bad["status"] == "running"
    lines = []
    for rows, what in ((bad[~running], "failed"), (bad[running], "are still running in another process")):
        if len(rows):
            names = "; ".join(f"{Path(r.run_dir).name} ({r.status}"
                              + (f": {r.detail}" if isinstance(r.detail, str) else "") + ")" for r in rows.itertuples())
            lines.append(f"{len(rows)} of {total} runs {what} in {sweep_dir}: {names}")
    return lines


def say_best_trial(config: DictConfig, sweep_dir: Path) -> None:
    """After a search: its best value, parameters and run directory (the sweeper wrote the first two
    into optimization_results.yaml; the run directory is the one its overrides name)."""
    found = best_trial(sweep_dir) if searching(config.hydra.sweeper) else None
    if found is None or "best_value" not in found[0]:
        return
    study, run_dir = found
    params = " ".join(f"{k}={v}" for k, v in (study.get("best_params") or {}).items())
    print(f"best trial: {config.optimized_metric} = {study['best_value']:g} with {params or '(no parameters)'}: "
          f"{run_dir or 'run directory not found'} (all trials: {sweep_dir / STUDY_FILE})", flush=True)


def unfinished(df, planned=None, sweep_dir: Path | None = None):
    """The runs of this launch (`planned`; all of `df` without a plan) that did not finish, with what
    stopped them: their error, or who holds a run still in progress (never started: why, the
    fail-fast reason of `sweep_dir`'s fail_fast.json if it has one)."""
    import pandas as pd  # only where a sweep ends: Hydra instantiates these callbacks before every run

    if planned is not None:
        mine = {str(job.done_in or job.run_dir) for job in planned}
        missing = sorted(mine - set(df["run_dir"]))  # never started: no directory to collect
        stopped = (read_fail_fast(sweep_dir) or {}).get("reason") if sweep_dir is not None else None
        df = pd.concat([df[df["run_dir"].isin(mine)], pd.DataFrame(
            {"run_dir": missing, "status": "not_started", "error": [not_started.get(r) or stopped for r in missing]})])
    bad = df[~df["status"].isin(FINISHED)].copy()
    now = {run_dir: RunFiles(run_dir).read_results() or {} for run_dir in bad["run_dir"]}
    still = pd.Series([now[r].get("status") not in FINISHED for r in bad["run_dir"]], index=bad.index, dtype=bool)
    bad = bad[still]  # finished since (another launch); a Series: a list would select columns when empty
    owners = {}
    for run_dir in bad["run_dir"]:
        if now[run_dir].get("status") == "running":  # its owner: results.json's, else the lock's holder
            files = RunFiles(run_dir)
            owners[run_dir] = f"in use by {describe_owner(now[run_dir].get('owner') or RunLock(files.lock).holder())}"
    bad["detail"] = [owners.get(r.run_dir) or r.error for r in bad.itertuples()]
    return bad
