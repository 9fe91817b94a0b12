"""What the launch/ entry points do once Hydra has composed the config."""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hydra_plugins.coupled_net_launcher.launcher import register_plugins

from .errors import ConfigError, DatasetUnavailable, one_line

log = logging.getLogger("coupled_net")


def fail(message: str, code: int = 2, details: list[str] = ()):
    """End the process with one line on stderr (the last thing printed), after `details`, if any."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:  # inside Hydra: the line also goes to train.log (only there)
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    sys.stderr.flush()
    for line in details:
        print(f"coupled_net: error: {line}", file=sys.stderr)
    print(f"coupled_net: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextmanager
def interrupted():
    """Ctrl-C outside a run (composing, planning, waiting for SLURM jobs): one line, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ncoupled_net: error: interrupted (SIGINT); runs already started keep their state: the same "
              "command resumes them", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def setup() -> None:
    """What must happen before Hydra starts: our launchers known to Hydra, even in an editable install."""
    register_plugins()


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes into `<run dir>/.hydra/` (conf/train.yaml turns that off, hydra.output_subdir:
    null): the run writes it itself once the directory is its own, so a refused start changes nothing."""
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.instance().cfg
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def train_task(cfg: DictConfig) -> str:
    """Run one job; returns its status. A single run that fails exits non-zero with one line; in a
    sweep the failure is recorded in the run's results.json and the sweep goes on. A stop signal
    (Ctrl-C) ends the process, a sweep included, with one line."""
    from .run import RunRefused, run
    from .signals import RunInterrupted

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    single = hc.mode == RunMode.RUN
    try:
        outcome = run(cfg, run_dir, hydra_files=hydra_files(cfg))
    except RunRefused as e:
        if single:
            fail(str(e))
        log.error("refused: %s", e)
        return "refused"
    except (ConfigError, DatasetUnavailable) as e:
        if single:
            fail(str(e))
        log.error("bad input: %s", e)
        return "failed"
    except Exception as e:  # noqa: BLE001 - the directory could not even be claimed (unwritable, ...)
        log.error("run failed before it started:\n%s", traceback.format_exc())
        if single:
            fail(f"run failed: {one_line(e)}", code=1)
        return "failed"
    except RunInterrupted as e:
        again = "hydra.run.dir" if single else "hydra.sweep.dir"
        where = run_dir if single else hc.sweep.dir
        fail(f"{e}: {run_dir} is `interrupted`; the same command with {again}={where} resumes it",
             code=e.exit_code)
    if single and outcome["status"] == "failed":
        fail(f"run failed: {outcome['error']} (traceback in {run_dir / 'train.log'})", code=1)
    return outcome["status"]


def check_group_choices(args: list[str], conf_dir: Path) -> None:
    """Refuse `group=option` overrides naming an option that does not exist, with one line, before
    Hydra composes (whose own message spans a screen and ends with a hint about stack traces)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    dirs, candidates, i = [conf_dir], [], 0
    while i < len(args):  # `--config-dir DIR` / `-cd DIR` / `--config-dir=DIR` add options too
        arg = args[i]
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.append(Path(args[i + 1]))
            i += 1
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif "=" in arg and not arg.startswith("-"):
            candidates.append(arg)
        i += 1
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # malformed: Hydra reports it
    for o in overrides:
        groups = [d / o.key_or_group for d in dirs if (d / o.key_or_group).is_dir()]
        if o.package is not None or o.is_delete() or not groups or o.key_or_group.startswith("hydra"):
            continue
        options = sorted({p.stem for group in groups for p in group.glob("*.yaml")})
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
