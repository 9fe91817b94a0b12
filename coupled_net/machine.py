"""This machine's facts (SPEC §12): the CPUs this process may use, its devices and their free
memory, the SLURM job it runs in, and the provenance a run records (code, libraries, hardware).
Nothing here changes the machine; every other module asks here."""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import psutil
import submitit
import torch
import torchvision

from .cudavisible import parse_cuda_visible
from .errors import ConfigError
from .monitor import gpu_facts
from .storage import write_text

DEVICES = "allowed: auto, cpu, cuda, cuda:N"
SLOT_ENV = "COUPLED_NET_SLOT"  # the slot a scheduler started this process in (coupled_net.slots writes it)


def this_slot() -> dict | None:
    """The slot this process was started in (a run of hydra/launcher=local or of a packed SLURM
    task: its GPU, cores, how many share them), or None."""
    try:
        record = json.loads(os.environ.get(SLOT_ENV) or "null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def affinity_cpus() -> int:
    """The CPUs this process is bound to (taskset, a SLURM binding), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM allocation, taskset), not the machine's count."""
    cpus = affinity_cpus()
    allocated = os.environ.get("SLURM_CPUS_PER_TASK")  # a cluster without CPU binding still allocates
    return min(cpus, int(allocated)) if allocated and allocated.isdigit() else cpus


def resolve_device(name: str) -> torch.device:
    """trainer.device (auto, cpu, cuda, cuda:N) as a device this process can use; ConfigError else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("trainer.device", name, DEVICES) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("trainer.device", name, DEVICES)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", name, "no CUDA GPU is visible to this process; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("trainer.device", name, f"this process sees {torch.cuda.device_count()} GPU(s)")
    return device


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's (for a run sharing its GPU with others of its launch, at most
    its share of what was free when the launch began), or this process's share of the host's
    (torchrun ranks, and runs a scheduler started side by side, share it)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        budget = (this_slot() or {}).get("gpu_budget_bytes")
        return min(free, int(budget)) if budget else free
    alongside = int((this_slot() or {}).get("parallel") or 1)  # runs the scheduler started beside this one
    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) // alongside


def submitit_tasks() -> int:
    """The tasks of the submitit job this process is one of (1 outside a job)."""
    try:
        return submitit.JobEnvironment().num_tasks
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return 1


def slurm_array_job_id() -> str | None:
    """The SLURM job array this process is a task of (None: not an array task)."""
    return os.environ.get("SLURM_ARRAY_JOB_ID")


def rank_gpu(device: torch.device) -> torch.device:
    """A CUDA device without an index as the GPU this process's rank takes: its LOCAL_RANK (torchrun's,
    or submitit's for SLURM tasks) modulo the GPUs it sees, so a SLURM task bound to one GPU takes
    `cuda:0` whatever its rank; any other device as it is."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def select_device(device: torch.device) -> torch.device:
    """The device this process trains on (rank_gpu), made the current CUDA device: NCCL's first
    collective, pinned-memory threads and any tensor created without a device go there, not to GPU 0.
    A CPU device is returned as it is."""
    device = rank_gpu(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def ranks_sharing_cpus() -> int:
    """How many ranks of one run share this process's CPUs: torchrun's LOCAL_WORLD_SIZE (its ranks
    are processes of one allocation), or 1: outside DDP, and for ranks that are SLURM tasks, whose
    CPUs (usable_cpus) are already the task's own."""
    if submitit_tasks() > 1:
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def slurm_job_id() -> str | None:
    """This process's SLURM job (`13_0` for an array task), or None: also inside submitit's local
    executor (hydra/launcher=local), whose job ids are process ids, not SLURM's."""
    try:
        env = submitit.JobEnvironment()
        if env.cluster == "slurm":
            return str(env.job_id)
    except Exception:  # noqa: BLE001 - not inside a submitit job
        pass
    array = slurm_array_job_id()
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


GIT_DIFF = "git.diff"  # a dirty tree's changes, in the run directory (provenance.git_diff names it)


@functools.lru_cache(maxsize=None)  # the code this process runs was loaded when it started
def _git(*args: str, repo: Path | None = None, strip: bool = True) -> str | None:
    """git's output in `repo` (default: the checkout this package runs from); None outside one."""
    try:
        out = subprocess.run(["git", *args], cwd=repo or Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if strip else out.stdout


def save_git_diff(run_dir: Path, repo: Path | None = None) -> str | None:
    """A dirty tree's commit alone does not say what ran: `git diff HEAD` goes to `<run_dir>/git.diff`
    (atomic), after a header naming the untracked files (names only: data or outputs can be huge;
    `git apply` skips the header). Returns the file's name, None when there is nothing to save."""
    diff = _git("diff", "HEAD", repo=repo, strip=False)
    if not diff:
        return None
    untracked = _git("ls-files", "--others", "--exclude-standard", "--full-name", "--", ":/", repo=repo) or ""
    names = [f"#   {name}\n" for name in untracked.splitlines() if name]
    header = (f"# git diff HEAD of {_git('rev-parse', 'HEAD', repo=repo)}\n"
              + (f"# untracked files (not in the diff):\n{''.join(names)}" if names else "") + "\n")
    write_text(Path(run_dir) / GIT_DIFF, header + diff)
    return GIT_DIFF


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_record(device: torch.device, slot: dict | None) -> dict:
    """The GPU a run trains on: its index as the run sees it, its physical index (NVML's, found by
    its UUID; without NVML the slot's, else CUDA_VISIBLE_DEVICES' entry where CUDA_DEVICE_ORDER=
    PCI_BUS_ID makes CUDA's order NVML's; else None), UUID and name, the NVIDIA driver (None without
    NVML), and the CUDA runtime and cuDNN torch runs it with."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    facts = gpu_facts(torch.device("cuda", index))
    physical = facts["physical"]
    if physical is None and slot and slot.get("gpu") is not None:
        physical = slot["gpu"]
    elif physical is None and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        entries = parse_cuda_visible(os.environ.get("CUDA_VISIBLE_DEVICES"))
        entry = index if entries is None else entries[index] if index < len(entries) else None
        physical = entry if isinstance(entry, int) else None
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a build without cuDNN
        cudnn = None
    return {"index": index, "physical": physical,
            "uuid": facts["uuid"] or (f"GPU-{uuid}" if uuid is not None else None), "name": props.name,
            "driver": facts["driver"], "cuda": torch.version.cuda, "cudnn": cudnn}


def sharing() -> dict:
    """How many runs shared this run's GPU (or, without one, ran in parallel on the machine or its
    SLURM task), from the slot the launcher started it in; a run started alone shares with none."""
    slot = this_slot() or {}
    return {"shared_by": int(slot.get("shared_by") or 1), "parallel": int(slot.get("parallel") or 1),
            "packed_in": slot.get("packed_in"), "slot_gpu": slot.get("gpu"), "slot_cpus": slot.get("cpus"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def provenance(device: torch.device | None, run_dir: Path | None = None, repo: Path | None = None) -> dict:
    """Where and with what a run executes; `device` None: not chosen yet. With `run_dir` (once per
    start, by the directory's owner) a dirty tree's diff is saved there and `git_diff` names it (None:
    clean). `repo`: the checkout to describe, default this package's."""
    status = _git("status", "--porcelain", "--untracked-files=no", repo=repo)
    if device is None:
        shown = None
    elif device.type == "cuda":
        shown = torch.cuda.get_device_name(device)
    else:
        shown = f"cpu ({_cpu_name()})"
    return {
        "git_commit": _git("rev-parse", "HEAD", repo=repo),
        "git_dirty": None if status is None else bool(status),
        **({"git_diff": save_git_diff(run_dir, repo) if status else None} if run_dir is not None else {}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": shown,
        "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
        "gpu": _gpu_record(device, this_slot()) if device is not None and device.type == "cuda" else None,
        "sharing": sharing(),
    }
