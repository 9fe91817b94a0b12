"""The epoch loop's decisions: which epoch is best (select_by), when early stopping triggers."""

from __future__ import annotations

import pytest

from coupled_net.lifecycle import execute_run
from helpers import compose_cfg
from helpers.scripted import scripted_validation

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.batch_size=16",
        "trainer.limit_batches=1", "trainer.epochs=5", "trainer.patience=2"]


def test_early_stopping_on_val_loss_before_ke(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, val_losses=[1, 2, 3, 4, 5], ke_losses=[5, 4, 3, 2, 1])
    res = execute_run(compose_cfg(*TINY, f"dataset.root={tmp_path}"), tmp_path / "run")
    # epoch 1 is best; epochs 2 and 3 do not improve: patience 2 stops after epoch 3
    assert (res["epochs_run"], res["best_epoch"], res["stopped_early"]) == (3, 1, True)


def test_select_by_ke_val_loss_judges_after_equalization(tmp_path, monkeypatch):
    scripted_validation(monkeypatch, val_losses=[1, 2, 3, 4, 5], ke_losses=[5, 4, 3, 2, 1])
    res = execute_run(compose_cfg(*TINY, "trainer.select_by=ke_val_loss", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert (res["epochs_run"], res["best_epoch"], res["stopped_early"]) == (5, 5, False)


def test_scheduler_none_keeps_the_learning_rate(tmp_path, monkeypatch):
    import csv

    scripted_validation(monkeypatch, val_losses=[5, 4, 3, 2, 1], ke_losses=[5, 4, 3, 2, 1])
    execute_run(compose_cfg(*TINY, "scheduler=none", f"dataset.root={tmp_path}"), tmp_path / "run")
    with open(tmp_path / "run" / "epochs.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == pytest.approx([0.05] * 5)


def test_step_scheduler_decays_every_step_size_epochs(tmp_path, monkeypatch):
    import csv

    scripted_validation(monkeypatch, val_losses=[5, 4, 3, 2, 1], ke_losses=[5, 4, 3, 2, 1])
    execute_run(compose_cfg(*TINY, "scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.1",
                    f"dataset.root={tmp_path}"), tmp_path / "run")
    with open(tmp_path / "run" / "epochs.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005])


@pytest.mark.parametrize("overrides", [
    ["trainer.precision=bf16"], ["trainer.precision=fp16"], ["trainer.channels_last=true"],
    pytest.param(["trainer.compile=true"], marks=pytest.mark.slow),
], ids=["bf16", "fp16", "channels_last", "compile"])
def test_precision_memory_format_and_compile_train_and_resume(tmp_path, overrides):
    import torch

    cfg = compose_cfg("experiment=quickstart", "dataset.train_per_class=8", "dataset.test_per_class=2",
                      "trainer.batch_size=32", "trainer.epochs=2", *overrides, f"dataset.root={tmp_path}")
    res = execute_run(cfg, tmp_path / "run")
    assert res["status"] == "done" and res["epochs_run"] == 2
    assert 0 < res["metrics"]["val"]["loss"] < 10
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] if overrides == ["trainer.precision=fp16"] else True  # the GradScaler's state
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["features.0.weight"].dtype == torch.float32  # autocast never changes the stored weights
