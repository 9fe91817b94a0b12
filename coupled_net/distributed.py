"""Several processes per run: DistributedDataParallel ranks from `torchrun` or from SLURM tasks
(submitit's job environment); gloo on CPU, NCCL on GPU. One process is a world of size 1."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import submitit
import torch
import torch.distributed as dist

from .errors import ConfigError
from .machine import resolve_device, select_device, submitit_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device_name: str) -> World:
    """Join (or create) the process group this process belongs to, if any."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and submitit_tasks() > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    gpu = _rank_gpu(device_name)
    backend = "nccl" if gpu is not None else "gloo"
    # the GPU is current before the group exists: NCCL's first collective (the run directory's claim)
    # would otherwise run on cuda:0 in every rank ("Duplicate GPU detected")
    dist.init_process_group(backend=backend, device_id=gpu)
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    log.info("rank %d of %d (%s backend)", world.rank, world.size, backend)
    return world


def _rank_gpu(device_name: str) -> torch.device | None:
    """The GPU this rank trains on, made current; None: it trains on a CPU, or the name is one the
    run's validation refuses (in one line, once the process group lets every rank record it)."""
    if device_name == "cpu" or not torch.cuda.is_available():
        return None
    try:
        device = resolve_device(device_name)
    except ConfigError:
        return None
    return select_device(device) if device.type == "cuda" else None


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_FLAG_GROUPS: dict = {}


def _flag_group():
    """The group host-side flags travel in: the default one under gloo; under NCCL a gloo group
    beside it (made once, by every rank at the same call), so a flag costs no device synchronize."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _FLAG_GROUPS:
        _FLAG_GROUPS[key] = dist.new_group(backend="gloo")
    return _FLAG_GROUPS[key]


def max_on_host(value: int) -> int:
    """The largest of every rank's `value` (a small int: a signal number, 0 for none), on every rank:
    one CPU collective, never a device sync (measured: 0.45-0.8 ms a call between 2 gloo ranks on a
    busy 2-core host). Every rank must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group())
    return int(t.item())


def all_gather_on_host(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank ([obj] without a process
    group): through the host-side group, never a device tensor."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_flag_group())
    return out


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
