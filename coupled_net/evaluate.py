"""Re-evaluate a trained run's checkpoint on its val and/or test split, built from the run's own
config (.hydra/config.yaml) by the same builder as training (coupled_net.build).

    out = evaluate_run("outputs/runs/2026-11-25/10-00-00", split="test", checkpoint="best")

What a checkpoint holds, as the trainer writes it (SPEC §2, coupled_net.trainer):

- `best.pt`: a plain state_dict of the best epoch's weights, saved *after* KE, so already
  equalized; its fingerprint is in the state_dict's `_metadata`.
- `last.pt` (and the periodic `epoch_NNN.pt`): a training checkpoint, `{"model": state_dict,
  "progress": ..., "fingerprint": ..., "identity": ...}`, saved at the end of an epoch, after KE
  (equalized), or mid-epoch when the run was interrupted (then equalized only with
  coupling.schedule=step).
- any other file: a state_dict, or a dict of that shape with the state_dict under "model".

Whether KE changes the loaded weights is computed, not assumed: when equalizing changes nothing
(the usual case, and always for alpha=0), one set of metrics is reported (`after_ke`); otherwise
the weights as saved (`before_ke`) and after equalizing (`after_ke`).

The whole val/test split is evaluated unless `limit_batches` says otherwise: the run's own
`trainer.limit_batches` (a debugging cut of training) is ignored. The result is returned and
written to the run's evaluation.json, which records the checkpoint, device, limit and fingerprint."""

from __future__ import annotations

import pickle
import sys
import zipfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from .build import build_loaders, build_model, resolve
from .distributed import World
from .errors import ConfigError, one_line
from .identity import differences, identity_of, model_name
from .results import RunFiles, now_iso, read_json, write_json
from .trainer import Numerics, evaluate
from .validation import resolve_device

SPLITS = {"val": ["val"], "test": ["test"], "both": ["val", "test"]}
CHECKPOINTS = ("best", "last")  # anything else is a path to a .pt file


@dataclass
class Checkpoint:
    """A loaded checkpoint file: its model weights and what it says about itself."""
    path: Path
    kind: str                    # best | last | path
    state: dict                  # the model's state_dict
    fingerprint: str | None      # of the run that wrote it; None: not recorded
    identity: dict | None        # its identity keys (training checkpoints carry them)
    progress: dict | None        # training checkpoints: epoch, best_epoch, partial (mid-epoch), ...


def pick_device(name: str) -> torch.device:
    """`auto` (the trainer's choice: the current CUDA GPU if there is one, else the CPU), cpu,
    cuda, cuda:N; ConfigError (--device) for a device this process cannot use."""
    try:
        device = resolve_device(str(name))
    except ConfigError as e:
        raise ConfigError("--device", name, e.allowed) from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _numpy_globals() -> list:
    """What a training checkpoint's RNG state (numpy's) needs from torch.load(weights_only=True)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def _refuse(path: Path, why: str) -> ConfigError:
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


def load_checkpoint(path: Path, kind: str = "path") -> Checkpoint:
    """Read `path` with torch.load(weights_only=True) (no code from the file is run); ConfigError
    naming the file when it cannot be read or holds no state_dict."""
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "not a file" if path.exists() else "no such file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, _unpickling_problem(path, e)) from None
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated, ...
        first = one_line(e, 300).split(". ")[0]
        raise _refuse(path, f"cannot be read by torch.load ({first}): truncated or not a checkpoint?") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # last.pt, epoch_NNN.pt
        return Checkpoint(path, kind, obj["model"], obj.get("fingerprint"), obj.get("identity"), obj.get("progress"))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # best.pt
        stamp = (getattr(obj, "_metadata", None) or {}).get("coupled_net") or {}
        return Checkpoint(path, kind, obj, stamp.get("fingerprint"), None, None)
    raise _refuse(path, f"holds neither a state_dict nor a training checkpoint (a dict with the state_dict "
                        f"under 'model'): it holds a {type(obj).__name__}")


def _another_run(ckpt: Checkpoint, identity) -> str:
    """Why `ckpt` is not of the run of `identity`, naming the differing config keys where known: from
    the checkpoint itself, or from the results.json of the run directory it lies in."""
    stored = ckpt.identity
    if stored is None:
        beside = read_json(ckpt.path.parent.parent / "results.json") or {}
        if beside.get("fingerprint") == ckpt.fingerprint:
            stored = beside.get("identity")
    diff = differences(stored, identity.keys) if stored else []
    if diff:
        return f"a checkpoint of another run (its config → this run's: {'; '.join(diff)})"
    return f"a checkpoint of another run (fingerprint {ckpt.fingerprint}; this run's is {identity.fingerprint})"


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


def _coupled_params(coupling) -> list[torch.Tensor]:
    return [p for _, conv in coupling.layers for p in (conv.weight, conv.bias) if p is not None]


def ke_changes_weights(coupling) -> bool:
    """Would equalizing change any weight of the coupled layers? The weights are left as they are."""
    saved = [p.detach().clone() for p in _coupled_params(coupling)]
    coupling.equalize()
    changed = any(not torch.equal(a, p) for a, p in zip(saved, _coupled_params(coupling)))
    with torch.no_grad():
        for a, p in zip(saved, _coupled_params(coupling)):
            p.copy_(a)
    return changed


def measure(model, loader, device: torch.device, numerics: Numerics, limit: int | None = None,
            progress: bool = False, desc: str = "") -> dict:
    """evaluate() over the first `limit` batches of `loader` (all: None), with the number of
    samples and batches seen."""
    from tqdm import tqdm

    n = len(loader) if limit is None else min(len(loader), limit)
    seen = {"samples": 0, "batches": 0}

    def counted():
        for images, labels in tqdm(islice(loader, n), total=n, desc=desc, leave=False, disable=not progress,
                                     file=sys.stderr):
            seen["samples"] += int(labels.size(0))
            seen["batches"] += 1
            yield images, labels

    return {**evaluate(model, counted(), device, numerics), **seen}


def _checkpoint_path(files: RunFiles, checkpoint: str) -> tuple[Path, str]:
    if checkpoint in CHECKPOINTS:
        path = files.best if checkpoint == "best" else files.last
        if not path.is_file():
            hint = "has this run finished an epoch?" if checkpoint == "best" else "has this run started an epoch?"
            raise ConfigError("--checkpoint", checkpoint, f"{path} does not exist ({hint})")
        return path, checkpoint
    return Path(checkpoint).expanduser().absolute(), "path"


def evaluate_run(run_dir: str | Path, split: str = "both", checkpoint: str = "best", device: str = "auto",
                 limit_batches: int | None = None, progress: bool = False) -> dict:
    """Evaluate `checkpoint` (best | last | a .pt path) of the run in `run_dir` on `split` (val | test
    | both) on `device` (auto | cpu | cuda | cuda:N), over whole splits or the first `limit_batches`
    batches of each; returns the record also written to `run_dir`/evaluation.json. Raises
    ConfigError (one line, nothing written) for anything that does not fit."""
    if split not in SPLITS:
        raise ConfigError("--split", split, f"allowed: {', '.join(SPLITS)}")
    if limit_batches is not None and (isinstance(limit_batches, bool) or not isinstance(limit_batches, int)
                                      or limit_batches < 1):
        raise ConfigError("--limit-batches", limit_batches, "must be a positive integer (leave it out: whole splits)")
    dev = pick_device(device)
    files = RunFiles(Path(run_dir).expanduser().absolute())
    config = files.hydra / "config.yaml"
    if not files.dir.is_dir():
        raise ConfigError("run_dir", str(files.dir), "no such directory")
    if not config.is_file():
        raise ConfigError("run_dir", str(files.dir), "is not a run directory: .hydra/config.yaml is missing")
    try:
        cfg = OmegaConf.load(config)
    except Exception as e:  # noqa: BLE001 - not YAML, unreadable
        raise ConfigError("run_dir", str(files.dir), f".hydra/config.yaml cannot be read: {one_line(e, 200)}") from None
    identity = identity_of(cfg)
    results = files.read_results() or {}
    if results.get("fingerprint") and results["fingerprint"] != identity.fingerprint:
        diff = differences(results.get("identity") or {}, identity.keys)
        raise ConfigError("run_dir", str(files.dir), f".hydra/config.yaml is not the config of the run in "
                          f"results.json ({'; '.join(diff) or 'another fingerprint'}): it cannot be re-evaluated "
                          f"from it")
    path, kind = _checkpoint_path(files, checkpoint)
    ckpt = load_checkpoint(path, kind)
    if ckpt.fingerprint and ckpt.fingerprint != identity.fingerprint:
        if kind == "path":
            raise _refuse(path, _another_run(ckpt, identity))
        raise ConfigError("run_dir", str(files.dir), f".hydra/config.yaml is not the config of the run in "
                          f"checkpoints/{path.name}: it cannot be re-evaluated from it")

    trained_limit = cfg.trainer.get("limit_batches")
    with open_dict(cfg):
        cfg.trainer.device = str(dev)
    spec = resolve(cfg, World())  # one process: the whole split, never a DDP shard
    model, coupling = build_model(spec)
    problem = misfit(model, ckpt.state)
    if problem:
        raise _refuse(path, f"does not fit this run's model ({model_name(cfg.model)}): {problem}")
    model.load_state_dict(ckpt.state)
    memory = torch.channels_last if cfg.trainer.get("channels_last") else torch.preserve_format
    model.to(dev, memory_format=memory)
    loaders = build_loaders(spec)
    numerics = Numerics.from_config(cfg.trainer, dev)
    names = SPLITS[split]

    def on(name: str, when: str) -> dict:
        return measure(model, loaders[name], dev, numerics, limit_batches, progress, f"{name} {when}")

    saved = {name: on(name, "as saved") for name in names} if ke_changes_weights(coupling) else None
    coupling.equalize()
    partial = (ckpt.progress or {}).get("partial")
    out = {
        "run_dir": str(files.dir), "fingerprint": identity.fingerprint,
        "checkpoint": str(path), "checkpoint_kind": kind, "checkpoint_fingerprint": ckpt.fingerprint,
        "checkpoint_epoch": (ckpt.progress or {}).get("epoch") if kind != "best" else results.get("best_epoch"),
        "checkpoint_mid_epoch": {k: partial[k] for k in ("epoch", "step")} if partial else None,
        "model": model_name(cfg.model), "alpha": coupling.alpha, "coupling_mode": coupling.mode,
        "select_by": cfg.trainer.get("select_by"),
        "device": str(dev), "limit_batches": limit_batches, "trained_limit_batches": trained_limit,
        "already_equalized": saved is None, "evaluated_at": now_iso(), "splits": {},
    }
    for name in names:
        after = on(name, "after KE")
        out["splits"][name] = {"after_ke": after} if saved is None else {"before_ke": saved[name], "after_ke": after}
    write_json(files.dir / "evaluation.json", out)
    return out


# ---- what launch/evaluate.py prints -------------------------------------------------------------

def describe(out: dict) -> list[str]:
    """What was evaluated, in words: the checkpoint, whether KE changes it, device and batches."""
    kind, epoch, alpha = out["checkpoint_kind"], out["checkpoint_epoch"], out["alpha"]
    run = f"{out['run_dir']} ({out['model']}, alpha={alpha}, {out['coupling_mode']}; fingerprint {out['fingerprint']})"
    lines = [f"run         {run}"]
    if kind == "best":
        chosen = f"epoch {epoch}, chosen by {out['select_by']}" if epoch else f"chosen by {out['select_by']}"
        what = f"the best epoch's weights ({chosen}), saved after KE"
    elif out["checkpoint_mid_epoch"]:
        at = out["checkpoint_mid_epoch"]
        what = f"a training state saved mid-epoch (interrupted at step {at['step']} of epoch {at['epoch']})"
    elif kind == "last":
        what = f"the training state at the end of epoch {epoch}, saved after KE"
    elif epoch is not None:
        what = f"a training checkpoint of the end of epoch {epoch}"
    else:
        what = "a state_dict" + ("" if out["checkpoint_fingerprint"] else " (no fingerprint: its run is not checked)")
    lines.append(f"checkpoint  {out['checkpoint']}: {what}")
    limit, trained = out["limit_batches"], out["trained_limit_batches"]
    if limit:
        batches = f"at most {limit} batch{'es' if limit > 1 else ''} per split (--limit-batches)"
    else:
        batches = "whole splits" + (f" (the run's trainer.limit_batches={trained} is not applied)" if trained else "")
    lines.append(f"device      {out['device']}; {batches}")
    if not out["already_equalized"]:
        lines.append(f"KE changes these weights (alpha={alpha}): metrics as saved (before KE) and after KE")
    elif alpha == 0:
        lines.append("alpha=0 (no coupling): KE changes nothing, before and after KE are the same model")
    elif kind == "best":
        lines.append(f"best.pt holds equalized weights (saved after KE, alpha={alpha}): before and after KE "
                     "are the same model, so one set of metrics")
    else:
        lines.append(f"weights already equalized (alpha={alpha}): before and after KE are the same model")
    return lines


def table(out: dict) -> list[str]:
    rows = [f"{'split':6} {'weights':22} {'samples':>8} {'top-1':>8} {'top-5':>8} {'loss':>9}"]
    for split, metrics in out["splits"].items():
        shown = [("equalized, as saved", metrics["after_ke"])] if "before_ke" not in metrics else \
            [("as saved (before KE)", metrics["before_ke"]), ("after KE", metrics["after_ke"])]
        for label, m in shown:
            rows.append(f"{split:6} {label:22} {m['samples']:8d} {m['top1']:8.2f} {m['top5']:8.2f} {m['loss']:9.4f}")
    return rows
