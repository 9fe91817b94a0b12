"""One place builds a run (coupled_net.build): a Trainer from the builder, without a run directory."""

from __future__ import annotations

import pytest
import torch

from coupled_net.build import build, make_trainer, resolve
from coupled_net.trainer import LoopState

from helpers import compose_cfg


def test_a_trainer_built_without_a_run_directory_trains_two_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written would land here
    cfg = compose_cfg("experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2",
                      "trainer.batch_size=16", "trainer.limit_batches=2", "trainer.epochs=1", "coupling.alpha=4")
    spec = resolve(cfg)
    parts = build(spec)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    steps = []  # forward passes in training mode: one per training batch
    parts.model.register_forward_pre_hook(lambda module, args: steps.append(1) if module.training else None)

    trainer = make_trainer(spec, parts)
    progress = trainer.fit(LoopState())

    assert len(steps) == 2  # trainer.limit_batches=2
    assert (progress.epoch, progress.best_epoch) == (1, 1)
    assert [row["epoch"] for row in trainer.rows] == [1]
    w = parts.model.state_dict()["features.0.weight"]
    assert not torch.equal(w, before["features.0.weight"])  # it trained
    assert all(torch.equal(w[2 * k], w[2 * k + 1]) for k in range(4))  # and equalized 4 pairs
    assert not torch.equal(w[8], w[9])
    metrics = trainer.final_metrics()  # the best weights, kept in memory
    assert set(metrics) == {"val", "test"} and 0 <= metrics["test"]["top1"] <= 100
    assert list(tmp_path.iterdir()) == []  # no run directory, no file


def test_bad_input_is_refused_by_the_builder_before_any_data(tmp_path, monkeypatch):
    from coupled_net import data
    from coupled_net.errors import ConfigError

    monkeypatch.setattr(data, "build_splits", lambda *a, **k: pytest.fail("data was built"))
    with pytest.raises(ConfigError, match=r"^trainer.batch_size=0: must be an integer >= 1$"):
        resolve(compose_cfg("experiment=quickstart", "trainer.batch_size=0"))
