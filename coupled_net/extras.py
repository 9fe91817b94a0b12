"""The one table of optional extras: the options that need a package `pip install -e '.[extra]'`
adds (timm models, the trackers), and what to install when it is absent."""

from __future__ import annotations

import importlib.util

TIMM = "coupled_net.models.timm_model"
TENSORBOARD, MLFLOW, WANDB = ("coupled_net.loggers.TensorBoardLogger", "coupled_net.loggers.MLflowLogger",
                              "coupled_net.loggers.WandbLogger")
# option `_target_` -> the package to find and the extra that installs it
EXTRAS = {TIMM: ("timm", "timm"), TENSORBOARD: ("tensorboard", "tensorboard"), MLFLOW: ("mlflow", "mlflow"),
          WANDB: ("wandb", "wandb")}


def install_hint(target: str) -> str:
    """What the option `target` (one of EXTRAS) needs installed, as a refusal says it."""
    module, extra = EXTRAS[target]
    return f"needs the {module} package: pip install -e '.[{extra}]'"


def missing_extra(target: str) -> str | None:
    """What to install for the option `target` when its package is absent, else None. Looks only
    (importlib.util.find_spec): cheap enough to call for every job before a sweep starts."""
    if target not in EXTRAS:
        return None
    try:
        found = importlib.util.find_spec(EXTRAS[target][0]) is not None
    except (ImportError, ValueError):  # sys.modules[module] = None, or a broken install
        found = False
    return None if found else install_hint(target)
