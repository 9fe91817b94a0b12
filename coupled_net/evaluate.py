"""Re-evaluate a finished run's best.pt before and after KE (the seed notebook's last cells),
built from the run's own config by the same builder as training (coupled_net.build)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .build import build_loaders, build_model, resolve
from .errors import ConfigError
from .identity import identity_of
from .results import RunFiles, write_json
from .trainer import Numerics, evaluate

SPLITS = {"val": ["val"], "test": ["test"], "both": ["val", "test"]}


def evaluate_run(run_dir: str | Path, split: str = "both") -> dict:
    files = RunFiles(run_dir)
    if not files.best.is_file():
        raise FileNotFoundError(f"{files.best} does not exist: has this run finished an epoch?")
    cfg = OmegaConf.load(files.hydra / "config.yaml")
    recorded = (files.read_results() or {}).get("fingerprint")
    best = torch.load(files.best, map_location="cpu", weights_only=True)
    stamped = (getattr(best, "_metadata", None) or {}).get("coupled_net", {}).get("fingerprint")
    for where, fingerprint in (("results.json", recorded), ("checkpoints/best.pt", stamped)):
        if fingerprint and fingerprint != identity_of(cfg).fingerprint:
            raise ConfigError("run_dir", str(files.dir), f".hydra/config.yaml is not the config of the run in "
                              f"{where}: it cannot be re-evaluated from it")
    spec = resolve(cfg)
    model, coupling = build_model(spec)
    model.load_state_dict(best)
    model.to(spec.device)
    loaders = build_loaders(spec)
    limit = cfg.trainer.limit_batches
    numerics = Numerics.from_config(cfg.trainer, spec.device)

    def on(name):
        loader = loaders[name]
        return evaluate(model, loader if limit is None else islice(loader, limit), spec.device, numerics)

    out = {"run_dir": str(files.dir), "checkpoint": str(files.best), "alpha": coupling.alpha, "splits": {}}
    before = {name: on(name) for name in SPLITS[split]}
    coupling.equalize()
    for name in SPLITS[split]:
        out["splits"][name] = {"before_ke": before[name], "after_ke": on(name)}
    write_json(files.dir / "evaluation.json", out)
    return out
