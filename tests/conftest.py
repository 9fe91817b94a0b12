"""Shared test helpers: compose configs in-process, run the real CLI, and in-memory stand-ins for
the datasets that would otherwise be downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from coupled_net import data

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRAIN = REPO / "launch" / "train.py"


def compose_cfg(*overrides: str):
    """The config `python launch/train.py OVERRIDES` would run (without the hydra node)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, script: Path = TRAIN, timeout: int = 600, env: dict | None = None):
    """Run an entry point as a user would, from `cwd`; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("COUPLED_NET_DATA", None)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_sweep(tmp_path: Path, *overrides: str, **kwargs):
    """`python launch/train.py -m OVERRIDES` into tmp_path/sweep (data root tmp_path);
    returns (process, sweep dir, its run dirs in job order)."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *overrides, f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path, **kwargs)
    runs = sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name.split("_")[0])) if sweep.is_dir() else []
    return proc, sweep, runs


def standin_loader(channels: int, size: int, num_classes: int, label_offset: int, n_train=64, n_test=32):
    """A loader factory for data.LOADERS: random uint8 images in the dataset's own layout."""
    def factory(dcfg):
        def load(root, train, download):
            n = n_train if train else n_test
            g = torch.Generator().manual_seed(1 if train else 2)
            shape = (n, size, size) if channels == 1 else (n, size, size, 3)
            images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            labels = torch.arange(n) % num_classes + label_offset
            return data.ArraySource(images, labels)
        return load
    return factory


STANDINS = {
    "emnist_letters": standin_loader(1, 28, 26, 1),
    "mnist": standin_loader(1, 28, 10, 0),
    "fashion_mnist": standin_loader(1, 28, 10, 0),
    "cifar10": standin_loader(3, 32, 10, 0),
}


@pytest.fixture
def standin_datasets(monkeypatch):
    """Replace every downloadable dataset by a small in-memory one: tests never download."""
    for name, factory in STANDINS.items():
        monkeypatch.setitem(data.LOADERS, name, factory)
    return STANDINS
