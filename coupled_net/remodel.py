"""The `re_model` probe (callbacks=re_model; off by default): how well a copy of the architecture,
trained only on the trained model's outputs, reproduces it.

This is a generic model-extraction baseline: distillation from query access to the trained model's
outputs on the validation split, i.e. what an attacker who can query the model could do. It is NOT the
paper's feature-snooping attack, whose details are not public. It is the worked example of
`on_fit_end`: a researcher's own attack plugs in the same way (a `Callback` whose `on_fit_end` returns
its numbers, selected with +callbacks.mine._target_=my.module.Attack).

Once, on the run's best model (equalized, after its val/test metrics): a fresh copy of the architecture
(the model deep-copied, every submodule with `reset_parameters()` re-initialised from `seed`, so the
student never starts from the teacher's weights) is trained with SGD (momentum 0.9) for `epochs` passes
over the val split on the loss

    KL(softmax(teacher / T) || softmax(student / T)) * T^2      (Hinton et al., soft targets)

then the student and the teacher are compared on the test split. results.json gets, under
callbacks.re_model: `test_top1` (the student's top-1, %), `gap` (the run's test top-1 minus the
student's, points), `agreement` (% of test images where both predict the same class) and `queries`
(val images queried per pass)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .loopcallbacks import Callback, Context

KEY = "callbacks.re_model"


def fresh_copy(model: nn.Module, seed: int, device: torch.device) -> nn.Module:
    """The same architecture with new weights: every submodule that has reset_parameters() is
    re-initialised on the CPU after torch.manual_seed(seed) (the same start on any device)."""
    student = copy.deepcopy(model).cpu()
    torch.manual_seed(seed)
    for module in student.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return student.to(device)


def distill(student: nn.Module, teacher: nn.Module, loader, device: torch.device, epochs: int, lr: float,
            temperature: float) -> int:
    """Train `student` on `teacher`'s softened outputs over `loader`; the images queried per pass."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    student.train()
    teacher.eval()
    queries = 0
    for epoch in range(epochs):
        for images, _ in loader:  # the labels are not used: only the teacher's outputs
            images = images.to(device)
            with torch.no_grad():
                soft = F.softmax(teacher(images) / temperature, dim=1)
            log_student = F.log_softmax(student(images) / temperature, dim=1)
            loss = F.kl_div(log_student, soft, reduction="batchmean") * temperature ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if epoch == 0:
                queries += len(images)
    return queries


@torch.no_grad()
def compare(student: nn.Module, teacher: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(student's top-1 %, % of images where student and teacher predict the same class); NaN if empty."""
    student.eval()
    teacher.eval()
    correct = same = seen = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        guess, truth = student(images).argmax(1), teacher(images).argmax(1)
        correct += (guess == labels).sum().item()
        same += (guess == truth).sum().item()
        seen += len(labels)
    return (100.0 * correct / seen, 100.0 * same / seen) if seen else (math.nan, math.nan)


class ReModel(Callback):
    """Distil a fresh copy of the architecture from the trained model's val outputs; compare on test."""
    needs_grad = True  # it trains the student

    def __init__(self, epochs: int = 5, lr: float = 0.05, temperature: float = 2.0, seed: int = 0):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"{KEY}.epochs", epochs, "must be an integer >= 1")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"{KEY}.lr", lr, "must be a number > 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"{KEY}.temperature", temperature, "must be a number > 0")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
            raise ConfigError(f"{KEY}.seed", seed, "must be an integer from 0 to 4294967295")
        self.epochs, self.lr, self.temperature, self.seed = epochs, float(lr), float(temperature), seed

    def on_fit_end(self, ctx: Context, results: dict) -> dict:
        student = fresh_copy(ctx.model, self.seed, ctx.device)
        queries = distill(student, ctx.model, ctx.loaders["val"], ctx.device, self.epochs, self.lr,
                          self.temperature)
        top1, agreement = compare(student, ctx.model, ctx.loaders["test"], ctx.device)
        return {"test_top1": top1, "gap": results["test"]["top1"] - top1, "agreement": agreement,
                "queries": queries}
