"""Compose configs in-process, run the real CLI as a user would, and look at what it left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TRAIN = REPO / "launch" / "train.py"


def compose_cfg(*overrides: str):
    """The config `python launch/train.py OVERRIDES` would run (without the hydra node)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, script: Path = TRAIN, timeout: int = 600, env: dict | None = None):
    """Run an entry point as a user would, from `cwd`; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("COUPLED_NET_DATA", None)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_dirs(sweep: Path) -> list[Path]:
    """A sweep's run directories, by name (names are the runs' sorted identity overrides)."""
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) if sweep.is_dir() else []


def run_sweep(tmp_path: Path, *overrides: str, sweep: Path | None = None, **kwargs):
    """`python launch/train.py -m OVERRIDES` into tmp_path/sweep (data root tmp_path);
    returns (process, sweep dir, its run dirs by name)."""
    sweep = sweep or tmp_path / "sweep"
    proc = run_cli("-m", *overrides, f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path, **kwargs)
    return proc, sweep, run_dirs(sweep)


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `root` (hidden ones included): relative path -> (bytes, mtime in ns)."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def epoch_numbers(run_dir: Path) -> list[int]:
    import pandas as pd

    return list(pd.read_csv(Path(run_dir) / "epochs.csv")["epoch"])


def metric_table(run_dir: Path):
    """epochs.csv without its timing columns: what two equivalent runs must share exactly."""
    import pandas as pd

    timings = ["epoch_time_s", "ke_time_s", "ke_eval_time_s", "checkpoint_time_s"]
    frame = pd.read_csv(Path(run_dir) / "epochs.csv")
    return frame.drop(columns=[c for c in timings if c in frame.columns])


def wait_for(predicate, timeout: float = 300, every: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` s."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
