"""Re-evaluate a trained run's checkpoint on its val and/or test split, built from the run's own
config (.hydra/config.yaml) by the same builder as training (coupled_net.build).

    out = evaluate_run("outputs/runs/2026-11-25/10-00-00", split="test", checkpoint="best")

What a checkpoint holds: coupled_net.checkpoint (best.pt is equalized; last.pt is a training
checkpoint, equalized unless it was saved mid-epoch; any other file is a state_dict).

Whether KE changes the loaded weights is computed, not assumed: when equalizing changes nothing
(the usual case, and always for alpha=0), one set of metrics is reported (`after_ke`); otherwise
the weights as saved (`before_ke`) and after equalizing (`after_ke`).

The whole val/test split is evaluated unless `limit_batches` says otherwise: the run's own
`trainer.limit_batches` (a debugging cut of training) is ignored. The result is returned and
written to the run's evaluation.json, which records the checkpoint, device, limit and fingerprint."""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict
from tqdm import tqdm

from .build import build_callbacks, build_coupled_model, build_loaders, resolve
from .checkpoint import Checkpoint, load, misfit, refuse
from .distributed import World
from .errors import ConfigError, one_line
from .identify import identity_of
from .identity import differences, model_name
from .machine import resolve_device
from .loopcallbacks import Context
from .results import FINISHED, RunFiles, now_iso
from .storage import write_json
from .trainer import Numerics, evaluate_batches
from .validation import check_config

SPLITS = {"val": ["val"], "test": ["test"], "both": ["val", "test"]}
CALLBACKS = Path(__file__).resolve().parents[1] / "conf" / "callbacks"  # --callbacks NAME: NAME.yaml here
CHECKPOINTS = ("best", "last")  # anything else is a path to a .pt file


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


def _another_run(ckpt: Checkpoint, identity) -> str:
    """Why `ckpt` is not of the run of `identity`, naming the differing config keys where known: from
    the checkpoint itself, or from the results.json of the run directory it lies in."""
    stored = ckpt.identity
    if stored is None:
        beside = RunFiles(ckpt.path.parent.parent).read_results() or {}
        if beside.get("fingerprint") == ckpt.fingerprint:
            stored = beside.get("identity")
    diff = differences(stored, identity.keys) if stored else []
    if diff:
        return f"a checkpoint of another run (its config → this run's: {'; '.join(diff)})"
    return f"a checkpoint of another run (fingerprint {ckpt.fingerprint}; this run's is {identity.fingerprint})"


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
    """evaluate_batches() over the first `limit` batches of `loader` (all: None), with the number of
    samples and batches seen."""
    n = len(loader) if limit is None else min(len(loader), limit)
    seen = {"samples": 0, "batches": 0}

    def counted():
        for images, labels in tqdm(islice(loader, n), total=n, desc=desc, leave=False, disable=not progress,
                                     file=sys.stderr):
            seen["samples"] += int(labels.size(0))
            seen["batches"] += 1
            yield images, labels

    return {**evaluate_batches(model, counted(), device, numerics), **seen}


def _checkpoint_path(files: RunFiles, checkpoint: str) -> tuple[Path, str]:
    if checkpoint in CHECKPOINTS:
        path = files.best if checkpoint == "best" else files.last
        if not path.is_file():
            hint = "has this run finished an epoch?" if checkpoint == "best" else "has this run started an epoch?"
            raise ConfigError("--checkpoint", checkpoint, f"{path} does not exist ({hint})")
        return path, checkpoint
    return Path(checkpoint).expanduser().absolute(), "path"


def callback_configs(names) -> dict:
    """`--callbacks` as the `callbacks` config: each NAME is conf/callbacks/NAME.yaml, or a YAML file of
    the same form ({name: {_target_: ..., ...}})."""
    merged = {}
    for name in names:
        path = Path(name) if str(name).endswith((".yaml", ".yml")) else CALLBACKS / f"{name}.yaml"
        if not path.is_file():
            options = ", ".join(sorted(p.stem for p in CALLBACKS.glob("*.yaml") if p.stem != "none"))
            raise ConfigError("--callbacks", name, f"no such callback (options: {options}; or a YAML file)")
        node = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(node, dict) or not node:
            raise ConfigError("--callbacks", name, f"{path} holds no callback ({{name: {{_target_: ...}}}})")
        merged.update(node)
    return merged


def evaluate_run(run_dir: str | Path, split: str = "both", checkpoint: str = "best", device: str = "auto",
                 limit_batches: int | None = None, progress: bool = False, callbacks=()) -> dict:
    """Evaluate `checkpoint` (best | last | a .pt path) of the run in `run_dir` on `split` (val | test
    | both) on `device` (auto | cpu | cuda | cuda:N), over whole splits or the first `limit_batches`
    batches of each; returns the record also written to `run_dir`/evaluation.json. `callbacks`
    (names, callback_configs): their on_fit_end on the best, equalized model, as the run would have
    called it, recorded in evaluation.json and, for a finished run, in results.json's `callbacks`
    (a probe added to a sweep after its runs ended). Raises ConfigError (one line, nothing written)
    for anything that does not fit."""
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
    if results.get("fingerprint") and not identity.matches(results):
        diff = differences(results.get("identity") or {}, identity.keys)
        raise ConfigError("run_dir", str(files.dir), f".hydra/config.yaml is not the config of the run in "
                          f"results.json ({'; '.join(diff) or 'another fingerprint'}): it cannot be re-evaluated "
                          f"from it")
    path, kind = _checkpoint_path(files, checkpoint)
    ckpt = load(path, kind)
    if ckpt.fingerprint and not identity.matches({"fingerprint": ckpt.fingerprint, "identity": ckpt.identity}):
        if kind == "path":
            raise refuse(path, _another_run(ckpt, identity))
        raise ConfigError("run_dir", str(files.dir), f".hydra/config.yaml is not the config of the run in "
                          f"checkpoints/{path.name}: it cannot be re-evaluated from it")

    trained_limit = cfg.trainer.get("limit_batches")
    with open_dict(cfg):
        cfg.trainer.device = str(dev)
        if callbacks:
            if (kind, split, limit_batches) != ("best", "both", None):
                raise ConfigError("--callbacks", ",".join(callbacks), "on_fit_end runs on the best, equalized model "
                                  "over whole splits: use it with --checkpoint best --split both, without "
                                  "--limit-batches")
            cfg.callbacks = callback_configs(callbacks)
            check_config(cfg)  # their keys, as a run's: before anything is built
    spec = resolve(cfg, World())  # one process: the whole split, never a DDP shard
    model, coupling = build_coupled_model(spec)
    problem = misfit(model, ckpt.state)
    if problem:
        raise refuse(path, f"does not fit this run's model ({model_name(cfg.model)}): {problem}")
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
    if callbacks:
        ctx = Context(model=model, coupling=coupling, loaders=loaders, device=dev, run_dir=files.dir,
                      epoch=results.get("best_epoch") or 0)
        out["callbacks"] = build_callbacks(cfg).fit_end(ctx, {n: out["splits"][n]["after_ke"] for n in names})
        if results.get("status") in FINISHED and out["callbacks"]:
            files.write_results({**results, "callbacks": {**(results.get("callbacks") or {}), **out["callbacks"]}})
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
