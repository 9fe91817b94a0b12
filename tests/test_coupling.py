"""Coupling semantics: which filters are equal after KE, for both modes and schedules, on one
layer and on a list; the equalized weights are what best.pt stores; alpha=0 changes nothing."""

from __future__ import annotations

import csv

import pytest
import torch

import coupled_net.build as build_module
from coupled_net.coupling import Coupling
from coupled_net.errors import ConfigError
from coupled_net.models import build_model
from coupled_net.lifecycle import execute_run
from helpers import compose_cfg

TINY = ["experiment=quickstart", "dataset.train_per_class=12", "dataset.test_per_class=4", "trainer.batch_size=16",
        "trainer.num_workers=0"]


def small_cnn():
    torch.manual_seed(0)
    return build_model("small_cnn", 1, 26, 28)


def pairs_equal(conv, alpha) -> list[bool]:
    """For each pair k < alpha... and beyond: is filter 2k+1 equal to filter 2k (weights and bias)?"""
    n = conv.out_channels // 2
    out = []
    for k in range(n):
        same = torch.equal(conv.weight[2 * k], conv.weight[2 * k + 1])
        if conv.bias is not None:
            same = same and torch.equal(conv.bias[2 * k], conv.bias[2 * k + 1])
        out.append(same)
    return out


@pytest.mark.parametrize("alpha", [1, 3, 16])
def test_copy_makes_exactly_the_first_alpha_pairs_equal(alpha):
    model = small_cnn()
    conv = model.features[0]
    before_w, before_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    Coupling(model, alpha=alpha, mode="copy").equalize()
    assert pairs_equal(conv, alpha) == [k < alpha for k in range(16)]
    # copy: the even filters keep their values, odd ones take them; filters past 2*alpha are untouched
    assert torch.equal(conv.weight[0:2 * alpha:2], before_w[0:2 * alpha:2])
    assert torch.equal(conv.weight[1:2 * alpha:2], before_w[0:2 * alpha:2])
    assert torch.equal(conv.bias[1:2 * alpha:2], before_b[0:2 * alpha:2])
    assert torch.equal(conv.weight[2 * alpha:], before_w[2 * alpha:])
    assert torch.equal(conv.bias[2 * alpha:], before_b[2 * alpha:])


def test_mean_sets_both_filters_to_their_mean():
    model = small_cnn()
    conv = model.features[0]
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    Coupling(model, alpha=2, mode="mean").equalize()
    assert pairs_equal(conv, 2) == [True, True] + [False] * 14
    for k in range(2):
        torch.testing.assert_close(conv.weight[2 * k], (w[2 * k] + w[2 * k + 1]) / 2)
        torch.testing.assert_close(conv.bias[2 * k + 1], (b[2 * k] + b[2 * k + 1]) / 2)
    assert torch.equal(conv.weight[4:], w[4:])


def test_a_list_of_layers_is_coupled_and_other_convs_are_not():
    model = small_cnn()
    second = model.features[4].weight.detach().clone()
    Coupling(model, alpha=2, layer=["features.0", "features.4"]).equalize()
    assert pairs_equal(model.features[0], 2)[:3] == [True, True, False]
    assert pairs_equal(model.features[4], 2)[:3] == [True, True, False]
    model2 = small_cnn()
    Coupling(model2, alpha=2, layer="features.0").equalize()
    assert torch.equal(model2.features[4].weight, second)  # only the named layer changes


def test_default_layer_is_the_first_conv_and_a_bias_free_conv_works():
    model = build_model("resnet18", 1, 10, 32)
    coupling = Coupling(model, alpha=4)
    assert coupling.layer_paths == ["conv1"]
    coupling.equalize()
    assert pairs_equal(model.conv1, 4)[:5] == [True] * 4 + [False]


def test_alpha_zero_is_a_no_op():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Coupling(model, alpha=0).equalize()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, key", [
    (dict(alpha=17), "coupling.alpha"),
    (dict(alpha=-1), "coupling.alpha"),
    (dict(alpha=2, layer="no.such.layer"), "coupling.layer"),
    (dict(alpha=2, layer="features.1"), "coupling.layer"),     # a BatchNorm, not a Conv2d
    (dict(alpha=2, mode="sideways"), "coupling.mode"),
    (dict(alpha=2, schedule="hourly"), "coupling.schedule"),
])
def test_bad_coupling_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Coupling(small_cnn(), **kwargs)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")


def test_alpha_larger_than_half_the_filters_names_the_limit():
    with pytest.raises(ConfigError, match=r"coupling.alpha=17: at most 16: layer features.0 has 32 filters"):
        Coupling(small_cnn(), alpha=17)


class RecordingCoupling(Coupling):
    """Records, at every forward of the coupled conv, whether the first alpha pairs are equal."""
    seen: list

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        RecordingCoupling.seen = []
        conv = self.layers[0][1]

        def hook(module, inputs):
            RecordingCoupling.seen.append((module.training, all(pairs_equal(module, self.alpha)[:self.alpha])))
        conv.register_forward_pre_hook(hook)


@pytest.mark.parametrize("schedule", ["epoch", "step"])
def test_schedule_decides_when_filters_are_equal(schedule, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "Coupling", RecordingCoupling)
    cfg = compose_cfg(*TINY, "coupling.alpha=4", f"coupling.schedule={schedule}", "trainer.epochs=2",
                      "trainer.limit_batches=4", f"dataset.root={tmp_path}")
    assert execute_run(cfg, tmp_path / "run")["status"] == "done"
    seen = RecordingCoupling.seen
    train = [equal for training, equal in seen if training]
    evals = [equal for training, equal in seen if not training][1:]  # [0]: torchinfo's model_summary forward
    assert len(train) == 8
    # 26*12 = 312 images: 265 train, 47 val (3 batches of 16); 104 test (limit 4 batches)
    val, ke_val = 3, 3
    assert len(evals) == 2 * (val + ke_val) + val + 4
    if schedule == "step":
        # after every optimizer step the pairs are equal again: every forward but the very first sees them equal
        assert train[1:] == [True] * 7
        assert all(evals)
    else:
        # within an epoch the pairs drift apart; the epoch-end KE makes them equal for the 2nd validation
        assert train[1:4] == [False] * 3 and train[5:] == [False] * 3
        per_epoch = [False] * val + [True] * ke_val
        assert evals == per_epoch * 2 + [True] * (val + 4)  # final val and test: the equalized best model


def test_best_checkpoint_holds_coupled_filters(tmp_path):
    cfg = compose_cfg(*TINY, "coupling.alpha=2", "trainer.epochs=2", f"dataset.root={tmp_path}")
    execute_run(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    w, b = state["features.0.weight"], state["features.0.bias"]
    assert not any(k.startswith("module.") for k in state)
    assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3]) and torch.equal(b[2], b[3])
    assert not torch.equal(w[4], w[5])


def test_alpha_zero_makes_ke_metrics_equal_plain_metrics(tmp_path):
    cfg = compose_cfg(*TINY, "coupling.alpha=0", "trainer.epochs=2", f"dataset.root={tmp_path}")
    execute_run(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        assert row["ke_val_loss"] == row["val_loss"] and row["ke_val_acc"] == row["val_acc"]


# ---- grouped convs: coupling keeps its meaning only with an even number of filters per group ------

def test_a_grouped_conv_with_an_odd_number_of_filters_per_group_is_refused_for_coupling():
    from torch import nn

    # 2 groups of 3 filters: pair (2, 3) straddles the groups. Even group count, even filter count:
    # only the filters per group are odd
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(ConfigError) as err:
        Coupling(model, alpha=1)
    assert str(err.value) == (
        "coupling.layer='0': a grouped conv (groups=2, 3 filter(s) per group): filters 2k and 2k+1 see different "
        "input channels, so equal filters would not give equal outputs; couple a conv with an even number of "
        "filters per group")
    assert Coupling(model, alpha=0).layer_paths == ["0"]  # nothing coupled: allowed
    # 3 groups of 2 filters (an odd group count): every pair inside one group, allowed up to alpha 3
    assert Coupling(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)), alpha=3).layer_paths == ["0"]
