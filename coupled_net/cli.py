"""What the launch/ entry points do once Hydra has composed the config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .errors import ConfigError, DatasetUnavailable

log = logging.getLogger("coupled_net")


def fail(message: str, code: int = 2):
    """End the process with one line on stderr (the last thing printed)."""
    if logging.getLogger().hasHandlers():  # inside Hydra: the line also goes to train.log
        log.error(message)
    sys.stderr.flush()
    print(f"coupled_net: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def train_task(cfg: DictConfig) -> str:
    from . import results
    from .run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    single = hc.mode == RunMode.RUN
    try:
        outcome = run(cfg, run_dir)
    except (ConfigError, DatasetUnavailable) as e:
        if single:
            fail(str(e))
        log.error("bad input: %s", e)  # a sweep goes on; its end names this run
        files = results.RunFiles(run_dir)
        results.write_json(files.results, {"status": "failed", "error": str(e), "epochs_run": 0})
        return "failed"
    if single and outcome["status"] == "failed":
        fail(f"run failed: {outcome['error']} (traceback in {run_dir / 'train.log'})", code=1)
    return outcome["status"]


def prepare_task(cfg: DictConfig) -> None:
    from . import data

    try:
        print(data.prepare(cfg.dataset))
    except (ConfigError, DatasetUnavailable) as e:
        fail(str(e))
