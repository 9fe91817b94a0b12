"""The pair_drift probe: relative distances of filter pairs before KE, on a 6-filter conv whose
filters are set by hand so that every expected value is worked out here.

Filters (weights 1x3x3, then bias) of `tiny()`:
  0: nine 1s, bias 0            ||v0|| = 3
  1: filter 0, +0.75 on one weight      d0 = 0.75 / 3 = 0.25
  2: nine 2s, bias 0            ||v2|| = 6
  3: filter 2, bias 3                   d1 = 3 / 6 = 0.5
  4: zeros, bias 2              ||v4|| = 2
  5: filter 4, +1.5 on one weight       d2 = 1.5 / 2 = 0.75"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from coupled_net.coupling import Coupling
from coupled_net.loopcallbacks import Context, LoopCallbacks
from coupled_net.pairdrift import PairDrift

CONF = Path(__file__).resolve().parents[1] / "conf" / "callbacks"


def set_filters(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 1.0
        conv.weight[1] = 1.0
        conv.weight[1, 0, 0, 0] += 0.75
        conv.weight[2] = 2.0
        conv.weight[3] = 2.0
        conv.weight[5, 0, 1, 1] = 1.5
        if conv.bias is not None:
            conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, 2.0, 2.0]))


def tiny(alpha: int, mode: str = "copy", bias: bool = True):
    model = nn.Sequential(nn.Conv2d(1, 6, 3, bias=bias), nn.ReLU())
    set_filters(model[0])
    coupling = Coupling(model, alpha=alpha, mode=mode)
    return model, coupling, Context(model=model, coupling=coupling, loaders={}, device=torch.device("cpu"))


def drift(ctx: Context) -> dict:
    return PairDrift().on_before_ke(ctx)


def test_right_after_ke_the_coupled_pairs_are_at_distance_zero_and_the_uncoupled_ones_keep_theirs():
    _, coupling, ctx = tiny(alpha=1)
    coupling.equalize()
    got = drift(ctx)
    assert got["0.coupled_mean"] == 0.0 and got["0.coupled_max"] == 0.0
    assert got["0.uncoupled_mean"] == pytest.approx((0.5 + 0.75) / 2)
    assert got["0.uncoupled_max"] == pytest.approx(0.75)


def test_mode_mean_also_leaves_the_coupled_pairs_at_distance_zero():
    _, coupling, ctx = tiny(alpha=2, mode="mean")
    coupling.equalize()
    got = drift(ctx)
    assert got["0.coupled_mean"] == 0.0 and got["0.coupled_max"] == 0.0
    assert got["0.uncoupled_mean"] == pytest.approx(0.75) and got["0.uncoupled_max"] == pytest.approx(0.75)


def test_a_known_perturbation_gives_the_hand_computed_distances_mean_and_max():
    _, _, ctx = tiny(alpha=2)
    got = drift(ctx)
    assert got["0.coupled_mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert got["0.coupled_max"] == pytest.approx(0.5)
    assert got["0.uncoupled_mean"] == pytest.approx(0.75) and got["0.uncoupled_max"] == pytest.approx(0.75)


def test_after_ke_a_perturbation_of_the_odd_filter_shows_as_its_distance_over_the_even_ones_norm():
    model, coupling, ctx = tiny(alpha=2)
    coupling.equalize()
    with torch.no_grad():
        model[0].weight[3, 0, 2, 2] += 1.5  # ||v2|| = 6: d1 = 0.25, d0 stays 0
    got = drift(ctx)
    assert got["0.coupled_mean"] == pytest.approx(0.25 / 2) and got["0.coupled_max"] == pytest.approx(0.25)


def test_alpha_zero_has_no_coupled_pair_and_every_pair_is_uncoupled():
    _, _, ctx = tiny(alpha=0)
    got = drift(ctx)
    assert math.isnan(got["0.coupled_mean"]) and math.isnan(got["0.coupled_max"])
    assert got["0.uncoupled_mean"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert got["0.uncoupled_max"] == pytest.approx(0.75)


def test_alpha_at_half_the_filters_has_no_uncoupled_pair():
    _, _, ctx = tiny(alpha=3)
    got = drift(ctx)
    assert got["0.coupled_mean"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert got["0.coupled_max"] == pytest.approx(0.75)
    assert math.isnan(got["0.uncoupled_mean"]) and math.isnan(got["0.uncoupled_max"])


def test_two_zero_filters_are_at_distance_zero_and_a_zero_even_filter_gives_inf():
    model, _, ctx = tiny(alpha=1)
    with torch.no_grad():
        model[0].weight[0:4] = 0.0
        model[0].bias[0:4] = 0.0
        model[0].weight[3, 0, 0, 0] = 1.0  # pair 0: both zero; pair 1: only filter 2 zero
    got = drift(ctx)
    assert got["0.coupled_mean"] == 0.0 and got["0.coupled_max"] == 0.0
    assert got["0.uncoupled_mean"] == math.inf and got["0.uncoupled_max"] == math.inf


def test_a_conv_without_bias_measures_the_weights_alone():
    _, _, ctx = tiny(alpha=1, bias=False)
    got = drift(ctx)
    # without the biases: d0 = 0.75 / 3, d1 = 0 (filters 2 and 3 differ only in bias), d2 = 1.5 / 0 = inf
    assert got["0.coupled_mean"] == pytest.approx(0.25) and got["0.coupled_max"] == pytest.approx(0.25)
    assert got["0.uncoupled_mean"] == math.inf and got["0.uncoupled_max"] == math.inf


def test_the_columns_are_named_per_layer_in_the_documented_order_and_prefixed_by_the_runner():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    set_filters(model[0])
    coupling = Coupling(model, alpha=1, layer=["0", "2"])
    ctx = Context(model=model, coupling=coupling, loaders={}, device=torch.device("cpu"))
    stats = ["coupled_mean", "coupled_max", "uncoupled_mean", "uncoupled_max"]
    expected = [f"{p}.{s}" for p in ("0", "2") for s in stats]
    assert PairDrift().columns(ctx) == expected
    own = PairDrift().on_before_ke(ctx)
    assert list(own) == expected and all(type(v) is float for v in own.values())

    runner = LoopCallbacks({"pair_drift": PairDrift()})
    assert runner.columns(ctx) == [f"pair_drift.{c}" for c in expected]
    values = runner.before_ke(ctx)
    assert list(values) == [f"pair_drift.{c}" for c in expected]
    assert all(type(v) is float for v in values.values())
    assert values["pair_drift.0.coupled_mean"] == pytest.approx(0.25)
    assert values["pair_drift.0.uncoupled_max"] == pytest.approx(0.75)


def test_the_probe_leaves_the_weights_unchanged():
    model, _, ctx = tiny(alpha=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    LoopCallbacks({"pair_drift": PairDrift()}).columns(ctx)
    drift(ctx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_config_group_instantiates_the_probe_and_none_adds_nothing():
    named = instantiate(OmegaConf.load(CONF / "pair_drift.yaml"))
    assert list(named) == ["pair_drift"] and isinstance(named["pair_drift"], PairDrift)
    assert OmegaConf.load(CONF / "none.yaml") == OmegaConf.create({})
