"""One run, from a composed config to a finished run directory: validate, build, train or resume,
evaluate, record. Each run catches its own failures so a sweep goes on (SPEC §8)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from . import data
from .coupling import Coupling
from .distributed import World, init_world
from .errors import ConfigError, DatasetUnavailable, one_line
from .monitor import SystemMonitor
from .results import RunFiles, provenance
from .trainer import Numerics, Progress, Trainer
from .validation import resolve_device, usable_cpus, validate

log = logging.getLogger(__name__)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at CUDA init


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, letting our own ConfigError through unwrapped (one line for the user)."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ConfigError, DatasetUnavailable)):
            raise e.__cause__ from None
        raise


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def config_key(cfg: DictConfig) -> str:
    """A digest of the resolved task config: tells a finished run of this config from another's."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.get("trainer", {}).pop("progress", None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(plain)).encode()).hexdigest()[:16]


def write_model_summary(model: torch.nn.Module, channels: int, size: int, coupling: Coupling, path: Path) -> None:
    from torchinfo import summary

    was_training = model.training
    stats = summary(model.eval(), input_data=torch.zeros(1, channels, size, size), device="cpu", verbose=0,
                    col_names=("output_size", "num_params", "kernel_size"), depth=4)
    model.train(was_training)
    text = f"{stats}\n\ncoupled layer(s): {', '.join(coupling.layer_paths)}; alpha={coupling.alpha}\n"
    path.write_text(text)


def _settings(tcfg, device: torch.device) -> tuple[int, int]:
    cpus = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: ranks share a node
    threads = cpus if tcfg.threads == "auto" else int(tcfg.threads)
    if tcfg.num_workers != "auto":
        workers = int(tcfg.num_workers)
    elif device.type == "cuda":
        workers = min(16, max(1, cpus - 1))
    else:  # on a CPU the workers take cores from the training itself
        workers = 0 if cpus <= 2 else min(8, cpus // 2)
    return threads, workers


def load_resume_point(files: RunFiles, device: torch.device) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint to continue from: last.pt, else the newest periodic one.
    An unreadable file (a kill mid-write on a filesystem without atomic rename, a full disk) is
    skipped with a warning rather than crashing the run again at every restart."""
    for stale in files.checkpoints.glob(".*.tmp"):  # temp files of writes a kill interrupted
        stale.unlink(missing_ok=True)
    candidates = [files.last, *sorted(files.checkpoints.glob("epoch_*.pt"), reverse=True)]
    for path in filter(Path.exists, candidates):
        try:
            return torch.load(path, map_location=device, weights_only=False), path
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: try the next one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, one_line(e, 200))
    if any(map(Path.exists, candidates)):
        log.warning("no readable checkpoint in %s: starting from scratch", files.checkpoints)
    return None, None


def gather_digests(coupling: Coupling) -> list[str]:
    import torch.distributed as dist

    digest = hashlib.sha256()
    for _, conv in coupling.layers:
        digest.update(conv.weight.detach().cpu().numpy().tobytes())
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, digest.hexdigest()[:16])
    return out


def prepare_config(cfg: DictConfig) -> None:
    """Fill what follows from the data itself (image_folder's class count) before the model is built."""
    if cfg.dataset.name == "image_folder" and cfg.dataset.get("num_classes") is None:
        with open_dict(cfg):
            cfg.dataset.num_classes = data.count_classes(cfg.dataset)


@dataclass
class Experiment:
    model: torch.nn.Module
    coupling: Coupling
    device: torch.device
    loaders: dict
    threads: int
    workers: int
    world: World


def build(cfg: DictConfig) -> Experiment:
    """Validate the config, then build the model (on its device), its coupling and the data loaders.
    Seeds everything first, so the model's initial weights follow `seed`."""
    validate(cfg)
    prepare_config(cfg)  # idempotent: fills only what is missing
    world = init_world(cfg.trainer.device)
    if not world.is_main:  # one voice in the log: rank 0's
        logging.getLogger("coupled_net").setLevel(logging.WARNING)
    device = resolve_device(cfg.trainer.device)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if cfg.trainer.batch_size % world.size:
        raise ConfigError("trainer.batch_size", cfg.trainer.batch_size,
                          f"must be divisible by the {world.size} processes of this run (it is the global batch)")
    threads, workers = _settings(cfg.trainer, device)
    torch.set_num_threads(threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    model = instantiate(cfg.model)
    coupling = Coupling(model, **cfg.coupling)
    splits = data.build_splits(cfg.dataset, cfg.model.input_size, cfg.seed)
    t = cfg.trainer
    common = dict(device=device, size=cfg.model.input_size, workers=workers, seed=cfg.seed, rank=world.rank,
                  world_size=world.size)
    loaders = {
        "train": data.build_loader(splits.train, cfg.dataset, train=True, batch_size=t.batch_size // world.size,
                                   **common),
        "val": data.build_loader(splits.val, cfg.dataset, train=False, batch_size=t.eval_batch_size, **common),
        "test": data.build_loader(splits.test, cfg.dataset, train=False, batch_size=t.eval_batch_size, **common),
    }
    model = model.to(device, memory_format=torch.channels_last if t.get("channels_last") else torch.preserve_format)
    return Experiment(model, coupling, device, loaders, threads, workers, world)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train (or resume, or skip as done) the run described by `cfg` in `run_dir`; returns results.json.
    Raises ConfigError / DatasetUnavailable for bad input, before any training."""
    files = RunFiles(run_dir)
    validate(cfg)
    prepare_config(cfg)
    previous = files.read_results() or {}
    if previous.get("status") == "done":
        if previous.get("config_key") not in (None, config_key(cfg)):
            raise ConfigError("hydra.run.dir", str(files.dir),
                              "holds a finished run of a different config; choose another directory")
        log.info("%s already holds a finished run (status: done); nothing to do", files.dir)
        return previous

    exp = build(cfg)
    model, coupling, device, loaders, world = exp.model, exp.coupling, exp.device, exp.loaders, exp.world
    main = world.is_main
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer)
    files.checkpoints.mkdir(parents=True, exist_ok=True)
    monitor = SystemMonitor()
    bars = {"auto": os.isatty(2)}.get(str(cfg.trainer.progress).lower(), bool(cfg.trainer.progress))
    logger = instantiate(cfg.logger, run_dir=files.dir) if "logger" in cfg and main else None
    train_model = model
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        train_model = torch.compile(train_model)
    numerics = Numerics.from_config(cfg.trainer, device)
    trainer = Trainer(model, coupling, optimizer, scheduler, loaders, device, cfg.trainer, files, monitor, bars,
                      logger, world, train_model, numerics)

    progress, resumes = Progress(), int(previous.get("resumes", 0))
    checkpoint, path = load_resume_point(files, device)
    if checkpoint is not None:
        progress = trainer.load_state(checkpoint)
        resumes += 1
        where = f"epoch {progress.epoch}" if not progress.partial else \
            f"step {progress.partial['step']} of epoch {progress.partial['epoch']}"
        log.info("resuming from %s after %s (resume #%d)", path, where, resumes)
    if main:
        files.epochs.keep_epochs_upto(progress.epoch)  # rows written after that checkpoint (or any, from scratch)
        if not files.summary.exists():
            write_model_summary(model, cfg.dataset.channels, cfg.model.input_size, coupling, files.summary)

    results = {
        "status": "running", "stopped_early": False, "epochs_run": progress.epoch, "best_epoch": progress.best_epoch,
        "resumes": resumes, "model": cfg.model.name, "dataset": cfg.dataset.name, "alpha": coupling.alpha,
        "coupling_mode": coupling.mode, "coupling_schedule": coupling.schedule, "seed": cfg.seed,
        "coupled_layers": coupling.layer_paths, "metrics": None, "ke_time_s_mean": None,
        "epoch_time_s_mean": None, "total_time_s": None, "best_val_acc": None, "best_ke_val_acc": None,
        "error": None, "config_key": config_key(cfg), "provenance": provenance(device),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world.size,
    }
    if main:
        files.write_results(results)
    log.info("run %s: %s on %s, alpha=%d (%s, %s) on %s, %d threads, %d workers, %d process(es)", files.dir,
             cfg.model.name, cfg.dataset.name, coupling.alpha, coupling.mode, coupling.schedule,
             results["provenance"]["device"], exp.threads, exp.workers, world.size)
    try:
        progress = trainer.fit(progress)
        final_start = time.perf_counter()
        results["metrics"] = trainer.final_metrics() if progress.best_epoch is not None else None
        progress.elapsed_s += time.perf_counter() - final_start
        if progress.diverged_at is not None:
            results["status"] = "diverged"
            results["error"] = f"training loss became non-finite at epoch {progress.diverged_at}"
        else:
            results["status"] = "done"
    except Exception as e:  # noqa: BLE001 - recorded, logged, and the sweep goes on
        log.error("run failed:\n%s", traceback.format_exc())
        results["status"], results["error"] = "failed", one_line(e)
    finally:
        monitor.close()
        trainer.logger.close()

    if world.active:  # evidence that equalization kept every rank's coupled layers identical
        results["coupled_layer_digest_per_rank"] = gather_digests(coupling)
    if not main:
        return results
    rows = files.epochs.rows()
    mean = lambda col: float(np.mean([float(r[col]) for r in rows])) if rows else None  # noqa: E731
    top = lambda col: max(float(r[col]) for r in rows) if rows else None  # noqa: E731
    results.update({
        "stopped_early": progress.stopped_early, "epochs_run": progress.epoch, "best_epoch": progress.best_epoch,
        "ke_time_s_mean": mean("ke_time_s"), "epoch_time_s_mean": mean("epoch_time_s"),
        "total_time_s": round(progress.elapsed_s, 3), "best_val_acc": top("val_acc"),
        "best_ke_val_acc": top("ke_val_acc"), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    files.write_results(results)
    if results["metrics"]:
        m = results["metrics"]
        log.info("%s: best epoch %s; val top-1 %.2f%% top-5 %.2f%%; test top-1 %.2f%% top-5 %.2f%% (after KE)",
                 results["status"], progress.best_epoch, m["val"]["top1"], m["val"]["top5"],
                 m["test"]["top1"], m["test"]["top5"])
    return results


__all__ = ["run", "ConfigError", "DatasetUnavailable"]
