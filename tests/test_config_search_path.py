"""Group options come from Hydra's config search path (conf/, a user's --config-dir, hydra.searchpath),
never from a list in the code: a user's own option composes and is offered in refusals and in --help."""

from __future__ import annotations

import importlib.util

import pytest

from coupled_net import cli, commandline

from helpers import CONF, run_cli

BUILT_IN_MODELS = ["alexnet", "resnet18", "small_cnn", "timm", "torchvision", "vgg11"]


@pytest.fixture
def own_configs(tmp_path):
    """A user's config dir with a model of their own (any `_target_`) and an experiment using it."""
    root = tmp_path / "my_conf"
    (root / "model").mkdir(parents=True)
    (root / "model" / "mobilenet.yaml").write_text(
        "_target_: torchvision.models.mobilenet_v3_small\nnum_classes: ${dataset.num_classes}\ninput_size: 32\n")
    return root


def test_a_model_yaml_in_a_users_config_dir_composes_through_the_cli(own_configs, tmp_path):
    proc = run_cli("--config-dir", str(own_configs), "model=mobilenet", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "_target_: torchvision.models.mobilenet_v3_small" in proc.stdout


def test_a_mistyped_option_is_refused_listing_the_users_options_beside_the_shipped_ones(own_configs, tmp_path):
    proc = run_cli("--config-dir", str(own_configs), "model=mobilnet", cwd=tmp_path)
    assert proc.returncode == 2
    expected = sorted(BUILT_IN_MODELS + ["mobilenet"])
    assert proc.stderr.strip().splitlines()[-1] == f"coupled_net: error: model='mobilnet': allowed: {', '.join(expected)}"
    assert not (tmp_path / "outputs").exists()


def test_an_option_on_a_hydra_searchpath_override_counts_as_well(own_configs):
    repo = commandline.config_repository(CONF, [], [])
    assert "mobilenet" not in repo.get_group_options("model")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    searchpath = OverridesParser.create().parse_overrides([f"hydra.searchpath=[file://{own_configs}]"])
    repo = commandline.config_repository(CONF, [], searchpath)
    assert sorted(repo.get_group_options("model")) == sorted(BUILT_IN_MODELS + ["mobilenet"])


def check(args, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.check_command_line(args, CONF)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_each_logger_of_a_logger_list_must_be_an_option(capsys):
    assert check(["logger=[tensorboard,mlfow]"], capsys) == (
        2, "coupled_net: error: logger='mlfow': allowed: mlflow, none, tensorboard, wandb")


def test_a_search_without_the_optuna_sweeper_installed_is_refused_with_the_pip_command(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_optuna") else real(name, *a))
    assert check(["-m", "hparams_search=optuna_lr"], capsys) == (
        2, "coupled_net: error: hparams_search=optuna_lr: needs the hydra-optuna-sweeper package: "
           "pip install -e '.[optuna]'")


def test_the_app_help_lists_the_groups_from_the_search_path_and_the_keys_typed_most(own_configs, tmp_path):
    proc = run_cli("--config-dir", str(own_configs), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"model: {', '.join(sorted(BUILT_IN_MODELS + ['mobilenet']))}" in lines
    assert "augment: crop_flip, letters, none" in lines
    assert "debug: fast, overfit" in lines
    assert "hparams_search: none, optuna_lr" in lines
    assert any(line.startswith("coupling.alpha=0,2,4,8 ") for line in lines)
    assert "Powered by Hydra" not in proc.stdout  # not Hydra's generic page
