"""Bounds and refusals that were accepted silently or ended in a traceback (issue 18, item 10), each
refused in one line naming the key, the value and what is allowed, before anything runs: a padding
far beyond the image, more overfit batches than the training split holds, a baseline no run has, an
Optuna search without trials, a ViT size its patches do not divide, a key of other model options,
and a mistyped key given to launch/prepare.py. The values are taken at the limit itself: the largest
allowed one passes, one more is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from coupled_net import commandline, review
from coupled_net.build import build_loaders, resolve
from coupled_net.errors import ConfigError
from coupled_net.validation import check_config
from helpers import CONF, REPO, compose_cfg, make_run, run_cli, snapshot

QUICK = ["experiment=quickstart"]
PREPARE = REPO / "launch" / "prepare.py"
COLLECT = REPO / "launch" / "collect.py"


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(*overrides))
    return str(err.value)


def refused_on_the_command_line(*args: str) -> str:
    """What launch/train.py's checks before Hydra say about `args`."""
    with pytest.raises(ConfigError) as err:
        commandline.check(list(args), CONF)
    return str(err.value)


# ---- augment.padding: at most half the side of the stored image ------------------------------------

@pytest.mark.parametrize("dataset, side", [("mnist", 28), ("synthetic_letters", 28), ("cifar10", 32)])
def test_a_padding_of_half_the_stored_image_is_the_largest_accepted(dataset, side):
    check_config(compose_cfg(f"dataset={dataset}", "augment=crop_flip", f"augment.padding={side // 2}"))
    assert refused(f"dataset={dataset}", "augment=crop_flip", f"augment.padding={side // 2 + 1}") == (
        f"augment.padding={side // 2 + 1}: must be at most {side // 2}, half the side of the {side}-pixel {dataset} "
        "images it pads")


def test_a_padding_of_a_thousand_pixels_on_a_28_pixel_image_is_refused():
    assert refused("dataset=mnist", "augment=crop_flip", "augment.padding=1000") == (
        "augment.padding=1000: must be at most 14, half the side of the 28-pixel mnist images it pads")


# ---- trainer.overfit_batches: whole batches of the training split ---------------------------------------

# quickstart with 4 images per class: 26 x 4 = 104, 85 % of them (88) train; 88 // 40 = 2 whole batches
SPLIT_OF_88 = [*QUICK, "dataset.train_per_class=4", "trainer.batch_size=40"]


def test_overfit_batches_may_be_every_whole_batch_of_the_training_split_and_not_one_more():
    check_config(compose_cfg(*SPLIT_OF_88, "trainer.overfit_batches=2"))
    check_config(compose_cfg(*SPLIT_OF_88, "trainer.overfit_batches=0"))  # off
    assert refused(*SPLIT_OF_88, "trainer.overfit_batches=3") == (
        "trainer.overfit_batches=3: must be at most 2, the whole batches of trainer.batch_size=40 in the training "
        "split of 88 images (dataset.train_per_class=4 x 26 classes, less dataset.val_fraction=0.15)")


def write_folder(root: Path, classes=("a", "b", "c"), per_class: int = 8) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.new("L", (12, 12), color=20 * c + k).save(root / name / f"{k}.png")
    return root


def test_overfit_batches_beyond_an_image_folders_split_are_refused_once_it_is_read_before_training(tmp_path):
    # 24 images: 4 (15 %, rounded) held out for test, 20 left, int(0.85 * 20) = 17 train: 2 whole batches of 8
    root = write_folder(tmp_path / "images")
    common = ["dataset=image_folder", f"dataset.root={root}", "model=small_cnn", "model.input_size=28",
              "trainer.batch_size=8", "trainer.num_workers=0", "trainer.device=cpu"]
    loaders = build_loaders(resolve(compose_cfg(*common, "trainer.overfit_batches=2")))
    assert [len(y) for _, y in loaders["train"]] == [8, 8]
    with pytest.raises(ConfigError) as err:
        build_loaders(resolve(compose_cfg(*common, "trainer.overfit_batches=3")))
    assert str(err.value) == (
        f"trainer.overfit_batches=3: must be at most 2, the whole batches of trainer.batch_size=8 in the training "
        f"split of 17 images (the images of dataset.root={root.resolve()}, less dataset.val_fraction=0.15)")


# ---- keys and values the command line is checked for before Hydra composes -----------------------------

def test_a_key_of_other_model_options_is_refused_naming_the_options_keys_before_hydra_composes():
    assert refused_on_the_command_line("model.weights=x.pth") == (
        "model.weights='x.pth': not a key of model alexnet (its keys: in_channels, input_size, name, num_classes)")
    assert refused_on_the_command_line(*QUICK, "model.weights=x.pth") == (  # the preset's model, small_cnn
        "model.weights='x.pth': not a key of model small_cnn (its keys: in_channels, input_size, name, num_classes, "
        "width)")
    assert refused_on_the_command_line("-m", "model=torchvision,resnet18", "model.weights=x.pth") == (
        "model.weights='x.pth': not a key of model resnet18 (its keys: in_channels, input_size, name, num_classes)")
    assert refused_on_the_command_line("dataset=mnist", "dataset.test_fraction=0.2") == (
        "dataset.test_fraction=0.2: not a key of dataset mnist (did you mean dataset.val_fraction?)")
    # the options that take them pass, and so does a key a preset's option has
    commandline.check(["model=torchvision", "model.weights=x.pth"], CONF)
    commandline.check(["model=timm", "model.weights=x.pth"], CONF)
    commandline.check([*QUICK, "model.width=16", "dataset=image_folder", "dataset.test_fraction=0.2"], CONF)
    # an option set on the command line is not the YAML's: left to Hydra and the composed config's check
    commandline.check(["model._target_=my_models.Net", "model.weights=x.pth"], CONF)


def test_an_optuna_search_needs_at_least_one_trial():
    commandline.check(["-m", "hparams_search=optuna_lr", "hydra.sweeper.n_trials=1"], CONF)
    for value in ("0", "-1", "null", "2.5"):
        assert refused_on_the_command_line("-m", "hparams_search=optuna_lr", f"hydra.sweeper.n_trials={value}") == (
            f"hydra.sweeper.n_trials={value}: must be an integer >= 1 (the runs the Optuna study tries)")


def test_a_vit_whose_patches_do_not_divide_the_input_size_is_refused_naming_the_multiple():
    check_config(compose_cfg(*QUICK, "model=torchvision", "model.arch=vit_b_16", "model.input_size=32"))
    assert refused(*QUICK, "model=torchvision", "model.arch=vit_b_16", "model.input_size=28") == (
        "model.input_size=28: vit_b_16 needs a multiple of 16 pixels (its patch size), e.g. 16 or 32")


# ---- through the real command lines: one line, nothing on disk ------------------------------------------

CLI_CASES = {
    "padding": ([*QUICK, "augment=crop_flip", "augment.padding=15"],
                "augment.padding=15: must be at most 14, half the side of the 28-pixel synthetic_letters images it pads"),
    "overfit": ([*SPLIT_OF_88, "trainer.overfit_batches=3"],
                "trainer.overfit_batches=3: must be at most 2, the whole batches of trainer.batch_size=40 in the "
                "training split of 88 images (dataset.train_per_class=4 x 26 classes, less dataset.val_fraction=0.15)"),
    "vit": ([*QUICK, "model=torchvision", "model.arch=vit_b_16", "model.input_size=28"],
            "model.input_size=28: vit_b_16 needs a multiple of 16 pixels (its patch size), e.g. 16 or 32"),
    "weights": ([*QUICK, "model.weights=x.pth"], "model.weights='x.pth': not a key of model small_cnn (its keys: "
                                                 "in_channels, input_size, name, num_classes, width)"),
    "trials": (["-m", *QUICK, "hparams_search=optuna_lr", "hydra.sweeper.n_trials=0"],
               "hydra.sweeper.n_trials=0: must be an integer >= 1 (the runs the Optuna study tries)"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_train_py_refuses_each_in_one_line_before_any_directory_exists(tmp_path, case):
    args, message = CLI_CASES[case]
    where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    proc = run_cli(*args, f"{where}={tmp_path / 'out'}", f"dataset.root={tmp_path / 'data'}", cwd=tmp_path)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [f"coupled_net: error: {message}"])
    assert list(tmp_path.iterdir()) == []  # no run, sweep or data directory


def test_prepare_py_refuses_a_mistyped_key_in_the_same_one_line_as_train_py(tmp_path):
    proc = run_cli("dataset=synthetic_letters", "trainer.epoch=3", script=PREPARE, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2, ["coupled_net: error: trainer.epoch=3: not a key of trainer (did you mean trainer.epochs?)"])
    assert list(tmp_path.iterdir()) == []


# ---- collect.py --baseline: a value some finished run has ----------------------------------------------

def two_alphas(root: Path) -> Path:
    for alpha in (0, 2):
        for seed in (1, 2):
            make_run(root / f"a{alpha}s{seed}", coupling__alpha=alpha, seed=seed, test_top1=50.0 + alpha + seed)
    make_run(root / "failed", status="failed", test_top1=None, coupling__alpha=99, coupling__mode="mean")
    return root


def test_a_baseline_no_finished_run_has_is_refused_naming_the_values_they_have(tmp_path):
    runs = review.runs(two_alphas(tmp_path))
    for baseline, values in (({"coupling.alpha": 99}, "0, 2"), ({"coupling.mode": "mean"}, "copy")):
        with pytest.raises(ConfigError) as err:
            review.compare(runs, baseline)
        (key, value), = baseline.items()
        assert str(err.value) == (f"baseline='{key}={value}': no finished run has {key}={value} (the finished "
                                  f"runs' values: {values})")
    by_two = review.compare(runs, {"coupling.alpha": 2})  # a value they have: the alpha=0 group against it
    assert by_two["n_pairs"].tolist() == [2] and by_two["delta_mean"].tolist() == [-2.0]


def test_the_default_baseline_of_a_sweep_without_alpha_0_still_gives_its_tables(tmp_path):
    # its alpha=0 runs may be in another sweep, collected with it later: not refused
    make_run(tmp_path / "a2", coupling__alpha=2)
    make_run(tmp_path / "a4", coupling__alpha=4)
    assert review.compare(review.runs(tmp_path))["n_pairs"].tolist() == [0, 0]


def test_collect_py_refuses_a_baseline_no_run_has_in_one_line_and_writes_nothing(tmp_path):
    root = two_alphas(tmp_path / "sweep")
    before = snapshot(root)
    proc = run_cli(str(root), "--baseline", "coupling.alpha=99", script=COLLECT, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [
        "collect: error: baseline='coupling.alpha=99': no finished run has coupling.alpha=99 (the finished runs' "
        "values: 0, 2)"])
    assert snapshot(root) == before  # no summary file
