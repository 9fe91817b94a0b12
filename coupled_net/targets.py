"""What a config's `_target_` names, as Hydra will find it, and the keys it takes: the one
locator and the one key check (one wording) for every group whose options are `_target_`s."""

from __future__ import annotations

import difflib
import importlib
import inspect

from .errors import ConfigError, one_line


def locate(target: str, key: str):
    """What a dotted `_target_` names (the longest importable module, then attributes), as Hydra will
    find it; ConfigError in one line (naming `key`) where it cannot."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and not module_name.startswith(e.name) and e.name != module_name:
                raise ConfigError(key, target, f"cannot be imported: {module_name} needs {e.name}, which is not "
                                               "installed") from None
            continue
        except Exception as e:  # noqa: BLE001 - an error inside the module itself
            raise ConfigError(key, target, f"cannot be imported: {one_line(e, 200)}") from None
        for name in parts[cut:]:
            if not hasattr(obj, name):
                raise ConfigError(key, target, f"cannot be imported: {'.'.join(parts[:cut])} has no {name}")
            obj = getattr(obj, name)
        return obj
    raise ConfigError(key, target, f"cannot be imported: no module named {parts[0]}")


def keywords(fn) -> tuple[list[str], bool]:
    """The keyword parameters of `fn` (a class: its __init__) and whether it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): take everything
        return [], True
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def not_a_key(prefix: str, key: str, value, where: str, names) -> ConfigError:
    """`trainer.epoch=3: not a key of trainer (did you mean trainer.epochs?)`: `key` (below `prefix`)
    is none of `names`, the keys of `where`; without a close one, the keys are listed."""
    leaf = key[len(prefix) + 1:].split(".")[0]
    near = difflib.get_close_matches(leaf, names, n=1)
    keys = [n for n in names if not n.startswith("_")]
    hint = f"did you mean {prefix}.{near[0]}?" if near else f"its keys: {', '.join(keys)}" if keys else "it takes none"
    return ConfigError(key, value, f"not a key of {where} ({hint})")


def check_keys(prefix: str, target: str, options: dict, names: list[str], any_keyword: bool) -> None:
    """Refuse the first key of `options` that what `target` names does not take (`names`, unless it
    takes **kwargs); Hydra's own keys (`_partial_`, `_convert_`, ...) pass."""
    for key, value in options.items():
        if key not in names and not any_keyword and not (key.startswith("_") and key.endswith("_")):
            raise not_a_key(prefix, f"{prefix}.{key}", value, f"{prefix} {target}", names)
