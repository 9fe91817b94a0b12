"""The `pair_drift` probe (callbacks=pair_drift): how far training pulls a coupled pair of filters
apart between two equalizations (KE).

Before each epoch's KE it measures, in every coupled layer P, the relative distance of each pair k
(filters 2k and 2k+1, weights and bias together):

    d_k = ||v_{2k+1} - v_{2k}|| / ||v_{2k}||      (0 when both are zero, inf when only v_{2k} is)

and adds to epochs.csv `P.coupled_mean`, `P.coupled_max` (pairs k < alpha) and `P.uncoupled_mean`,
`P.uncoupled_max` (the other pairs; NaN where a layer has no pair of that kind).

Why: KE makes a coupled pair equal, so its distance is 0 right after KE; what it has grown to by the
next KE is what training undid in between (with coupling.schedule=step, about one optimizer step's
worth). The KE drop of the accuracy shows this only indirectly. The uncoupled pairs are the reference:
how different two neighbouring filters are anyway, with no coupling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .loopcallbacks import Callback, Context

STATS = ("coupled_mean", "coupled_max", "uncoupled_mean", "uncoupled_max")


def pair_distances(conv: nn.Conv2d) -> torch.Tensor:
    """d_k for every pair k < out_channels // 2 of `conv`, in float64 on the conv's device."""
    v = conv.weight.detach().flatten(1).double()
    if conv.bias is not None:
        v = torch.cat([v, conv.bias.detach().double()[:, None]], dim=1)
    pairs = conv.out_channels // 2
    even, odd = v[0:2 * pairs:2], v[1:2 * pairs:2]
    apart, norm = torch.linalg.vector_norm(odd - even, dim=1), torch.linalg.vector_norm(even, dim=1)
    return torch.where(apart == 0, torch.zeros_like(apart), apart / norm)  # x/0: inf; 0/0: 0


def _mean_max(d: torch.Tensor) -> tuple[float, float]:
    if d.numel() == 0:
        return math.nan, math.nan
    return d.mean().item(), d.max().item()


class PairDrift(Callback):
    """Relative distance of filter pairs before each KE, coupled and uncoupled, per coupled layer."""

    def columns(self, ctx: Context) -> list[str]:
        return [f"{path}.{stat}" for path, _ in ctx.coupling.layers for stat in STATS]

    def on_before_ke(self, ctx: Context) -> dict:
        values = {}
        for path, conv in ctx.coupling.layers:
            d = pair_distances(conv)
            stats = _mean_max(d[:ctx.coupling.alpha]) + _mean_max(d[ctx.coupling.alpha:])
            values.update({f"{path}.{stat}": value for stat, value in zip(STATS, stats)})
        return values
