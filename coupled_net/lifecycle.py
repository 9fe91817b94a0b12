"""One run's lifecycle (SPEC §5): the run directory's owner (coupled_net.rundir) trains in it,
resumes it, or leaves it as it is, and records how it ended.

    execute_run(cfg, run_dir)
      identity = identity_of(cfg)                 the fingerprint (coupled_net.identify)
      claim:  coupled_net.rundir: examine (read-only) -> lock .lock -> examine again -> own it
              a run of another fingerprint, or a directory in use: RunRefused, no byte changed
              a finished run of this fingerprint: nothing to do, no byte changed
      build:  coupled_net.build (validate once, model, data, optimizer, trackers, ...)
      train:  Trainer.fit, resuming from the newest readable checkpoint of this fingerprint
      finish: results.json `done` / `diverged` / `failed` / `interrupted`

Each run catches its own failures so a sweep goes on (SPEC §8); a stop signal ends it with
`status: interrupted` (coupled_net.signals)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchinfo import summary

from . import checkpoint
from .build import build, build_callbacks, build_trackers, make_trainer, resolve
from .coupling import Coupling
from .distributed import init_world
from .errors import ConfigError, DatasetUnavailable, RunFault, one_line
from .identify import identity_of
from .identity import model_name
from .loggers import final_metrics
from .logs import FILE_ONLY
from .machine import provenance
from .monitor import SystemMonitor
from .results import epoch_fields, new_results, now_iso
from .rundir import RunDirectory, Verdict, owner_record
from .signals import RunInterrupted, StopGuard
from .storage import disk_full, write_text
from .trainer import LoopState

log = logging.getLogger(__name__)


def write_model_summary(model: torch.nn.Module, channels: int, size: int, coupling: Coupling, path: Path) -> None:
    # on the model's own device: torchinfo moves the model to the device it is given (a "cpu" here once
    # left every GPU run's model on the CPU, its batches on the GPU)
    # The model's first forward on real tensors (the checks ran it on the meta device only): an error
    # there is the model's own, which torchinfo wraps in "Failed to run torchinfo. See above stack
    # traces" with nothing above; the run fails with the model's error in one line, its traceback in train.log
    device = next(model.parameters()).device
    was_training = model.training
    batch = torch.zeros(1, channels, size, size, device=device)
    try:
        stats = summary(model.eval(), input_data=batch, device=device, verbose=0,
                        col_names=("output_size", "num_params", "kernel_size"), depth=4)
    except Exception as e:  # noqa: BLE001 - whatever the model raised
        own = e.__cause__ if e.__cause__ is not None else e  # torchinfo raises its RuntimeError from the model's
        log.error("model forward failed:\n%s", "".join(traceback.format_exception(own)), extra=FILE_ONLY)
        raise RunFault(f"model forward failed on a {'x'.join(map(str, batch.shape))} batch: {one_line(own)}") from own
    finally:
        model.train(was_training)
    text = f"{stats}\n\ncoupled layer(s): {', '.join(coupling.layer_paths)}; alpha={coupling.alpha}\n"
    write_text(path, text)


def log_config(cfg: DictConfig, resume: int) -> None:
    """The whole resolved config (after validation filled what follows from the data) into train.log at
    every start, so the log alone says what ran; a resume's under its own header. Not on the terminal:
    the run's one-line summary is there, `--cfg job` prints the tree."""
    header = f"resumed from a checkpoint (resume #{resume})" if resume else "started"
    log.info("run %s; resolved config:\n%s", header, OmegaConf.to_yaml(cfg, resolve=True).rstrip(), extra=FILE_ONLY)


def gather_digests(coupling: Coupling) -> list[str]:
    digest = hashlib.sha256()
    for _, conv in coupling.layers:
        digest.update(conv.weight.detach().cpu().numpy().tobytes())
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, digest.hexdigest()[:16])
    return out


def execute_run(cfg: DictConfig, run_dir: str | Path, hydra_files: dict[str, str] | None = None) -> dict:
    """Train (or resume, or skip as finished) the run described by `cfg` in `run_dir`; returns its
    results.json. Raises RunRefused (nothing changed), ConfigError / DatasetUnavailable (bad input,
    recorded as failed, before any training) and RunInterrupted (recorded as interrupted).
    `hydra_files` (name -> text) are written into `.hydra/` once the directory is this run's."""
    identity = identity_of(cfg)
    world = init_world(str(cfg.trainer.get("device", "auto")))
    with StopGuard() as guard, RunDirectory(Path(run_dir), identity, world) as rd:
        verdict = rd.claim(hydra_files)
        if verdict.kind == "done":
            log.info("%s already holds a finished run (status: %s); nothing to do", rd.files.dir,
                     verdict.results["status"])
            return verdict.results
        return _train(cfg, rd, verdict, guard)


def _train(cfg: DictConfig, rd: RunDirectory, verdict: Verdict, guard: StopGuard) -> dict:
    files, world = rd.files, rd.world
    ckpt = verdict.checkpoint
    progress = LoopState(**checkpoint.saved_progress(ckpt))
    previous = verdict.results if verdict.results and rd.identity.matches(verdict.results) \
        else {}
    resumes = int(previous.get("resumes") or 0) + (ckpt is not None)
    results = new_results(cfg, rd.identity, owner=owner_record(), resumes=resumes, world_size=world.size,
                          provenance=provenance(None, run_dir=files.dir if world.is_main else None))
    rd.start({**results, "epochs_run": progress.epoch, "best_epoch": progress.best_epoch})
    monitor, trainer, logger = None, None, None
    try:
        spec = resolve(cfg, world)
        if world.is_main:
            log_config(cfg, resumes if ckpt is not None else 0)
        parts = build(spec)
        rd.write(coupled_layers=parts.coupling.layer_paths,  # git_diff: saved once per start, above
                 provenance={**rd.results["provenance"], **provenance(spec.device)})
        monitor = SystemMonitor(spec.device)  # this rank's GPU (by its UUID), or none
        bars = {"auto": os.isatty(2)}.get(str(cfg.trainer.progress).lower(), bool(cfg.trainer.progress))
        logger = build_trackers(cfg, files.dir, rd.identity) if world.is_main else None
        trainer = make_trainer(spec, parts, files=files, monitor=monitor, logger=logger, progress_bars=bars,
                               guard=guard, stamp={"fingerprint": rd.identity.fingerprint,
                                                   "identity": rd.identity.keys},
                               on_epoch_end=lambda p: rd.write(epochs_run=p.epoch, best_epoch=p.best_epoch),
                               callbacks=build_callbacks(cfg))
        if ckpt is not None:
            misfit = checkpoint.misfit(parts.model, ckpt.get("model"))
            if misfit:  # the same fingerprint, yet another architecture: the model code changed since
                raise RunFault(f"{verdict.checkpoint_path} cannot be loaded into this model ({misfit}): it was "
                               "written by another version of the model; move checkpoints/ away to start over")
            progress = trainer.load_state(ckpt)
            where = f"epoch {progress.epoch}" if not progress.partial else \
                f"step {progress.partial['step']} of epoch {progress.partial['epoch']}"
            log.info("resuming from %s after %s (resume #%d)", verdict.checkpoint_path, where, resumes)
        ckpt = verdict.checkpoint = None  # the memory-mapped file is not needed any more
        trainer.reconcile_best(progress)  # best.pt of this checkpoint's best epoch, whatever kill came between
        trainer.align_logs(progress)  # rows written after that checkpoint (or any, from scratch) are not this run's
        if world.is_main:
            write_model_summary(parts.model, cfg.dataset.channels, cfg.model.input_size, parts.coupling,
                                files.summary)
        log.info("run %s: %s on %s, alpha=%d (%s, %s) on %s, %d threads, %d workers, %d process(es)", files.dir,
                 model_name(cfg.model), cfg.dataset.name, parts.coupling.alpha, parts.coupling.mode,
                 parts.coupling.schedule, rd.results["provenance"]["device"], spec.threads, spec.workers, world.size)
        progress = trainer.fit(progress)
        final_start = time.perf_counter()
        metrics = trainer.final_metrics() if progress.best_epoch is not None else None
        probed = trainer.callback_results(metrics) if metrics else {}  # on the best, equalized model
        progress.elapsed_s += time.perf_counter() - final_start
        status, error = "done", None
        if progress.diverged_at is not None:
            status, error = "diverged", f"training loss became non-finite at epoch {progress.diverged_at}"
        if world.active:  # evidence that equalization kept every rank's coupled layers identical
            rd.results["coupled_layer_digest_per_rank"] = gather_digests(parts.coupling)
    except (ConfigError, DatasetUnavailable, RunFault) as e:  # the entry point reports the line
        log.error("%s", e, extra=FILE_ONLY)
        _record_failure(rd, str(e))
        raise
    except RunInterrupted as e:
        rd.write(status="interrupted", error=f"{e}; the same command resumes it", finished_at=now_iso(),
                 epochs_run=progress.epoch, best_epoch=progress.best_epoch)
        raise
    except Exception as e:  # noqa: BLE001 - recorded, logged, and the sweep goes on
        log.error("run failed:\n%s", traceback.format_exc(), extra=FILE_ONLY)  # the terminal gets one line
        return _record_failure(rd, describe_fault(e))
    except BaseException:  # a kill-like end (KeyboardInterrupt): the trackers are closed, their runs left open
        if logger is not None:
            logger.close()
            logger = None
        raise
    finally:
        if monitor is not None:
            monitor.close()
        if logger is not None and rd.results.get("status") != "running":  # failed / interrupted: its last word
            finish_trackers(logger, rd.results)

    if not world.is_main:
        return dict(rd.results)
    try:
        results = rd.write(status=status, error=error, metrics=metrics, callbacks=probed,
                           stopped_early=progress.stopped_early,
                           epochs_run=progress.epoch, best_epoch=progress.best_epoch,
                           total_time_s=round(progress.elapsed_s, 3), finished_at=now_iso(),
                           **epoch_fields(files.dir),
                           **monitor.run_peaks(trainer.system_log.rows() if trainer.system_log is not None else ()))
    finally:
        if logger is not None:
            finish_trackers(logger, rd.results)
    if metrics:
        log.info("%s: best epoch %s; val top-1 %.2f%% top-5 %.2f%%; test top-1 %.2f%% top-5 %.2f%% (after KE)",
                 status, progress.best_epoch, metrics["val"]["top1"], metrics["val"]["top5"],
                 metrics["test"]["top1"], metrics["test"]["top5"])
    return results


def describe_fault(e: BaseException) -> str:
    """One line for a failure: a full disk says so, with where and how much is free."""
    full = disk_full(e)
    return full if full else one_line(e)


def _record_failure(rd: RunDirectory, error: str) -> dict:
    """results.json says `failed` with the reason; when even that cannot be written (a full disk),
    the reason still reaches the terminal."""
    try:
        return rd.write(status="failed", error=error, finished_at=now_iso())
    except OSError as e:
        raise RunFault(f"{error}; and results.json could not be updated ({describe_fault(e)})") from None


def finish_trackers(logger, results: dict) -> None:
    """results.json's final word (metrics when there are any, best epoch, status) to the trackers; then
    they are closed. An interrupted run has none yet: its trackers' runs end as killed, and the resume
    continues them to their final word."""
    if results.get("status") != "interrupted":
        logger.log_final(final_metrics(results))
    logger.close()
