"""Test helpers shared by the suites (imported as `from helpers import ...`; pytest puts tests/ on
sys.path). Fixtures live in conftest.py."""

from .cli import (CONF, REPO, TRAIN, compose_cfg, epoch_numbers, metric_table, read_results, run_cli, run_dirs,
                  run_sweep, snapshot, wait_for)
from .runs import make_run
from .standins import STANDINS, standin_loader

__all__ = ["CONF", "REPO", "TRAIN", "STANDINS", "compose_cfg", "epoch_numbers", "make_run", "metric_table",
           "read_results", "run_cli", "run_dirs", "run_sweep", "snapshot", "standin_loader", "wait_for"]
