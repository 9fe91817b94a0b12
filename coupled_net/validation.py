"""Checks of the user-facing keys, run after composition and before any data is loaded or any run
directory is made: each failure is a ConfigError naming the key, the value and what is allowed.
What each key allows is declared in one table (coupled_net.knobs.KNOBS); here it is applied, with
the checks of keys that must agree and what this machine can take.

A key inside a group that the table does not declare for the group's option (`+trainer.epoch=3`, a
typo) is refused with the nearest declared key; only top-level `+name=value` keys are labels.

    check_config(cfg)   # the config alone: keys, values, keys that must agree, the model's shape
    check_machine(c)    # this machine: the device is there, one training batch fits in its memory
    validate(cfg)       # both, once per process for one config (coupled_net.build.resolve, and
                        # before a single run's directory is made: coupled_net.callbacks)

The sweep planner (coupled_net.sweep.plan) runs check_config on every job before any is launched;
check_machine runs where the run runs (a SLURM node is not the login node). check_override_keys
refuses a mistyped key on the command line before Hydra composes (coupled_net.commandline)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from .coupling import coupled_layers
from .data import IN_MEMORY_ONLY
from .errors import AsTyped, ConfigError, one_line
from .extras import missing_extra
from .identity import flatten, model_name
from .knobs import (ADAM, ADAMW, CROP_FLIP, GROUPS, KNOBS, KNOWN, NAMED_GROUPS, OPTION_KEY, OPTIONAL_GROUPS, declared,
                    is_int, spell, unknown_key)
from .machine import available_bytes, rank_gpu, resolve_device, sharing
from .models import BUILTIN, RESERVED, make
from .targets import keywords, locate

# Training images of the datasets whose size is known without loading them (image_folder: counted
# once it is read, coupled_net.build.build_loaders).
TRAIN_IMAGES = {"mnist": 60_000, "fashion_mnist": 60_000, "emnist_letters": 124_800, "cifar10": 50_000,
                "cifar100": 50_000, "svhn": 73_257, "kmnist": 60_000}
SYNTHETIC_CLASSES = 26
# The side of the images as stored, in pixels, where the config tells it (image_folder: each file its own):
# what augment.padding pads, before the crop is resized to model.input_size.
STORED_SIDE = {"mnist": 28, "fashion_mnist": 28, "emnist_letters": 28, "kmnist": 28, "synthetic_letters": 28,
               "cifar10": 32, "cifar100": 32, "svhn": 32}


# ---- one group's keys ---------------------------------------------------------------------------

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
            raise ConfigError(f"{prefix}.{leaf}", AsTyped("(absent)"), "is required here: only optional keys may "
                                                                       "be left out")
    for key, value in flatten(node, f"{prefix}.").items():
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
    if group in NAMED_GROUPS:  # a dict of named loggers or callbacks
        if not isinstance(node, dict):
            example = {"logger": "logger=tensorboard, logger=[tensorboard,mlflow]",
                       "callbacks": "callbacks=pair_drift, +callbacks.mine._target_=my.module.Probe"}[group]
            raise ConfigError(group, node, f"must be {NAMED_GROUPS[group]} by name: {example}")
        for name, entry in node.items():
            _check_node(f"{group}.*", entry, f"{group}.{name}")
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
            raise ConfigError(f"model.{key}", m[key], f"must equal dataset.{of} ({spell(d[of])})")


def _pipeline(c: dict) -> None:
    d = c["dataset"]
    if d["name"] == "image_folder" and d["pipeline"] == "tensor":
        raise ConfigError("dataset.pipeline", "tensor", IN_MEMORY_ONLY)


def _warmup_within_run(c: dict) -> None:
    warmup, epochs = (c.get("scheduler") or {}).get("warmup_epochs"), (c.get("trainer") or {}).get("epochs")
    if is_int(warmup) and is_int(epochs) and warmup >= epochs > 0:
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


def overfit_fits(trainer: dict, train: int, how: str) -> None:
    """trainer.overfit_batches=N asks for N whole batches of the training split: more than the split
    holds would silently be the whole split (the last batch short), not the batches asked for."""
    n, batch = trainer.get("overfit_batches") or 0, trainer["batch_size"]
    if n * batch > train:
        raise ConfigError("trainer.overfit_batches", n,
                          f"must be at most {train // batch}, the whole batches of trainer.batch_size={batch} in the "
                          f"training split of {train} images ({how})")


def _batch_fits_split(c: dict) -> None:
    known = training_images(c["dataset"])
    if known:
        batch_fits(c["trainer"]["batch_size"], *known)
        overfit_fits(c["trainer"], *known)


def _padding_within_image(c: dict) -> None:
    """augment.padding at most half the side of the stored image: every crop then keeps at least half
    the image in each direction. More, and crops that are mostly zeros (from a padding of the side on,
    some only zeros) are trained on as the image's class: with 1000 on 28 pixels 99.9 % of the crops
    hold no pixel of the image. Checked where the config tells the side; an image_folder's files each
    have their own (not measured for it)."""
    augment, side = c.get("augment") or {}, STORED_SIDE.get(c["dataset"]["name"])
    padding = augment.get("padding")
    if side and augment.get("_target_") == CROP_FLIP and is_int(padding) and padding > side // 2:
        raise ConfigError("augment.padding", padding, f"must be at most {side // 2}, half the side of the {side}-pixel "
                                                      f"{c['dataset']['name']} images it pads")


@dataclass(frozen=True)
class ModelShape:
    params: int
    activations: int  # values a training step keeps per image (the layers' outputs, the input)


_shapes: dict[str, ModelShape] = {}


def model_shape(c: dict) -> ModelShape:
    """The model at its input size, built on the meta device (no memory, no weights; models.make
    refuses an input size it cannot take, once per process), its coupled layers checked against the
    coupling keys; counts parameters and the activations of one image. Cached: a sweep's jobs mostly
    share a model."""
    m, d = c["model"], c["dataset"]
    cache_key = repr((m, d["channels"], d["num_classes"], c["coupling"]))
    if cache_key in _shapes:
        return _shapes[cache_key]
    size, channels = m["input_size"], d["channels"]
    with torch.device("meta"):
        model = make(m, channels, d["num_classes"] or 2).eval()
    coupled_layers(model, **c["coupling"])  # coupling.layer / coupling.alpha against the model's layers
    counted: list[int] = []
    leaves = [mod for mod in model.modules() if not list(mod.children())]
    hooks = [mod.register_forward_hook(lambda mod, i, out: counted.append(
        0 if getattr(mod, "inplace", False) else out.numel())) for mod in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(1, channels, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    shape = ModelShape(sum(p.numel() for p in model.parameters()), sum(counted) + channels * size * size)
    _shapes[cache_key] = shape
    return shape


# Checks of keys that must agree, in order; each raises ConfigError.
CHECKS = (_per_channel, _model_fits_dataset, _pipeline, _nesterov, _batch_fits_split, _padding_within_image,
          model_shape)


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
    return _check_plain(plain_config(cfg))


def _check_plain(c: dict) -> dict:
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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def check_machine(c: dict) -> torch.device:
    """What this machine decides: the device is there and one training batch fits in its memory.
    Returns the device (trainer.device resolved: coupled_net.build.resolve trains on it)."""
    device = resolve_device(c["trainer"]["device"])
    where = rank_gpu(device)
    need, free = batch_bytes(c, model_shape(c)), available_bytes(where)
    shared = sharing()
    if need > free and where.type == "cuda" and shared["shared_by"] > 1:
        raise ConfigError("trainer.batch_size", c["trainer"]["batch_size"],
                          f"a training batch of {model_name(c['model'])} needs about {_size(need)}, more than this "
                          f"run's share of GPU {shared['slot_gpu']} ({_size(free)}: its free memory at launch ÷ the "
                          f"{shared['shared_by']} runs placed on it): lower hydra.launcher.runs_per_gpu (or "
                          "hydra.launcher.runs_per_task), or trainer.batch_size")
    if need > free:
        raise ConfigError("model.input_size", c["model"]["input_size"],
                          f"a training batch of {c['trainer']['batch_size']} images of {model_name(c['model'])} needs "
                          f"about {_size(need)}, more than the {_size(free)} free on {where}; lower "
                          "model.input_size or trainer.batch_size")
    return device


# configs validated by validate(keep=True) and not yet validated again: the single run's check before
# Hydra makes its directory (coupled_net.callbacks) leaves its result for the build (coupled_net.build)
_kept: dict[str, torch.device] = {}


def validate(cfg: DictConfig, keep: bool = False) -> torch.device:
    """check_config and check_machine; returns the device. Once per process for one config: with
    `keep`, the result is left for the next validate of the same config, which takes it instead of
    checking again."""
    c = plain_config(cfg)
    key = json.dumps(c, sort_keys=True, default=str)
    if key in _kept:
        return _kept.pop(key)
    device = check_machine(_check_plain(c))
    if keep:
        _kept[key] = device
    return device


def check_override_keys(overrides, own_configs: bool = False) -> None:
    """Refuse `group.key=value` overrides (parsed by coupled_net.commandline) whose key no
    option of the group declares, in one line, before Hydra composes: for `trainer.epoch=3` Hydra's own
    refusal spans five lines and proposes `+trainer.epoch=3`, which would add a key nothing reads.
    Groups whose options may be a user's own `_target_` (model, optimizer, ...) take keys the table
    cannot know: there, only a plain `key=value` without configs of the user's own (`own_configs`:
    --config-dir, hydra.searchpath) is refused here; the rest is checked once composed (check_config)."""
    for o in overrides:
        group, _, rest = o.key_or_group.partition(".")
        if not rest or group not in GROUPS or o.is_delete() or o.package is not None or group in NAMED_GROUPS:
            continue
        if OPTION_KEY.get(group) == "_target_" and (own_configs or o.is_add() or o.is_force_add()):
            continue
        if f"{group}.{rest.split('.')[0]}" not in KNOBS:
            value = AsTyped(o.get_value_string()) if o.is_sweep_override() else o.value()
            raise unknown_key(group, None, o.key_or_group, value, any_option=True)


