"""The epoch loop of the seed notebook, generalised (SPEC §2):

    train -> validate -> equalize (KE) -> validate again -> epochs.csv row -> monitoring
    -> best model (by val loss before KE, or after with select_by=ke_val_loss) -> early stopping
    -> scheduler step -> last.pt (+ a periodic copy)

Losses and accuracies are accumulated on the device and read once per phase; timings are taken
after a device synchronize."""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .coupling import Coupling
from .data import EpochLoader
from .loggers import NullLogger
from .monitor import SystemMonitor
from .results import EPOCH_COLUMNS, CsvLog, RunFiles, save_torch

log = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device) -> dict:
    """Per-sample mean loss, top-1 and top-5 accuracy (percent) over `batches` of (images, labels)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.int64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        outputs = model(images)
        loss_sum += F.cross_entropy(outputs, labels, reduction="sum")
        hits = outputs.topk(min(5, outputs.size(1)), dim=1).indices == labels.unsqueeze(1)
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        seen += labels.size(0)
    return {"loss": loss_sum.item() / seen, "top1": 100.0 * top1.item() / seen, "top5": 100.0 * top5.item() / seen}


@dataclass
class Progress:
    """What the loop carries from epoch to epoch (and through a checkpoint)."""
    epoch: int = 0                      # epochs finished
    best_metric: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0                 # epochs since the selection metric last improved
    stopped_early: bool = False
    diverged_at: int | None = None
    elapsed_s: float = 0.0              # training time, summed over attempts (resumes)


class Trainer:
    def __init__(self, model: nn.Module, coupling: Coupling, optimizer, scheduler, loaders: dict[str, EpochLoader],
                 device: torch.device, tcfg, files: RunFiles, monitor: SystemMonitor, progress_bars: bool,
                 logger=None):
        self.model, self.coupling, self.optimizer, self.scheduler = model, coupling, optimizer, scheduler
        self.loaders, self.device, self.cfg, self.files = loaders, device, tcfg, files
        self.monitor, self.bars = monitor, progress_bars
        self.logger = logger or NullLogger()
        self.system_log = CsvLog(files.dir / "system.csv", ["epoch", "phase", "time"] + monitor.columns)
        self.limit = tcfg.limit_batches

    # ---- one pass over the data ----------------------------------------------------------------

    def _batches(self, name: str, desc: str):
        loader = self.loaders[name]
        n = len(loader) if self.limit is None else min(len(loader), self.limit)
        batches = loader if self.limit is None else islice(loader, self.limit)
        return tqdm(batches, total=n, desc=desc, leave=False, disable=not self.bars, file=sys.stderr)

    def train_one_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        self.loaders["train"].set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        for images, labels in self._batches("train", f"epoch {epoch} train"):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            outputs = self.model(images)
            loss = F.cross_entropy(outputs, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.coupling.schedule == "step":
                self.coupling.equalize()
            loss_sum += loss.detach() * labels.size(0)
            correct += (outputs.detach().argmax(1) == labels).sum()
            seen += labels.size(0)
        return loss_sum.item() / seen, 100.0 * correct.item() / seen

    def evaluate(self, name: str, desc: str = "") -> dict:
        return evaluate(self.model, self._batches(name, desc or name), self.device)

    def _timed(self, fn):
        synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        synchronize(self.device)
        return out, time.perf_counter() - start

    # ---- checkpoints -----------------------------------------------------------------------------

    def state(self, progress: Progress) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": None, "progress": progress.__dict__,
                "rng": rng_state()}

    def load_state(self, ckpt: dict) -> Progress:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        return Progress(**ckpt["progress"])

    def _save_last(self, progress: Progress) -> None:
        save_torch(self.files.last, self.state(progress))
        if progress.epoch % self.cfg.checkpoint_every == 0:
            shutil.copyfile(self.files.last, self.files.periodic(progress.epoch))

    def _record_system(self, epoch: int, phase: str) -> None:
        self.system_log.append({"epoch": epoch, "phase": phase, "time": round(time.time(), 3),
                                **self.monitor.sample()})

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self, progress: Progress) -> Progress:
        cfg = self.cfg
        while progress.epoch < cfg.epochs and not progress.stopped_early and progress.diverged_at is None:
            epoch = progress.epoch + 1
            started = time.perf_counter()
            self._record_system(epoch, "start")
            lr = self.optimizer.param_groups[0]["lr"]

            ((train_loss, train_acc), val), epoch_time = self._timed(
                lambda: (self.train_one_epoch(epoch), self.evaluate("val", f"epoch {epoch} val")))
            _, ke_time = self._timed(self.coupling.equalize)
            ke_val, ke_eval_extra = self._timed(lambda: self.evaluate("val", f"epoch {epoch} val after KE"))

            row = dict(zip(EPOCH_COLUMNS, [
                epoch, lr, train_loss, train_acc, val["loss"], val["top1"], ke_val["loss"], ke_val["top1"],
                round(epoch_time, 6), round(ke_time, 9), round(ke_time + ke_eval_extra, 6)]))
            self.files.epochs.append(row)
            self.logger.log_epoch(row)
            log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  "
                     "after KE: val loss %.4f acc %.2f%%  (%.1fs, KE %.2gs)", epoch, cfg.epochs, lr, train_loss,
                     train_acc, val["loss"], val["top1"], ke_val["loss"], ke_val["top1"], epoch_time, ke_time)
            self._record_system(epoch, "end")

            progress.epoch = epoch
            if not math.isfinite(train_loss):
                progress.diverged_at = epoch
                log.error("training loss is %s at epoch %d: stopping (diverged)", train_loss, epoch)
            else:
                metric = val["loss"] if cfg.select_by == "val_loss" else ke_val["loss"]
                if metric < progress.best_metric:  # the weights are the equalized ones, as in the seed
                    progress.best_metric, progress.best_epoch, progress.bad_epochs = metric, epoch, 0
                    save_torch(self.files.best, self.model.state_dict())
                else:
                    progress.bad_epochs += 1
                if progress.bad_epochs >= cfg.patience:
                    progress.stopped_early = True
                    log.info("early stopping: %s has not improved for %d epochs", cfg.select_by, cfg.patience)
                else:
                    self.scheduler.step()
            progress.elapsed_s += time.perf_counter() - started
            self._save_last(progress)
        return progress

    def final_metrics(self) -> dict:
        """The best model, equalized, on validation and test (the seed's last cells, test added)."""
        if self.files.best.exists():
            self.model.load_state_dict(torch.load(self.files.best, map_location=self.device, weights_only=True))
        self.coupling.equalize()
        return {split: self.evaluate(split, f"final {split}") for split in ("val", "test")}
