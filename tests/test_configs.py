"""Each config group composes and trains a few batches, in-process (SPEC §4, §10): every model on
every downloadable-or-generated dataset, every optimizer with every scheduler on the quickstart,
and the quickstart composed with another dataset."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coupled_net.lifecycle import execute_run
from coupled_net.validation import validate

from helpers import compose_cfg

MODELS = ["alexnet", "resnet18", "vgg11", "small_cnn"]
DATASETS = ["emnist_letters", "mnist", "fashion_mnist", "cifar10", "synthetic_letters"]
HEAVY_MODELS = {"vgg11"}  # marked slow: a 133M-parameter model trained and checkpointed at 224 px

# dataset -> (classes, channels)
SHAPES = {
    "emnist_letters": (26, 1),
    "mnist": (10, 1),
    "fashion_mnist": (10, 1),
    "cifar10": (10, 3),
    "synthetic_letters": (26, 1),
}
# model -> (first conv weight, last Linear weight) in the state dict
KEYS = {
    "alexnet": ("features.0.weight", "classifier.6.weight"),
    "resnet18": ("conv1.weight", "fc.weight"),
    "vgg11": ("features.0.weight", "classifier.6.weight"),
    "small_cnn": ("features.0.weight", "classifier.4.weight"),
}
DEFAULT_INPUT_SIZE = {"alexnet": 224, "resnet18": 224, "vgg11": 224, "small_cnn": 28}

FAST = ["trainer.epochs=1", "trainer.limit_batches=1", "trainer.batch_size=2", "trainer.num_workers=0"]
TINY_SYNTHETIC = ["dataset.train_per_class=4", "dataset.test_per_class=2"]


def root_override(path: Path) -> str:
    return f"dataset.root='{path}'"


def epoch_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def run_dir(tmp_path):
    """A fresh run directory; its (large, for the 224 px models) checkpoints are removed afterwards."""
    path = tmp_path / "run"
    yield path
    shutil.rmtree(path / "checkpoints", ignore_errors=True)


def _model_dataset_cases():
    for model in MODELS:
        for dataset in DATASETS:
            marks = [pytest.mark.slow] if model in HEAVY_MODELS else []
            yield pytest.param(model, dataset, id=f"{model}-{dataset}", marks=marks)


@pytest.mark.parametrize("model, dataset", list(_model_dataset_cases()))
def test_model_on_dataset_composes_and_trains(model, dataset, standin_datasets, tmp_path, run_dir):
    overrides = [f"model={model}", f"dataset={dataset}", *FAST, root_override(tmp_path / "data")]
    if dataset == "synthetic_letters":
        overrides += TINY_SYNTHETIC
    cfg = compose_cfg(*overrides)
    classes, channels = SHAPES[dataset]
    assert cfg.model.name == model and cfg.dataset.name == dataset
    assert cfg.model.input_size == DEFAULT_INPUT_SIZE[model]
    assert cfg.model.num_classes == classes and cfg.model.in_channels == channels

    results = execute_run(cfg, run_dir)

    assert results["status"] == "done", results["error"]
    assert results["error"] is None
    assert results["epochs_run"] == 1
    assert results["best_epoch"] == 1
    assert results["model"] == model and results["dataset"] == dataset
    assert set(results["metrics"]) == {"val", "test"}
    assert (run_dir / "results.json").is_file() and (run_dir / "model_summary.txt").is_file()

    rows = epoch_rows(run_dir)
    assert len(rows) == 1
    assert int(rows[0]["epoch"]) == 1

    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    first_conv, last_linear = KEYS[model]
    linears = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    assert linears[-1] == last_linear
    assert state[last_linear].shape[0] == classes
    assert state[first_conv].dim() == 4
    assert state[first_conv].shape[1] == channels
    assert not any(k.startswith("module.") for k in state)
    assert (run_dir / "checkpoints" / "last.pt").is_file()


OPTIMIZERS = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}
SCHEDULERS = {
    "step": "torch.optim.lr_scheduler.StepLR",
    "cosine": "torch.optim.lr_scheduler.CosineAnnealingLR",
    "none": "torch.optim.lr_scheduler.ConstantLR",
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_and_scheduler_on_quickstart(optimizer, scheduler, tmp_path, run_dir):
    cfg = compose_cfg("experiment=quickstart", f"optimizer={optimizer}", f"scheduler={scheduler}", *FAST,
                      *TINY_SYNTHETIC, root_override(tmp_path / "data"))
    assert cfg.optimizer._target_ == OPTIMIZERS[optimizer]
    assert cfg.scheduler._target_ == SCHEDULERS[scheduler]
    assert cfg.model.name == "small_cnn" and cfg.dataset.name == "synthetic_letters"
    lr = cfg.optimizer.lr
    assert isinstance(lr, float) and lr > 0

    results = execute_run(cfg, run_dir)

    assert results["status"] == "done", results["error"]
    assert results["epochs_run"] == 1
    rows = epoch_rows(run_dir)
    assert len(rows) == 1
    assert int(rows[0]["epoch"]) == 1
    assert float(rows[0]["lr"]) == lr


def test_quickstart_composes_with_another_dataset_and_a_label():
    cfg = compose_cfg("experiment=quickstart", "dataset=mnist", "+label=abc")
    assert cfg.model.name == "small_cnn"
    assert cfg.dataset.name == "mnist"
    assert cfg.model.num_classes == 10
    assert cfg.model.in_channels == 1
    # the model takes its shape from the dataset by interpolation, not from values set by hand
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    assert raw["num_classes"] == "${dataset.num_classes}"
    assert raw["in_channels"] == "${dataset.channels}"
    # the rest of the quickstart still applies
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert cfg.trainer.epochs == 4
    # a +key=value label is accepted and kept
    assert cfg.label == "abc"
    validate(cfg)


def test_label_is_accepted_by_a_run(standin_datasets, tmp_path, run_dir):
    cfg = compose_cfg("experiment=quickstart", "dataset=mnist", "+label=abc", *FAST,
                      root_override(tmp_path / "data"))
    assert cfg.label == "abc"
    results = execute_run(cfg, run_dir)
    assert results["status"] == "done", results["error"]
    assert results["model"] == "small_cnn" and results["dataset"] == "mnist"
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["classifier.4.weight"].shape[0] == 10
    assert state["features.0.weight"].shape[1] == 1
