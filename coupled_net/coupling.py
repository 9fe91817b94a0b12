"""Kernel equalization (KE): after each epoch or optimizer step, filters 2k and 2k+1 (k < alpha) of
the coupled conv layer(s) are made equal, weights and bias, in place on the model's device.

Grouped convs (groups > 1, weight [out, in/groups, k, k]): filters 2k and 2k+1 have the same shape
whatever the groups, but each group of out/groups filters sees only its own in/groups input
channels. Coupling keeps its meaning — equal filters give equal feature maps — only where every pair
lies inside one group, i.e. where out/groups is even; that is allowed. Where it is odd (a depthwise
conv: one filter per group) filters 2k and 2k+1 see different input channels, so equalizing them
would tie two kernels across channels without making any feature map redundant: refused (for alpha
> 0) with one line."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError

MODES = ("copy", "mean")
SCHEDULES = ("epoch", "step")


def first_conv_path(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ConfigError("coupling.layer", None, "the model has no Conv2d layer to couple")


def resolve_layers(model: nn.Module, layer: str | Sequence[str] | None) -> list[tuple[str, nn.Conv2d]]:
    paths = [first_conv_path(model)] if layer is None else [layer] if isinstance(layer, str) else list(layer)
    if not paths:
        raise ConfigError("coupling.layer", layer, "give a module path such as features.0, or a list of them")
    convs = dict((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    resolved = []
    for path in paths:
        if path not in convs:
            raise ConfigError("coupling.layer", path,
                              f"not a Conv2d of this model; its Conv2d layers are: {', '.join(convs)}")
        resolved.append((path, convs[path]))
    return resolved


def coupled_layers(model: nn.Module, alpha: int, layer=None, mode: str = "copy",
                   schedule: str = "epoch") -> list[tuple[str, nn.Conv2d]]:
    """The layers a coupling config names in `model`, after checking it against them: ConfigError
    for a mode, schedule or alpha not allowed, a layer that is not a Conv2d, alpha above half its
    filters. A model without any Conv2d has none to couple: allowed at alpha=0 only (no layers).
    Validation calls it on a shape-only (meta) model; Coupling on the real one."""
    if mode not in MODES:
        raise ConfigError("coupling.mode", mode, f"allowed: {', '.join(MODES)}")
    if schedule not in SCHEDULES:
        raise ConfigError("coupling.schedule", schedule, f"allowed: {', '.join(SCHEDULES)}")
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 0:
        raise ConfigError("coupling.alpha", alpha, "must be an integer >= 0 (0 = no coupling)")
    if layer is None and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # a model without a conv (an MLP baseline): alpha=0 couples nothing and needs no layer
        if alpha == 0:
            return []
        raise ConfigError("coupling.alpha", alpha, "needs a Conv2d layer to couple and the model has none; "
                                                   "coupling.alpha=0 trains it uncoupled")
    layers = resolve_layers(model, layer)
    for path, conv in layers:
        per_group = conv.out_channels // conv.groups
        if alpha > 0 and conv.groups > 1 and per_group % 2:
            raise ConfigError("coupling.layer", path,
                              f"a grouped conv (groups={conv.groups}, {per_group} filter(s) per group): filters 2k "
                              "and 2k+1 see different input channels, so equal filters would not give equal "
                              "outputs; couple a conv with an even number of filters per group")
        if 2 * alpha > conv.out_channels:
            raise ConfigError("coupling.alpha", alpha,
                              f"at most {conv.out_channels // 2}: layer {path} has {conv.out_channels} filters")
    return layers


class Coupling:
    """The coupled layers of one model and how to equalize them."""

    def __init__(self, model: nn.Module, alpha: int, layer=None, mode: str = "copy", schedule: str = "epoch"):
        self.layers = coupled_layers(model, alpha, layer, mode, schedule)
        self.alpha, self.mode, self.schedule = alpha, mode, schedule

    @property
    def layer_paths(self) -> list[str]:
        return [path for path, _ in self.layers]

    @torch.no_grad()
    def equalize(self) -> None:
        if self.alpha == 0:
            return
        pairs = 2 * self.alpha
        for _, conv in self.layers:
            for param in (conv.weight, conv.bias):
                if param is None:
                    continue
                even, odd = param[0:pairs:2], param[1:pairs:2]
                if self.mode == "copy":
                    odd.copy_(even)
                else:
                    mean = (even + odd) / 2
                    even.copy_(mean)
                    odd.copy_(mean)
