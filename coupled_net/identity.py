"""What a run *is* (SPEC §5): its fingerprint, a digest of the resolved config without the keys that
say only where and how it runs; and the sweep sub-directory name derived from the same rule (§6).

This module is the one place that lists those keys. A directory holding a run of another
fingerprint is never trained in, resumed or skipped into (coupled_net.rundir); the name of a sweep's
run directory leaves out the same keys, so re-launching with another `dataset.root` or
`trainer.device` finds the runs it already made."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import QuotedString
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, one_line
from .objectives import direction

# Keys (or whole sub-trees) that change where or how a run executes, never what it computes.
NON_IDENTITY = ("dataset.root", "dataset.download", "trainer.device", "trainer.num_workers", "trainer.threads",
                "trainer.progress", "trainer.compile", "trainer.channels_last", "logger", "hydra",
                "optimized_metric")
# Keys added after runs were made, at the value that computes what those runs computed without them:
# left out of the fingerprint there, so those runs keep theirs (they resume, re-launches skip them).
# Any other value is part of the identity like every key. `augment`: the seed's letters family, which
# every run made before the augment group existed was trained with.
NEUTRAL = {
    "trainer.label_smoothing": 0.0,
    "trainer.grad_clip_norm": None,
    "trainer.overfit_batches": 0,
    "scheduler.warmup_epochs": 0,
    "augment": {"_target_": "coupled_net.augment.Letters", "flip_p": 0.5, "degrees": 20.0, "translate": 0.1,
                "scale": [0.8, 1.2], "shear": 10.0},
}
# The task config's own top-level keys and the config groups that only select others (experiment).
# Any other top-level key is a `+label`: recorded and reviewed, but not part of the fingerprint.
TASK_ROOTS = ("model", "dataset", "augment", "optimizer", "scheduler", "coupling", "trainer", "logger", "seed",
              "optimized_metric")
SELECTOR_GROUPS = ("experiment", "debug", "hparams_search")
# Selectors that change only how runs are chosen (the sweeper), never what one computes: left out of
# run directory names, so an Optuna trial is named by its sampled overrides alone.
NAMELESS = ("hparams_search",)
MAX_NAME_BYTES = 200


def model_name(m: dict) -> str:
    """What results.json and the review call the model of model config `m`: its `name` (the built-in
    models), else its `arch` (model=torchvision, model=timm), else the last part of its `_target_`."""
    return str(m.get("name") or m.get("arch") or str(m.get("_target_", "model")).rsplit(".", 1)[-1])


def is_non_identity(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NON_IDENTITY)


def flatten(node, prefix: str = "") -> dict:
    """A nested config as dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`); an empty mapping is a value."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class Identity:
    """The identity keys of one run (dotted name -> resolved value), its labels and fingerprint."""
    keys: dict
    labels: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(_canonical(self.keys).encode()).hexdigest()[:16]

    @property
    def run_key(self) -> str:
        return run_key(self.fingerprint, self.labels)

    def record(self) -> dict:
        """How results.json and checkpoints store it."""
        return {"fingerprint": self.fingerprint, "identity": self.keys, "labels": self.labels}


def run_key(fingerprint: str, labels: dict | None) -> str:
    """What makes two directories one run twice (SPEC §6): the same fingerprint and the same labels."""
    return json.dumps([fingerprint, labels or {}], sort_keys=True, default=str)


def identity_of(cfg: DictConfig) -> Identity:
    """The identity of the task config `cfg` (the `hydra` node, if present, is ignored)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that cannot be resolved
        raise ConfigError("config", "(composed)", f"cannot be resolved: {one_line(e, 300)}") from None
    plain.pop("hydra", None)
    labels = {k: plain.pop(k) for k in list(plain) if k not in TASK_ROOTS}
    for key, value in NEUTRAL.items():
        if _canonical(_get(plain, key)) == _canonical(value):
            _drop(plain, key)
    keys = {k: v for k, v in flatten(plain).items() if not is_non_identity(k)}
    return Identity(keys=dict(sorted(keys.items())), labels=labels)


_ABSENT = object()


def _get(plain: dict, dotted: str):
    node = plain
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _drop(plain: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = plain
    for part in parents:
        node = node[part]
    del node[leaf]


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else _canonical(value) if isinstance(value, (list, dict)) else str(value)


def differences(stored: dict, wanted: dict) -> list[str]:
    """`key: stored → wanted` for every identity key whose value differs, as the fingerprint sees it
    (a key only one side has included)."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, _ABSENT), wanted.get(key, _ABSENT)
        if a is _ABSENT or b is _ABSENT or _canonical(a) != _canonical(b):
            shown = _show(a), _show(b)
            if shown[0] == shown[1]:  # '0.05' (a string) and 0.05: show what tells them apart
                shown = _canonical(a), _canonical(b)
            out.append(f"{key}: {shown[0]} → {shown[1]}")
    return out


# ---- sweep sub-directory names (SPEC §6) -----------------------------------------------------

def _is_label(key: str, is_add: bool) -> bool:
    return is_add and "." not in key and "/" not in key and key not in TASK_ROOTS + SELECTOR_GROUPS


def _value_text(o) -> str:
    """An override's value as one text whatever quoting was typed: 'mean', "mean" and mean alike."""
    value = o.value()
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, str):
        return value
    return o.get_value_element_as_str()


def run_name(task_overrides) -> str:
    """A sweep job's sub-directory, from its overrides alone: `key=value` of every identity key,
    sorted by key, joined with commas; no job number, so the same overrides give the same directory
    whatever else the sweep holds. Longer than 200 bytes: a readable prefix and an 8-hex digest."""
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    items = []
    for o in overrides:
        key = o.key_or_group
        if is_non_identity(key) or _is_label(key, o.is_add() or o.is_force_add()) or key in NAMELESS:
            continue
        item = f"~{key}" if o.is_delete() else f"{key}={_value_text(o)}"
        items.append(item.replace("/", "%2F"))  # a path-valued key must not nest directories
    name = ",".join(sorted(items)) or "default"
    raw = name.encode()
    if len(raw) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    prefix = raw[:MAX_NAME_BYTES - 9].decode(errors="ignore")
    return f"{prefix}-{digest}"


def register_resolver() -> None:
    """`${coupled_net.run_name:${hydra.overrides.task}}`, used by conf/train.yaml's hydra.sweep.subdir;
    `${coupled_net.minus:a,b}` (a - b), used by conf/scheduler/cosine.yaml's T_max;
    `${coupled_net.direction:${optimized_metric}}` (conf/hparams_search/*.yaml): a study maximizes an
    accuracy and minimizes a loss without a second key to keep in step."""
    if not OmegaConf.has_resolver("coupled_net.run_name"):
        OmegaConf.register_new_resolver("coupled_net.run_name", lambda overrides: run_name(list(overrides)))
    if not OmegaConf.has_resolver("coupled_net.minus"):
        OmegaConf.register_new_resolver("coupled_net.minus", lambda a, b: a - b)
    if not OmegaConf.has_resolver("coupled_net.direction"):
        OmegaConf.register_new_resolver("coupled_net.direction", lambda metric: direction(str(metric)))


register_resolver()
