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
from omegaconf import OmegaConf

from .objectives import direction

# Keys (or whole sub-trees) that change where or how a run executes, never what it computes.
NON_IDENTITY = ("dataset.root", "dataset.download", "trainer.device", "trainer.num_workers", "trainer.threads",
                "trainer.progress", "trainer.compile", "trainer.channels_last", "trainer.last_every", "logger",
                "callbacks", "hydra", "optimized_metric")
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
TASK_ROOTS = ("model", "dataset", "augment", "optimizer", "scheduler", "coupling", "trainer", "logger", "callbacks",
              "seed", "optimized_metric")
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
        return run_key(self.record())

    def matches(self, record: dict) -> bool:
        """Is `record` (results.json, a checkpoint: its `fingerprint` and `identity`) a run of this
        identity? Its fingerprint, else its identity keys compared value by value: a run recorded
        with a default typed out as an integer (before 0 and 0.0 were one value) is still this run."""
        if record.get("fingerprint") == self.fingerprint:
            return True
        stored = record.get("identity")
        return bool(record.get("fingerprint")) and isinstance(stored, dict) and not differences(stored, self.keys)

    def record(self) -> dict:
        """How results.json and checkpoints store it."""
        return {"fingerprint": self.fingerprint, "identity": self.keys, "labels": self.labels}


def run_key(record: dict) -> str:
    """What makes two directories one run twice (SPEC §6): the same identity and the same labels, of
    `record` (results.json, or Identity.record()). The identity keys are compared as differences()
    compares them (0 is 0.0, a key at its neutral value is as good as absent), so a run recorded with
    a default typed out as an integer (before the two were one value) is found as the run it repeats;
    a record without its keys falls back on its fingerprint."""
    stored = record.get("identity")
    if isinstance(stored, dict):
        same = {k: _comparable(v) for k, v in stored.items()
                if not (k in _NEUTRAL_FLAT and same_value(v, _NEUTRAL_FLAT[k]))}
        return json.dumps([same, record.get("labels") or {}], sort_keys=True, default=str)
    return json.dumps([record.get("fingerprint"), record.get("labels") or {}], sort_keys=True, default=str)


def _comparable(value):
    """A value with equal numbers spelt alike (2.0 as 2), for run_key."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def identity_from(plain: dict, floats=frozenset()) -> Identity:
    """The identity of the resolved task config `plain` (no `hydra` node; coupled_net.identify adds what
    the config alone cannot say, such as an image folder's contents). `floats`: the dotted keys that
    take a number (coupled_net.knobs.float_keys): a value typed there as an integer is that float,
    so `trainer.label_smoothing=0` is the default 0.0's run, not a new one."""
    plain = dict(plain)
    plain.pop("hydra", None)
    labels = {k: plain.pop(k) for k in list(plain) if k not in TASK_ROOTS}
    keys = {k: as_float(v) if k in floats else v for k, v in flatten(plain).items() if not is_non_identity(k)}
    for key, value in NEUTRAL.items():
        at = {k: v for k, v in keys.items() if k == key or k.startswith(key + ".")}
        neutral = flatten({key: value})
        if at.keys() == neutral.keys() and all(same_value(at[k], neutral[k]) for k in at):
            for k in at:
                del keys[k]
    return Identity(keys=dict(sorted(keys.items())), labels=labels)


def as_float(value):
    """An integer (or a list of them) as the float it equals; anything else as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        return [as_float(v) for v in value]
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def same_value(a, b) -> bool:
    """Equal as the run sees them: numbers by value (0 is 0.0), lists and mappings element by element;
    a text is never a number, `true` never 1."""
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_ABSENT = object()
_NEUTRAL_FLAT = flatten(NEUTRAL)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else _canonical(value) if isinstance(value, (list, dict)) else str(value)


def differences(stored: dict, wanted: dict) -> list[str]:
    """`key: stored → wanted` for every identity key whose value differs as the run sees it
    (same_value: 0 is 0.0); a key only one side has counts as its neutral value there (NEUTRAL), so a
    record that typed a default out (`trainer.label_smoothing: 0`) shows no difference from one without it."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        neutral = _NEUTRAL_FLAT.get(key, _ABSENT)
        a, b = stored.get(key, neutral), wanted.get(key, neutral)
        if a is _ABSENT or b is _ABSENT or not same_value(a, b):
            a, b = stored.get(key, _ABSENT), wanted.get(key, _ABSENT)
            shown = _show(a), _show(b)
            if shown[0] == shown[1]:  # '0.05' (a string) and 0.05: show what tells them apart
                shown = _canonical(a), _canonical(b)
            out.append(f"{key}: {shown[0]} → {shown[1]}")
    return out


# ---- sweep sub-directory names (SPEC §6) -----------------------------------------------------

def _is_label(key: str, is_add: bool) -> bool:
    return is_add and "." not in key and "/" not in key and key not in TASK_ROOTS + SELECTOR_GROUPS


def _value_text(o, floats) -> str:
    """An override's value as one text whatever quoting was typed: 'mean', "mean" and mean alike; an
    integer for a key that takes a float (`floats`) as that float: `label_smoothing=0` is `=0.0`."""
    value = o.value()
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, str):
        return value
    if o.key_or_group in floats and isinstance(value, int) and not isinstance(value, bool):
        return str(float(value))
    return o.get_value_element_as_str()


def run_name(task_overrides, floats=frozenset()) -> str:
    """A sweep job's sub-directory, from its overrides alone: `key=value` of every identity key,
    sorted by key, joined with commas; no job number, so the same overrides give the same directory
    whatever else the sweep holds. Longer than 200 bytes: a readable prefix and an 8-hex digest.
    `floats`: the keys whose integers are floats (as in identity_from)."""
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    items = []
    for o in overrides:
        key = o.key_or_group
        if is_non_identity(key) or _is_label(key, o.is_add() or o.is_force_add()) or key in NAMELESS:
            continue
        item = f"~{key}" if o.is_delete() else f"{key}={_value_text(o, floats)}"
        items.append(item.replace("/", "%2F"))  # a path-valued key must not nest directories
    name = ",".join(sorted(items)) or "default"
    raw = name.encode()
    if len(raw) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    prefix = raw[:MAX_NAME_BYTES - 9].decode(errors="ignore")
    return f"{prefix}-{digest}"


def register_resolver() -> None:
    """`${coupled_net.minus:a,b}` (a - b), used by conf/scheduler/cosine.yaml's T_max;
    `${coupled_net.direction:${optimized_metric}}` (conf/hparams_search/*.yaml): a study maximizes an
    accuracy and minimizes a loss without a second key to keep in step. (`coupled_net.run_name`, the
    sweep directories' names: coupled_net.identify.)"""
    if not OmegaConf.has_resolver("coupled_net.minus"):
        OmegaConf.register_new_resolver("coupled_net.minus", lambda a, b: a - b)
    if not OmegaConf.has_resolver("coupled_net.direction"):
        OmegaConf.register_new_resolver("coupled_net.direction", lambda metric: direction(str(metric)))


register_resolver()
