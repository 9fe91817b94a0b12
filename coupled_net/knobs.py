"""The one table of every key a config group may hold and what it allows (KNOBS), with the rules
that say it: adding a knob to conf/ means adding one line here (tests/test_validation.py fails for a
key of conf/ without one). Each rule takes a value and returns None when it is allowed, else the
text of what is allowed; coupled_net.validation applies the table to a composed config.

Which option of a group a config is: its `name` (dataset; the built-in models) or its `_target_`
(the rest). A group's options are whatever its YAML files on the config search path hold (conf/, a
user's --config-dir): an option whose `_target_` the table does not know (a user's own model,
optimizer, scheduler, logger) must import, and its keys must be parameters of what it names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .coupling import MODES, SCHEDULES
from .data import NAMES as DATASETS
from .errors import ConfigError
from .extras import MLFLOW, TENSORBOARD, TIMM, WANDB
from .machine import DEVICES
from .models import BUILTIN, MODELS, TORCHVISION
from .objectives import OBJECTIVES
from .targets import not_a_key

SELECT_BY = ("val_loss", "ke_val_loss")
SEED_MAX = 2**32 - 1  # numpy's seeds stop there

# ---- rules: a value -> None when allowed, else what is allowed ----------------------------------

Rule = Callable[[object], "str | None"]


def _same(a, b) -> bool:
    """Equal and of the same type: `true` is not 1, `1` is not `1.0`."""
    return type(a) is type(b) and a == b


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def spell(v) -> str:
    """A value as typed on the command line: true, false, null."""
    return "null" if v is None else ("true" if v else "false") if isinstance(v, bool) else str(v)


def integer(minimum: int, maximum: int | None = None, also=()) -> Rule:
    text = f"must be an integer >= {minimum}" if maximum is None else f"must be an integer from {minimum} to {maximum}"
    text += "".join(f" or {spell(a)}" for a in also)

    def check(v):
        if any(_same(v, a) for a in also):
            return None
        ok = is_int(v) and v >= minimum and (maximum is None or v <= maximum)
        return None if ok else text
    return check


def takes_float(rule: Rule) -> Rule:
    """Mark `rule` as one whose values are numbers (an integer typed there is the float it equals: float_keys)."""
    rule.takes_float = True
    return rule


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
    return takes_float(check)


def choice(*allowed) -> Rule:
    text = f"allowed: {', '.join(map(spell, allowed))}"
    return lambda v: None if any(_same(v, a) for a in allowed) else text


BOOLEAN = choice(True, False)


def text_value(v):
    return None if isinstance(v, str) and v.strip() else "must be a non-empty text"


def numbers(each: Rule, what: str, length: int | None = None) -> Rule:
    """A list of numbers each allowed by `each` (the length is checked against other keys elsewhere)."""
    def check(v):
        ok = isinstance(v, list) and v and all(each(x) is None for x in v) and (length is None or len(v) == length)
        return None if ok else what
    return takes_float(check) if getattr(each, "takes_float", False) else check


def maybe_text(v):
    return None if v is None or text_value(v) is None else "must be null or a non-empty text"


def maybe_number(**bounds) -> Rule:
    inner = number(**bounds)

    def check(v):
        return None if v is None or inner(v) is None else inner(v) + " or null"
    return takes_float(check)


def dotted_path(v):
    """A `_target_`: the spelling only (`package.module.name`); whether it imports is coupled_net.targets.locate's."""
    ok = isinstance(v, str) and all(part.isidentifier() for part in v.split("."))
    return None if ok else "must be a dotted import path such as torchvision.models.resnet18"


def ordered_pair(each: Rule, what: str) -> Rule:
    """[low, high], each allowed by `each`, low <= high (a range such as a scale factor's)."""
    pair = numbers(each, what, 2)

    def check(v):
        return pair(v) or (None if v[0] <= v[1] else what)
    return takes_float(check) if getattr(pair, "takes_float", False) else check


def module_paths(v):
    ok = v is None or text_value(v) is None or (isinstance(v, list) and v and all(text_value(x) is None for x in v))
    return None if ok else "must be null, a module path such as features.0, or a list of them"


def device_name(v):
    """The spelling only; whether this machine has that device is validation.check_machine's question."""
    allowed = DEVICES
    if not isinstance(v, str):
        return allowed
    if v == "auto":
        return None
    try:
        return None if torch.device(v).type in ("cpu", "cuda") else allowed
    except (RuntimeError, TypeError):
        return allowed


# ---- the table -----------------------------------------------------------------------------------
OPTION_KEY = {"model": "_target_", "dataset": "name", "optimizer": "_target_", "scheduler": "_target_",
              "augment": "_target_", "logger.*": "_target_", "callbacks.*": "_target_"}
# in this order: a key interpolated from another (model.in_channels: ${dataset.channels}, scheduler.T_max:
# ${trainer.epochs}) is reported at its source
GROUPS = ("dataset", "augment", "model", "coupling", "trainer", "optimizer", "scheduler", "logger", "callbacks")
OPTIONAL_GROUPS = ("logger", "callbacks")  # logger=none: no logger; callbacks=none: no training-loop callback
# groups that are a dict of named entries, several at once (logger=[tensorboard,mlflow], callbacks=[pair_drift]):
# each entry is checked as group `<group>.*`
NAMED_GROUPS = {"logger": "loggers", "callbacks": "training-loop callbacks"}
PAIR_DRIFT, RE_MODEL = "coupled_net.pairdrift.PairDrift", "coupled_net.remodel.ReModel"
SGD, ADAM, ADAMW = "torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"
STEP, COSINE, CONSTANT = ("torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.CosineAnnealingLR",
                          "torch.optim.lr_scheduler.ConstantLR")
LETTERS, CROP_FLIP, NO_AUGMENT = ("coupled_net.augment.Letters", "coupled_net.augment.CropFlip",
                                  "coupled_net.augment.NoAugment")
UNIT = number(ge=0, lt=1)  # momentum-like: a fraction of the past kept


@dataclass(frozen=True)
class Knob:
    rule: Rule
    only: tuple = ()  # the options (OPTION_KEY's values) that take this key; () = every option of the group
    optional: bool = False  # may be absent (the code or PyTorch has a default); else `~key` is refused


def knob(rule: Rule, *only: str) -> Knob:
    return Knob(rule, only)


def optional(rule: Rule, *only: str) -> Knob:
    return Knob(rule, only, optional=True)


# `(CHECKS)`: the key must also agree with others, checked by coupled_net.validation.CHECKS
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
    "augment.padding": knob(integer(0), CROP_FLIP),       # and at most half the stored image's side (CHECKS)
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
    "optimizer.fused": optional(BOOLEAN, SGD, ADAM, ADAMW),  # one kernel; with fp16, GradScaler's check stays on the GPU
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
    "trainer.overfit_batches": optional(integer(0)),    # and whole batches of the training split (CHECKS)
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
    "trainer.last_every": optional(integer(1)),
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
    # callbacks: a dict of named training-loop callbacks (coupled_net.loopcallbacks); a user's own `_target_`
    # takes the parameters of what it names
    "callbacks.*._target_": knob(dotted_path),
    "callbacks.*.epochs": optional(integer(1), RE_MODEL),      # passes over the val split
    "callbacks.*.lr": optional(number(gt=0), RE_MODEL),
    "callbacks.*.temperature": optional(number(gt=0), RE_MODEL),
    "callbacks.*.seed": optional(integer(0, SEED_MAX), RE_MODEL),
}
# the options the table knows the keys of, per group; any other `_target_` is a user's own
KNOWN = {group: {o for k, v in KNOBS.items() if k.startswith(group + ".") for o in v.only}
         for group in OPTION_KEY}
KNOWN["model"] |= {BUILTIN}
KNOWN["optimizer"] |= {SGD, ADAM, ADAMW}
KNOWN["scheduler"] |= {STEP, COSINE, CONSTANT}
KNOWN["augment"] |= {NO_AUGMENT}
KNOWN["callbacks.*"] |= {PAIR_DRIFT, RE_MODEL}



def float_keys() -> frozenset[str]:
    """The keys whose values are numbers, not integers (a `number` rule, or a list of them): an
    integer typed there is the float it equals, in a run's identity and its directory's name."""
    return frozenset(k for k, v in KNOBS.items() if getattr(v.rule, "takes_float", False))


def declared(group: str, option) -> dict[str, Knob]:
    """The keys group `group` takes when its option is `option` (leaf name -> Knob)."""
    prefix = f"{group}."
    return {k[len(prefix):]: v for k, v in KNOBS.items()
            if k.startswith(prefix) and (not v.only or option in v.only)}


def unknown_key(group: str, option, key: str, value, any_option: bool = False, names=None) -> ConfigError:
    """`trainer.epoch=3: not a key of trainer (did you mean trainer.epochs?)`; `any_option`: the
    keys of every option of the group are candidates (before composition, the option is not known);
    `names`: the keys the option takes, where the table does not list them (a user's own _target_)."""
    if names is None:
        names = sorted({k.partition(".")[2] for k in KNOBS if k.startswith(group + ".")} if any_option
                       else declared(group, option))
    shown = key.rsplit(".", 1)[0] if group.endswith(".*") else group
    where = shown if group not in OPTION_KEY or any_option else f"{shown} {option}"
    return not_a_key(shown, key, value, where, names)


