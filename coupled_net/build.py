"""One place builds a run: the config is validated and resolved once per process (`resolve`), then
everything the trainer needs is built from it (`build`): model and coupling, data loaders,
optimizer, scheduler, numerics, the DDP world; and the run's trackers (`build_trackers`). Nothing
here owns a run directory: coupled_net.lifecycle does. coupled_net.reevaluate and the tests build
through the same functions.

    spec = resolve(cfg)                 # ConfigError for bad input, before any data or model
    parts = build(spec)
    trainer = make_trainer(spec, parts)  # no run directory: rows and the best weights in memory
    trainer.fit(LoopState())
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LinearLR, SequentialLR

from . import data, models
from .augment import Letters, NoAugment
from .coupling import Coupling
from .distributed import World, init_world
from .errors import ConfigError, DatasetUnavailable, one_line
from .identity import Identity, flatten
from .loaders import build_loader
from .loggers import Loggers
from .loopcallbacks import CallbackFailed, LoopCallbacks, preserved_rng
from .machine import ranks_sharing_cpus, select_device, usable_cpus
from .trainer import Numerics, Trainer, steps_on_metric
from .validation import batch_fits, overfit_fits, validate

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


def seed_generators(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a DDP rank's own draws (dropout, ...): the run's seed on rank 0 (a run of one process
    draws what it always drew), on the others a deterministic value of (seed, rank), distinct per rank:
    equal seeds would give every rank the same dropout masks."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_everything(seed: int, deterministic: bool) -> None:
    seed_generators(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


_warned: set = set()


def _once(message: str) -> None:
    """A warning line, once per process."""
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("coupled_net").warning("%s", message)


def _clamp(key: str, value: int, most: int, cpus: int) -> int:
    """Threads or workers beyond what this process's CPUs can run: warned about once per process and
    clamped, not refused. Neither changes what a run computes (SPEC §5), and a sweep's runs meet
    machines (SLURM allocations) of different sizes with one command line."""
    if value <= most:
        return value
    _once(f"{key}={value} is more than this process's {cpus} usable CPU(s) can run; using {most}")
    return most


def _threads_and_workers(tcfg, device: torch.device) -> tuple[int, int]:
    cpus = max(1, usable_cpus() // ranks_sharing_cpus())
    threads = cpus if tcfg.threads == "auto" else _clamp("trainer.threads", int(tcfg.threads), cpus, cpus)
    if tcfg.num_workers != "auto":  # workers wait on files as well as CPUs: up to twice the CPUs is sensible
        workers = _clamp("trainer.num_workers", int(tcfg.num_workers), 2 * cpus, cpus)
    elif device.type == "cuda":
        workers = min(16, max(1, cpus - 1))
    else:  # on a CPU the workers take cores from the training itself
        workers = 0 if cpus <= 2 else min(8, cpus // 2)
    return threads, workers


@dataclass
class RunSpec:
    """A validated config and what it resolves to on this process."""
    cfg: DictConfig
    world: World
    device: torch.device
    threads: int
    workers: int


def prepare_config(cfg: DictConfig) -> None:
    """Fill what follows from the data itself (image_folder's class count) before the model is built."""
    if cfg.dataset.name == "image_folder" and cfg.dataset.get("num_classes") is None:
        with open_dict(cfg):
            cfg.dataset.num_classes = data.count_classes(cfg.dataset)


def resolve(cfg: DictConfig, world: World | None = None) -> RunSpec:
    """Validate the config (one line per mistake: ConfigError), fill what follows from the data itself
    (image_folder's class count), join the DDP world and pick the device, threads and workers."""
    device = validate(cfg)
    prepare_config(cfg)
    world = world or init_world(cfg.trainer.device)
    if not world.is_main:  # one voice in the log: rank 0's
        logging.getLogger("coupled_net").setLevel(logging.WARNING)
    local_ranks = ranks_sharing_cpus() if world.active else 1  # the run's processes on this node
    if device.type == "cuda" and device.index is not None and local_ranks > 1:
        raise ConfigError("trainer.device", cfg.trainer.device,
                          f"names one GPU for the {local_ranks} processes of this run on this node; use cuda "
                          "(each process takes the GPU of its LOCAL_RANK)")
    device = select_device(device)  # a GPU: this rank's, made current (the pil loader's pinning thread uses it)
    if cfg.trainer.batch_size % world.size:
        raise ConfigError("trainer.batch_size", cfg.trainer.batch_size,
                          f"must be divisible by the {world.size} processes of this run (it is the global batch)")
    threads, workers = _threads_and_workers(cfg.trainer, device)
    return RunSpec(cfg, world, device, threads, workers)


def build_coupled_model(spec: RunSpec) -> tuple[torch.nn.Module, Coupling]:
    """The model (initial weights from `seed`: everything is seeded first) and its coupled layers,
    on the CPU."""
    torch.set_num_threads(spec.threads)
    seed_everything(spec.cfg.seed, spec.cfg.trainer.deterministic)
    cfg = spec.cfg
    model = models.make(OmegaConf.to_container(cfg.model, resolve=True), cfg.dataset.channels, cfg.dataset.num_classes)
    coupling = Coupling(model, **spec.cfg.coupling)
    if spec.world.rank:  # the same initial weights on every rank (DDP also broadcasts rank 0's), then its own draws
        seed_generators(rank_seed(cfg.seed, spec.world.rank))
    return model, coupling


def build_loaders(spec: RunSpec) -> dict:
    """train / val / test loaders (this rank's shard of the training set). The training split is
    augmented by the `augment` policy; with trainer.overfit_batches=N it is instead the same first N
    batches of the training split every epoch, unshuffled and unaugmented (loaded like eval data)."""
    cfg, world = spec.cfg, spec.world
    # the policy object; a config saved before the augment group existed (a run evaluated again) trained
    # with the seed's family. _convert_: augment.scale arrives as a tuple, not a ListConfig
    augment = Letters() if cfg.get("augment") is None else instantiate(cfg.augment, _convert_="all")
    splits = data.build_splits(cfg.dataset, cfg.model.input_size, cfg.seed, augment)
    # where the split's size could not be known from the config (image_folder), now it is
    how = f"the images of dataset.root={data.dataset_root(cfg.dataset)}, less dataset.val_fraction=" \
          f"{cfg.dataset.val_fraction}"
    batch_fits(cfg.trainer.batch_size, len(splits.train), how)
    overfit_fits(cfg.trainer, len(splits.train), how)
    common = dict(device=spec.device, size=cfg.model.input_size, workers=spec.workers, seed=cfg.seed,
                  rank=world.rank, world_size=world.size)
    t = cfg.trainer
    train = dict(split=splits.train, train=True, augment=augment)
    overfit = int(t.get("overfit_batches") or 0)
    if overfit > 0:
        # N global batches; a multiple of the ranks, so that every rank steps the same number of times
        n = min(overfit * t.batch_size, len(splits.train))
        train = dict(split=data.overfit_split(splits, n - n % world.size), train=False, augment=NoAugment())
    return {
        "train": build_loader(dcfg=cfg.dataset, batch_size=t.batch_size // world.size, **train, **common),
        "val": build_loader(splits.val, cfg.dataset, train=False, batch_size=t.eval_batch_size, **common),
        "test": build_loader(splits.test, cfg.dataset, train=False, batch_size=t.eval_batch_size, **common),
    }


@dataclass
class Parts:
    """Everything a Trainer is made of, built for one run."""
    model: torch.nn.Module        # the plain model (checkpoints, KE, evaluation)
    coupling: Coupling
    loaders: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    numerics: Numerics
    train_model: torch.nn.Module  # what the training step calls: DDP-wrapped and/or compiled


def build(spec: RunSpec) -> Parts:
    cfg, device = spec.cfg, spec.device
    model, coupling = build_coupled_model(spec)
    loaders = build_loaders(spec)
    memory = torch.channels_last if cfg.trainer.get("channels_last") else torch.preserve_format
    model = model.to(device, memory_format=memory)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    if cfg.trainer.get("precision") == "fp16" and device.type == "cuda" and \
            not getattr(optimizer, "_step_supports_amp_scaling", False):
        _once(f"trainer.precision=fp16 with {type(optimizer).__name__}: its GradScaler reads a flag off the GPU at "
              "every step (a host sync); optimizer.fused=true (SGD, Adam, AdamW) keeps that check on the GPU, and "
              "bf16 (Ampere and newer) needs no scaler")
    scheduler = make_scheduler(cfg.scheduler, optimizer)
    train_model = model
    if spec.world.active:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        train_model = torch.compile(train_model)
    return Parts(model, coupling, loaders, optimizer, scheduler, Numerics.from_config(cfg.trainer, device),
                 train_model)


def make_scheduler(scfg, optimizer: torch.optim.Optimizer):
    """The epoch scheduler of `scfg` (a scheduler config node), after `warmup_epochs` (coupled_net's
    own key, popped: the scheduler's _target_ does not take it; absent = 0) epochs of linear warmup.

    Warmup w > 0: the lr of epoch k = 1..w is k/(w+1) of the optimizer's lr, epoch w+1 has the full
    lr, and from there on the main scheduler runs as it would from the start of a run without warmup
    (SequentialLR restarts it at its epoch 0 at the milestone). So the main scheduler's epochs count
    after the warmup: step_size, T_max, total_iters mean the same with and without it, and for a
    user's own scheduler nothing needs translating (conf/scheduler/cosine.yaml's T_max is the epochs
    after the warmup, so it still ends on eta_min with the run).
    A scheduler that steps on a metric (ReduceLROnPlateau; coupled_net.trainer.steps_on_metric) is
    given the selection metric of the epochs after the warmup only (WarmupThenMetric).
    Warmup 0 builds exactly the scheduler of the config (the seed's protocol unchanged)."""
    node = OmegaConf.to_container(scfg, resolve=True) if isinstance(scfg, DictConfig) else dict(scfg)
    warmup = int(node.pop("warmup_epochs", 0) or 0)
    main = instantiate(node)(optimizer)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    if steps_on_metric(main):  # SequentialLR refuses ReduceLROnPlateau (its step() passes no metric)
        return WarmupThenMetric(optimizer, ramp, main, warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class WarmupThenMetric:
    """`warmup` epochs of `ramp` (LinearLR, ending on the optimizer's lr), then `main`, a scheduler
    stepped on a metric, which sees the metrics of the epochs after the warmup only: it runs as it would
    from the start of a run without warmup. Checkpointed whole (state_dict / load_state_dict)."""

    def __init__(self, optimizer, ramp, main, warmup: int):
        self.optimizer, self.ramp, self.main, self.warmup = optimizer, ramp, main, warmup
        self.last_epoch = 0  # steps taken (epochs ended)

    def step(self, metric) -> None:
        self.last_epoch += 1
        if self.last_epoch <= self.warmup:
            self.ramp.step()
        else:
            self.main.step(metric)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "ramp": self.ramp.state_dict(), "main": self.main.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]
        self.ramp.load_state_dict(state["ramp"])
        self.main.load_state_dict(state["main"])


def make_trainer(spec: RunSpec, parts: Parts, **run_dir_parts) -> Trainer:
    """A Trainer for `parts` with the loop settings of `spec`; `run_dir_parts` are the keyword
    arguments that tie it to a run directory (files, monitor, logger, guard, stamp, on_epoch_end,
    progress_bars, callbacks), all optional; a logger is what build_trackers returns (None: no trackers),
    callbacks what build_callbacks does."""
    t = spec.cfg.trainer
    return Trainer(model=parts.model, coupling=parts.coupling, optimizer=parts.optimizer, scheduler=parts.scheduler,
                   loaders=parts.loaders, device=spec.device, numerics=parts.numerics, train_model=parts.train_model,
                   world=spec.world, epochs=t.epochs, patience=t.patience, select_by=t.select_by,
                   checkpoint_every=t.checkpoint_every, last_every=int(t.get("last_every") or 1),
                   limit_batches=t.limit_batches,
                   label_smoothing=float(t.get("label_smoothing", 0.0)), grad_clip_norm=t.get("grad_clip_norm"),
                   **run_dir_parts)


def build_callbacks(cfg: DictConfig) -> LoopCallbacks:
    """Every training-loop callback under `callbacks` (coupled_net.loopcallbacks), by name, built without
    drawing from the run's random generators (a probe that makes a model of its own leaves the run's
    initialisation as it was); one that cannot be built fails the run in one line naming it."""
    named = {}
    with preserved_rng():
        for name, node in (cfg.get("callbacks") or {}).items():
            if node is None:
                continue
            try:
                named[name] = instantiate(node)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - one line naming the callback
                cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
                raise CallbackFailed(f"callbacks.{name}: {one_line(cause)}") from e
    return LoopCallbacks(named)


# ---- the run's trackers ------------------------------------------------------------------------------


def start_trackers(nodes, context: dict, params: dict) -> Loggers:
    """Every tracker config in `nodes` (name -> config; None: left out), each given `context` (run_dir,
    sweep_dir, run_name, fingerprint), then told the run's hyperparameters `params`. A missing extra
    is a ConfigError; a tracker that cannot start (its server down) is warned about and left out."""
    loggers = Loggers()
    try:
        for name, node in nodes.items():
            if node is None:
                continue
            try:
                loggers.append(instantiate(node, **context))
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - the run matters more than its tracker
                cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
                log.warning("logger %s: %s", name, one_line(cause, 300))
        loggers.log_hparams(params)
    except BaseException:
        loggers.close()  # the ones already started (a W&B service process)
        raise
    if loggers:
        log.info("trackers: %s", loggers.describe())
    return loggers


def build_trackers(cfg: DictConfig, run_dir: Path, identity: Identity) -> Loggers | None:
    """Every tracker under `logger` (none there: None) as one `Loggers`, told the run's hyperparameters:
    its identity config (flattened), labels and fingerprint. Each gets the run directory, the run's name
    and, in a sweep job, the sweep directory (MLflow's default store is shared by the sweep)."""
    if not cfg.get("logger"):
        return None
    sweep_dir = None
    try:
        hc = HydraConfig.get()
        sweep_dir = Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else None
    except ValueError:  # not under Hydra (a run started directly): a single run
        pass
    context = {"run_dir": run_dir, "sweep_dir": sweep_dir, "run_name": Path(run_dir).resolve().name,
               "fingerprint": identity.fingerprint}
    params = {**identity.keys, **flatten(identity.labels), "fingerprint": identity.fingerprint}
    return start_trackers(cfg.logger, context, params)
