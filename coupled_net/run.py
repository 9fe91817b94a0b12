"""One run directory's lifecycle (SPEC §5): identity, ownership, resume, status, results.

    run(cfg, run_dir)
      identity = identity_of(cfg)                 the fingerprint (coupled_net.identity)
      claim:  inspect (read-only) -> lock .lock -> inspect again -> take ownership
              a run of another fingerprint, or a directory in use: RunRefused, no byte changed
              a finished run of this fingerprint: nothing to do, no byte changed
      build:  coupled_net.build (validate once, model, data, optimizer, ...)
      train:  Trainer.fit, resuming from the newest readable checkpoint of this fingerprint
      finish: results.json `done` / `diverged` / `failed` / `interrupted`

Each run catches its own failures so a sweep goes on (SPEC §8); a stop signal ends it with
`status: interrupted` (coupled_net.signals)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from .build import build, make_trainer, resolve
from .coupling import Coupling
from .distributed import World, init_world
from .errors import ConfigError, DatasetUnavailable, RunFault, one_line
from .evaluate import misfit as checkpoint_misfit
from .identity import Identity, differences, identity_of, model_name
from .logs import FILE_ONLY, claim_file_logs
from .monitor import SystemMonitor
from .results import FINISHED, RunFiles, atomic_write, disk_full, epoch_aggregates, new_results, now_iso, \
    provenance, slurm_job_id
from .signals import RunInterrupted, StopGuard
from .trainer import Progress

log = logging.getLogger(__name__)
HEARTBEAT_S = 300           # results.json's heartbeat_at is refreshed at least this often while a run lives
SAME_JOB_LOCK_WAIT_S = 120  # a requeued SLURM job waits this long for its previous incarnation's lock


class RunRefused(RuntimeError):
    """This process may not run in this directory: it holds a run of another config, or is in use."""


# ---- what a directory holds --------------------------------------------------------------------

@dataclass
class Verdict:
    kind: str                        # new | resume | done | conflict
    results: dict | None = None      # results.json as found
    problem: str = ""                # conflict: why, naming the differing keys
    checkpoint: dict | None = None   # resume: the newest readable checkpoint of this fingerprint
    checkpoint_path: Path | None = None


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, memory-mapped on the CPU (cheap to open just to read its fingerprint)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def resume_point(files: RunFiles) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint: last.pt, else the newest periodic one. An unreadable file (a
    kill mid-write on a filesystem without atomic rename, a full disk) is skipped with a warning
    rather than crashing the run again at every restart. Reads only."""
    candidates = [files.last, *sorted(files.checkpoints.glob("epoch_*.pt"), reverse=True)]
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            return read_checkpoint(path), path
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: try the next one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, one_line(e, 200))
    if existing:
        log.warning("no readable checkpoint in %s: starting from scratch", files.checkpoints)
    return None, None


def _holds_training(files: RunFiles, results: dict | None) -> bool:
    """Has anything been trained here? A run that failed before its first epoch has not."""
    if results and (results.get("status") in FINISHED or (results.get("epochs_run") or 0) > 0):
        return True
    return files.last.is_file() or any(files.checkpoints.glob("epoch_*.pt")) or bool(files.epochs.rows())


def inspect(run_dir: Path, identity: Identity, checkpoint: bool = True) -> Verdict:
    """What `run_dir` holds, compared with `identity`; reads only. With `checkpoint`, the newest
    readable checkpoint's fingerprint is compared too (and the checkpoint kept for resuming)."""
    files = RunFiles(run_dir)
    results = files.read_results()
    results = results if isinstance(results, dict) else None
    trained = _holds_training(files, results)
    stored = (results or {}).get("fingerprint")
    if trained and results is not None and stored != identity.fingerprint:
        return Verdict("conflict", results, _mismatch("results.json", results, identity))
    if stored == identity.fingerprint and results.get("status") in FINISHED:
        return Verdict("done", results)
    if checkpoint:
        ckpt, path = resume_point(files)
        if ckpt is not None:
            if ckpt.get("fingerprint") != identity.fingerprint:
                return Verdict("conflict", results, _mismatch(f"checkpoints/{path.name}", ckpt, identity))
            return Verdict("resume", results, checkpoint=ckpt, checkpoint_path=path)
    return Verdict("resume" if trained else "new", results)


def _mismatch(where: str, record: dict, identity: Identity) -> str:
    if not record.get("fingerprint"):
        return f"{where} has no fingerprint (written by an older coupled_net): its config cannot be checked"
    diff = differences(record.get("identity") or {}, identity.keys)
    return f"{where} is a run of another config: {'; '.join(diff) or 'fingerprint ' + record['fingerprint']}"


# ---- ownership -----------------------------------------------------------------------------------

def owner_record() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(),
            "process_started": psutil.Process().create_time(), "since": now_iso()}


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process (it has not recorded itself yet)"
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{job}, since {owner.get('since')}"


class RunLock:
    """An exclusive flock on `<run dir>/.lock`, held for the life of the process that trains there;
    the kernel releases it on any death (SIGKILL included). The holder writes who it is into the
    file once it owns the directory, so a refused process can name it."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def holder(self) -> dict | None:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock or raise RunRefused naming its holder. A holder that is this very SLURM job
        (a requeue whose previous incarnation is still being torn down) is waited for up to `wait_s`."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                pass
            except OSError as e:  # ENOLCK: a filesystem without locks (NFS mounted nolock)
                log.warning("cannot lock %s (%s): a second process starting in this directory would not be "
                            "stopped", self.path, e.strerror)
                self.fd = fd
                return
            holder = self.holder()
            mine = slurm_job_id()
            if mine and holder and holder.get("slurm_job_id") == mine and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            os.close(fd)
            raise RunRefused(f"{self.path.parent}: in use by {describe_owner(holder)}; "
                             "wait for it to end, or stop it, then start again")

    def record(self, owner: dict) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(owner) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class RunDirectory:
    """The owner's handle on one run directory: claim it, keep results.json (and its heartbeat)
    current, release it. Under DDP rank 0 claims and holds the lock; the other ranks follow its verdict."""

    def __init__(self, path: Path, identity: Identity, world: World = World()):
        self.files, self.identity, self.world = RunFiles(path), identity, world
        self.lock = RunLock(self.files.lock)
        self.results: dict | None = None
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        self.lock.release()

    # -- claiming

    def claim(self, hydra_files: dict[str, str] | None = None) -> Verdict:
        """Decide (rank 0) and agree (all ranks): a refusal raises RunRefused, `done` changes nothing,
        otherwise this process owns the directory and the verdict says where to resume from."""
        decision: list = [None, ""]
        if self.world.is_main:
            try:
                verdict = self._claim(hydra_files)
                decision = [verdict.kind, ""]
            except RunRefused as e:
                decision = ["refused", str(e)]
        if self.world.active:
            import torch.distributed as dist

            dist.broadcast_object_list(decision, src=0)
        kind, problem = decision
        if kind == "refused":
            raise RunRefused(problem)
        if not self.world.is_main:  # rank 0 owns the directory; the others read the same checkpoint
            verdict = inspect(self.files.dir, self.identity, checkpoint=kind != "done")
        return verdict

    def _claim(self, hydra_files: dict[str, str] | None) -> Verdict:
        quick = inspect(self.files.dir, self.identity)  # refuse or skip without locking (nor writing)
        if quick.kind in ("conflict", "done"):
            return self._refuse_or_skip(quick)
        quick.checkpoint = None
        self.files.dir.mkdir(parents=True, exist_ok=True)
        created = not self.lock.path.exists()
        self.lock.acquire(wait_s=SAME_JOB_LOCK_WAIT_S)
        verdict = inspect(self.files.dir, self.identity)  # under the lock: authoritative
        if verdict.kind in ("conflict", "done"):  # another process got here first
            if created:
                self.lock.path.unlink(missing_ok=True)
            self.lock.release()
            return self._refuse_or_skip(verdict)
        # this process owns the directory from here on
        self.lock.record(owner_record())
        claim_file_logs(self.files.dir)
        log.info("%s: run %s owned by pid %d on %s", self.files.dir, self.identity.fingerprint, os.getpid(),
                 socket.gethostname())
        for name, text in (hydra_files or {}).items():
            atomic_write(self.files.hydra / name, lambda f, t=text: f.write(t.encode()))
        for stale in self.files.checkpoints.glob(".*.tmp"):  # temp files of writes a kill interrupted
            stale.unlink(missing_ok=True)
        return verdict

    def _refuse_or_skip(self, verdict: Verdict) -> Verdict:
        if verdict.kind == "conflict":
            raise RunRefused(f"{self.files.dir}: {verdict.problem}; choose another directory, or start it with "
                             "the config it was made with")
        return verdict

    # -- results.json

    def write(self, **fields) -> dict:
        """Update results.json (rank 0; atomic); `heartbeat_at` is refreshed with every write."""
        with self._io:
            self.results.update(fields, heartbeat_at=now_iso())
            if self.world.is_main:
                self.files.write_results(self.results)
            return dict(self.results)

    def start(self, results: dict) -> None:
        self.results = results
        self.write()
        if self.world.is_main and self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.write()
            except Exception as e:  # noqa: BLE001 - a full disk must not kill the run from this thread
                log.warning("could not refresh the heartbeat in %s: %s", self.files.results, one_line(e, 200))


# ---- one run ---------------------------------------------------------------------------------------

def write_model_summary(model: torch.nn.Module, channels: int, size: int, coupling: Coupling, path: Path) -> None:
    from torchinfo import summary

    # on the model's own device: torchinfo moves the model to the device it is given (a "cpu" here once
    # left every GPU run's model on the CPU, its batches on the GPU)
    device = next(model.parameters()).device
    was_training = model.training
    stats = summary(model.eval(), input_data=torch.zeros(1, channels, size, size, device=device), device=device,
                    verbose=0, col_names=("output_size", "num_params", "kernel_size"), depth=4)
    model.train(was_training)
    text = f"{stats}\n\ncoupled layer(s): {', '.join(coupling.layer_paths)}; alpha={coupling.alpha}\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def gather_digests(coupling: Coupling) -> list[str]:
    import torch.distributed as dist

    digest = hashlib.sha256()
    for _, conv in coupling.layers:
        digest.update(conv.weight.detach().cpu().numpy().tobytes())
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, digest.hexdigest()[:16])
    return out


def run(cfg: DictConfig, run_dir: str | Path, hydra_files: dict[str, str] | None = None) -> dict:
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
    progress = Progress(**ckpt["progress"]) if ckpt is not None else Progress()
    previous = verdict.results if verdict.results and verdict.results.get("fingerprint") == rd.identity.fingerprint \
        else {}
    resumes = int(previous.get("resumes") or 0) + (ckpt is not None)
    results = new_results(cfg, rd.identity, owner=owner_record(), resumes=resumes, world_size=world.size,
                          provenance=provenance(None))
    rd.start({**results, "epochs_run": progress.epoch, "best_epoch": progress.best_epoch})
    monitor, trainer, logger = None, None, None
    try:
        spec = resolve(cfg, world)
        parts = build(spec)
        rd.write(coupled_layers=parts.coupling.layer_paths, provenance=provenance(spec.device))
        monitor = SystemMonitor()
        bars = {"auto": os.isatty(2)}.get(str(cfg.trainer.progress).lower(), bool(cfg.trainer.progress))
        logger = build_logger(cfg, files, rd.identity) if world.is_main else None
        trainer = make_trainer(spec, parts, files=files, monitor=monitor, logger=logger, progress_bars=bars,
                               guard=guard, stamp={"fingerprint": rd.identity.fingerprint,
                                                   "identity": rd.identity.keys},
                               on_epoch_end=lambda p: rd.write(epochs_run=p.epoch, best_epoch=p.best_epoch))
        if ckpt is not None:
            misfit = checkpoint_misfit(parts.model, ckpt.get("model"))
            if misfit:  # the same fingerprint, yet another architecture: the model code changed since
                raise RunFault(f"{verdict.checkpoint_path} cannot be loaded into this model ({misfit}): it was "
                               "written by another version of the model; move checkpoints/ away to start over")
            progress = trainer.load_state(ckpt)
            where = f"epoch {progress.epoch}" if not progress.partial else \
                f"step {progress.partial['step']} of epoch {progress.partial['epoch']}"
            log.info("resuming from %s after %s (resume #%d)", verdict.checkpoint_path, where, resumes)
        ckpt = verdict.checkpoint = None  # the memory-mapped file is not needed any more
        trainer.reconcile_best(progress)  # best.pt of this checkpoint's best epoch, whatever kill came between
        if world.is_main:  # rows written after that checkpoint (or any, from scratch) are not this run's
            files.epochs.keep_epochs_upto(progress.epoch)
            if trainer.system_log is not None:
                trainer.system_log.keep_epochs_upto(progress.epoch)
            write_model_summary(parts.model, cfg.dataset.channels, cfg.model.input_size, parts.coupling,
                                files.summary)
        log.info("run %s: %s on %s, alpha=%d (%s, %s) on %s, %d threads, %d workers, %d process(es)", files.dir,
                 model_name(cfg.model), cfg.dataset.name, parts.coupling.alpha, parts.coupling.mode,
                 parts.coupling.schedule, rd.results["provenance"]["device"], spec.threads, spec.workers, world.size)
        progress = trainer.fit(progress)
        final_start = time.perf_counter()
        metrics = trainer.final_metrics() if progress.best_epoch is not None else None
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
            finish_logger(logger, rd.results)

    if not world.is_main:
        return dict(rd.results)
    try:
        results = rd.write(status=status, error=error, metrics=metrics, stopped_early=progress.stopped_early,
                           epochs_run=progress.epoch, best_epoch=progress.best_epoch,
                           total_time_s=round(progress.elapsed_s, 3), finished_at=now_iso(),
                           **epoch_aggregates(files.epochs.rows()))
    finally:
        if logger is not None:
            finish_logger(logger, rd.results)
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


def build_logger(cfg: DictConfig, files: RunFiles, identity: Identity):
    """Every tracker under `logger` (none there: None) as one `Loggers`, told the run's hyperparameters:
    its identity config (flattened), labels and fingerprint. Each gets the run directory, the run's name
    and, in a sweep job, the sweep directory (MLflow's default store is shared by the sweep)."""
    from .identity import _flatten
    from .loggers import Loggers

    if not cfg.get("logger"):
        return None
    sweep_dir = None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        sweep_dir = Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else None
    except ValueError:  # not under Hydra (run() called directly): a single run
        pass
    context = {"run_dir": files.dir, "sweep_dir": sweep_dir, "run_name": Path(files.dir).resolve().name,
               "fingerprint": identity.fingerprint}
    params = {**identity.keys, **_flatten(identity.labels), "fingerprint": identity.fingerprint}
    return Loggers.start(cfg.logger, context, params)


def finish_logger(logger, results: dict) -> None:
    """results.json's final word (metrics when there are any, best epoch, status) to the trackers; then
    they are closed. An interrupted run has none yet: its trackers' runs end as killed, and the resume
    continues them to their final word."""
    from .loggers import final_metrics

    if results.get("status") != "interrupted":
        logger.log_final(final_metrics(results))
    logger.close()


__all__ = ["run", "inspect", "RunRefused", "ConfigError", "DatasetUnavailable"]
