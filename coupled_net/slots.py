"""Where a sweep's runs go on one machine (SPEC §7): GPU and CPU slots.

A slot is one place a run may occupy: a physical GPU (or none) and a set of cores. `plan_slots`
turns the keys of hydra/launcher=local (gpus, runs_per_gpu, max_parallel, cpus_per_run), or a
packed SLURM task's allocation (hydra.launcher.runs_per_task), into slots: GPUs dealt round-robin
(the first runs spread over the GPUs before any GPU takes a second run), cores cut into disjoint
shares while the cores allow. Each run is started with its slot in its environment
(`slot_environment`): CUDA_VISIBLE_DEVICES = its one physical GPU (so it trains on `cuda:0`), and
COUPLED_NET_SLOT, which the run reads back (coupled_net.machine.this_slot) for its provenance and
for its share of the GPU's memory. Bad keys are refused here in one line (ConfigError), before anything starts.

GPUs are found through NVML (nvidia-ml-py's pynvml), never by initialising CUDA in the launcher;
without a driver there are none. Nothing here starts or changes anything."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from .cudavisible import parse_cuda_visible
from .errors import ConfigError
from .machine import SLOT_ENV


@dataclass(frozen=True)
class Gpu:
    index: int  # physical (NVML) index: what nvidia-smi shows
    uuid: str
    name: str
    free_bytes: int


@dataclass(frozen=True)
class Slot:
    number: int
    gpu: Optional[int]  # physical index, None: CPU only
    cpus: tuple[int, ...]
    shared_by: int  # runs placed on this slot's GPU (on a CPU-only machine: runs in parallel)
    parallel: int  # runs of the launch (or of the SLURM task) alive at once at most
    packed_in: str  # "local" | "slurm task"
    gpu_budget_bytes: Optional[int] = None  # this run's share of the GPU's free memory


def gpu_inventory() -> list[Gpu]:
    """Every GPU of this machine by physical index, with its free memory; [] without NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver: no GPU
        return []
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name, uuid = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetUUID(handle)
            found.append(Gpu(i, uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                             name.decode() if isinstance(name, bytes) else str(name),
                             int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)))
        return found
    except Exception:  # noqa: BLE001 - a driver that stops answering: as good as no GPU
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def visible_gpus(present: Sequence[Gpu], cuda_visible: Optional[str]) -> list[int]:
    """The physical GPUs a process sees: all present ones, or those CUDA_VISIBLE_DEVICES names
    (indices or UUIDs, in its order; CUDA stops at the first entry it cannot match, so do we)."""
    entries = parse_cuda_visible(cuda_visible)
    if entries is None:
        return [g.index for g in present]
    by_index = {g.index: g.index for g in present}
    by_uuid = {g.uuid: g.index for g in present}
    seen = []
    for item in entries:
        if isinstance(item, int):
            match = by_index.get(item)
        else:  # a UUID's first characters name the one GPU they begin (two: neither, as CUDA reads it)
            matches = [i for uuid, i in by_uuid.items() if uuid.startswith(item)]
            match = matches[0] if len(matches) == 1 else None
        if match is None or match in seen:
            break
        seen.append(match)
    return seen


def _positive(key: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, f"{what}: an integer of at least 1")
    return value


def plan_slots(*, gpus: Sequence[int], present: Sequence[int], runs_per_gpu, max_parallel, cpus_per_run,
               cores: Sequence[int], key: str = "hydra.launcher", packed_in: str = "local",
               free_bytes: Optional[dict[int, int]] = None) -> list[Slot]:
    """The slots a launch fills, at most `max_parallel` (None: every GPU × runs_per_gpu, or on a
    CPU-only machine as many runs as `cpus_per_run` fits). `gpus`: the physical GPUs asked for,
    `present`: those this process may use. `cpus_per_run` None: the cores divided by the slots.
    ConfigError (one line, the key named) for what cannot be placed."""
    cores = sorted(cores)
    if len(set(gpus)) != len(gpus) or any(isinstance(g, bool) or not isinstance(g, int) for g in gpus):
        raise ConfigError(f"{key}.gpus", list(gpus), "physical GPU indices (as nvidia-smi lists them), each once")
    absent = [g for g in gpus if g not in present]
    if absent:
        has = f"GPUs {', '.join(map(str, present))}" if present else "no GPU"
        raise ConfigError(f"{key}.gpus", list(gpus), f"GPU {', '.join(map(str, absent))} is not on this machine "
                          f"(this process sees {has}): choose among those, or gpus=[] to run on CPUs")
    runs_per_gpu = _positive(f"{key}.runs_per_gpu", runs_per_gpu, "runs sharing one GPU")
    if max_parallel is not None:
        max_parallel = _positive(f"{key}.max_parallel", max_parallel, "runs alive at once")
    if cpus_per_run is not None:
        cpus_per_run = _positive(f"{key}.cpus_per_run", cpus_per_run, "cores per run")
        if cpus_per_run > len(cores):
            raise ConfigError(f"{key}.cpus_per_run", cpus_per_run, f"this process may use {len(cores)} core(s): "
                              f"at most {len(cores)}")
    if gpus:
        places = [g for _ in range(runs_per_gpu) for g in gpus]  # round-robin: each GPU's first run first
        if max_parallel is not None and max_parallel > len(places):
            raise ConfigError(f"{key}.max_parallel", max_parallel, f"above the {len(places)} slot(s) of "
                              f"{len(gpus)} GPU(s) × runs_per_gpu={runs_per_gpu}: raise {key}.runs_per_gpu, "
                              f"or leave max_parallel out")
        places = places[:max_parallel or len(places)]
    else:
        n = max_parallel or max(1, len(cores) // (cpus_per_run or len(cores)))
        places = [None] * n
    per_run = cpus_per_run or max(1, len(cores) // len(places))
    slots = []
    for number, gpu in enumerate(places):
        share = tuple(sorted({cores[(number * per_run + j) % len(cores)] for j in range(per_run)}))
        on_gpu = places.count(gpu) if gpu is not None else len(places)
        budget = None
        if gpu is not None and free_bytes and gpu in free_bytes:
            budget = free_bytes[gpu] // on_gpu
        slots.append(Slot(number, gpu, share, on_gpu, len(places), packed_in, budget))
    return slots


def slot_environment(slot: Slot, gpu: Optional[Gpu] = None) -> dict[str, str]:
    """The environment a run is started with in `slot` (added to the launcher's)."""
    record = asdict(slot)
    record["cpus"] = list(slot.cpus)
    if gpu is not None:
        record.update(gpu_uuid=gpu.uuid, gpu_name=gpu.name)
    env = {"CUDA_VISIBLE_DEVICES": "" if slot.gpu is None else str(slot.gpu), SLOT_ENV: json.dumps(record)}
    if slot.gpu is not None:  # the slot's index is NVML's, in PCI order; CUDA's own default is fastest first
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env
