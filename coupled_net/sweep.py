"""A sweep is planned before anything in it starts (SPEC §6): every job's run directory (named from
its identity overrides, coupled_net.identity.run_name) is inspected. A directory holding a run of
another config, or two jobs that would share one directory, refuse the whole launch, listing every
conflict, before anything is written or submitted; jobs whose directory holds their finished run
are not launched again. Each run checks again when it starts (coupled_net.run.inspect, under the
directory's lock), so a race between two launches is still caught."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError
from .identity import identity_of, run_key
from .validation import OBJECTIVES, check_config
from .run import Verdict, inspect

log = logging.getLogger(__name__)


@dataclass
class PlannedJob:
    num: int
    overrides: list[str]
    run_dir: Path
    verdict: Verdict | None  # None: the job's config cannot be resolved (the run itself will say why)
    done_in: Path | None = None  # finished: where (its own directory, or another one of the sweep)
    error: str | None = None  # its config is refused (coupled_net.validation.check_config): so is the launch


_launch: list[PlannedJob] | None = None  # the jobs of this process's current launch (set by the sweeper)


def remember(planned: list[PlannedJob]) -> None:
    global _launch
    _launch = planned


def launched() -> list[PlannedJob] | None:
    """The jobs the current launch planned (finished ones included), or None outside a planned sweep."""
    return _launch


# ---- a dataset no run of the sweep can have --------------------------------------------------------
# When a run finds its dataset unavailable (not on disk, not downloadable), every other run of the
# same launch with the same dataset and root would fail the same way, each after its own download
# attempt (a timeout apiece; 40 of them on a cluster). The first failure is remembered for the
# launch: in this process (the basic launcher runs jobs here), and for the tasks of one SLURM array
# in a file in the sweep directory named after the array's job id, so a re-launch tries again.

_unavailable: dict[str, str] = {}
not_started: dict[str, str] = {}  # run dir -> why this launch did not start it


def _unavailable_file(sweep_dir: Path) -> Path | None:
    import os

    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return Path(sweep_dir) / f".unavailable.{array}.json" if array else None


def note_unavailable(sweep_dir: Path, dataset: str, reason: str) -> None:
    from .results import read_json, write_json

    _unavailable[dataset] = reason
    path = _unavailable_file(sweep_dir)
    if path is not None:
        try:
            write_json(path, {**(read_json(path) or {}), dataset: reason})
        except OSError:
            pass  # only an optimisation: the other tasks find out for themselves


def unavailable(sweep_dir: Path, dataset: str) -> str | None:
    """The first failure's line if `dataset` (name and root) was found unavailable in this launch."""
    from .results import read_json

    if dataset in _unavailable:
        return _unavailable[dataset]
    path = _unavailable_file(sweep_dir)
    return (read_json(path) or {}).get(dataset) if path is not None and path.is_file() else None


def planned_num(overrides, default: int) -> int:
    """A job's number in the whole launch (finished jobs are left out of the batches the launchers see)."""
    for job in _launch or ():
        if job.overrides == list(overrides):
            return job.num
    return default


def _finished_runs(sweep_dir: Path) -> dict[str, Path]:
    """(fingerprint, labels) -> run dir, for the finished runs directly below `sweep_dir`."""
    from .results import FINISHED, read_json

    found = {}
    for run_dir in sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else ():
        res = read_json(run_dir / "results.json") if run_dir.is_dir() else None
        if isinstance(res, dict) and res.get("fingerprint") and res.get("status") in FINISHED:
            found.setdefault(run_key(res["fingerprint"], res.get("labels")), run_dir)
    return found


def job_config(config_loader, config: DictConfig, overrides: Sequence[str], num: int) -> tuple[Path, DictConfig]:
    """Job `num`'s composed config and the run directory Hydra will give it."""
    cfg = config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
        cfg.hydra.job.id = num
    return (Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)).absolute(), cfg


def plan(config_loader, config: DictConfig, jobs: Sequence[Sequence[str]], first_num: int = 0) -> list[PlannedJob]:
    """Every job's run directory and what it holds. A job whose run (same fingerprint and labels) is
    already finished in another directory of the sweep — the same overrides spelt another way, a
    default value typed out — counts as done there, not as a run to train again."""
    planned, elsewhere = [], None
    for num, overrides in enumerate(jobs, start=first_num):
        run_dir, cfg = job_config(config_loader, config, overrides, num)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        job = PlannedJob(num, list(overrides), run_dir, None)
        try:
            check_config(task)  # a bad value in one job refuses the whole launch (see bad_configs)
            identity = identity_of(task)
            job.verdict = inspect(run_dir, identity)
            job.verdict.checkpoint = None  # only its fingerprint was needed here
        except ConfigError as e:
            job.error = str(e)
            planned.append(job)
            continue
        if job.verdict.kind == "done":
            job.done_in = run_dir
        elif job.verdict.kind == "new":
            if elsewhere is None:
                elsewhere = _finished_runs(run_dir.parent)
            job.done_in = elsewhere.get(identity.run_key)
        planned.append(job)
    return planned


def bad_configs(planned: list[PlannedJob]) -> list[str]:
    """Each mistake in the jobs' configs once (`coupling.alpha=0,2 optimizer.lr=-1` makes one twice)."""
    return list(dict.fromkeys(job.error for job in planned if job.error))


def conflicts(planned: list[PlannedJob]) -> list[str]:
    """One line per job that must not start: another config's run in its directory, or a directory
    another job of this launch would use too."""
    lines, by_dir = [], {}
    for job in planned:
        by_dir.setdefault(job.run_dir, []).append(job)
        if job.verdict is not None and job.verdict.kind == "conflict":
            lines.append(f"{job.run_dir}: {job.verdict.problem}; choose another hydra.sweep.dir, or launch with "
                         "the config it was made with")
    for run_dir, jobs in by_dir.items():
        if len(jobs) > 1:
            shown = "; ".join(" ".join(j.overrides) for j in jobs)
            lines.append(f"{run_dir}: {len(jobs)} jobs of this sweep would share it ({shown}): they differ only "
                         "in keys that do not change the run (dataset.root, trainer.device, +labels, ...), "
                         "so they are one run")
    return lines


def finished(planned: list[PlannedJob]) -> list[PlannedJob]:
    return [j for j in planned if j.done_in is not None]


# ---- what a run returns to a sweeper that optimizes (hparams_search=optuna_lr) ---------------------
# validation.OBJECTIVES says where each optimized_metric is and which way is better. conf/hparams_search/
# *.yaml take hydra.sweeper.direction from it (the coupled_net.direction resolver), so
# optimized_metric=val_loss alone makes a study minimize.


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


STUDY_FILE = "optimization_results.yaml"  # what hydra-optuna-sweeper writes into the sweep directory


def best_trial(sweep_dir: Path) -> tuple[dict, Path | None] | None:
    """The study's result as hydra-optuna-sweeper wrote it ({name, best_params, best_value}) and the run
    directory of its best trial (the one whose overrides hold every best parameter; None if none does),
    or None when the sweep directory holds no study result."""
    path = Path(sweep_dir) / STUDY_FILE
    if not path.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    study = OmegaConf.to_container(OmegaConf.load(path))
    wanted = study.get("best_params") or {}
    parser = OverridesParser.create()
    for run_dir in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        overrides = run_dir / ".hydra" / "overrides.yaml"
        if not wanted or not overrides.is_file():
            continue
        try:  # compared as values, as Hydra parses them: 1e-05 and 1.0e-05 are one weight decay
            given = {o.key_or_group: o.value() for o in parser.parse_overrides([str(o) for o in OmegaConf.load(
                overrides)])}
        except (HydraException, OSError, ValueError):
            continue
        if all(k in given and given[k] == v for k, v in wanted.items()):
            return study, run_dir
    return study, None
