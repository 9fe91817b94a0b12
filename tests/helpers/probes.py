"""Training-loop callbacks for the tests (coupled_net.loopcallbacks), reachable by `_target_`."""

from __future__ import annotations

import random

import numpy as np
import torch

from coupled_net.loopcallbacks import Callback
from coupled_net.pairdrift import pair_distances

CALLS: list[tuple] = []  # (hook, epoch, what it saw), in call order, across instances


class Recorder(Callback):
    """Records each call with the epoch and the first coupled pair's distance it saw, and does what a
    careless probe would: draws from every random generator, switches the model to eval mode and
    back to train on one submodule, runs a forward pass."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def _meddle(self, ctx) -> float:
        random.random(), np.random.rand(), torch.rand(3)
        ctx.model.eval()
        ctx.model(next(iter(ctx.loaders["val"]))[0][:2].to(ctx.device))
        return float(pair_distances(ctx.coupling.layers[0][1])[0])

    def columns(self, ctx):
        return ["epoch_seen", "ke_gap"]

    def on_fit_start(self, ctx):
        CALLS.append(("on_fit_start", ctx.epoch, self._meddle(ctx)))

    def on_before_ke(self, ctx):
        CALLS.append(("on_before_ke", ctx.epoch, self._meddle(ctx)))
        return {"epoch_seen": ctx.epoch * self.scale}

    def on_epoch_end(self, ctx, row):
        CALLS.append(("on_epoch_end", ctx.epoch, self._meddle(ctx)))
        return {"ke_gap": row["val_acc"] - row["ke_val_acc"]}

    def on_fit_end(self, ctx, results):
        CALLS.append(("on_fit_end", ctx.epoch, self._meddle(ctx)))
        return {"test_top1_seen": results["test"]["top1"], "grad_enabled": torch.is_grad_enabled()}


class Boom(Callback):
    """Raises at the end of epoch `at`."""

    def __init__(self, at: int = 1):
        self.at = at

    def on_epoch_end(self, ctx, row):
        if ctx.epoch == self.at:
            return {"x": 1 / 0}
        return {}
