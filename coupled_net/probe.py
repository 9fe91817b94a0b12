"""A model checked on the meta device (shapes only: no memory, no initialisation, no weights read)
before it is built for real, once per process for one model config: it must run on images of its
input size (else the smallest size it takes is named) and its training forward must return one
(batch, classes) tensor of logits. Validation builds on the meta device and stops there."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError, one_line


def _forward_ok(model: nn.Module, in_channels: int, size: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.empty(1, in_channels, size, size, device="meta"))
        return True
    except (RuntimeError, ValueError, AssertionError, IndexError):  # timm / ViTs assert their sizes
        return False


def smallest_input_size(probe: nn.Module, in_channels: int) -> int:
    """Smallest square input a model (built on the meta device) runs on."""
    lo, hi = 1, 1024
    if not _forward_ok(probe, in_channels, hi):
        return hi
    while lo < hi:  # the models here accept every size above their smallest
        mid = (lo + hi) // 2
        if _forward_ok(probe, in_channels, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _on_meta() -> bool:
    """Whether tensors made now land on the meta device (validation's shape-only build)."""
    return torch.empty(0).device.type == "meta"


def check_model(probe: nn.Module, channels: int, size: int, num_classes: int, name: str) -> None:
    """On a meta-device model: refuse an input size it cannot take (`model.input_size`) and a model
    whose training forward does not return one (batch, num_classes) tensor of logits."""
    was_training = probe.training
    try:
        probe.eval()  # batch 1: BatchNorm in train mode refuses a 1x1 map of one image
        try:
            with torch.no_grad():
                probe(torch.empty(1, channels, size, size, device="meta"))
        except Exception as e:
            smallest = smallest_input_size(probe, channels)
            if size < smallest and _forward_ok(probe, channels, smallest):
                raise ConfigError("model.input_size", size,
                                  f"{name} needs images of at least {smallest} pixels") from None
            raise ConfigError("model.input_size", size, f"{name} does not run on images of {size} pixels: "
                                                        f"{one_line(e)}") from None
        probe.train()  # the trainer's forward: some models return auxiliary outputs only in training
        try:
            with torch.no_grad():
                out = probe(torch.empty(2, channels, size, size, device="meta"))
        except Exception as e:
            raise ConfigError("model", name, f"does not train on images of {size} pixels: {one_line(e)}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError("model", name, f"its forward returns {got} in training, not logits of shape "
                                             f"(batch, {num_classes})")
    finally:
        probe.train(was_training)


_checked: set = set()  # models already checked in this process (validation's meta build, then the real one)


def build_checked(construct: Callable[[bool], nn.Module], channels: int, num_classes: int, size: int,
                   name: str, key: tuple) -> nn.Module:
    """`construct(load)` builds the adapted model (`load`: read its pretrained weights). It is first
    built on the meta device (no memory, no initialisation, no weights read) and checked there, once
    per process for one `key` (the model's config); the real model is built only after that — unless
    the build itself is on the meta device (validation)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError("model.input_size", size, "must be an integer >= 1")
    meta = _on_meta()
    key = repr((key, channels, num_classes, size))
    probe = None
    if meta or key not in _checked:
        try:
            with torch.device("meta"):
                probe = construct(False)
        except ConfigError:
            raise
        except Exception:  # code that cannot run on the meta device (a .item() in an __init__): built for real below
            probe = None
        if probe is not None:
            if key not in _checked:
                check_model(probe, channels, size, num_classes, name)
                _checked.add(key)
            if meta:
                return probe
    try:
        with torch.device("cpu"):
            model = construct(not meta)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("model", name, one_line(e)) from e
    if key not in _checked:
        check_model(copy.deepcopy(model).to("meta"), channels, size, num_classes, name)
        _checked.add(key)
    return model.to("meta") if meta else model
