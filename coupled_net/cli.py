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

from .errors import ConfigError, DatasetUnavailable, RunFault
from .logs import CONSOLE_ONLY, FILE_ONLY

log = logging.getLogger("coupled_net")


def fail(message: str, code: int = 2, details: list[str] = (), to_file: bool = True):
    """End the process with one line on stderr (the last thing printed), after `details`, if any;
    `to_file`: the line also goes to train.log (False where the run logged it there already)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers if to_file else ():  # inside Hydra: train.log (only there)
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


def train_task(cfg: DictConfig) -> float:
    """Run one job; returns its `optimized_metric` (coupled_net.sweep.objective: val_top1 / val_top5 /
    val_loss of the best, equalized model), what an optimizing sweeper (hparams_search=optuna_lr)
    reads; a run that failed, was refused, did not start or diverged returns the worst value so a
    study goes on, and a run found finished in its directory returns its stored value. A single run
    that fails exits non-zero with one line; in a sweep the failure is recorded in the run's
    results.json and the sweep goes on (its verdict reads the run directories, not these values). A
    stop signal (Ctrl-C) ends the process, a sweep included, with one line."""
    from . import sweep
    from .run import RunRefused, describe_fault, run
    from .signals import RunInterrupted

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
    try:
        outcome = run(cfg, run_dir, hydra_files=hydra_files(cfg))
    except RunRefused as e:
        if single:
            fail(str(e))
        log.error("refused: %s", e)
        return _returned(hc, run_dir, metric, None)
    except (ConfigError, DatasetUnavailable, RunFault) as e:  # recorded in the run dir and its train.log
        if single:
            fail(str(e), code=1 if isinstance(e, RunFault) else 2, to_file=False)
        if isinstance(e, DatasetUnavailable) and dataset:
            sweep.note_unavailable(Path(hc.sweep.dir), dataset, str(e))
        log.error("%s: %s", run_dir.name, e, extra=CONSOLE_ONLY)
        return _returned(hc, run_dir, metric, None)
    except Exception as e:  # noqa: BLE001 - the directory could not even be claimed (unwritable, ...)
        log.error("run failed before it started:\n%s", traceback.format_exc(), extra=FILE_ONLY)
        if single:
            fail(f"run failed: {describe_fault(e)}", code=1, to_file=False)
        log.error("%s: run failed before it started: %s", run_dir.name, describe_fault(e), extra=CONSOLE_ONLY)
        return _returned(hc, run_dir, metric, None)
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
    return _returned(hc, run_dir, metric, outcome)


def _returned(hc, run_dir: Path, metric: str, results: dict | None) -> float:
    """train_task's value for a run whose results.json is `results` (None: nothing to read); said on
    the console when a search sweeper (not coupled_net's own, which reads the run directories) gets it."""
    from hydra_plugins.coupled_net_launcher.launcher import searching

    from .sweep import objective

    value = objective(results, metric)
    if hc.mode == RunMode.MULTIRUN and searching(hc.sweeper):
        log.info("%s: %s = %s returned to the sweeper", run_dir.name, metric, f"{value:g}")
    return value


def _dataset_key(cfg: DictConfig) -> str | None:
    """A downloadable dataset and the root it is looked for in ("mnist@/data"), else None."""
    from .data import LOADERS, dataset_root

    try:
        return f"{cfg.dataset.name}@{dataset_root(cfg.dataset)}" if cfg.dataset.name in LOADERS else None
    except Exception:  # noqa: BLE001 - a bad dataset config: the run itself reports it
        return None


def check_command_line(args: list[str], conf_dir: Path) -> None:
    """What launch/train.py checks before Hydra starts, each a one-line refusal: the overrides are
    parsed once (as Hydra parses them) for every check; malformed ones are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .validation import check_override_keys

    extra_dirs, candidates, i = [], [], 0
    while i < len(args):  # `--config-dir DIR` / `-cd DIR` / `--config-dir=DIR` add options too
        arg = args[i]
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            extra_dirs.append(Path(args[i + 1]))
            i += 1
        elif arg.startswith("--config-dir="):
            extra_dirs.append(Path(arg.split("=", 1)[1]))
        elif "=" in arg and not arg.startswith("-"):
            candidates.append(arg)
        i += 1
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # malformed: Hydra reports it
    searchpath = [o for o in overrides if o.key_or_group == "hydra.searchpath"]
    check_group_choices(overrides, config_repository(conf_dir, extra_dirs, searchpath))
    check_output_dirs(overrides)
    check_override_keys(overrides, own_configs=bool(extra_dirs or searchpath))


def config_repository(conf_dir: Path, extra_dirs: list[Path], searchpath_overrides=()):
    """Hydra's config search path as `launch/train.py` will see it (conf/, search-path plugins, each
    --config-dir, a hydra.searchpath override), as a repository that lists a group's options."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path

    search_path = create_config_search_path(f"file://{conf_dir.resolve()}")
    for d in extra_dirs:  # as hydra's main does for --config-dir
        search_path.prepend("command-line", f"file://{d.resolve()}")
    for o in searchpath_overrides:
        for path in o.value() if isinstance(o.value(), list) else []:
            search_path.append("hydra.searchpath in command-line", str(path))
    return ConfigRepository(search_path)


def check_group_choices(overrides, repository) -> None:
    """Refuse `group=option` overrides naming an option that no directory of the config search path
    holds (conf/, a --config-dir, hydra.searchpath), with one line, before Hydra composes (whose own
    message spans a screen and ends with a hint about stack traces). `logger=[a,b]` names several."""
    from hydra.core.object_type import ObjectType

    for o in overrides:
        group = o.key_or_group
        if o.package is not None or o.is_delete() or group.startswith("hydra") or not repository.group_exists(group):
            continue
        options = repository.get_group_options(group, ObjectType.CONFIG)
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
        elif isinstance(o.value(), list):
            values = [str(v) for v in o.value()]
        else:
            values = [o.get_value_element_as_str()]
        for value in values:
            if value not in options and value != "null":
                fail(f"{group}={value!r}: allowed: {', '.join(sorted(options))}")
        if group == "hparams_search" and any(v != "none" for v in values):
            _needs_optuna(values)


def _needs_optuna(values) -> None:
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        fail(f"hparams_search={','.join(values)}: needs the hydra-optuna-sweeper package: pip install -e '.[optuna]'")


def check_output_dirs(overrides) -> None:
    """Refuse a `hydra.run.dir` / `hydra.sweep.dir` that cannot be a directory of ours (a file, a path
    through a file, a folder not writable), with one line, before Hydra tries to create it and fails
    with a traceback."""
    import os

    for o in overrides:
        key = o.key_or_group
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or o.is_delete() or o.is_sweep_override():
            continue
        value = o.get_value_element_as_str()
        if "${" in value or not value:
            continue
        path = Path(os.path.expanduser(value))
        existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor or "."))
        if not existing.is_dir():
            where = "is a file" if existing == path else f"{existing} is a file"
            fail(f"{key}={value}: {where}, not a directory: choose another {key}")
        if not os.access(existing, os.W_OK | os.X_OK):
            fail(f"{key}={value}: {existing} is not writable by this user: choose another {key}")


def prepare_task(cfg: DictConfig) -> None:
    from . import data

    try:
        print(data.prepare(cfg.dataset))
    except (ConfigError, DatasetUnavailable) as e:
        fail(str(e))
