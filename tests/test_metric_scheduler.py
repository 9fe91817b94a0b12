"""A scheduler that steps on a metric (issue 18, item 6): ReduceLROnPlateau is stepped after each epoch
with the validation loss the run selects on (trainer.select_by), after any warmup, and a resume
continues it exactly. The expected learning rates are worked out here from the losses in epochs.csv."""

from __future__ import annotations

import csv
import math

import pytest

from coupled_net.lifecycle import execute_run
from coupled_net.trainer import Trainer
from helpers import compose_cfg, read_results, run_cli
from helpers.scripted import scripted_validation

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.batch_size=16",
        "trainer.limit_batches=1"]
LR, FACTOR = 0.05, 0.5
# quickstart's cosine scheduler replaced by ReduceLROnPlateau: halve the lr after every epoch whose loss is
# not below the best so far (patience 0; threshold 0: "below" is plain <, as for the run's best epoch)
PLATEAU = ["scheduler=none", "scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
           "~scheduler.total_iters", f"scheduler.factor={FACTOR}", "+scheduler.patience=0", "+scheduler.threshold=0",
           f"optimizer.lr={LR}"]


def epoch_rows(run_dir) -> list[dict]:
    with open(run_dir / "epochs.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plateau_lrs(losses: list[float], warmup: int = 0) -> list[float]:
    """The lr of each epoch: warmup epoch k at k/(warmup+1) of LR; after it, LR halved after each epoch
    whose loss is not below the best loss since the warmup ended."""
    lrs, lr, best = [], LR, math.inf
    for epoch, loss in enumerate(losses, start=1):
        lrs.append(LR * epoch / (warmup + 1) if epoch <= warmup else lr)
        if epoch <= warmup:
            continue
        if loss < best:
            best = loss
        else:
            lr *= FACTOR
    return lrs


def test_a_reduce_on_plateau_run_through_the_cli_halves_the_lr_after_each_epoch_whose_val_loss_did_not_improve(
        tmp_path):
    proc = run_cli(*TINY, *PLATEAU, "trainer.epochs=3", "trainer.patience=3", f"hydra.run.dir={tmp_path / 'run'}",
                   f"dataset.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_results(tmp_path / "run")["status"] == "done"
    rows = epoch_rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == plateau_lrs([r["val_loss"] for r in rows])


@pytest.mark.parametrize("select_by, column", [("val_loss", "val_loss"), ("ke_val_loss", "ke_val_loss")])
def test_reduce_on_plateau_steps_on_the_loss_the_run_selects_by(tmp_path, monkeypatch, select_by, column):
    # the two losses improve in different epochs: the lr follows the selected one only
    scripted_validation(monkeypatch, val_losses=[3, 4, 2, 5, 1], ke_losses=[3, 2, 4, 1, 5])
    res = execute_run(compose_cfg(*TINY, *PLATEAU, "trainer.epochs=5", "trainer.patience=5",
                                  f"trainer.select_by={select_by}", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done", res["error"]
    rows = epoch_rows(tmp_path / "run")
    assert [r["lr"] for r in rows] == plateau_lrs([r[column] for r in rows])
    assert plateau_lrs([r["val_loss"] for r in rows]) != plateau_lrs([r["ke_val_loss"] for r in rows])


def test_reduce_on_plateau_after_a_warmup_sees_only_the_losses_after_it(tmp_path, monkeypatch):
    # epoch 3 (the first after the warmup) is worse than epoch 1, yet the plateau's first: the lr stays
    scripted_validation(monkeypatch, val_losses=[1, 2, 3, 4, 2, 5], ke_losses=[1, 2, 3, 4, 2, 5])
    res = execute_run(compose_cfg(*TINY, *PLATEAU, "scheduler.warmup_epochs=2", "trainer.epochs=6",
                                  "trainer.patience=6", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done", res["error"]
    rows = epoch_rows(tmp_path / "run")
    assert [r["lr"] for r in rows] == pytest.approx(plateau_lrs([r["val_loss"] for r in rows], warmup=2), rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 1])
def test_a_reduce_on_plateau_run_killed_and_resumed_keeps_the_best_loss_and_the_same_lrs(tmp_path, monkeypatch,
                                                                                        warmup):
    # after epoch 3 the best loss is epoch 2's; epoch 4 is worse than it (though better than nothing): a
    # resume that forgot the plateau's best would keep the lr for epoch 5
    scripted_validation(monkeypatch, val_losses=[3, 2, 4, 3, 1], ke_losses=[3, 2, 4, 3, 1])
    common = [*TINY, *PLATEAU, f"scheduler.warmup_epochs={warmup}", "trainer.epochs=5", "trainer.patience=5",
              f"dataset.root={tmp_path}"]
    real_save = Trainer._save_last

    def killed_after_epoch_3(self, progress, *args, **kwargs):
        real_save(self, progress, *args, **kwargs)
        if progress.epoch == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "_save_last", killed_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*common), tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "_save_last", real_save)
    assert execute_run(compose_cfg(*common), tmp_path / "resumed")["status"] == "done"
    execute_run(compose_cfg(*common), tmp_path / "straight")
    resumed, straight = epoch_rows(tmp_path / "resumed"), epoch_rows(tmp_path / "straight")
    expected = plateau_lrs([r["val_loss"] for r in resumed], warmup=warmup)
    assert [r["lr"] for r in resumed] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in straight] == [r["lr"] for r in resumed]
