"""Bad input is refused in one line naming the key, the value and what is allowed, before any data,
model or run directory (SPEC §8): every key of every config group has a declared rule, a key a group
does not have is refused with the nearest one, and a sweep with one bad job starts none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coupled_net import build, validation
from coupled_net.build import resolve
from coupled_net.errors import ConfigError
from coupled_net.knobs import declared
from coupled_net.validation import check_config, validate

from helpers import CONF, compose_cfg, run_cli, snapshot

GROUPS = ["model", "dataset", "augment", "optimizer", "scheduler", "coupling", "trainer", "logger"]
QUICK = ["experiment=quickstart"]


def options_of_every_group():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield pytest.param(group, path.stem, id=f"{group}={path.stem}")


def leaf_keys(node, prefix=""):
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += leaf_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def composed(group, option):
    extra = ["dataset.root=/data"] if (group, option) == ("dataset", "image_folder") else []
    return compose_cfg(f"{group}={option}", *extra)


def option_of(group, node):
    """The option a group's config is: a built-in model by its name, a dataset by its name, the rest by target."""
    if group == "dataset" or (group == "model" and node["_target_"] == "coupled_net.models.build_model"):
        return node["name"]
    return node.get("_target_")


@pytest.mark.parametrize("group, option", list(options_of_every_group()))
def test_every_key_of_every_group_option_has_a_declared_rule(group, option):
    cfg = composed(group, option)
    if (group, option) == ("logger", "none"):
        assert not cfg.get("logger")  # no logger: nothing, or an empty node
        return
    node = OmegaConf.to_container(cfg[group], resolve=False)
    # a logger option is one named entry of the logger dict (logger=[tensorboard,mlflow] holds two)
    entries = {f"logger.{k}": ("logger.*", v) for k, v in node.items()} if group == "logger" else \
        {group: (group, node)}
    for prefix, (kind, entry) in entries.items():
        rules = declared(kind, option_of(kind, entry))
        assert leaf_keys(entry), f"conf/{group}/{option}.yaml composed to nothing"
        missing = [f"{prefix}.{key}" for key in leaf_keys(entry) if key not in rules]
        assert missing == [], f"conf/{group}/{option}.yaml: no rule in coupled_net.knobs.KNOBS for {missing}"


@pytest.mark.parametrize("group, option", list(options_of_every_group()))
def test_every_group_option_as_shipped_passes_its_own_rules(group, option):
    check_config(composed(group, option))


BAD = [
    # numbers that must be finite
    (["optimizer.lr=inf"], "optimizer.lr=inf: must be a finite number > 0"),
    (["optimizer.lr=nan"], "optimizer.lr=nan: must be a finite number > 0"),
    (["optimizer.lr=-1"], "optimizer.lr=-1: must be a number > 0"),
    # scheduler parameters that would reach PyTorch
    (["scheduler.step_size=0"], "scheduler.step_size=0: must be an integer >= 1"),
    (["scheduler.gamma=-0.1"], "scheduler.gamma=-0.1: must be a number in (0, 1]"),
    (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max=0: must be an integer >= 1"),
    (["scheduler=none", "scheduler.factor=0"], "scheduler.factor=0: must be a number in (0, 1]"),
    # optimizer ranges
    (["optimizer.momentum=1.5"], "optimizer.momentum=1.5: must be a number in [0, 1)"),
    (["optimizer.weight_decay=-1e-4"], "optimizer.weight_decay=-0.0001: must be a number >= 0"),
    (["optimizer=adam", "+optimizer.betas=[0.9,1.0]"],
     "optimizer.betas=[0.9, 1.0]: must be a list of two numbers in [0, 1)"),
    (["optimizer.momentum=0", "+optimizer.nesterov=true"],
     "optimizer.nesterov=True: needs optimizer.momentum > 0 and optimizer.dampening=0"),
    # per-channel normalisation
    (["dataset.mean=[0.1,0.2,0.3]"],
     "dataset.mean=[0.1, 0.2, 0.3]: must hold 1 value(s), one per channel (dataset.channels=1)"),
    (["dataset=cifar10", "dataset.std=[0.2,0.2]"],
     "dataset.std=[0.2, 0.2]: must hold 3 value(s), one per channel (dataset.channels=3)"),
    (["dataset.std=[0.0]"], "dataset.std=[0.0]: must be a list of numbers > 0, one per channel"),
    # types
    (["trainer.epochs=2.5"], "trainer.epochs=2.5: must be an integer >= 1"),
    (["trainer.deterministic=yes"], "trainer.deterministic='yes': allowed: true, false"),
    (["trainer.limit_batches=0"], "trainer.limit_batches=0: must be an integer >= 1 or null"),
    (["seed=-1"], "seed=-1: must be an integer from 0 to 4294967295"),
    (["trainer.device=tpu"], "trainer.device='tpu': allowed: auto, cpu, cuda, cuda:N"),
    # keys that must agree
    (["model.in_channels=3"], "model.in_channels=3: must equal dataset.channels (1)"),
    (["dataset=image_folder", "dataset.root=/data", "dataset.pipeline=tensor"],
     "dataset.pipeline='tensor': needs a dataset held in memory; use pil for image_folder"),
    (["coupling.alpha=33"], "coupling.alpha=33: at most 32: layer features.0 has 64 filters"),
    (["model=alexnet", "model.input_size=28"], "model.input_size=28: alexnet needs images of at least 63 pixels"),
    # a batch larger than the training split, known from the config: 26 x 4 images, 85% of them (88) train
    ([*QUICK, "dataset.train_per_class=4"], "trainer.batch_size=128: must be at most 88, the training split's "
     "size (dataset.train_per_class=4 x 26 classes, less dataset.val_fraction=0.15)"),
    (["dataset=mnist", "trainer.batch_size=60000"], "trainer.batch_size=60000: must be at most 51000, the "
     "training split's size (60000 mnist images, less dataset.val_fraction=0.15)"),
    # mistyped keys: refused with the nearest key, whatever the preset
    ([*QUICK, "+trainer.epoch=3"], "trainer.epoch=3: not a key of trainer (did you mean trainer.epochs?)"),
    ([*QUICK, "+coupling.alpah=2"], "coupling.alpah=2: not a key of coupling (did you mean coupling.alpha?)"),
    (["++trainer.pateince=3"], "trainer.pateince=3: not a key of trainer (did you mean trainer.patience?)"),
    # a key the run reads cannot be left out
    (["~trainer.patience"], "trainer.patience=(absent): is required here: only optional keys may be left out"),
    # a key another option of the group has is not this option's
    ([*QUICK, "+optimizer.betas=[0.9,0.99]"], "optimizer.betas=[0.9, 0.99]: not a key of optimizer "
     "torch.optim.SGD (its keys: dampening, fused, lr, momentum, nesterov, weight_decay)"),
    (["+model.width=64"], "model.width=64: not a key of model alexnet (its keys: in_channels, input_size, name, "
     "num_classes)"),
    # the research-surface keys (issue 12): off by default, checked like the rest
    (["trainer.label_smoothing=1.0"], "trainer.label_smoothing=1.0: must be a number in [0, 1)"),
    (["trainer.grad_clip_norm=0"], "trainer.grad_clip_norm=0: must be a number > 0 or null"),
    (["trainer.overfit_batches=-1"], "trainer.overfit_batches=-1: must be an integer >= 0"),
    (["scheduler.warmup_epochs=1.5"], "scheduler.warmup_epochs=1.5: must be an integer >= 0"),
    (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0: must be an integer >= 1 or null"),
    (["optimized_metric=test_top1"], "optimized_metric='test_top1': allowed: val_top1, val_top5, val_loss"),
    (["augment.degrees=200"], "augment.degrees=200: must be a number in [0, 180]"),
    (["augment=crop_flip", "augment.padding=-4"], "augment.padding=-4: must be an integer >= 0"),
    (["augment.scale=[1.2,0.8]"], "augment.scale=[1.2, 0.8]: must be a list of two numbers > 0, the smaller first"),
    (["augment=crop_flip", "+augment.degrees=3"], "augment.degrees=3: not a key of augment "
     "coupled_net.augment.CropFlip (its keys: flip_p, padding)"),
    (["logger=mlflow", "+logger.mlflow.mode=offline"], "logger.mlflow.mode='offline': not a key of logger.mlflow "
     "coupled_net.loggers.MLflowLogger (its keys: experiment_name, tracking_uri)"),
    (["logger=wandb", "logger.wandb.mode=cloud"], "logger.wandb.mode='cloud': allowed: offline, online, disabled"),
    # a user's own _target_: it must import, and its keys are its parameters
    (["optimizer._target_=torch.optim.NoSuchOptimizer"], "optimizer._target_='torch.optim.NoSuchOptimizer': cannot "
     "be imported: torch.optim has no NoSuchOptimizer"),
    (["model._target_=mymodels.Net"], "model._target_='mymodels.Net': cannot be imported: no module named mymodels"),
    (["optimizer._target_=torch.optim.RMSprop", "+optimizer.centred=true"], "optimizer.centred=True: not a key of "
     "optimizer torch.optim.RMSprop (did you mean optimizer.centered?)"),
    (["scheduler._target_=torch.optim.lr_scheduler.ExponentialLR", "scheduler.step_size=3"], "scheduler.step_size=3: "
     "not a key of scheduler torch.optim.lr_scheduler.ExponentialLR (its keys: gamma, last_epoch)"),
    (["optimizer._target_=torch optim"], "optimizer._target_='torch optim': must be a dotted import path such as "
     "torchvision.models.resnet18"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_is_refused_in_one_line_naming_key_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as refused:
        check_config(compose_cfg(*overrides))
    assert str(refused.value) == message


# ---- at the limits: the largest allowed value passes, one past it (or zero where zero is no value) does not

AT_LIMIT = [
    ["seed=4294967295"],                           # numpy's largest seed, 2**32 - 1
    [*QUICK, "dataset.generator_seed=2147483647"],  # 2**31 - 1
    ["coupling.alpha=32"],                         # half of alexnet's 64 first-layer filters
    ["augment.degrees=180"],
    ["augment.flip_p=1"],
    ["scheduler.gamma=1"],
    ["scheduler=none", "scheduler.factor=1"],
    ["trainer.patience=1"],
    [*QUICK, "dataset.train_per_class=4", "trainer.batch_size=88"],  # 26 x 4 images, 85 % of them train
    [*QUICK, "dataset.val_fraction=0.5", "dataset.train_per_class=4", "trainer.batch_size=52"],
]


@pytest.mark.parametrize("overrides", AT_LIMIT, ids=[" ".join(o) for o in AT_LIMIT])
def test_the_largest_allowed_value_is_accepted(overrides):
    check_config(compose_cfg(*overrides))


PAST_LIMIT = [
    (["trainer.patience=0"], "trainer.patience=0: must be an integer >= 1"),
    (["dataset.val_fraction=0"], "dataset.val_fraction=0: must be a number strictly between 0 and 1"),
    (["dataset.val_fraction=1"], "dataset.val_fraction=1: must be a number strictly between 0 and 1"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be an integer >= 1"),
    (["seed=4294967296"], "seed=4294967296: must be an integer from 0 to 4294967295"),
    ([*QUICK, "dataset.generator_seed=2147483648"],
     "dataset.generator_seed=2147483648: must be an integer from 0 to 2147483647"),
    (["augment.degrees=180.5"], "augment.degrees=180.5: must be a number in [0, 180]"),
    (["augment.flip_p=1.01"], "augment.flip_p=1.01: must be a number in [0, 1]"),
    ([*QUICK, "dataset.train_per_class=4", "trainer.batch_size=89"], "trainer.batch_size=89: must be at most 88, "
     "the training split's size (dataset.train_per_class=4 x 26 classes, less dataset.val_fraction=0.15)"),
]


@pytest.mark.parametrize("overrides, message", PAST_LIMIT, ids=[" ".join(o) for o, _ in PAST_LIMIT])
def test_one_past_the_limit_or_zero_where_zero_is_invalid_is_refused(overrides, message):
    with pytest.raises(ConfigError) as refused:
        check_config(compose_cfg(*overrides))
    assert str(refused.value) == message


def test_a_user_s_own_optimizer_scheduler_and_model_targets_pass_with_their_own_keys():
    check_config(compose_cfg(*QUICK, "optimizer._target_=torch.optim.RMSprop", "+optimizer.centered=true"))
    check_config(compose_cfg(*QUICK, "scheduler=none", "scheduler._target_=torch.optim.lr_scheduler.ExponentialLR",
                             "~scheduler.factor", "~scheduler.total_iters", "+scheduler.gamma=0.9"))
    check_config(compose_cfg(*QUICK, "model._target_=torchvision.models.mobilenet_v3_small", "~model.name",
                             "~model.width", "~model.in_channels", "model.input_size=32"))


def test_an_option_that_needs_a_missing_extra_is_refused_naming_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("timm", "wandb") else
                        real(name, *a))
    with pytest.raises(ConfigError) as refused:
        check_config(compose_cfg(*QUICK, "model=timm"))
    assert str(refused.value) == "model._target_='coupled_net.models.timm_model': needs the timm package: " \
                                 "pip install -e '.[timm]'"
    with pytest.raises(ConfigError) as refused:
        check_config(compose_cfg(*QUICK, "logger=[tensorboard,wandb]"))
    assert str(refused.value) == "logger.wandb._target_='coupled_net.loggers.WandbLogger': needs the wandb " \
                                 "package: pip install -e '.[wandb]'"


def test_a_top_level_plus_key_is_a_label_and_an_optimizers_own_keys_may_be_added_or_left_out():
    check_config(compose_cfg(*QUICK, "+label=abc", "+note=first try"))
    check_config(compose_cfg("optimizer=adam", "+optimizer.betas=[0.9,0.99]", "+optimizer.eps=1e-6"))
    check_config(compose_cfg("~optimizer.momentum", "~scheduler.gamma"))  # PyTorch's defaults


def test_a_first_batch_that_does_not_fit_in_free_memory_is_refused_with_the_estimate(monkeypatch):
    monkeypatch.setattr(validation, "available_bytes", lambda device: 16 * 2**30)
    validate(compose_cfg("trainer.device=cpu"))  # alexnet at 224 px in batches of 128 fits in 16 GiB
    with pytest.raises(ConfigError) as refused:
        validate(compose_cfg("trainer.device=cpu", "model.input_size=20000"))
    line = str(refused.value)
    found = re.fullmatch(r"model.input_size=20000: a training batch of 128 images of alexnet needs about "
                         r"([\d.]+) TiB, more than the 16.0 GiB free on cpu; lower model.input_size or "
                         r"trainer.batch_size", line)
    assert found, line
    assert float(found.group(1)) * 2**40 > 128 * 20000 * 20000 * 4  # at least the input batch itself, in fp32


def test_a_config_validated_before_its_run_directory_is_made_is_not_validated_again_by_the_build(monkeypatch):
    calls = []
    real = validation.check_machine
    monkeypatch.setattr(validation, "check_machine", lambda c: calls.append(c["seed"]) or real(c))
    cfg = compose_cfg(*QUICK, "trainer.device=cpu", "seed=7")
    assert str(validate(cfg, keep=True)) == "cpu" and calls == [7]   # the single run's callback
    assert str(resolve(cfg).device) == "cpu" and calls == [7]        # its build takes the kept result
    validate(cfg)
    assert calls == [7, 7]  # kept once: the next validation of the same config checks again
    validate(cfg, keep=True)
    validate(compose_cfg(*QUICK, "trainer.device=cpu", "seed=8"))  # another config is never served the kept one
    assert calls == [7, 7, 7, 8]


def test_a_batch_larger_than_a_split_known_only_from_the_data_is_refused_before_the_model_trains(
        standin_datasets, tmp_path, monkeypatch):
    # the mnist stand-in holds 64 training images: 54 train after val_fraction 0.15
    cfg = compose_cfg("model=small_cnn", "dataset=mnist", "trainer.batch_size=60", "trainer.num_workers=0",
                      f"dataset.root={tmp_path}")
    with pytest.raises(ConfigError) as refused:
        build.build(resolve(cfg))
    assert str(refused.value) == (f"trainer.batch_size=60: must be at most 54, the training split's size (the "
                                  f"images of dataset.root={tmp_path.resolve()}, less dataset.val_fraction=0.15)")


def test_threads_above_the_usable_cpus_are_clamped_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(build, "usable_cpus", lambda: 2)
    monkeypatch.setattr(build, "_warned", set())
    cfg = compose_cfg(*QUICK, "trainer.device=cpu", "trainer.threads=64", "trainer.num_workers=64")
    specs = [resolve(cfg) for _ in range(2)]
    assert [(s.threads, s.workers) for s in specs] == [(2, 4), (2, 4)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["trainer.threads=64 is more than this process's 2 usable CPU(s) can run; using 2",
                        "trainer.num_workers=64 is more than this process's 2 usable CPU(s) can run; using 4"]


# ---- through the real command line: one line, nothing on disk -------------------------------------

CLI_CASES = [  # refused before Hydra composes; by the run's callback before Hydra makes its directory; by the planner
    ([*QUICK, "+trainer.epoch=3"], "trainer.epoch=3: not a key of trainer (did you mean trainer.epochs?)"),
    ([*QUICK, "optimizer.lr=inf"], "optimizer.lr=inf: must be a finite number > 0"),
    (["-m", *QUICK, "optimizer.lr=0.1,-1", "coupling.alpha=0,2"], "optimizer.lr=-1: must be a number > 0"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=["typo", "single run", "sweep with one bad value"])
def test_the_command_line_refuses_bad_input_in_one_line_before_any_directory_exists(tmp_path, args, message):
    where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    proc = run_cli(*args, f"{where}={tmp_path / 'out'}", f"dataset.root={tmp_path / 'data'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"coupled_net: error: {message}"]
    assert snapshot(tmp_path) == {} and list(Path(tmp_path).iterdir()) == []  # no run, sweep or data directory
