"""Checks of the user-facing keys, run after composition and before any data is loaded or any run
directory is made: each failure is a ConfigError naming the key, the value and what is allowed.

KNOBS below is the one table of every key a config group may hold and what it allows: adding a knob
to conf/ means adding one line there (tests/test_validation.py fails for a key of conf/ without one).
A key inside a group that the table does not declare for the group's option (`+trainer.epoch=3`, a
typo) is refused with the nearest declared key; only top-level `+name=value` keys are labels.

    check_config(cfg)   # the config alone: keys, values, keys that must agree, the model's shape
    check_machine(cfg)  # this machine: the device is there, one training batch fits in its memory
    validate(cfg)       # both (coupled_net.build.resolve, and before a single run's directory is made)

The sweep planner (coupled_net.sweep.plan) runs check_config on every job before any is launched;
check_machine runs where the run runs (a SLURM node is not the login node)."""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .coupling import MODES, SCHEDULES
from .data import NAMES as DATASETS
from .errors import ConfigError, one_line
from .models import BUILTIN, MODELS, RESERVED, display_name, keywords

SELECT_BY = ("val_loss", "ke_val_loss")
SEED_MAX = 2**32 - 1  # numpy's seeds stop there

class _AsTyped(str):
    """A value shown as typed (`0.1,0.2`, not `'0.1,0.2'`)."""

    def __repr__(self) -> str:
        return str(self)


# ---- rules: a value -> None when allowed, else what is allowed ----------------------------------

Rule = Callable[[object], "str | None"]


def _same(a, b) -> bool:
    """Equal and of the same type: `true` is not 1, `1` is not `1.0`."""
    return type(a) is type(b) and a == b


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _spell(v) -> str:
    """A value as typed on the command line: true, false, null."""
    return "null" if v is None else ("true" if v else "false") if isinstance(v, bool) else str(v)


def integer(minimum: int, maximum: int | None = None, also=()) -> Rule:
    text = f"must be an integer >= {minimum}" if maximum is None else f"must be an integer from {minimum} to {maximum}"
    text += "".join(f" or {_spell(a)}" for a in also)

    def check(v):
        if any(_same(v, a) for a in also):
            return None
        ok = _is_int(v) and v >= minimum and (maximum is None or v <= maximum)
        return None if ok else text
    return check


def number(gt=None, ge=None, lt=None, le=None) -> Rule:
    """A finite number within the bounds given (gt: >, ge: >=, lt: <, le: <=)."""
    low, high = (gt if gt is not None else ge), (lt if lt is not None else le)
    if high is None:
        text = f"must be a number {'>' if gt is not None else '>='} {low}"
    elif gt is not None and lt is not None:
        text = f"must be a number strictly between {low} and {high}"
    else:
        text = f"must be a number in {'(' if gt is not None else '['}{low}, {high}{')' if lt is not None else ']'}"

    def check(v):
        if not _is_number(v):
            return text
        if not math.isfinite(v):
            return text.replace("a number", "a finite number")
        ok = ((gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt)
              and (le is None or v <= le))
        return None if ok else text
    return check


def choice(*allowed) -> Rule:
    text = f"allowed: {', '.join(map(_spell, allowed))}"
    return lambda v: None if any(_same(v, a) for a in allowed) else text


BOOLEAN = choice(True, False)


def text_value(v):
    return None if isinstance(v, str) and v.strip() else "must be a non-empty text"


def numbers(each: Rule, what: str, length: int | None = None) -> Rule:
    """A list of numbers each allowed by `each` (the length is checked against other keys elsewhere)."""
    def check(v):
        ok = isinstance(v, list) and v and all(each(x) is None for x in v) and (length is None or len(v) == length)
        return None if ok else what
    return check


def maybe_text(v):
    return None if v is None or text_value(v) is None else "must be null or a non-empty text"


def maybe_number(**bounds) -> Rule:
    inner = number(**bounds)

    def check(v):
        return None if v is None or inner(v) is None else inner(v) + " or null"
    return check


def dotted_path(v):
    """A `_target_`: the spelling only (`package.module.name`); whether it imports is _check_target's."""
    ok = isinstance(v, str) and all(part.isidentifier() for part in v.split("."))
    return None if ok else "must be a dotted import path such as torchvision.models.resnet18"


def ordered_pair(each: Rule, what: str) -> Rule:
    """[low, high], each allowed by `each`, low <= high (a range such as a scale factor's)."""
    pair = numbers(each, what, 2)
    return lambda v: pair(v) or (None if v[0] <= v[1] else what)


def module_paths(v):
    ok = v is None or text_value(v) is None or (isinstance(v, list) and v and all(text_value(x) is None for x in v))
    return None if ok else "must be null, a module path such as features.0, or a list of them"


def device_name(v):
    """The spelling only; whether this machine has that device is check_machine's question."""
    allowed = "allowed: auto, cpu, cuda, cuda:N"
    if not isinstance(v, str):
        return allowed
    if v == "auto":
        return None
    try:
        return None if torch.device(v).type in ("cpu", "cuda") else allowed
    except (RuntimeError, TypeError):
        return allowed


# ---- the table -----------------------------------------------------------------------------------
# Which option of a group a config is: its `name` (dataset; the built-in models) or its `_target_`
# (the rest). A group's options are whatever its YAML files on the config search path hold (conf/, a
# user's --config-dir): an option whose `_target_` the table does not know (a user's own model,
# optimizer, scheduler, logger) must import, and its keys must be parameters of what it names.
OPTION_KEY = {"model": "_target_", "dataset": "name", "optimizer": "_target_", "scheduler": "_target_",
              "augment": "_target_", "logger.*": "_target_"}
# in this order: a key interpolated from another (model.in_channels: ${dataset.channels}, scheduler.T_max:
# ${trainer.epochs}) is reported at its source
GROUPS = ("dataset", "augment", "model", "coupling", "trainer", "optimizer", "scheduler", "logger")
OPTIONAL_GROUPS = ("logger",)  # logger=none: no logger
SGD, ADAM, ADAMW = "torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"
STEP, COSINE, CONSTANT = ("torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.CosineAnnealingLR",
                          "torch.optim.lr_scheduler.ConstantLR")
TORCHVISION, TIMM = "coupled_net.models.torchvision_model", "coupled_net.models.timm_model"
LETTERS, CROP_FLIP, NO_AUGMENT = ("coupled_net.augment.Letters", "coupled_net.augment.CropFlip",
                                  "coupled_net.augment.NoAugment")
TENSORBOARD, MLFLOW, WANDB = ("coupled_net.loggers.TensorBoardLogger", "coupled_net.loggers.MLflowLogger",
                              "coupled_net.loggers.WandbLogger")
# options that need an optional extra: the package to find and the extra that installs it
EXTRAS = {TIMM: ("timm", "timm"), TENSORBOARD: ("tensorboard", "tensorboard"), MLFLOW: ("mlflow", "mlflow"),
          WANDB: ("wandb", "wandb")}
UNIT = number(ge=0, lt=1)  # momentum-like: a fraction of the past kept


def missing_extra(target: str) -> str | None:
    """What to install for the option `target` when its package is absent, else None. Looks only
    (importlib.util.find_spec): cheap enough to call for every job before a sweep starts."""
    if target not in EXTRAS:
        return None
    module, extra = EXTRAS[target]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # sys.modules[module] = None, or a broken install
        found = False
    return None if found else f"needs the {module} package: pip install -e '.[{extra}]'"


# optimized_metric -> where it is in results.json's `metrics` (the best model, equalized) and which way
# is better (coupled_net.sweep.objective; the coupled_net.direction resolver of conf/hparams_search/)
OBJECTIVES = {"val_top1": (("val", "top1"), "maximize"), "val_top5": (("val", "top5"), "maximize"),
              "val_loss": (("val", "loss"), "minimize")}


@dataclass(frozen=True)
class Knob:
    rule: Rule
    only: tuple = ()  # the options (OPTION_KEY's values) that take this key; () = every option of the group
    optional: bool = False  # may be absent (the code or PyTorch has a default); else `~key` is refused


def knob(rule: Rule, *only: str) -> Knob:
    return Knob(rule, only)


def optional(rule: Rule, *only: str) -> Knob:
    return Knob(rule, only, optional=True)


KNOBS: dict[str, Knob] = {
    "seed": knob(integer(0, SEED_MAX)),
    "optimized_metric": knob(choice(*OBJECTIVES)),       # what the task returns to a sweeper (Optuna)
    # model (the built-in four are options by name; the rest by _target_)
    "model._target_": knob(dotted_path),
    "model.name": knob(choice(*sorted(MODELS)), *MODELS),
    "model.arch": knob(text_value, TORCHVISION, TIMM),
    "model.weights": optional(maybe_text, TORCHVISION, TIMM),
    "model.in_channels": optional(choice(1, 3)),        # ${dataset.channels}; must agree (CHECKS)
    "model.num_classes": optional(integer(2, also=(None,))),  # ${dataset.num_classes}; must agree (CHECKS)
    "model.input_size": knob(integer(1)),               # and the model's smallest, and memory (CHECKS)
    "model.width": optional(integer(1), "small_cnn"),
    # augment
    "augment._target_": knob(dotted_path),
    "augment.flip_p": knob(number(ge=0, le=1), LETTERS, CROP_FLIP),
    "augment.degrees": knob(number(ge=0, le=180), LETTERS),
    "augment.translate": knob(number(ge=0, lt=1), LETTERS),
    "augment.scale": knob(ordered_pair(number(gt=0), "must be a list of two numbers > 0, the smaller first"),
                          LETTERS),
    "augment.shear": knob(number(ge=0, lt=90), LETTERS),
    "augment.padding": knob(integer(0), CROP_FLIP),
    # dataset
    "dataset.name": knob(choice(*DATASETS)),
    "dataset.root": knob(text_value),
    "dataset.download": knob(BOOLEAN),
    "dataset.channels": knob(choice(1, 3)),
    "dataset.num_classes": knob(integer(2, also=(None,))),  # null only for image_folder (CHECKS)
    "dataset.label_offset": knob(integer(0)),
    "dataset.mean": knob(numbers(number(), "must be a list of numbers, one per channel")),
    "dataset.std": knob(numbers(number(gt=0), "must be a list of numbers > 0, one per channel")),
    "dataset.val_fraction": knob(number(gt=0, lt=1)),
    "dataset.pipeline": knob(choice("tensor", "pil")),
    "dataset.test_fraction": optional(number(gt=0, lt=1), "image_folder"),
    "dataset.skip_bad_images": optional(BOOLEAN, "image_folder"),
    "dataset.train_per_class": knob(integer(1), "synthetic_letters"),
    "dataset.test_per_class": knob(integer(1), "synthetic_letters"),
    "dataset.generator_seed": knob(integer(0, 2**31 - 1), "synthetic_letters"),
    # optimizer (keys not in conf/ are the optimizer's own, added with +optimizer.KEY=VALUE)
    "optimizer._target_": knob(dotted_path),
    "optimizer._partial_": knob(choice(True)),
    "optimizer.lr": knob(number(gt=0)),
    "optimizer.weight_decay": optional(number(ge=0)),
    "optimizer.momentum": optional(UNIT, SGD),
    "optimizer.dampening": optional(UNIT, SGD),
    "optimizer.nesterov": optional(BOOLEAN, SGD),        # needs momentum > 0 and dampening 0 (CHECKS)
    "optimizer.betas": optional(numbers(UNIT, "must be a list of two numbers in [0, 1)", 2), ADAM, ADAMW),
    "optimizer.eps": optional(number(gt=0), ADAM, ADAMW),
    "optimizer.amsgrad": optional(BOOLEAN, ADAM, ADAMW),
    # scheduler
    "scheduler._target_": knob(dotted_path),
    "scheduler._partial_": knob(choice(True)),
    "scheduler.warmup_epochs": optional(integer(0)),    # coupled_net's own: linear warmup before the schedule
    "scheduler.step_size": knob(integer(1), STEP),
    "scheduler.gamma": optional(number(gt=0, le=1), STEP),
    "scheduler.T_max": knob(integer(1), COSINE),
    "scheduler.eta_min": optional(number(ge=0), COSINE),
    "scheduler.factor": optional(number(gt=0, le=1), CONSTANT),
    "scheduler.total_iters": optional(integer(0), CONSTANT),
    # coupling
    "coupling.alpha": knob(integer(0)),                 # and at most half the layer's filters (CHECKS)
    "coupling.layer": optional(module_paths),           # and a Conv2d of the model (CHECKS)
    "coupling.mode": optional(choice(*MODES)),
    "coupling.schedule": optional(choice(*SCHEDULES)),
    # trainer
    "trainer.epochs": knob(integer(1)),
    "trainer.patience": knob(integer(1)),
    "trainer.select_by": knob(choice(*SELECT_BY)),
    "trainer.label_smoothing": optional(number(ge=0, lt=1)),
    "trainer.grad_clip_norm": optional(maybe_number(gt=0)),
    "trainer.overfit_batches": optional(integer(0)),
    "trainer.batch_size": knob(integer(1)),             # and at most the training split (CHECKS)
    "trainer.eval_batch_size": knob(integer(1)),
    "trainer.device": knob(device_name),                # and present on this machine (check_machine)
    "trainer.num_workers": knob(integer(0, also=("auto",))),  # far above the CPUs: clamped (build.py)
    "trainer.threads": knob(integer(1, also=("auto",))),      # above the CPUs: clamped (build.py)
    "trainer.deterministic": knob(BOOLEAN),
    "trainer.precision": optional(choice("fp32", "bf16", "fp16")),
    "trainer.channels_last": optional(BOOLEAN),
    "trainer.compile": knob(BOOLEAN),
    "trainer.checkpoint_every": knob(integer(1, also=(None,))),
    "trainer.limit_batches": knob(integer(1, also=(None,))),
    "trainer.progress": knob(choice("auto", True, False)),
    # logger: a dict of named loggers (logger=[tensorboard,mlflow]); `*` is any logger's name
    "logger.*._target_": knob(dotted_path),
    "logger.*.subdir": optional(text_value, TENSORBOARD),
    "logger.*.tracking_uri": optional(maybe_text, MLFLOW),
    "logger.*.experiment_name": optional(text_value, MLFLOW),
    "logger.*.project": optional(text_value, WANDB),
    "logger.*.mode": optional(choice("offline", "online", "disabled"), WANDB),
    "logger.*.entity": optional(maybe_text, WANDB),
}
# the options the table knows the keys of, per group; any other `_target_` is a user's own
KNOWN = {group: {o for k, v in KNOBS.items() if k.startswith(group + ".") for o in v.only}
         for group in OPTION_KEY}
KNOWN["model"] |= {BUILTIN}
KNOWN["optimizer"] |= {SGD, ADAM, ADAMW}
KNOWN["scheduler"] |= {STEP, COSINE, CONSTANT}
KNOWN["augment"] |= {NO_AUGMENT}


# Training images of the datasets whose size is known without loading them (image_folder: counted
# once it is read, coupled_net.build.build_loaders).
TRAIN_IMAGES = {"mnist": 60_000, "fashion_mnist": 60_000, "emnist_letters": 124_800, "cifar10": 50_000,
                "cifar100": 50_000, "svhn": 73_257, "kmnist": 60_000}
SYNTHETIC_CLASSES = 26


def declared(group: str, option) -> dict[str, Knob]:
    """The keys group `group` takes when its option is `option` (leaf name -> Knob)."""
    prefix = f"{group}."
    return {k[len(prefix):]: v for k, v in KNOBS.items()
            if k.startswith(prefix) and (not v.only or option in v.only)}


def _flatten(node: dict, prefix: str) -> list[tuple[str, object]]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def unknown_key(group: str, option, key: str, value, any_option: bool = False, names=None) -> ConfigError:
    """`trainer.epoch=3: not a key of trainer (did you mean trainer.epochs?)`; `any_option`: the
    keys of every option of the group are candidates (before composition, the option is not known);
    `names`: the keys the option takes, where the table does not list them (a user's own _target_)."""
    if names is None:
        names = sorted({k.partition(".")[2] for k in KNOBS if k.startswith(group + ".")} if any_option
                       else declared(group, option))
    shown = key.rsplit(".", 1)[0] if group == "logger.*" else group
    leaf = key[len(shown) + 1:].split(".")[0]
    where = shown if group not in OPTION_KEY or any_option else f"{shown} {option}"
    near = difflib.get_close_matches(leaf, names, n=1)
    hint = f"did you mean {shown}.{near[0]}?" if near else \
        f"its keys: {', '.join(n for n in names if not n.startswith('_'))}"
    return ConfigError(key, value, f"not a key of {where} ({hint})")


def locate(target: str, key: str):
    """What a dotted `_target_` names (the longest importable module, then attributes), as Hydra will
    find it; ConfigError in one line where it cannot."""
    import importlib

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


def _target_keys(target: str, key: str) -> list[str] | None:
    """The keyword parameters of what `target` names (None: it takes any, **kwargs); ConfigError when
    it does not import."""
    named, any_keyword = keywords(locate(target, key))  # a builtin without a signature takes any too
    return None if any_keyword else named


def _option(group: str, node: dict, prefix: str):
    """Which option of `group` the config `node` is (its target, or a built-in model's name), after
    checking the key that says so; and the keys a user's own `_target_` takes (None: not one)."""
    key = f"{prefix}.{OPTION_KEY[group]}"
    option = node.get(OPTION_KEY[group])
    allowed = KNOBS[f"{group}.{OPTION_KEY[group]}"].rule(option)
    if allowed:
        raise ConfigError(key, option, allowed)
    problem = missing_extra(option)
    if problem:
        raise ConfigError(key, option, problem)
    if group == "model" and option == BUILTIN:
        name = node.get("name")
        allowed = KNOBS["model.name"].rule(name)
        if allowed:
            raise ConfigError("model.name", name, allowed)
        return name, None
    if option in KNOWN[group] or OPTION_KEY[group] != "_target_":
        return option, None
    params = _target_keys(option, key)  # a user's own: it must import, its keys are its parameters
    if params is None:
        return option, None
    if node.get("_partial_"):  # the first argument (the parameters, the optimizer) is given when it is built
        params = params[1:]
    return option, sorted(set(params) | (set(RESERVED) if group == "model" else set()))


def _check_node(group: str, node, prefix: str) -> None:
    """One group's config (or one logger's, group `logger.*`): the option, then every key against the
    option's rules; a key without a rule is refused with the nearest one. A user's own `_target_`:
    the group's common keys by their rules, the rest must be parameters of what it names."""
    if not isinstance(node, dict):
        raise ConfigError(prefix, node, "is required: choose one of conf/" + prefix.split(".")[0])
    option, own, foreign = None, None, False
    if group in OPTION_KEY:  # the option first: it decides which keys the group takes
        option, own = _option(group, node, prefix)
        foreign = OPTION_KEY[group] == "_target_" and option not in KNOWN[group]
    knobs = {leaf: k for leaf, k in declared(group, None).items() if not k.only} if foreign \
        else declared(group, option)
    for leaf, knob_ in knobs.items():
        if not knob_.optional and leaf not in node:
            raise ConfigError(f"{prefix}.{leaf}", _AsTyped("(absent)"), "is required here: only optional keys may "
                                                                       "be left out")
    for key, value in _flatten(node, f"{prefix}."):
        leaf = key[len(prefix) + 1:]
        if leaf in knobs:
            allowed = knobs[leaf].rule(value)
            if allowed:
                raise ConfigError(key, value, allowed)
        elif not foreign or (own is not None and leaf.split(".")[0] not in own):
            raise unknown_key(group, option, key, value, names=own)


def _check_group(group: str, node) -> None:
    if group in OPTIONAL_GROUPS and node in (None, {}):
        return
    if group == "logger":  # a dict of named loggers
        if not isinstance(node, dict):
            raise ConfigError("logger", node, "must be loggers by name: logger=tensorboard, logger=[tensorboard,mlflow]")
        for name, entry in node.items():
            _check_node("logger.*", entry, f"logger.{name}")
        return
    _check_node(group, node, group)


# ---- keys that must agree -------------------------------------------------------------------------

def _per_channel(c: dict) -> None:
    d = c["dataset"]
    for key in ("mean", "std"):
        if len(d[key]) != d["channels"]:
            raise ConfigError(f"dataset.{key}", d[key], f"must hold {d['channels']} value(s), one per channel "
                                                        f"(dataset.channels={d['channels']})")


def _model_fits_dataset(c: dict) -> None:
    m, d = c["model"], c["dataset"]
    if d["num_classes"] is None and d["name"] != "image_folder":
        raise ConfigError("dataset.num_classes", None, "must be an integer >= 2 (only image_folder counts its "
                                                       "classes itself)")
    for key, of in (("in_channels", "channels"), ("num_classes", "num_classes")):
        if key in m and m[key] != d[of]:
            raise ConfigError(f"model.{key}", m[key], f"must equal dataset.{of} ({_spell(d[of])})")


def _pipeline(c: dict) -> None:
    d = c["dataset"]
    if d["name"] == "image_folder" and d["pipeline"] == "tensor":
        raise ConfigError("dataset.pipeline", "tensor", "needs a dataset held in memory; use pil for image_folder")


def _warmup_within_run(c: dict) -> None:
    warmup, epochs = (c.get("scheduler") or {}).get("warmup_epochs"), (c.get("trainer") or {}).get("epochs")
    if _is_int(warmup) and _is_int(epochs) and warmup >= epochs > 0:
        raise ConfigError("scheduler.warmup_epochs", warmup, f"must be less than trainer.epochs ({epochs}): the "
                                                             "schedule starts after the warmup")


def _nesterov(c: dict) -> None:
    o = c["optimizer"]
    if o.get("nesterov") and (o.get("momentum", 0) <= 0 or o.get("dampening", 0) != 0):
        raise ConfigError("optimizer.nesterov", True, "needs optimizer.momentum > 0 and optimizer.dampening=0")


def training_images(d: dict) -> tuple[int, str] | None:
    """The training split's size and how it follows from the config, where known without loading."""
    if d["name"] == "synthetic_letters":
        n, how = d["train_per_class"] * SYNTHETIC_CLASSES, f"dataset.train_per_class={d['train_per_class']} x " \
                                                            f"{SYNTHETIC_CLASSES} classes"
    elif d["name"] in TRAIN_IMAGES:
        n, how = TRAIN_IMAGES[d["name"]], f"{TRAIN_IMAGES[d['name']]} {d['name']} images"
    else:
        return None
    return int((1 - d["val_fraction"]) * n), f"{how}, less dataset.val_fraction={d['val_fraction']}"


def batch_fits(batch_size: int, train: int, how: str) -> None:
    """A batch larger than the training split: one short batch an epoch, not the batch asked for."""
    if batch_size > train:
        raise ConfigError("trainer.batch_size", batch_size,
                          f"must be at most {train}, the training split's size ({how})")


def _batch_fits_split(c: dict) -> None:
    known = training_images(c["dataset"])
    if known:
        batch_fits(c["trainer"]["batch_size"], *known)


@dataclass(frozen=True)
class ModelShape:
    params: int
    activations: int  # values a training step keeps per image (the layers' outputs, the input)


_shapes: dict[str, ModelShape] = {}


def model_shape(c: dict) -> ModelShape:
    """The model at its input size, built on the meta device (no memory, no weights): refuses an
    input size it cannot take and coupled layers it does not have; counts parameters and the
    activations of one image. Cached: a sweep's jobs mostly share a model."""
    from .coupling import Coupling
    from .models import make, smallest_input_size

    m, d = c["model"], c["dataset"]
    cache_key = repr((m, d["channels"], d["num_classes"], c["coupling"]))
    if cache_key in _shapes:
        return _shapes[cache_key]
    size, channels = m["input_size"], d["channels"]
    with torch.device("meta"):
        model = make(m, channels, d["num_classes"] or 2).eval()
    counted: list[int] = []
    leaves = [mod for mod in model.modules() if not list(mod.children())]
    hooks = [mod.register_forward_hook(lambda mod, i, out: counted.append(
        0 if getattr(mod, "inplace", False) else out.numel())) for mod in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(1, channels, size, size, device="meta"))
    except RuntimeError:
        raise ConfigError("model.input_size", size, f"{display_name(m)} needs images of at least "
                                                    f"{smallest_input_size(model, channels)} pixels") from None
    finally:
        for h in hooks:
            h.remove()
    Coupling(model, **c["coupling"])  # coupling.layer / coupling.alpha against the model's layers
    shape = ModelShape(sum(p.numel() for p in model.parameters()), sum(counted) + channels * size * size)
    _shapes[cache_key] = shape
    return shape


# Checks of keys that must agree, in order; each raises ConfigError.
CHECKS = (_per_channel, _model_fits_dataset, _pipeline, _nesterov, _batch_fits_split, model_shape)


# ---- entry points -----------------------------------------------------------------------------------

def plain_config(cfg: DictConfig) -> dict:
    """The task config resolved to plain values (the `hydra` node left out); `???` refused."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "???", "is required here: set it on the command line")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that cannot be resolved
        raise ConfigError("config", "(composed)", f"cannot be resolved: {one_line(e, 300)}") from None
    return plain


def check_config(cfg: DictConfig) -> dict:
    """Everything the config alone decides (no data, no machine); returns the resolved plain config."""
    c = plain_config(cfg)
    for key in ("seed", "optimized_metric"):
        allowed = KNOBS[key].rule(c.get(key))
        if allowed:
            raise ConfigError(key, c.get(key), allowed)
    _warmup_within_run(c)  # before the groups: cosine's T_max is counted from it (T_max=0 would say less)
    for group in GROUPS:
        _check_group(group, c.get(group))
    for check in CHECKS:
        check(c)
    return c


def batch_bytes(c: dict, shape: ModelShape) -> int:
    """A rough lower bound of one training step's memory: weights, gradients and optimizer state,
    the layers' outputs for one (per-process) batch."""
    states = {ADAM: 2, ADAMW: 2}.get(c["optimizer"]["_target_"], 1 if c["optimizer"].get("momentum") else 0)
    per_value = 4 if c["trainer"].get("precision", "fp32") == "fp32" else 2
    batch = max(1, c["trainer"]["batch_size"] // int(os.environ.get("WORLD_SIZE", "1")))
    return shape.params * 4 * (2 + states) + batch * shape.activations * per_value


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def check_machine(c: dict) -> None:
    """What this machine decides: the device is there and one training batch fits in its memory."""
    device = resolve_device(c["trainer"]["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    need, free = batch_bytes(c, model_shape(c)), available_bytes(device)
    if need > free:
        raise ConfigError("model.input_size", c["model"]["input_size"],
                          f"a training batch of {c['trainer']['batch_size']} images of {display_name(c['model'])} needs "
                          f"about {_size(need)}, more than the {_size(free)} free on {device}; lower "
                          "model.input_size or trainer.batch_size")


def validate(cfg: DictConfig) -> None:
    check_machine(check_config(cfg))


def check_override_keys(overrides, own_configs: bool = False) -> None:
    """Refuse `group.key=value` overrides (parsed by coupled_net.cli.check_command_line) whose key no
    option of the group declares, in one line, before Hydra composes: for `trainer.epoch=3` Hydra's own
    refusal spans five lines and proposes `+trainer.epoch=3`, which would add a key nothing reads.
    Groups whose options may be a user's own `_target_` (model, optimizer, ...) take keys the table
    cannot know: there, only a plain `key=value` without configs of the user's own (`own_configs`:
    --config-dir, hydra.searchpath) is refused here; the rest is checked once composed (check_config)."""
    from .cli import fail

    for o in overrides:
        group, _, rest = o.key_or_group.partition(".")
        if not rest or group not in GROUPS or o.is_delete() or o.package is not None or group == "logger":
            continue
        if OPTION_KEY.get(group) == "_target_" and (own_configs or o.is_add() or o.is_force_add()):
            continue
        if f"{group}.{rest.split('.')[0]}" not in KNOBS:
            value = _AsTyped(o.get_value_string()) if o.is_sweep_override() else o.value()
            fail(str(unknown_key(group, None, o.key_or_group, value, any_option=True)))


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM allocation, taskset), not the machine's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK")  # a cluster without CPU binding still allocates
    return min(cpus, int(allocated)) if allocated and allocated.isdigit() else cpus


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("trainer.device", name, "allowed: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("trainer.device", name, "allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", name, "no CUDA GPU is visible to this process; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("trainer.device", name, f"this process sees {torch.cuda.device_count()} GPU(s)")
    return device


class RefuseBadConfig(Callback):
    """conf/train.yaml's first callback: a single run's config is validated before Hydra makes its
    run directory, so a refusal leaves nothing on disk. (A sweep's jobs: coupled_net.sweep.plan.)"""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from .cli import fail

        try:
            validate(config)
        except ConfigError as e:
            fail(str(e))
