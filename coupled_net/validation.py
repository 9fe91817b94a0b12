"""Checks of the user-facing keys, run after composition and before any data is loaded: each
failure is a ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

from .coupling import MODES, SCHEDULES
from .data import NAMES as DATASETS
from .errors import ConfigError
from .models import MODELS

SELECT_BY = ("val_loss", "ke_val_loss")


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM allocation, taskset), not the machine's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK")  # a cluster without CPU binding still allocates
    return min(cpus, int(allocated)) if allocated and allocated.isdigit() else cpus


def _int(key: str, value, minimum: int, allow=()) -> None:
    if value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = "".join(f" or {a}" for a in allow)
        raise ConfigError(key, value, f"must be an integer >= {minimum}{extra}")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {', '.join(map(str, allowed))}")


def _fraction(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(key, value, "must be a number strictly between 0 and 1")


def validate(cfg: DictConfig) -> None:
    for key in ("dataset.root", "dataset.name", "model.name"):
        group, _, leaf = key.partition(".")
        if OmegaConf.is_missing(cfg[group], leaf):
            raise ConfigError(key, "???", "is required here: set it on the command line")
    t, d = cfg.trainer, cfg.dataset
    _choice("model", cfg.model.get("name"), sorted(MODELS))
    _choice("dataset", d.get("name"), DATASETS)
    _int("seed", cfg.seed, 0)
    _int("trainer.epochs", t.epochs, 1)
    _int("trainer.patience", t.patience, 1)
    _int("trainer.batch_size", t.batch_size, 1)
    _int("trainer.eval_batch_size", t.eval_batch_size, 1)
    _int("trainer.checkpoint_every", t.checkpoint_every, 1)
    _int("trainer.num_workers", t.num_workers, 0, allow=("auto",))
    _int("trainer.threads", t.threads, 1, allow=("auto",))
    if t.limit_batches is not None:
        _int("trainer.limit_batches", t.limit_batches, 1, allow=(None,))
    _choice("trainer.select_by", t.select_by, SELECT_BY)
    _choice("trainer.deterministic", t.deterministic, (True, False))
    _choice("trainer.progress", t.progress, ("auto", True, False))
    _choice("trainer.precision", t.get("precision", "fp32"), ("fp32", "bf16", "fp16"))
    _choice("trainer.channels_last", t.get("channels_last", False), (True, False))
    _choice("trainer.compile", t.get("compile", False), (True, False))
    _fraction("dataset.val_fraction", d.val_fraction)
    _choice("dataset.pipeline", d.get("pipeline"), ("tensor", "pil"))
    _int("model.input_size", cfg.model.input_size, 1)
    _choice("coupling.mode", cfg.coupling.mode, MODES)
    _choice("coupling.schedule", cfg.coupling.schedule, SCHEDULES)
    _int("coupling.alpha", cfg.coupling.alpha, 0)
    lr = cfg.optimizer.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError("optimizer.lr", lr, "must be a number > 0")
    resolve_device(t.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("trainer.device", name, "allowed: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("trainer.device", name, "allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", name, "no CUDA GPU is visible to this process; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("trainer.device", name, f"this process sees {torch.cuda.device_count()} GPU(s)")
    return device
