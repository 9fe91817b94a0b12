"""What the launch/ entry points do once Hydra has composed the config."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hydra_plugins.coupled_net_launcher.launcher import register_plugins

from .errors import ConfigError, DatasetUnavailable, one_line

log = logging.getLogger("coupled_net")


def fail(message: str, code: int = 2):
    """End the process with one line on stderr (the last thing printed)."""
    if logging.getLogger().hasHandlers():  # inside Hydra: the line also goes to train.log
        log.error(message)
    sys.stderr.flush()
    print(f"coupled_net: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def setup() -> None:
    """What must happen before Hydra starts: our launchers known to Hydra, even in an editable install."""
    register_plugins()


def train_task(cfg: DictConfig) -> str:
    """Run one job; returns its status. A single run that fails exits non-zero with one line;
    in a sweep the failure is recorded in the run's results.json and the sweep goes on."""
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
        log.error("bad input: %s", e)
        error = str(e)
    except Exception as e:  # noqa: BLE001 - a failure while building the run: recorded like any other
        log.error("run failed:\n%s", traceback.format_exc())
        error = one_line(e)
        if single:
            fail(f"run failed: {error} (traceback in {run_dir / 'train.log'})", code=1)
    else:
        if single and outcome["status"] == "failed":
            fail(f"run failed: {outcome['error']} (traceback in {run_dir / 'train.log'})", code=1)
        return outcome["status"]
    files = results.RunFiles(run_dir)
    record = {"epochs_run": 0, **(files.read_results() or {}), "status": "failed", "error": error}
    files.write_results(record)
    return "failed"


def check_group_choices(args: list[str], conf_dir: Path) -> None:
    """Refuse `group=option` overrides naming an option that does not exist, with one line, before
    Hydra composes (whose own message spans a screen and ends with a hint about stack traces)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # malformed: Hydra reports it
    for o in overrides:
        group = conf_dir / o.key_or_group
        if o.package is not None or o.is_delete() or not group.is_dir() or o.key_or_group.startswith("hydra"):
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for value in values:
            if value not in options and value != "null":
                fail(f"{o.key_or_group}={value!r}: allowed: {', '.join(options)}")


def prepare_task(cfg: DictConfig) -> None:
    from . import data

    try:
        print(data.prepare(cfg.dataset))
    except (ConfigError, DatasetUnavailable) as e:
        fail(str(e))
