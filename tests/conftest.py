"""Fixtures shared by the suites; helpers (composing configs, running the CLI, dataset stand-ins)
are in tests/helpers/."""

from __future__ import annotations

import pytest
import torch

from coupled_net import data
from helpers import STANDINS


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def standin_datasets(monkeypatch):
    """Replace every downloadable dataset by a small in-memory one: tests never download."""
    for name, factory in STANDINS.items():
        monkeypatch.setitem(data.LOADERS, name, factory)
    return STANDINS
