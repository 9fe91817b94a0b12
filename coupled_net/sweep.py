"""A sweep is planned before anything in it starts (SPEC §6): every job's run directory (named from
its identity overrides, coupled_net.identity.run_name) is inspected. A directory holding a run of
another config, or two jobs that would share one directory, refuse the whole launch, listing every
conflict, before anything is written or submitted; jobs whose directory holds their finished run
are not launched again. Each run checks again when it starts (coupled_net.rundir.examine, under the
directory's lock), so a race between two launches is still caught. Also: whether a sweep is a search
(an optimizing sweeper), and a search's result."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from .epochlog import epoch_log
from .errors import ConfigError
from .identify import identity_of
from .identity import run_key
from .machine import slurm_array_job_id
from .results import FINISHED, RunFiles
from .rundir import Verdict, examine
from .storage import read_json, write_json
from .validation import check_config

log = logging.getLogger(__name__)


@dataclass
class PlannedJob:
    num: int
    overrides: list[str]
    run_dir: Path
    verdict: Verdict | None  # None: the job's config cannot be resolved (the run itself will say why)
    done_in: Path | None = None  # finished: where (its own directory, or another one of the sweep)
    error: str | None = None  # its config is refused (coupled_net.validation.check_config): so is the launch
    lacks: list[str] = field(default_factory=list)  # finished: the callbacks of its config it has no numbers of


_launch: list[PlannedJob] | None = None  # the jobs of this process's current launch (set by the sweeper)


def remember(planned: list[PlannedJob]) -> None:
    global _launch
    _launch = planned
    _durations.clear()


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
    array = slurm_array_job_id()
    return Path(sweep_dir) / f".unavailable.{array}.json" if array else None


def note_unavailable(sweep_dir: Path, dataset: str, reason: str) -> None:
    _unavailable[dataset] = reason
    path = _unavailable_file(sweep_dir)
    if path is not None:
        try:
            write_json(path, {**(read_json(path) or {}), dataset: reason})
        except OSError:
            pass  # only an optimisation: the other tasks find out for themselves


def unavailable(sweep_dir: Path, dataset: str) -> str | None:
    """The first failure's line if `dataset` (name and root) was found unavailable in this launch."""
    if dataset in _unavailable:
        return _unavailable[dataset]
    path = _unavailable_file(sweep_dir)
    return (read_json(path) or {}).get(dataset) if path is not None and path.is_file() else None


# ---- progress of this process's launch (the basic launcher's console) ---------------------------------

_durations: list[float] = []  # seconds each run of this process's launch took (the basic launcher's ETA)


def eta_s(durations: Sequence[float], remaining: int, parallel: int) -> float | None:
    """Seconds until the last of `remaining` runs ends, `parallel` at a time, each taking as long as the
    mean of those ended (`durations`); None before any has ended."""
    if remaining <= 0:
        return 0.0
    if not durations:
        return None
    return sum(durations) / len(durations) * math.ceil(remaining / max(1, parallel))


def hms(seconds: float | None) -> str:
    """HH:MM:SS (hours past 99 as they come); `?` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def ended_line(run_dir: Path, status: str, took: float) -> str | None:
    """The basic launcher's line when a run of this process's launch ends: `run k/N ended …` (k: its
    place among the launched jobs in their planned order) with an ETA; None outside such a launch."""
    todo = [job for job in _launch or () if job.done_in is None]
    k = next((i for i, job in enumerate(todo, start=1) if str(job.run_dir) == str(run_dir)), None)
    if k is None:
        return None
    _durations.append(took)
    left = len(todo) - k
    return (f"run {k}/{len(todo)} ended (#{todo[k - 1].num}, {status}) after {took:.0f} s; ETA ~ "
            f"{hms(eta_s(_durations, left, 1))} ({left} left, 1 at once)")


def planned_num(overrides, default: int) -> int:
    """A job's number in the whole launch (finished jobs are left out of the batches the launchers see)."""
    for job in _launch or ():
        if job.overrides == list(overrides):
            return job.num
    return default


def numbered_runs(jobs: Sequence[Sequence[str]], first: int) -> list[tuple[int, list]]:
    """A batch of jobs (finished ones left out) as runs of consecutive planned numbers, each with the
    number of its first job. A launcher that numbers a batch's jobs from `initial_job_idx` on (Hydra's
    basic one) gives every job its planned number (planned_num) — its directory, where hydra.sweep.subdir
    holds ${hydra.job.num} — when each run is launched on its own, from that number."""
    runs: list[tuple[int, list]] = []
    for num, job in enumerate(jobs, start=first):
        num = planned_num(job, num)
        if runs and runs[-1][0] + len(runs[-1][1]) == num:
            runs[-1][1].append(job)
        else:
            runs.append((num, [job]))
    return runs


def _finished_runs(sweep_dir: Path) -> dict[str, Path]:
    """(fingerprint, labels) -> run dir, for the finished runs directly below `sweep_dir`."""
    found = {}
    for run_dir in sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else ():
        res = RunFiles(run_dir).read_results() if run_dir.is_dir() else None
        if res and res.get("fingerprint") and res.get("status") in FINISHED:
            found.setdefault(run_key(res), run_dir)
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
    planned, elsewhere, contents = [], None, {}
    for num, overrides in enumerate(jobs, start=first_num):
        run_dir, cfg = job_config(config_loader, config, overrides, num)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        job = PlannedJob(num, list(overrides), run_dir, None)
        try:
            check_config(task)  # a bad value in one job refuses the whole launch (see bad_configs)
            identity = identity_of(task, contents)
            job.verdict = examine(run_dir, identity)
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
        if job.done_in is not None:
            job.lacks = lacking_callbacks(job.done_in, list(task.get("callbacks") or {}))
        planned.append(job)
    return planned


def lacking_callbacks(run_dir: Path, names: list[str]) -> list[str]:
    """The training-loop callbacks among `names` that left nothing in the finished run at `run_dir` (no
    `<name>.` column in its epochs.csv, no `callbacks.<name>` in its results.json): added to the sweep
    after the run ended. Callbacks are not part of a run's identity, so the run is not trained again."""
    if not names:
        return []
    recorded = set((RunFiles(run_dir).read_results() or {}).get("callbacks") or {})
    header = epoch_log(run_dir).header() or []
    return [n for n in names if n not in recorded and not any(c.startswith(f"{n}.") for c in header)]


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


# ---- a search: a sweeper that optimizes over the values the runs return --------------------------
# Sweepers that launch what the command line lists and read no job's return value: coupled_net's own
# (it reads the run directories) and Hydra's basic one. Any other (hydra-optuna-sweeper's) searches:
# it needs each job's value (coupled_net.cli.train_task returns optimized_metric) before going on.
LISTING_SWEEPERS = ("hydra_plugins.coupled_net_launcher.sweeper.CoupledSweeper",
                    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper")


def searching(sweeper_cfg) -> bool:
    """Is the sweeper configured by `sweeper_cfg` (hydra.sweeper) one that optimizes over the values
    the jobs return (hparams_search=optuna_lr), rather than one that runs a list of jobs?"""
    return str((sweeper_cfg or {}).get("_target_")) not in LISTING_SWEEPERS


STUDY_FILE = "optimization_results.yaml"  # what hydra-optuna-sweeper writes into the sweep directory


def best_trial(sweep_dir: Path) -> tuple[dict, Path | None] | None:
    """The study's result as hydra-optuna-sweeper wrote it ({name, best_params, best_value}) and the run
    directory of its best trial (the one whose overrides hold every best parameter; None if none does),
    or None when the sweep directory holds no study result."""
    path = Path(sweep_dir) / STUDY_FILE
    if not path.is_file():
        return None
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
