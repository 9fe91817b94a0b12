"""What launch/train.py (and launch/prepare.py) check on the command line before Hydra starts, each
a one-line refusal (ConfigError; the entry point exits with it): group options that no directory of
the config search path holds, output directories that cannot be ours, keys no option of their group
declares (coupled_net.validation.check_override_keys), a key of other options than the one chosen
(model.weights on a built-in model), a search without its sweeper installed or without trials.
Malformed overrides are left to Hydra, whose message says where."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hydra._internal.config_repository import CachingConfigRepository, ConfigRepository
from hydra._internal.defaults_list import create_defaults_list
from hydra._internal.utils import create_config_search_path
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from .errors import AsTyped, ConfigError
from .knobs import KNOBS, KNOWN, OPTION_KEY, integer, unknown_key
from .models import BUILTIN
from .validation import check_override_keys


def check(args: list[str], conf_dir: Path) -> None:
    """What launch/train.py checks before Hydra starts, each a one-line refusal (ConfigError): the
    overrides are parsed once (as Hydra parses them) for every check; malformed ones are left to Hydra."""
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
    repository = config_repository(conf_dir, extra_dirs, searchpath)
    check_group_choices(overrides, repository)
    check_output_dirs(overrides)
    check_override_keys(overrides, own_configs=bool(extra_dirs or searchpath))
    check_option_keys(overrides, repository)
    check_sweeper(overrides)


def config_repository(conf_dir: Path, extra_dirs: list[Path], searchpath_overrides=()):
    """Hydra's config search path as `launch/train.py` will see it (conf/, search-path plugins, each
    --config-dir, a hydra.searchpath override), as a repository that lists a group's options."""
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
                raise ConfigError(group, value, f"allowed: {', '.join(sorted(options))}")
        if group == "hparams_search" and any(v != "none" for v in values):
            _needs_optuna(values)


def _needs_optuna(values) -> None:
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise ConfigError("hparams_search", AsTyped(",".join(values)),
                          "needs the hydra-optuna-sweeper package: pip install -e '.[optuna]'")


def check_output_dirs(overrides) -> None:
    """Refuse a `hydra.run.dir` / `hydra.sweep.dir` that cannot be a directory of ours (a file, a path
    through a file, a folder not writable), with one line, before Hydra tries to create it and fails
    with a traceback."""
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
            raise ConfigError(key, AsTyped(value), f"{where}, not a directory: choose another {key}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(key, AsTyped(value), f"{existing} is not writable by this user: choose another {key}")


def _chosen_options(overrides, repository) -> dict[str, list[str]]:
    """group -> the options the config will be composed with (`model=a,b`: each), as Hydra's defaults
    list chooses them (a preset such as experiment=quickstart chooses too); {} where that cannot be
    told here (Hydra reports it)."""
    try:
        defaults = create_defaults_list(repo=CachingConfigRepository(repository), config_name="train",
                                        overrides_list=[o for o in overrides if not o.is_sweep_override()],
                                        prepend_hydra=True, skip_missing=True)
    except HydraException:
        return {}
    chosen = {group: [option] for group, option in defaults.overrides.known_choices.items() if isinstance(option, str)}
    for o in overrides:
        if o.is_sweep_override() and o.package is None and o.key_or_group in chosen:
            chosen[o.key_or_group] = list(o.sweep_string_iterator())
    return chosen


def _option(group: str, choice: str, repository):
    """Which option (OPTION_KEY: a built-in model by its name) the YAML `group/choice` is; None where
    it cannot be read or is a user's own `_target_` (its keys are its parameters: check_config)."""
    try:
        node = repository.load_config(f"{group}/{choice}")
    except HydraException:
        return None
    config = node.config if node is not None else None
    option = config.get(OPTION_KEY[group]) if hasattr(config, "get") else None
    if group == "model" and option == BUILTIN:
        option = config.get("name")
    known = OPTION_KEY[group] != "_target_" or option in KNOWN[group]
    return option if isinstance(option, str) and known else None


def check_option_keys(overrides, repository) -> None:
    """Refuse `group.key=value` where `key` belongs to other options of the group than the one chosen
    (model.weights on a built-in model: only torchvision and timm models take weights), in the words
    of a composed config's refusal, before Hydra composes (its own refusal spans seven lines and
    proposes `+model.weights=...`, a key nothing would read). Options the table knows the keys of
    only; a user's own `_target_` is checked once composed."""
    chosen = None
    # a group whose option is set on the command line (model._target_=my.Net): not the YAML's, Hydra says
    retargeted = {o.key_or_group.split(".")[0] for o in overrides if o.key_or_group.count(".") == 1
                  and o.key_or_group.split(".")[1] in ("_target_", "name")}
    for o in overrides:
        group, _, rest = o.key_or_group.partition(".")
        knob = KNOBS.get(f"{group}.{rest.split('.')[0]}")
        if (not rest or group not in OPTION_KEY or group in retargeted or knob is None or not knob.only
                or o.package is not None or o.is_delete() or o.is_add() or o.is_force_add()):
            continue
        chosen = _chosen_options(overrides, repository) if chosen is None else chosen
        for choice in chosen.get(group, ()):
            option = _option(group, choice, repository)
            if option is not None and option not in knob.only:
                value = AsTyped(o.get_value_string()) if o.is_sweep_override() else o.value()
                raise unknown_key(group, option, o.key_or_group, value)


def check_sweeper(overrides) -> None:
    """An Optuna search (hparams_search=optuna_lr) without trials ends in optuna's traceback after
    the study ran nothing: refused in one line."""
    for o in overrides:
        if o.key_or_group == "hydra.sweeper.n_trials" and not o.is_delete() and not o.is_sweep_override():
            allowed = integer(1)(o.value())
            if allowed:
                raise ConfigError(o.key_or_group, AsTyped(o.get_value_element_as_str()),
                                  f"{allowed} (the runs the Optuna study tries)")
