"""Model factory: torchvision models (no pretrained weights) with the first conv rebuilt for the
dataset's channel count, plus a small CNN for CPU work."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from .errors import ConfigError


class SmallCNN(nn.Module):
    """Two conv blocks and an MLP head, laid out like torchvision's (features / avgpool /
    classifier) so `features.0` names the coupled layer as it does for AlexNet and VGG."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * width * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def _alexnet(in_channels: int, num_classes: int) -> nn.Module:
    model = tvm.alexnet(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)  # the seed's
    return model


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    model = tvm.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _vgg11(in_channels: int, num_classes: int) -> nn.Module:
    model = tvm.vgg11(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    return model


def _small_cnn(in_channels: int, num_classes: int, width: int = 32) -> nn.Module:
    return SmallCNN(in_channels, num_classes, width)


MODELS = {"alexnet": _alexnet, "resnet18": _resnet18, "vgg11": _vgg11, "small_cnn": _small_cnn}


def build_model(name: str, in_channels: int, num_classes: int, input_size: int, **options) -> nn.Module:
    """Build `name` for `in_channels`-channel images of `input_size` pixels and `num_classes`
    classes; refuses an input size the model cannot take."""
    if name not in MODELS:
        raise ConfigError("model", name, f"allowed: {', '.join(sorted(MODELS))}")
    if in_channels not in (1, 3):
        raise ConfigError("dataset.channels", in_channels, "allowed: 1 or 3")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("dataset.num_classes", num_classes, "must be an integer >= 2")
    with torch.device("meta"):  # a shape-only copy: no memory, no weight initialisation
        probe = MODELS[name](in_channels, num_classes, **options).eval()
    smallest = smallest_input_size(probe, in_channels)
    if not isinstance(input_size, int) or input_size < smallest:
        raise ConfigError("model.input_size", input_size,
                          f"{name} needs images of at least {smallest} pixels")
    return MODELS[name](in_channels, num_classes, **options)


def _forward_ok(model: nn.Module, in_channels: int, size: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.empty(1, in_channels, size, size, device="meta"))
        return True
    except RuntimeError:
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
