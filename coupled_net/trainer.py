"""The epoch loop of the seed notebook, generalised (SPEC §2):

    train -> validate -> callbacks' on_before_ke -> equalize (KE) -> validate again
    -> callbacks' on_epoch_end -> monitoring (system.csv row)
    -> best model (by val loss before KE, or after with select_by=ke_val_loss) -> early stopping
    -> scheduler step -> last.pt (every last_every epochs; + a periodic copy) and best.pt, timed
    -> epochs.csv row (with that checkpoint_time_s and the callbacks' columns)

Training-loop callbacks (coupled_net.loopcallbacks) are started before the first epoch a process
trains (their columns join epochs.csv's, then on_fit_start) and see the best, equalized model once
its val/test metrics are in (callback_results: on_fit_end).

A scheduler whose step() takes a metric (ReduceLROnPlateau, or a user's own with a required argument)
is stepped with the selection metric: val_loss, or ke_val_loss with select_by=ke_val_loss.

The training step's recipe: cross-entropy with optional label smoothing (trainer.label_smoothing;
the training loss only: validation and test stay plain cross-entropy, so val_loss, the selection
metric and early stopping mean the same for every run) and optional gradient clipping to a global L2
norm (trainer.grad_clip_norm). Both off (0.0, None) leave the seed's step unchanged, bit for bit.

Losses and accuracies are accumulated on the device and read once per phase; timings are taken
after a device synchronize. Under DDP every rank runs this loop on its shard, sums are all-reduced,
and only rank 0 writes files."""

from __future__ import annotations

import inspect
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint
from .coupling import Coupling
from .distributed import World, all_gather_on_host, all_reduce_sum, barrier, broadcast_from_main, max_on_host
from .epochlog import EPOCH_COLUMNS, CsvLog
from .loopcallbacks import Context, LoopCallbacks
from .monitor import SystemMonitor
from .results import RunFiles
from .signals import RunInterrupted, StopGuard

log = logging.getLogger(__name__)
# Under DDP the ranks agree whether to stop (a pending signal on any rank) every this many training
# steps: one host-side flag all-reduce, measured 0.45-0.8 ms between 2 gloo ranks on a busy 2-core
# host, whose quickstart DDP steps take ~150 ms (0.3-0.5% if every step; <0.1% at 8). A signal then
# waits at most 7 more steps, far below SLURM's 120 s signal_delay_s for any step shorter than 15 s.
STOP_CHECK_EVERY = 8
REQUEUE_WAIT_S = 60  # a rank other than 0, after a requeue signal: how long it waits to be killed by the requeue


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Numerics:
    """trainer.precision (autocast; fp16 with a GradScaler) and trainer.channels_last."""

    def __init__(self, device: torch.device, precision: str = "fp32", channels_last: bool = False):
        self.device, self.dtype, self.channels_last = device, PRECISIONS[precision], channels_last
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    @classmethod
    def from_config(cls, tcfg, device: torch.device) -> "Numerics":
        return cls(device, tcfg.get("precision", "fp32"), bool(tcfg.get("channels_last", False)))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def steps_on_metric(scheduler) -> bool:
    """Does `scheduler.step` need a metric (a positional parameter without a default, as
    ReduceLROnPlateau's `metrics`)? Such a scheduler is stepped with the run's selection metric."""
    try:
        params = inspect.signature(scheduler.step).parameters.values()
    except (AttributeError, TypeError, ValueError):  # none, or a builtin without a signature: stepped plainly
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is inspect.Parameter.empty for p in params)


def _summed_over_ranks(sums: torch.Tensor, seen: int) -> list[float]:
    """Device-side sums and the host's sample count, added over all ranks; one read."""
    total = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64, device=sums.device)])
    all_reduce_sum(total)
    return total.tolist()


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, device: torch.device, numerics: Numerics | None = None) -> dict:
    """Per-sample mean loss, top-1 and top-5 accuracy (percent) over `batches` of (images, labels),
    summed over all ranks."""
    numerics = numerics or Numerics(device)
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, top-1 hits, top-5 hits
    seen = 0  # batch sizes are known on the host: no per-batch host-to-device copy
    for images, labels in batches:
        images = numerics.inputs(images)
        labels = labels.to(device, non_blocking=True)
        with numerics.autocast():
            outputs = model(images).float()
        hits = outputs.topk(min(5, outputs.size(1)), dim=1).indices == labels.unsqueeze(1)
        sums += torch.stack([F.cross_entropy(outputs, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        seen += labels.size(0)
    loss, top1, top5, seen = _summed_over_ranks(sums, seen)
    return {"loss": loss / seen, "top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch (and through a checkpoint)."""
    epoch: int = 0                      # epochs finished
    best_metric: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0                 # epochs since the selection metric last improved
    stopped_early: bool = False
    diverged_at: int | None = None
    elapsed_s: float = 0.0              # training time, summed over attempts (resumes)
    partial: dict | None = None         # a training epoch interrupted at a step boundary


class Trainer:
    """The epoch loop. Without `files` nothing is written: epoch rows are kept in `self.rows` and
    the best weights in memory, so a Trainer can be built and run in a unit test."""

    def __init__(self, *, model: nn.Module, coupling: Coupling, optimizer, scheduler, loaders: dict,
                 device: torch.device, epochs: int, patience: int = 15, select_by: str = "val_loss",
                 checkpoint_every: int | None = 30, last_every: int = 1, limit_batches: int | None = None,
                 label_smoothing: float = 0.0, grad_clip_norm: float | None = None, numerics: Numerics | None = None,
                 world: World = World(), train_model: nn.Module | None = None, files: RunFiles | None = None,
                 monitor: SystemMonitor | None = None, logger=None, progress_bars: bool = False,
                 guard: StopGuard | None = None, stamp: dict | None = None,
                 on_epoch_end: Callable[[LoopState], None] | None = None, callbacks: LoopCallbacks | None = None):
        self.model, self.coupling, self.optimizer, self.scheduler = model, coupling, optimizer, scheduler
        self.scheduler_takes_metric = steps_on_metric(scheduler)
        self.train_model = model if train_model is None else train_model  # DDP-wrapped and/or compiled
        self.loaders, self.device, self.world = loaders, device, world
        self.epochs, self.patience, self.select_by = epochs, patience, select_by
        self.checkpoint_every, self.limit = checkpoint_every, limit_batches  # checkpoint_every None: no periodic copies
        self.last_every = last_every  # epochs between last.pt writes (a stop signal still saves at once)
        self.label_smoothing, self.grad_clip_norm = label_smoothing, grad_clip_norm
        self.numerics = numerics or Numerics(device)
        self.files, self.monitor, self.logger = files, monitor, logger  # logger: a coupled_net.loggers.Loggers
        self.bars = progress_bars and world.is_main
        self.guard = guard or StopGuard()  # not entered: no handlers, never pending
        self.stamp = stamp or {}           # stored in every checkpoint (the run's fingerprint)
        self.on_epoch_end = on_epoch_end
        # training-loop callbacks (the `callbacks` config): called on every rank, rank 0's values recorded
        self.callbacks = callbacks or LoopCallbacks()
        self.ctx = Context(model=model, coupling=coupling, loaders=loaders, device=device,
                           run_dir=files.dir if files is not None else None)
        self._callbacks_started = False
        self.writes = files is not None and world.is_main
        self.rows: list[dict] = []
        self.best_state: dict | None = None
        self.system_log = CsvLog(files.dir / "system.csv", ["epoch", "time"] + monitor.columns,
                                 numeric=["epoch", "time"]) \
            if self.writes and monitor is not None else None  # one row an epoch (coupled_net.monitor)
        self._started, self._carried = time.perf_counter(), 0.0
        self._agreed_signal = 0  # the signal the ranks last agreed to stop on (0: none)
        self._saved_row: dict | None = None  # the epochs.csv row stored in the checkpoint a resume loaded

    # ---- one pass over the data ----------------------------------------------------------------

    def _batches(self, name: str, desc: str, done: int = 0):
        loader = self.loaders[name]
        n = len(loader) if self.limit is None else max(0, min(len(loader), self.limit - done))
        return tqdm(islice(loader, n), total=n, desc=desc, leave=False, disable=not self.bars, file=sys.stderr)

    def train_one_epoch(self, epoch: int, progress: LoopState) -> tuple[float, float]:
        """One pass over this rank's shard; resumes mid-epoch from progress.partial."""
        self.train_model.train()
        partial = progress.partial or {"epoch": epoch, "step": 0, "sums": [0.0, 0.0, 0.0]}
        step = partial["step"]
        self.loaders["train"].set_epoch(epoch, step)
        # a checkpoint's sums are over all ranks (see _stop_mid_epoch): rank 0 carries them, the others start at 0
        carried = partial["sums"] if self.world.is_main else [0.0, 0.0, 0.0]
        sums = torch.tensor(carried[:2], device=self.device, dtype=torch.float64)  # loss, correct
        seen = carried[2]
        scaler = self.numerics.scaler
        for images, labels in self._batches("train", f"epoch {epoch} train", done=step):
            images = self.numerics.inputs(images)
            labels = labels.to(self.device, non_blocking=True)
            with self.numerics.autocast():
                outputs = self.train_model(images).float()
            # label_smoothing=0.0 is F.cross_entropy's own default: the seed's loss, bit for bit
            loss = F.cross_entropy(outputs, labels, label_smoothing=self.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if self.grad_clip_norm is not None:
                self._clip_gradients()
            scaler.step(self.optimizer)
            scaler.update()
            if self.coupling.schedule == "step":
                self.coupling.equalize()
            n = labels.size(0)
            sums += torch.stack([loss.detach().double() * n, (outputs.detach().argmax(1) == labels).sum().double()])
            seen += n
            step += 1
            if self._stop_agreed(step):  # a safe point: the step is complete on every rank
                self._stop_mid_epoch(progress, epoch, step, sums, seen)
        progress.partial = None
        loss_sum, correct, seen = _summed_over_ranks(sums, seen)
        return loss_sum / seen, 100.0 * correct / seen

    def _clip_gradients(self) -> None:
        """Scale the gradients down to a global L2 norm of at most grad_clip_norm. Under DDP they are
        already all-reduced by backward() (the same on every rank: every rank clips alike); with fp16
        they are unscaled first, so the norm is the true one (scaler.step then does not unscale them
        again, and still skips the step if they hold an inf or NaN)."""
        self.numerics.scaler.unscale_(self.optimizer)  # a no-op without fp16 (the scaler is disabled)
        # self.model's parameters are the DDP-wrapped / compiled train_model's own
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)

    def _stop_agreed(self, step: int) -> bool:
        """Does a stop signal end training at this step? Alone: whenever one is pending. Under DDP
        every STOP_CHECK_EVERY steps, all ranks together (one CPU flag collective), so they stop at
        the same step whichever rank was signalled."""
        if not self.world.active:
            return self.guard.pending is not None
        return step % STOP_CHECK_EVERY == 0 and self._signal_on_any_rank() != 0

    def _signal_on_any_rank(self) -> int:
        """The signal pending on some rank (0: none), the same on every rank; remembered for _act_on_stop."""
        self._agreed_signal = max_on_host(self.guard.pending[1] if self.guard.pending else 0)
        return self._agreed_signal

    def _stop_mid_epoch(self, progress: LoopState, epoch: int, step: int, sums: torch.Tensor, seen: int) -> None:
        """last.pt at this step boundary (rank 0), then the signal is acted on. The epoch's running
        sums are stored added over all ranks, so a resume is exact whichever rank carries them."""
        loss_sum, correct, seen_all = _summed_over_ranks(sums, seen)
        progress.partial = {"epoch": epoch, "step": step, "sums": [loss_sum, correct, seen_all],
                            "elapsed_s": self._carried + time.perf_counter() - self._started}
        self._save_last(progress, periodic=False)
        barrier()  # last.pt is on disk before any rank exits (torchrun stops the others when one does)
        self._act_on_stop(f"at step {step} of epoch {epoch}")

    def _act_on_stop(self, where: str) -> None:
        """Requeue through submitit (rank 0 exits there) or end the run with RunInterrupted. A rank
        that has not (yet) got the signal another rank got acts on it all the same: a requeue must
        not hang on which rank SLURM's signal reached first."""
        pending = self.guard.pending
        if pending is None:
            signum = self._agreed_signal
            if signum not in self.guard.requeue_handlers:
                raise RunInterrupted(signum, f"{where} (signalled on another rank)")
            pending = self.guard.pending = ("requeue", signum, None)
        self.guard.release(where)  # returns only on a rank other than 0 after a requeue signal
        # rank 0 is requeueing the job, which kills every task; a task ending first with an error could
        # take rank 0 down with it (srun --kill-on-bad-exit) before the requeue: wait for that kill
        log.info("rank %d: waiting up to %d s for rank 0's requeue to end this task", self.world.rank,
                 REQUEUE_WAIT_S)
        time.sleep(REQUEUE_WAIT_S)
        raise RunInterrupted(pending[1], f"{where} (rank 0 was to requeue the job)")

    def evaluate_split(self, name: str, desc: str = "") -> dict:
        return evaluate_batches(self.model, self._batches(name, desc or name), self.device, self.numerics)

    def _timed(self, fn):
        synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        synchronize(self.device)
        return out, time.perf_counter() - start

    # ---- checkpoints -----------------------------------------------------------------------------

    def state(self, progress: LoopState, rng: list[dict], weights: dict | None = None,
              row: dict | None = None) -> dict:
        """last.pt's contents: `rng` every rank's generators (rank order), `weights` the model's
        (default: its live state_dict), `row` the epochs.csv row of the epoch it ends."""
        return checkpoint.training_state(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                         scaler=self.numerics.scaler, progress=asdict(progress), stamp=self.stamp,
                                         rng=rng, weights=weights, row=row)

    def load_state(self, ckpt: dict) -> LoopState:
        self._saved_row = ckpt.get("epoch_row")
        return LoopState(**checkpoint.restore_training(ckpt, model=self.model, optimizer=self.optimizer,
                                                       scheduler=self.scheduler, scaler=self.numerics.scaler,
                                                       rank=self.world.rank, device=self.device))

    def _last_due(self, progress: LoopState) -> bool:
        """Is last.pt written at the end of this epoch: every `last_every` epochs, at a periodic copy's
        epoch, and at the loop's last epoch (a run killed before its results.json replays nothing)."""
        epoch = progress.epoch
        return (epoch % self.last_every == 0 or epoch >= self.epochs or progress.stopped_early
                or progress.diverged_at is not None
                or (self.checkpoint_every is not None and epoch % self.checkpoint_every == 0))

    def _save_last(self, progress: LoopState, periodic: bool = True, weights: dict | None = None,
                   row: dict | None = None) -> None:
        """last.pt (rank 0) with every rank's generators: a collective, every rank calls it."""
        rng = all_gather_on_host(checkpoint.rng_state(self.device))
        if not self.writes:
            return
        checkpoint.save_torch(self.files.last, self.state(progress, rng, weights, row))
        if periodic and self.checkpoint_every is not None and progress.epoch % self.checkpoint_every == 0:
            shutil.copyfile(self.files.last, self.files.periodic(progress.epoch))

    def _save_best(self, epoch: int, weights: dict | None = None) -> None:
        """The equalized weights of the best epoch: best.pt (a plain state_dict; the fingerprint and
        the epoch in its `_metadata`, which load_state_dict ignores), or kept in memory without a run
        directory. `weights`: the model's, already copied off the device for last.pt."""
        state = self.model.state_dict() if weights is None else checkpoint.shallow_copy(weights)
        if not self.writes:
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
            return
        checkpoint.write_best(self.files.best, state, self.stamp.get("fingerprint"), epoch)

    def _save_epoch(self, progress: LoopState, improved: bool, row: dict) -> float:
        """The epoch's checkpoints: last.pt when due, best.pt when it improved, both from one copy of
        the weights on the host (one device-to-host transfer, and best.pt holds exactly last.pt's
        model). Returns the seconds they took (checkpoint_time_s). Every rank calls it."""
        start = time.perf_counter()
        due = self._last_due(progress)
        weights = checkpoint.host_weights(self.model) if self.writes and (due or improved) else None
        if due:
            # last.pt first: a kill before best.pt leaves last.pt saying this epoch is best, and its weights
            # are the best ones (nothing changes them in between), so reconcile_best rewrites best.pt from it
            self._save_last(progress, weights=weights, row=row)
        if improved:
            self._save_best(progress.epoch, weights)
        return time.perf_counter() - start

    def align_logs(self, progress: LoopState) -> None:
        """Before a resumed (or fresh) run trains on from `progress`: epochs.csv and system.csv keep the
        rows up to its epoch (rows written after that checkpoint are not this run's); the row of the
        checkpoint's own epoch, when a kill came after last.pt and before the row was appended, comes
        from the checkpoint (its checkpoint_time_s unknown: nan). Rank 0 only."""
        if not self.writes:
            return
        self.files.epochs.keep_epochs_upto(progress.epoch)
        if self.system_log is not None:
            self.system_log.keep_epochs_upto(progress.epoch)
        row = self._saved_row
        if row and row.get("epoch") == progress.epoch and not progress.partial and \
                progress.epoch not in {int(r["epoch"]) for r in self.files.epochs.rows()}:
            log.warning("epochs.csv lacks epoch %d (a kill came after its checkpoint): its row restored from "
                        "the checkpoint", progress.epoch)
            self.files.epochs.append({**row, "checkpoint_time_s": math.nan})

    def reconcile_best(self, progress: LoopState) -> None:
        """Make best.pt the weights of `progress.best_epoch` before training resumes from `progress`
        (the model holds that checkpoint's weights), whatever kill came between best.pt and last.pt:
        best.pt of an epoch the run replays is removed; one behind a last.pt that says its own epoch
        is best is rewritten from those weights; if the best weights are nowhere, the best is chosen
        again from the epochs still to run. Every rank calls it; rank 0 decides and writes."""
        if self.files is None:
            return
        forget = broadcast_from_main(self._reconcile_best_file(progress) if self.writes else False)
        if forget:
            progress.best_metric, progress.best_epoch = math.inf, None

    def _reconcile_best_file(self, progress: LoopState) -> bool:
        """Rank 0's part of reconcile_best; True: the best epoch's weights are lost."""
        path, want = self.files.best, progress.best_epoch
        if not path.exists():
            have = None
        else:
            try:
                have = checkpoint.best_epoch(path)
            except Exception as e:  # noqa: BLE001 - truncated or corrupt: as good as absent
                log.warning("%s is unreadable (%s): not kept", path, " ".join(str(e).split())[:200])
                path.unlink()
                have = None
        if have == want or have == "unknown":  # consistent, or written before best.pt recorded its epoch
            return False
        if want is not None and want == progress.epoch and not progress.partial:
            log.warning("%s holds epoch %s, the checkpoint says epoch %d is best (a kill came in between): "
                        "rewritten from the checkpoint's weights", path, have, want)
            self._save_best(want)
            return False
        if have is not None:
            log.warning("%s holds epoch %s, not the best epoch (%s) of the checkpoint the run resumes from (after "
                        "epoch %d): removed", path, have, want, progress.epoch)
            path.unlink()
        if want is None:
            return False
        log.warning("the weights of best epoch %d are in no file: the best is chosen again from epoch %d on",
                    want, progress.epoch + 1)
        return True

    def _record_system(self, epoch: int, phase: str) -> None:
        """phase "start": the monitor samples the machine and the run's GPU from now on; "end": until
        now, and the epoch's system.csv row is written (before its checkpoints: a kill after last.pt
        leaves the row, one before it leaves a row the resume drops with the epoch's)."""
        if self.system_log is None:
            return
        if phase == "start":
            self.monitor.begin_epoch()
        else:
            self.system_log.append({"epoch": epoch, "time": round(time.time(), 3), **self.monitor.end_epoch()})

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self, progress: LoopState) -> LoopState:
        """Epochs until `epochs`, early stopping or divergence. A stop signal is acted on at the next
        step boundary (mid-epoch checkpoint; under DDP the next STOP_CHECK_EVERY-th step, all ranks at
        the same one) or, when it comes during validation, after the epoch."""
        self._start_callbacks(progress)
        with self.guard.deferred():
            while progress.epoch < self.epochs and not progress.stopped_early and progress.diverged_at is None:
                self._one_epoch(progress)
                if self._signal_on_any_rank():  # a signal after the last step check, or during validation
                    if not self._last_due(progress):  # trainer.last_every skipped this epoch's last.pt
                        self._save_last(progress)
                    self._act_on_stop(f"after epoch {progress.epoch}")
        return progress

    def _start_callbacks(self, progress: LoopState) -> None:
        """Once per process, before its first epoch: the callbacks' columns join epochs.csv's (a file
        written without them gains them, its earlier rows empty), then on_fit_start."""
        if self._callbacks_started or not self.callbacks:
            return
        self._callbacks_started = True
        self.ctx.epoch = progress.epoch
        columns = self.callbacks.columns(self.ctx)
        if self.writes:
            self.files.epochs.columns += [c for c in columns if c not in self.files.epochs.columns]
        self.callbacks.fit_start(self.ctx)

    def _one_epoch(self, progress: LoopState) -> None:
        epoch = progress.epoch + 1
        self._started = started = time.perf_counter()
        self._record_system(epoch, "start")
        lr = self.optimizer.param_groups[0]["lr"]
        self._carried = carried = (progress.partial or {}).get("elapsed_s", 0.0)  # before an interruption

        ((train_loss, train_acc), val), epoch_time = self._timed(
            lambda: (self.train_one_epoch(epoch, progress), self.evaluate_split("val", f"epoch {epoch} val")))
        self.ctx.epoch = epoch
        probed = self.callbacks.before_ke(self.ctx)  # the weights as training left them, before this KE
        _, ke_time = self._timed(self.coupling.equalize)
        ke_val, ke_eval_extra = self._timed(lambda: self.evaluate_split("val", f"epoch {epoch} val after KE"))

        row = dict(zip(EPOCH_COLUMNS, [
            epoch, lr, train_loss, train_acc, val["loss"], val["top1"], ke_val["loss"], ke_val["top1"],
            round(carried + epoch_time, 6), round(ke_time, 9), round(ke_time + ke_eval_extra, 6)]))
        row.update(probed)
        row.update(self.callbacks.epoch_end(self.ctx, row))
        self._record_system(epoch, "end")

        progress.epoch = epoch
        improved = False
        if not math.isfinite(train_loss):
            progress.diverged_at = epoch
            log.error("training loss is %s at epoch %d: stopping (diverged)", train_loss, epoch)
        else:
            metric = val["loss"] if self.select_by == "val_loss" else ke_val["loss"]
            if metric < progress.best_metric:  # the weights are the equalized ones, as in the seed
                progress.best_metric, progress.best_epoch, progress.bad_epochs = metric, epoch, 0
                improved = True
            else:
                progress.bad_epochs += 1
            if progress.bad_epochs >= self.patience:
                progress.stopped_early = True
                log.info("early stopping: %s has not improved for %d epochs", self.select_by, self.patience)
            elif self.scheduler_takes_metric:  # ReduceLROnPlateau: on the metric the run selects by
                self.scheduler.step(metric)
            else:
                self.scheduler.step()
        progress.elapsed_s += carried + time.perf_counter() - started
        # the row follows its checkpoints, to carry their time; last.pt holds the row (without that time)
        # for a kill in between (align_logs)
        row["checkpoint_time_s"] = round(self._save_epoch(progress, improved, row), 6)
        progress.elapsed_s += row["checkpoint_time_s"]
        self.rows.append(row)
        if self.writes:
            self.files.epochs.append(row)
        if self.world.is_main and self.logger is not None:
            self.logger.log_epoch(row)
        log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  "
                 "after KE: val loss %.4f acc %.2f%%  (%.1fs, KE %.2gs, checkpoints %.2gs)", epoch, self.epochs, lr,
                 train_loss, train_acc, val["loss"], val["top1"], ke_val["loss"], ke_val["top1"], epoch_time, ke_time,
                 row["checkpoint_time_s"])
        if self.on_epoch_end is not None:
            self.on_epoch_end(progress)

    def final_metrics(self) -> dict:
        """The best model, equalized, on validation and test (the seed's last cells, test added)."""
        barrier()  # rank 0 has written best.pt
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        elif self.files is not None and self.files.best.exists():
            self.model.load_state_dict(checkpoint.read_best(self.files.best, self.device))
        self.coupling.equalize()
        return {split: self.evaluate_split(split, f"final {split}") for split in ("val", "test")}

    def callback_results(self, metrics: dict) -> dict:
        """The callbacks' on_fit_end on the model final_metrics() left (the best, equalized): {name: results}."""
        return self.callbacks.fit_end(self.ctx, metrics)
