"""The training recipe's optional keys: trainer.label_smoothing, trainer.grad_clip_norm,
scheduler.warmup_epochs, trainer.checkpoint_every=null, and debug=fast. Each is checked against
numbers worked out in the test; with all of them at their defaults a run is bit-identical to one
whose config does not have them at all (the seed's protocol, SPEC §5)."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from coupled_net.build import build, make_scheduler, resolve
from coupled_net.errors import ConfigError
from coupled_net.lifecycle import execute_run
from coupled_net.trainer import LoopState, Numerics, Trainer
from helpers import CONF, compose_cfg, metric_table, read_results, run_cli

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.batch_size=16",
        "trainer.limit_batches=1"]
CPU = torch.device("cpu")


class Batches:
    """An EpochLoader stand-in: the same list of (images, labels) batches every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch, start_batch=0):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def bare_trainer(model, batches, lr, **kwargs) -> Trainer:
    """A Trainer of `model` (plain SGD at `lr`, no scheduler steps, no coupling) over `batches`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = Batches(batches)
    return Trainer(model=model, coupling=SimpleNamespace(schedule="epoch", equalize=lambda: None), optimizer=optimizer,
                   scheduler=None, loaders={"train": loader, "val": loader, "test": loader}, device=CPU, epochs=1,
                   **kwargs)


def lrs(run_dir) -> list[float]:
    with open(run_dir / "epochs.csv", newline="") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


# ---- label smoothing -----------------------------------------------------------------------------

P = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]  # softmax(log P) = P: each sample's probabilities known by eye


def identity_logits_model() -> nn.Module:
    """A linear map with the identity matrix (a parameter, so the step has something to train): the
    'images' are the logits themselves."""
    model = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(6))
    return model


def test_label_smoothing_changes_the_training_loss_to_the_smoothed_formula_and_validation_stays_plain():
    images, labels = torch.log(torch.tensor([P, P])), torch.tensor([0, 4])
    eps = 0.1
    ce = (-math.log(0.4) - math.log(0.06)) / 2                  # 1.8649: plain cross-entropy
    uniform = -sum(math.log(p) for p in P) / len(P)             # 2.0891: mean over classes of -log p, each sample
    smoothed = (1 - eps) * ce + eps * uniform                   # 1.8873
    trainer = bare_trainer(identity_logits_model(), [(images, labels)], lr=0.0, label_smoothing=eps)
    train_loss, _ = trainer.train_one_epoch(1, LoopState())
    assert train_loss == pytest.approx(smoothed, rel=1e-6) and abs(smoothed - ce) > 0.02
    assert trainer.evaluate_split("val")["loss"] == pytest.approx(ce, rel=1e-6)  # val_loss: never smoothed

    plain = bare_trainer(identity_logits_model(), [(images, labels)], lr=0.0)  # the default: the seed's loss
    assert plain.train_one_epoch(1, LoopState())[0] == pytest.approx(ce, rel=1e-6)


# ---- gradient clipping ---------------------------------------------------------------------------

# A 2-class linear model at zero weights on the one input x = (3, 4) with label 0: p = (1/2, 1/2) and
# dCE/dW = (p - onehot(0)) x^T = [[-1.5, -2], [1.5, 2]], of L2 norm sqrt(2 * (1.5² + 2²)) = sqrt(12.5).
GRAD = torch.tensor([[-1.5, -2.0], [1.5, 2.0]])
NORM = math.sqrt(12.5)  # 3.5355
LR = 100.0              # huge: the update is dominated by the (clipped) gradient, easy to read off


def one_step(precision="fp32", **kwargs) -> torch.Tensor:
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    numerics = Numerics(CPU, precision)
    # GradScaler's default first scale (65536) overflows fp16 in this backward pass (65536 * 1/2 * 4) and
    # skips the step, as it does on a GPU; 1024 does not
    numerics.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=precision == "fp16")
    trainer = bare_trainer(model, [(torch.tensor([[3.0, 4.0]]), torch.tensor([0]))], lr=LR, numerics=numerics,
                           **kwargs)
    trainer.train_one_epoch(1, LoopState())
    return model.weight.detach()


def test_grad_clip_norm_scales_the_update_to_lr_times_the_clipped_gradient():
    # clip_grad_norm_ multiplies by max_norm / (norm + 1e-6) when the norm is above max_norm
    clipped = one_step(grad_clip_norm=1.0)
    assert torch.allclose(clipped, -LR * GRAD * (1.0 / (NORM + 1e-6)), rtol=1e-5)
    assert torch.linalg.norm(clipped).item() == pytest.approx(LR * 1.0, rel=1e-5)  # the step's norm: lr * max_norm


def test_grad_clip_norm_null_or_above_the_norm_leaves_the_update_unclipped():
    assert torch.allclose(one_step(), -LR * GRAD, rtol=1e-6)                     # the default: no clipping
    assert torch.allclose(one_step(grad_clip_norm=10.0), -LR * GRAD, rtol=1e-6)  # 3.54 < 10: untouched


def test_grad_clip_norm_with_fp16_clips_the_unscaled_gradients():
    # the GradScaler multiplies the loss by 1024 here: clipping the scaled gradients (no unscale_ first)
    # would make the step 1024 times too small
    clipped = one_step("fp16", grad_clip_norm=1.0)
    assert torch.allclose(clipped, -LR * GRAD * (1.0 / (NORM + 1e-6)), rtol=1e-3)


# ---- warmup --------------------------------------------------------------------------------------

def test_warmup_epochs_ramp_the_lr_linearly_then_the_step_schedule_starts_from_the_full_lr(tmp_path):
    cfg = compose_cfg(*TINY, "scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.1",
                      "scheduler.warmup_epochs=3", "optimizer.lr=0.1", "trainer.epochs=8", "trainer.patience=8",
                      f"dataset.root={tmp_path}")
    res = execute_run(cfg, tmp_path / "run")
    assert res["status"] == "done", res["error"]
    # epochs 1-3: 1/4, 2/4, 3/4 of 0.1; epoch 4: 0.1; then StepLR's own epochs 0, 1 (0.1), 2, 3 (0.01), 4 (0.001)
    assert lrs(tmp_path / "run") == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_warmup_epochs_is_popped_and_zero_builds_the_configs_own_scheduler():
    def sgd():
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    step = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2, "gamma": 0.1}
    plain = make_scheduler(OmegaConf.create({**step, "warmup_epochs": 0}), sgd())
    assert type(plain) is torch.optim.lr_scheduler.StepLR
    assert plain.state_dict() == torch.optim.lr_scheduler.StepLR(sgd(), step_size=2, gamma=0.1).state_dict()
    assert type(make_scheduler(OmegaConf.create(step), sgd())) is torch.optim.lr_scheduler.StepLR  # absent: 0
    cosine = make_scheduler({"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True,
                             "T_max": 2, "eta_min": 0.0, "warmup_epochs": 1}, optimizer := sgd())
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    # warmup 1/2 of 0.1, then cosine over T_max = 2 epochs counted after the warmup: 0.1, 0.05, 0
    assert seen == pytest.approx([0.05, 0.1, 0.05, 0.0], abs=1e-12)


def test_a_run_resumed_in_the_middle_of_the_warmup_has_the_same_lr_sequence(tmp_path, monkeypatch):
    common = [*TINY, "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5", "scheduler.warmup_epochs=3",
              "optimizer.lr=0.1", "trainer.epochs=5", "trainer.patience=5", f"dataset.root={tmp_path}"]
    real_epoch = Trainer._one_epoch

    def killed_after_epoch_2(self, progress):
        real_epoch(self, progress)
        if progress.epoch == 2:
            raise KeyboardInterrupt  # a kill after the second epoch's checkpoint and row: 2 of 3 warmup epochs done
    monkeypatch.setattr(Trainer, "_one_epoch", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*common), tmp_path / "resumed")
    assert lrs(tmp_path / "resumed") == pytest.approx([0.025, 0.05])
    monkeypatch.setattr(Trainer, "_one_epoch", real_epoch)
    assert execute_run(compose_cfg(*common), tmp_path / "resumed")["status"] == "done"
    expected = [0.025, 0.05, 0.075, 0.1, 0.05]  # warmup 1/4, 2/4, 3/4; StepLR epochs 0, 1 (gamma 0.5)
    assert lrs(tmp_path / "resumed") == pytest.approx(expected)
    execute_run(compose_cfg(*common), tmp_path / "straight")
    assert metric_table(tmp_path / "resumed").equals(metric_table(tmp_path / "straight"))


# ---- defaults: nothing changes -------------------------------------------------------------------

def test_with_the_recipe_keys_at_their_defaults_a_run_is_bit_identical_to_one_without_them(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with grad_clip_norm null")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", never)
    overrides = [*TINY, "scheduler=step", "scheduler.step_size=1", "trainer.epochs=2", f"dataset.root={tmp_path}"]
    with_keys = compose_cfg(*overrides)
    assert (with_keys.trainer.label_smoothing, with_keys.trainer.grad_clip_norm, with_keys.scheduler.warmup_epochs) \
        == (0.0, None, 0)
    without = compose_cfg(*overrides)
    with open_dict(without):
        del without.trainer.label_smoothing, without.trainer.grad_clip_norm, without.scheduler.warmup_epochs
    spec = resolve(compose_cfg(*overrides))
    scheduler = build(spec).scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR and (scheduler.step_size, scheduler.gamma) == (1, 0.1)

    a, b = execute_run(with_keys, tmp_path / "with"), execute_run(without, tmp_path / "without")
    assert a["status"] == b["status"] == "done"
    assert metric_table(tmp_path / "with").equals(metric_table(tmp_path / "without"))
    assert a["metrics"] == b["metrics"]
    assert lrs(tmp_path / "with") == pytest.approx([0.05, 0.005])


# ---- checkpoints and debug=fast ------------------------------------------------------------------

def test_checkpoint_every_null_writes_no_periodic_checkpoints(tmp_path):
    res = execute_run(compose_cfg(*TINY, "trainer.epochs=2", "trainer.checkpoint_every=null", f"dataset.root={tmp_path}"),
              tmp_path / "run")
    assert res["status"] == "done", res["error"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_debug_fast_runs_one_short_epoch_without_periodic_checkpoints_through_the_cli(tmp_path):
    # a smaller synthetic set than quickstart's: the interpreter start and data generation dominate
    proc = run_cli("debug=fast", "experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2",
                   "trainer.batch_size=16", f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}",
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(tmp_path / "run")["status"] == "done"
    with open(tmp_path / "run" / "epochs.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_debug_fast_puts_runs_and_sweeps_under_outputs_debug():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["debug=fast", "experiment=quickstart"], return_hydra_config=True)
    assert (cfg.trainer.epochs, cfg.trainer.limit_batches, cfg.trainer.checkpoint_every) == (1, 3, None)
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)  # ${now:...} is resolved only in a real run
    assert hydra["run"]["dir"] == "outputs/debug/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
    assert hydra["sweep"]["dir"] == "outputs/debug/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"


def test_cosine_counts_its_t_max_from_the_end_of_the_warmup_so_the_lr_reaches_eta_min_with_the_run():
    from coupled_net.validation import check_config

    assert compose_cfg("scheduler=cosine", "trainer.epochs=10").scheduler.T_max == 10
    assert compose_cfg("scheduler=cosine", "trainer.epochs=10", "scheduler.warmup_epochs=3").scheduler.T_max == 7
    with pytest.raises(ConfigError) as refused:  # a warmup as long as the run leaves no schedule
        check_config(compose_cfg("scheduler=cosine", "trainer.epochs=3", "scheduler.warmup_epochs=3"))
    assert str(refused.value) == "scheduler.warmup_epochs=3: must be less than trainer.epochs (3): the schedule " \
                                 "starts after the warmup"
