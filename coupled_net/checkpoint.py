"""The checkpoint format (SPEC §5): the one module that writes and reads a run's checkpoints.

- `last.pt` (and its periodic copies `epoch_NNN.pt`): a training checkpoint, `{"model": state_dict,
  "optimizer", "scheduler", "scaler", "progress": the loop state, "rng": every rank's generators (a
  list in rank order; the GPU's of the run's own device only), "epoch_row": that epoch's epochs.csv
  row, "fingerprint", "identity"}`, saved at the end of an epoch after KE (equalized), or mid-epoch when
  the run was interrupted (then equalized only with coupling.schedule=step).
- `best.pt`: a plain state_dict of the best epoch's weights, saved *after* KE, so already equalized;
  the run's fingerprint and the epoch are in the state_dict's `_metadata` (load_state_dict ignores it).
- any other file given to re-evaluate: a state_dict, or a dict of that shape with it under "model".

Whole files are written atomically (coupled_net.storage); training checkpoints are read
memory-mapped (cheap to open just to read their fingerprint), everything else with
torch.load(weights_only=True): no code from the file is run."""

from __future__ import annotations

import logging
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, one_line
from .storage import atomic_write

log = logging.getLogger(__name__)


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


# ---- training checkpoints (last.pt, epoch_NNN.pt) -----------------------------------------------

def rng_state(device: torch.device | None = None) -> dict:
    """This process's generators: Python's, numpy's, torch's CPU one and, on a GPU, the run's own
    device's (not every visible GPU's: a resume may see fewer, or others)."""
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    on_gpu = device is not None and device.type == "cuda"
    if isinstance(cuda, list):  # written before 2026-12: one state per GPU the run saw; the run's own, if there
        index = (device.index or 0) if on_gpu else None
        cuda = cuda[index] if index is not None and index < len(cuda) else None
    if cuda is not None and on_gpu:
        torch.cuda.set_rng_state(cuda, device)


def rank_rng(saved, rank: int) -> dict | None:
    """The generators' state `rank` saved: last.pt holds one per rank (in rank order); one written
    before 2026-12 holds rank 0's alone, which every rank then used. None: this rank saved none (the run
    resumes with more processes than it had)."""
    if isinstance(saved, dict):
        return saved
    return saved[rank] if rank < len(saved) else None


def _state_dict_like(state: dict, items) -> dict:
    """`items` as a state_dict of `state`'s type, with its own copy of `state`'s `_metadata`."""
    out = type(state)(items)
    out._metadata = dict(getattr(state, "_metadata", {}))
    return out


def host_weights(model: torch.nn.Module) -> dict:
    """The model's state_dict copied to the host once (its `_metadata` kept): what last.pt and best.pt
    are both written from."""
    state = model.state_dict()
    return _state_dict_like(state, ((k, v.detach().to("cpu")) for k, v in state.items()))


def shallow_copy(state: dict) -> dict:
    """A state_dict sharing `state`'s tensors, with its own `_metadata` (best.pt stamps it)."""
    return _state_dict_like(state, state)


def training_state(*, model, optimizer, scheduler, scaler, progress: dict, stamp: dict, rng: list[dict],
                   weights: dict | None = None, row: dict | None = None) -> dict:
    """What last.pt holds: everything a resume needs to continue exactly (`stamp`: the run's
    fingerprint and identity keys; `rng`: every rank's generators, in rank order; `weights`: the
    model's state_dict already on the host, default its live one; `row`: the epochs.csv row of the
    epoch the checkpoint ends, for a kill before that row was appended)."""
    return {"model": model.state_dict() if weights is None else weights, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "progress": progress, "rng": rng,
            "epoch_row": row, **stamp}


def restore_training(ckpt: dict, *, model, optimizer, scheduler, scaler, rank: int = 0,
                     device: torch.device | None = None) -> dict:
    """Load a training checkpoint into the run's objects and this rank's generators (`device`: the
    run's GPU, whose generator is restored); returns its loop state."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = rank_rng(ckpt["rng"], rank)
    if state is None:
        log.warning("rank %d: the checkpoint holds the generators of %d process(es) only: this rank's continue "
                    "from its own seed, so the resume is not bit-exact", rank, len(ckpt["rng"]))
    else:
        set_rng_state(state, device)
    return saved_progress(ckpt)


def saved_progress(ckpt: dict | None) -> dict:
    """A training checkpoint's loop state ({} without a checkpoint)."""
    return dict(ckpt["progress"]) if ckpt is not None else {}


def read_training(path: Path) -> dict:
    """A training checkpoint, memory-mapped on the CPU (cheap to open just to read its fingerprint)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def resume_point(last: Path, folder: Path) -> tuple[dict | None, Path | None]:
    """The newest readable training checkpoint: `last`, else the newest periodic one in `folder`. An
    unreadable file (a kill mid-write on a filesystem without atomic rename, a full disk) is skipped
    with a warning rather than crashing the run again at every restart. Reads only."""
    candidates = [last, *sorted(folder.glob("epoch_*.pt"), reverse=True)]
    existing = [p for p in candidates if p.is_file()]
    for path in existing:
        try:
            return read_training(path), path
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: try the next one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, one_line(e, 200))
    if existing:
        log.warning("no readable checkpoint in %s: starting from scratch", folder)
    return None, None


# ---- best.pt ----------------------------------------------------------------------------------

def write_best(path: Path, state: dict, fingerprint: str | None, epoch: int) -> None:
    state._metadata["coupled_net"] = {"fingerprint": fingerprint, "epoch": epoch}
    save_torch(path, state)


def best_epoch(path: Path):
    """The epoch best.pt holds ("unknown": written before best.pt recorded it); raises when unreadable."""
    meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)._metadata
    return (meta.get("coupled_net") or {}).get("epoch", "unknown")


def read_best(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


# ---- any checkpoint file, for re-evaluation -------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded checkpoint file: its model weights and what it says about itself."""
    path: Path
    kind: str                    # best | last | path
    state: dict                  # the model's state_dict
    fingerprint: str | None      # of the run that wrote it; None: not recorded
    identity: dict | None        # its identity keys (training checkpoints carry them)
    progress: dict | None        # training checkpoints: epoch, best_epoch, partial (mid-epoch), ...


def _numpy_globals() -> list:
    """What a training checkpoint's RNG state (numpy's) needs from torch.load(weights_only=True)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def refuse(path: Path, why: str) -> ConfigError:
    return ConfigError("--checkpoint", str(path), why)


def _unpickling_problem(path: Path, e: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`: Python objects it will not run, or not a
    torch file at all."""
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the reason below is as good
            unsafe = []
        if unsafe:
            return (f"holds Python objects besides tensors ({', '.join(unsafe[:3])}), which "
                    "torch.load(weights_only=True) does not run: save the model's state_dict() instead")
    detail = str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    return f"cannot be read by torch.load: not a torch checkpoint ({' '.join(detail.split())[:150]})"


def load(path: Path, kind: str = "path") -> Checkpoint:
    """Read `path` with torch.load(weights_only=True) (no code from the file is run); ConfigError
    (--checkpoint) naming the file when it cannot be read or holds no state_dict."""
    path = Path(path)
    if not path.is_file():
        raise refuse(path, "not a file" if path.exists() else "no such file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refuse(path, _unpickling_problem(path, e)) from None
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated, ...
        first = one_line(e, 300).split(". ")[0]
        raise refuse(path, f"cannot be read by torch.load ({first}): truncated or not a checkpoint?") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # last.pt, epoch_NNN.pt
        return Checkpoint(path, kind, obj["model"], obj.get("fingerprint"), obj.get("identity"), obj.get("progress"))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # best.pt
        stamp = (getattr(obj, "_metadata", None) or {}).get("coupled_net") or {}
        return Checkpoint(path, kind, obj, stamp.get("fingerprint"), None, None)
    raise refuse(path, f"holds neither a state_dict nor a training checkpoint (a dict with the state_dict "
                       f"under 'model'): it holds a {type(obj).__name__}")


def _listed(items: list[str], noun: str, plural: str, limit: int = 3) -> str:
    shown = ", ".join(items[:limit]) + (", …" if len(items) > limit else "")
    return f"{len(items)} {noun if len(items) == 1 else plural} ({shown})"


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def misfit(model: torch.nn.Module, state: dict) -> str | None:
    """Why `state` cannot be loaded into `model` (missing or unexpected keys, other shapes), in one
    line; None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {_shape(state[k])} / model {_shape(v)})" for k, v in expected.items()
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(_listed(missing, "missing key", "missing keys"))
    if unexpected:
        problems.append(_listed(unexpected, "unexpected key", "unexpected keys"))
    if shapes:
        problems.append(_listed(shapes, "shape mismatch", "shape mismatches", limit=2))
    return "; ".join(problems) or None
