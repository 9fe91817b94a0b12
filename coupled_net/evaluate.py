"""Re-evaluate a finished run's best.pt before and after KE (the seed notebook's last cells)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .results import RunFiles, write_json
from .run import build
from .trainer import Numerics, evaluate

SPLITS = {"val": ["val"], "test": ["test"], "both": ["val", "test"]}


def evaluate_run(run_dir: str | Path, split: str = "both") -> dict:
    files = RunFiles(run_dir)
    if not files.best.is_file():
        raise FileNotFoundError(f"{files.best} does not exist: has this run finished an epoch?")
    cfg = OmegaConf.load(files.dir / ".hydra" / "config.yaml")
    exp = build(cfg)
    exp.model.load_state_dict(torch.load(files.best, map_location=exp.device, weights_only=True))
    limit = cfg.trainer.limit_batches
    numerics = Numerics.from_config(cfg.trainer, exp.device)

    def on(name):
        loader = exp.loaders[name]
        return evaluate(exp.model, loader if limit is None else islice(loader, limit), exp.device, numerics)

    out = {"run_dir": str(files.dir), "checkpoint": str(files.best), "alpha": exp.coupling.alpha, "splits": {}}
    before = {name: on(name) for name in SPLITS[split]}
    exp.coupling.equalize()
    for name in SPLITS[split]:
        out["splits"][name] = {"before_ke": before[name], "after_ke": on(name)}
    write_json(files.dir / "evaluation.json", out)
    return out
