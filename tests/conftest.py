"""Fixtures shared by the suites; helpers (composing configs, running the CLI, dataset stand-ins)
are in tests/helpers/."""

from __future__ import annotations

import subprocess

import pytest
import torch

from coupled_net import data
from helpers import REPO, STANDINS


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


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real one-node SLURM cluster (.ci/slurm_up.sh; started here if .ci/run has not already, once
    a session): `pytest.mark.usefixtures("slurm_cluster")` on the tests that submit jobs."""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm_up.sh")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
