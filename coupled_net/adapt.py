"""Fitting a classification model to a dataset: its first conv rebuilt for the dataset's channels
(kernels summed or tiled from pretrained ones, timm's rule), its classifier for the dataset's
classes. Any torchvision, timm or user model: the first Conv2d is the input layer, the last Linear
(or 1x1 Conv2d) the classifier — replaced only where the model does not already return logits for the
dataset's classes (fit_classifier)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ConfigError, one_line


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first Conv2d in registration order: the input layer of every torchvision/timm classifier."""
    return next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def head_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The last Linear or Conv2d in registration order: the classifier (a 1x1 Conv2d in SqueezeNet)."""
    found = None
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            found = (path, module)
    return found


def _input_kernel(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained first-conv kernels [out, C, k, k] for `in_channels` inputs (timm's adapt_input_conv
    rule): a grey image is C equal channels, so the sum of the C kernels answers it as the pretrained
    conv did; for more channels the kernels are tiled and scaled by C/in_channels, which keeps the
    answer to an image whose channels are equal."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    c = weight.shape[1]
    tiled = weight.repeat(1, -(-in_channels // c), 1, 1)[:, :in_channels]
    return tiled * (c / in_channels)


def adapt_first_conv(model: nn.Module, in_channels: int, name: str, pretrained: bool) -> None:
    """Rebuild the first Conv2d for `in_channels` inputs when it takes another count: same class,
    out_channels, kernel, stride, padding, dilation, bias and padding mode; kernels summed/tiled from
    the pretrained ones (`pretrained`), else the conv's own fresh initialisation (as the built-ins)."""
    found = first_conv(model)
    if found is None or found[1].in_channels == in_channels:
        return
    path, conv = found
    if conv.groups != 1:
        raise ConfigError("model", name, f"cannot adapt its first conv {path} to {in_channels} input channel(s): "
                                         f"it is grouped (groups={conv.groups})")
    new = copy.deepcopy(conv)  # keeps a subclass's own forward (timm's Conv2dSame, StdConv2d)
    new.in_channels = in_channels
    new.weight = nn.Parameter(torch.empty(conv.out_channels, in_channels, *conv.kernel_size,
                                          device=conv.weight.device, dtype=conv.weight.dtype))
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(_input_kernel(conv.weight, in_channels))
    else:
        new.reset_parameters()
    _set_module(model, path, new)


def adapt_classifier(model: nn.Module, num_classes: int, name: str) -> str | None:
    """Replace the classifier (the last Linear, or a last 1x1 Conv2d) by a fresh one of `num_classes`
    outputs when it has another count; returns the path replaced (None: none was)."""
    found = head_layer(model)
    if found is None:
        raise ConfigError("model", name, f"cannot adapt its classifier to {num_classes} classes: "
                                         "it has no Linear or Conv2d layer")
    path, head = found
    if isinstance(head, nn.Linear):
        if head.out_features != num_classes:
            _set_module(model, path, nn.Linear(head.in_features, num_classes, bias=head.bias is not None,
                                               device=head.weight.device, dtype=head.weight.dtype))
            return path
    elif head.kernel_size == (1, 1) and head.groups == 1:
        if head.out_channels != num_classes:
            _set_module(model, path, nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None,
                                               device=head.weight.device, dtype=head.weight.dtype))
            return path
    else:
        raise ConfigError("model", name, f"cannot adapt its classifier to {num_classes} classes: its last layer "
                                         f"{path} is a {'x'.join(map(str, head.kernel_size))} Conv2d, not a Linear "
                                         "or 1x1 Conv2d")
    return None


def _logits(model: nn.Module, in_channels: int, size: int) -> tuple[tuple | None, Exception | None]:
    """(the shape of `model`'s eval forward on one `in_channels` x `size` x `size` image, or None where
    it returns no tensor; the exception where the forward fails), on the meta device: no compute (a
    model not on it is copied there)."""
    on_meta = next((p.device.type == "meta" for p in model.parameters()), True)
    probe = model if on_meta else copy.deepcopy(model).to("meta")
    was_training = probe.training
    try:
        probe.eval()  # batch 1: BatchNorm in train mode refuses a 1x1 map of one image
        with torch.no_grad():
            out = probe(torch.empty(1, in_channels, size, size, device="meta"))
        return (tuple(out.shape) if isinstance(out, torch.Tensor) else None), None
    except Exception as e:  # noqa: BLE001 - whatever the model raises; coupled_net.probe reports it
        return None, e
    finally:
        probe.train(was_training)


def fit_classifier(model: nn.Module, num_classes: int, name: str, in_channels: int, size,
                   given: bool = False, fits: bool | None = None) -> bool:
    """Fit a model's classifier to `num_classes`, changing only what needs it: a model whose forward
    already returns (batch, num_classes) logits keeps every layer (its classifier need not be the last
    Linear or Conv2d it registers: a 1x1 conv may come after it), and so does one built with
    `num_classes` (`given`) whose output cannot be told on the meta device; any other has that last
    layer replaced (adapt_classifier). Where the model ran before and gives no logits of `num_classes`
    after, the refusal says so, not the input size. `fits`: what an earlier call found for the same
    model (the meta-device build before the real one), not worked out again. Returns whether the
    model fitted as it was."""
    if fits is None:
        conv = first_conv(model)
        channels = conv[1].in_channels if conv else in_channels  # its own, before adapt_first_conv
        before, _ = _logits(model, channels, size) if isinstance(size, int) else (None, None)
        if before == (1, num_classes) or (before is None and given):
            return True
        path = adapt_classifier(model, num_classes, name)
        if path is not None and before is not None:  # it ran: a failure now is the replaced layer's doing
            after, error = _logits(model, channels, size)
            if after != (1, num_classes):
                what = one_line(error) if error else f"it then returns {f'shape {after}' if after else 'no tensor'}"
                raise ConfigError("model", name, f"returns shape {before} for one image, not (1, {num_classes}), and "
                                                 f"rebuilding {path} (its last Linear or 1x1 Conv2d) for {num_classes} "
                                                 f"classes breaks its forward ({what}); give it a num_classes "
                                                 "parameter that sizes its own classifier")
        return False
    if not fits:
        adapt_classifier(model, num_classes, name)
    return fits
