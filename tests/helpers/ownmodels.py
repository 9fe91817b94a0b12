"""A user's own models for the adaptation and coupling tests, named by `model._target_=helpers.ownmodels.NAME`
(tests/ on PYTHONPATH for the CLI): a classifier that is not the last Linear or Conv2d registered, a
model without any Conv2d, and one that runs on the meta device but fails on real data."""

from __future__ import annotations

import torch
from torch import nn


class HeadBeforeMix(nn.Module):
    """Takes num_classes: its classifier `fc` is registered before `mix`, a 1x1 conv of its body, so
    `mix` is the last Linear or Conv2d in registration order."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.mix = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mix(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class FixedHeadBeforeMix(HeadBeforeMix):
    """The same for 10 classes, always: no num_classes parameter, so its classifier must be rebuilt."""

    def __init__(self):
        super().__init__(1, 10)


class MLP(nn.Module):
    """No Conv2d at all: pooled to 7x7, then two Linear layers (an uncoupled baseline)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(in_channels * 49, hidden),
                                 nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FailsOnRealData(nn.Module):
    """Runs on the meta device (the checks before a run see logits of the right shape) and fails on the
    first real batch: its forward reshapes the pooled features to `width + 2` columns there."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8):
        super().__init__()
        self.width = width
        self.features = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))
        if not x.is_meta:
            h = h.view(x.size(0), self.width + 2)  # RuntimeError: shape '[1, 10]' is invalid for input of size 8
        return self.head(h)
