"""What the launch/ entry points do once Hydra has composed the config: the task of train.py (one
run; a sweep's job) and of prepare.py. These are entry points: they end the process with one line
(coupled_net.errors.fail) where the library raises."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import commandline, data, failfast, sweep
from .errors import ConfigError, DatasetUnavailable, RunFault, RunRefused, fail
from .lifecycle import describe_fault, execute_run
from .logs import CONSOLE_ONLY, FILE_ONLY
from .objectives import objective
from .results import RunFiles
from .signals import RunInterrupted

log = logging.getLogger("coupled_net")


def check_command_line(args: list[str], conf_dir: Path) -> None:
    """launch/train.py's checks before Hydra starts (coupled_net.commandline): a mistake ends the
    process with one line, before anything is composed or written."""
    try:
        commandline.check(args, conf_dir)
    except ConfigError as e:
        fail(str(e))


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes into `<run dir>/.hydra/` (conf/train.yaml turns that off, hydra.output_subdir:
    null): the run writes it itself once the directory is its own, so a refused start changes nothing."""
    hydra_cfg = HydraConfig.instance().cfg
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def train_task(cfg: DictConfig) -> float:
    """Run one job; returns its `optimized_metric` (coupled_net.objectives: val_top1 / val_top5 /
    val_loss of the best, equalized model), what an optimizing sweeper (hparams_search=optuna_lr)
    reads; a run that failed, was refused, did not start or diverged returns the worst value so a
    study goes on, and a run found finished in its directory returns its stored value. A single run
    that fails exits non-zero with one line; in a sweep the failure is recorded in the run's
    results.json and the sweep goes on (its verdict reads the run directories, not these values). A
    stop signal (Ctrl-C) ends the process, a sweep included, with one line."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    single = hc.mode == RunMode.RUN
    metric = str(cfg.get("optimized_metric", "val_top1"))
    dataset = None if single else _dataset_key(cfg)
    earlier = dataset and sweep.unavailable(Path(hc.sweep.dir), dataset)
    if earlier:  # an earlier run of this launch found the dataset unavailable: do not try again
        sweep.not_started[str(run_dir)] = "its dataset was unavailable to an earlier run of this sweep"
        log.error("%s: not started: its dataset is unavailable (an earlier run of this sweep found it so)",
                  run_dir.name, extra=CONSOLE_ONLY)
        return _returned(hc, run_dir, metric, None)
    limit = None if single else failfast.fail_fast_limit(hc.sweeper)
    stop = failfast.fail_fast_stop(Path(hc.sweep.dir), limit, run_dir, sweep.launched())
    if stop:  # this launch has hydra.sweeper.fail_fast failed runs already
        sweep.not_started[str(run_dir)] = stop
        log.error("%s: not started: fail-fast (%d failed runs in this launch)", run_dir.name, limit,
                  extra=CONSOLE_ONLY)
        return _returned(hc, run_dir, metric, None)
    failfast.note_started(run_dir)
    started = time.monotonic()
    value, status = _run(cfg, hc, run_dir, metric, dataset, limit)
    line = None if single else sweep.ended_line(run_dir, status, time.monotonic() - started)
    if line:  # the basic launcher's sweep, in this process (the local launcher says it for its runs)
        log.info("%s", line, extra=CONSOLE_ONLY)
    return value


def _run(cfg: DictConfig, hc, run_dir: Path, metric: str, dataset: str | None, limit: int | None) -> tuple[float, str]:
    """train_task once the run may start: its value and how it ended (results.json's status, or refused)."""
    single = hc.mode == RunMode.RUN
    try:
        outcome = execute_run(cfg, run_dir, hydra_files=hydra_files(cfg))
    except RunRefused as e:
        if single:
            fail(str(e))
        log.error("refused: %s", e)
        return _returned(hc, run_dir, metric, None), "refused"
    except (ConfigError, DatasetUnavailable, RunFault) as e:  # recorded in the run dir and its train.log
        if single:
            fail(str(e), code=1 if isinstance(e, RunFault) else 2, to_file=False)
        if isinstance(e, DatasetUnavailable) and dataset:
            sweep.note_unavailable(Path(hc.sweep.dir), dataset, str(e))
        status = (RunFiles(run_dir).read_results() or {}).get("status") or "failed before it started"
        if limit and status == "failed":  # not if the directory was never claimed
            failfast.note_failure(Path(hc.sweep.dir), run_dir, str(e))
        log.error("%s: %s", run_dir.name, e, extra=CONSOLE_ONLY)
        return _returned(hc, run_dir, metric, None), status
    except Exception as e:  # noqa: BLE001 - the directory could not even be claimed (unwritable, ...)
        log.error("run failed before it started:\n%s", traceback.format_exc(), extra=FILE_ONLY)
        if single:
            fail(f"run failed: {describe_fault(e)}", code=1, to_file=False)
        log.error("%s: run failed before it started: %s", run_dir.name, describe_fault(e), extra=CONSOLE_ONLY)
        return _returned(hc, run_dir, metric, None), "failed before it started"
    except RunInterrupted as e:
        again = "hydra.run.dir" if single else "hydra.sweep.dir"
        where = run_dir if single else hc.sweep.dir
        fail(f"{e}: {run_dir} is `interrupted`; the same command with {again}={where} resumes it",
             code=e.exit_code)
    if outcome["status"] == "failed":
        line = f"run failed: {outcome['error']} (traceback in {run_dir / 'train.log'})"
        if single:
            fail(line, code=1, to_file=False)
        log.error("%s: %s", run_dir.name, line, extra=CONSOLE_ONLY)
        if limit:
            failfast.note_failure(Path(hc.sweep.dir), run_dir, outcome["error"])
    return _returned(hc, run_dir, metric, outcome), outcome["status"]


def _returned(hc, run_dir: Path, metric: str, results: dict | None) -> float:
    """train_task's value for a run whose results.json is `results` (None: nothing to read); said on
    the console when a search sweeper (not coupled_net's own, which reads the run directories) gets it."""
    value = objective(results, metric)
    if hc.mode == RunMode.MULTIRUN and sweep.searching(hc.sweeper):
        log.info("%s: %s = %s returned to the sweeper", run_dir.name, metric, f"{value:g}")
    return value


def _dataset_key(cfg: DictConfig) -> str | None:
    """A downloadable dataset and the root it is looked for in ("mnist@/data"), else None."""
    try:
        return f"{cfg.dataset.name}@{data.dataset_root(cfg.dataset)}" if cfg.dataset.name in data.LOADERS else None
    except Exception:  # noqa: BLE001 - a bad dataset config: the run itself reports it
        return None


def prepare_task(cfg: DictConfig) -> None:
    try:
        print(data.prepare(cfg.dataset))
    except (ConfigError, DatasetUnavailable) as e:
        fail(str(e))
