"""What a run returns to a sweeper that optimizes (hparams_search=optuna_lr): the optimized_metric
table, which way each metric is better, and the value of a run that has none to offer.

conf/hparams_search/*.yaml take hydra.sweeper.direction from `direction` (the coupled_net.direction
resolver, coupled_net.identity), so optimized_metric=val_loss alone makes a study minimize."""

from __future__ import annotations

import math
import sys

from .errors import ConfigError

# optimized_metric -> where it is in results.json's `metrics` (the best model, equalized) and which way
# is better
OBJECTIVES = {"val_top1": (("val", "top1"), "maximize"), "val_top5": (("val", "top5"), "maximize"),
              "val_loss": (("val", "loss"), "minimize")}


def direction(metric: str) -> str:
    """`maximize` / `minimize` for an optimized_metric; an unknown one is refused by the config check
    (coupled_net.validation) before a study starts, so its direction does not matter: maximize."""
    return OBJECTIVES.get(str(metric), OBJECTIVES["val_top1"])[1]


def worst(metric: str) -> float:
    """What a run that has no result to offer returns: a study must go on past it and never pick it.
    Not NaN: hydra-optuna-sweeper 1.3 then tells optuna 2.10 the trial FAILED *with* the NaN, which
    optuna refuses with an error that ends the whole study (and with max_failure_rate 0.0, any failed
    trial does). Not inf for a loss: optuna accepts it, but RDB storages on MySQL cannot store it and
    optimization_results.yaml would show `.inf`; the largest finite float ranks below every real loss
    just as well (TPE only orders the values). Accuracies are percentages: 0.0 is the floor."""
    return 0.0 if direction(metric) == "maximize" else sys.float_info.max


def objective(results: dict | None, metric: str) -> float:
    """The value of `optimized_metric` for the run whose results.json is `results` (None: the run did
    not start or could not record anything). Only a `done` run has one: a `diverged` run's metrics come
    from the epochs before its loss blew up, not from a completed schedule, and a setting that diverges
    must not win a study; failed, refused and unstarted runs have none. Never NaN (see `worst`)."""
    if metric not in OBJECTIVES:
        raise ConfigError("optimized_metric", metric, f"allowed: {', '.join(OBJECTIVES)}")
    (split, name), _ = OBJECTIVES[metric]
    if not isinstance(results, dict) or results.get("status") != "done":
        return worst(metric)
    try:
        value = float(((results.get("metrics") or {}).get(split) or {})[name])
    except (KeyError, TypeError, ValueError):
        return worst(metric)
    return value if math.isfinite(value) else worst(metric)
