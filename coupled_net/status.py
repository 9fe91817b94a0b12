"""How far a sweep is and when it should end (`python launch/collect.py DIR --status`, issue 21): how
many runs are in each status, a line per running, stale, failed or diverged run, and an ETA from the
runs' epoch times, the epochs they have left and the launch's parallelism.

It answers in under a second for 1,000 runs and writes nothing: one os.scandir walk finds the runs,
and per run it reads results.json, the header and last lines of epochs.csv (seeking from the end)
and, only where results.json does not say how many epochs the run plans, `.hydra/config.yaml` as
plain YAML. Hence no pandas and no OmegaConf here, and not coupled_net.collect (which imports both);
whether a running run's owner is gone is coupled_net.liveness's rule, the review's too."""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
import stat
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .liveness import age_s, owner_gone, squeue_states
from .storage import read_bytes, read_json
from .sweepfiles import FAIL_FAST_FILE, LAUNCH_FILE

# the counts line's order: finished first, then what is alive, then what will not go on by itself
ORDER = ("done", "running", "stale", "failed", "diverged", "interrupted", "pending", "not_started", "no results",
         "unreadable")
LISTED = ("running", "stale", "failed", "diverged")  # the runs that get a line of their own
MAX_LINES = 50
# what the ETA waits for: a run something is (or will be) training. A stale or interrupted run waits for
# the command to be run again, a not_started one (fail-fast) too.
AHEAD = ("running", "pending", "no results")
# a run in one of these never trains again by itself: its epochs.csv is read only where the ETA needs
# every run's epoch times (a run ahead that has none of its own)
FINAL = ("done", "diverged", "failed", "interrupted")
TAIL_BYTES = 16384       # the end of epochs.csv read per run: the last ~100 epochs
HEADER_BYTES = 4096
MARKERS = ("results.json", "epochs.csv")
SWEEP_FILES = ("multirun.yaml", "manifest.json", LAUNCH_FILE, FAIL_FAST_FILE)
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Run:
    """What the status view knows of one run (a directory, or a run a launch plans without one yet)."""
    run_dir: Path
    status: str
    epochs_done: int = 0
    planned: int | None = None          # trainer.epochs
    patience: int | None = None         # trainer.patience: early stopping may end it sooner
    epoch_times: list[float] = field(default_factory=list)  # epoch_time_s of the last epochs
    heartbeat_age_s: float | None = None
    error: str | None = None
    job_id: str | None = None            # its SLURM job (owner, else manifest.json)
    tail_read: bool = False               # epoch_times read from epochs.csv


@dataclass
class Sweep:
    """A directory's sweep records: manifest.json, fail_fast.json, launch.json, multirun.yaml."""
    dir: Path
    manifest: dict | None = None
    fail_fast: dict | None = None
    launch: dict | None = None
    has_multirun: bool = False

    def parallel(self) -> int:
        """How many of its runs go at once: launch.json's `parallel`, else multirun.yaml's launcher
        (SLURM: array_parallelism × runs_per_task; local: max_parallel), else 1."""
        value = (self.launch or {}).get("parallel")
        if isinstance(value, int) and value > 0:
            return value
        if self.has_multirun:
            launcher = _launcher(self.dir / "multirun.yaml")
            target = str(launcher.get("_target_", ""))
            if "Slurm" in target:
                lanes = _positive(launcher.get("array_parallelism")) * _positive(launcher.get("runs_per_task"))
                return lanes
            if "Local" in target:
                return _positive(launcher.get("max_parallel"))
        return 1


def _positive(value) -> int:
    return value if isinstance(value, int) and value > 0 else 1


def _launcher(path: Path) -> dict:
    try:
        cfg = yaml.load(read_bytes(path), Loader=_SafeLoader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError):
        return {}
    launcher = ((cfg or {}).get("hydra") or {}).get("launcher") if isinstance(cfg, dict) else None
    return launcher if isinstance(launcher, dict) else {}


# ---- finding runs: one walk ----------------------------------------------------------------------

def walk(root: Path) -> tuple[list[Path], dict[Path, Sweep]]:
    """The run directories at or below `root` (one holding results.json, epochs.csv or
    .hydra/config.yaml, as coupled_net.collect.find_runs finds them) and the sweeps among them
    (directories holding a sweep record), in one os.scandir walk that follows no symlinked folder."""
    runs, sweeps = [], {}
    todo = [str(Path(root).absolute())]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        files, subdirs = set(), []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry)
                else:
                    files.add(entry.name)
            except OSError:
                continue
        hydra = (any(e.name == ".hydra" for e in subdirs)
                 and os.path.isfile(os.path.join(folder, ".hydra", "config.yaml")))
        if hydra or not files.isdisjoint(MARKERS):
            runs.append(Path(folder))
        if not files.isdisjoint(SWEEP_FILES):
            here = Path(folder)
            sweeps[here] = Sweep(here, manifest=read_json(here / "manifest.json") if "manifest.json" in files else None,
                                 fail_fast=read_json(here / FAIL_FAST_FILE) if FAIL_FAST_FILE in files else None,
                                 launch=read_json(here / LAUNCH_FILE) if LAUNCH_FILE in files else None,
                                 has_multirun="multirun.yaml" in files)
        todo.extend(e.path for e in subdirs if e.name != ".hydra")
    return sorted(runs), sweeps


# ---- one run's files ------------------------------------------------------------------------------

def epoch_tail(path, tail_bytes: int = TAIL_BYTES) -> list[tuple[int, float]]:
    """(epoch, epoch_time_s) of the whole rows among the header and last lines of an epochs.csv,
    read from the end: a row cut short (no newline yet) or not made of numbers is left out, as
    coupled_net.epochlog leaves it out. Not a regular file (a FIFO) or absent: no rows."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return []
        head = os.pread(fd, HEADER_BYTES, 0)
        header_end = head.find(b"\n")
        if header_end < 0:
            return []
        start = max(header_end + 1, info.st_size - tail_bytes)
        body = os.pread(fd, info.st_size - start, start)
    finally:
        os.close(fd)
    header = next(csv.reader([head[:header_end].decode("utf-8", "replace")]), [])
    if "epoch" not in header or "epoch_time_s" not in header:
        return []
    at_epoch, at_time = header.index("epoch"), header.index("epoch_time_s")
    lines = body.decode("utf-8", "replace").split("\n")
    if start > header_end + 1:
        lines = lines[1:]  # the first line read from the middle of the file may be a part of one
    rows = []
    for line in lines[:-1]:  # the last piece has no newline: empty, or a row being written
        # the cells are numbers: a plain split, csv's quoting only for a line that has quotes
        cells = line.split(",") if '"' not in line else next(csv.reader([line]), [])
        if len(cells) != len(header):
            continue
        try:
            epoch, epoch_s = int(cells[at_epoch]), float(cells[at_time])
        except ValueError:
            continue
        if not math.isnan(epoch_s):
            rows.append((epoch, epoch_s))
    return rows


def _trainer_key(res: dict, key: str):
    """trainer.<key> as results.json's identity records it (dotted, or nested in older records)."""
    identity = res.get("identity")
    if not isinstance(identity, dict):
        return None
    if f"trainer.{key}" in identity:
        return identity[f"trainer.{key}"]
    trainer = identity.get("trainer")
    return trainer.get(key) if isinstance(trainer, dict) else None


def _config_trainer(run_dir: Path) -> dict:
    """The `trainer` node of the run's .hydra/config.yaml, read as plain YAML ({} without one)."""
    try:
        cfg = yaml.load(read_bytes(run_dir / ".hydra" / "config.yaml"), Loader=_SafeLoader)  # noqa: S506
    except (OSError, yaml.YAMLError):
        return {}
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    return trainer if isinstance(trainer, dict) else {}


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(run_dir: Path) -> tuple[Run, dict]:
    """One run directory as the status view sees it (its status as recorded, before the staleness
    check), and its results.json record ({} without one). The tail of epochs.csv is read here only for
    a run that may still be training (read_tail: the others'), the heartbeat's age only for a running one."""
    run = Run(run_dir, "no results")
    res: dict = {}
    folder = str(run_dir)
    try:
        loaded = json.loads(read_bytes(os.path.join(folder, "results.json")))
        if isinstance(loaded, dict):
            res = loaded
            run.status = str(res.get("status") or "unknown")
        else:
            run.status, run.error = "unreadable", f"results.json: a JSON {type(loaded).__name__}, not an object"
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        run.status, run.error = "unreadable", f"results.json: {' '.join(str(e).split())[:120]}"
    run.epochs_done = _int(res.get("epochs_run")) or 0
    if run.status not in FINAL:
        read_tail(run)
    run.planned, run.patience = _int(_trainer_key(res, "epochs")), _int(_trainer_key(res, "patience"))
    if run.planned is None and run.status not in FINAL:
        trainer = _config_trainer(run_dir)
        run.planned, run.patience = _int(trainer.get("epochs")), _int(trainer.get("patience"))
    if run.status == "running":
        run.heartbeat_age_s = age_s(res.get("heartbeat_at"))
    run.error = run.error or res.get("error")
    owner = res.get("owner")
    run.job_id = str(owner["slurm_job_id"]) if isinstance(owner, dict) and owner.get("slurm_job_id") else None
    return run, res


def read_tail(run: Run) -> None:
    """The run's last epoch times, and its last epoch where epochs.csv is ahead of results.json."""
    rows = epoch_tail(os.path.join(str(run.run_dir), "epochs.csv"))
    run.epoch_times = [t for _, t in rows]
    run.epochs_done = max([run.epochs_done] + [e for e, _ in rows])
    run.tail_read = True


# ---- one directory's view -------------------------------------------------------------------------

@dataclass
class View:
    """The status of every run at or below one directory."""
    root: Path
    runs: list[Run]
    sweeps: dict[Path, Sweep]
    lanes: dict[Path | None, int]  # the runs' sweep -> how many of them go at once (None: runs of no sweep)

    def counts(self) -> dict[str, int]:
        found = {s: 0 for s in ORDER}
        for run in self.runs:
            found[run.status] = found.get(run.status, 0) + 1
        return {s: n for s, n in found.items() if n}


def _manifest_jobs(sweep: Sweep) -> dict[Path, str]:
    """run dir -> SLURM job id of a sweep's manifest.json (a run dir is taken as a child of the
    manifest's own directory, as coupled_net.collect.manifest_jobs takes it)."""
    jobs = {}
    for job in (sweep.manifest or {}).get("jobs", []):
        if isinstance(job, dict) and job.get("executor", "slurm") == "slurm" and job.get("run_dir"):
            jobs[sweep.dir / Path(str(job["run_dir"])).name] = str(job.get("job_id"))
    return jobs


def view(root, queue=False) -> View:
    """The status of every run at or below `root`. `queue`: squeue's answer to use (tests), or False to
    ask squeue once, only where a run has a SLURM job id or a sweep has a manifest.json."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    dirs, sweeps = walk(root)
    dirs_found = set(dirs)
    read = [read_run(d) for d in dirs]
    runs = {run.run_dir: run for run, _ in read}
    jobs = {path: job for sweep in sweeps.values() for path, job in _manifest_jobs(sweep).items()}
    if queue is False:
        queue = squeue_states() if jobs or any(run.job_id for run in runs.values()) else None
    for run, res in read:
        run.job_id = run.job_id or jobs.get(run.run_dir)
        if run.status == "running":
            gone = owner_gone(res, statistics.mean(run.epoch_times) if run.epoch_times else None, queue)
            if gone:
                run.status, run.error = "stale", f"{gone}: it ended without recording why; the same command resumes it"
    for path, job in jobs.items():  # submitted, no directory yet: waiting, or its task just started
        state = (queue or {}).get(str(job), ("",))[0]
        runs.setdefault(path, Run(path, "running" if state in ("RUNNING", "CONFIGURING") else "pending", job_id=job))
    for sweep in sweeps.values():
        for name in (sweep.fail_fast or {}).get("not_started") or []:
            path = sweep.dir / Path(str(name)).name
            runs.setdefault(path, Run(path, "not_started"))
        if sweep.fail_fast is not None:  # the launch stopped: what has not started will not start
            for run in runs.values():
                if run.run_dir.parent == sweep.dir and run.status in ("pending", "no results"):
                    run.status = "not_started"
        planned = (sweep.launch or {}).get("planned")
        mine = [r for r in runs.values() if r.run_dir.parent == sweep.dir]
        if sweep.fail_fast is None and isinstance(planned, int) and planned > len(mine):
            for i in range(planned - len(mine)):  # a local launch starts them as slots free up
                path = sweep.dir / f"(not started yet #{i + 1})"
                runs[path] = Run(path, "pending")
    if any(r.status in AHEAD and not r.epoch_times for r in runs.values()):
        for run in runs.values():  # the median over every run's epochs stands in for its own
            if not run.tail_read and run.run_dir in dirs_found:
                read_tail(run)
    lanes: dict[Path | None, int] = {None: 1}
    for sweep in sweeps.values():
        lanes[sweep.dir] = sweep.parallel()
    return View(root, sorted(runs.values(), key=lambda r: str(r.run_dir)), sweeps, lanes)


# ---- ETA ------------------------------------------------------------------------------------------

def makespan(durations, lanes: int) -> float:
    """When the last of `durations` ends, run `lanes` at a time, each started on the lane that frees
    first, longest first (a greedy schedule: what a launch that starts the next run as one ends does)."""
    loads = [0.0] * max(1, int(lanes))
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


@dataclass
class Eta:
    seconds: float | None       # None: unknown
    runs_left: int
    at_once: int
    at_most: bool               # early stopping may end runs sooner
    why_unknown: str | None = None


def eta(v: View) -> Eta:
    """The time until every run something is training or will train ends: per run, its epochs left
    (trainer.epochs − epochs done) × its median epoch time (a warm-up epoch does not skew it; a run
    without an epoch takes the median over every run's epochs), scheduled per sweep on its lanes; the
    sweeps run side by side (the longest decides). Runs of no sweep each go on their own."""
    ahead = [r for r in v.runs if r.status in AHEAD]
    everyone = [t for r in v.runs for t in r.epoch_times]
    by_sweep: dict[Path | None, int] = {}
    for run in ahead:
        by_sweep[_sweep_of(run, v)] = by_sweep.get(_sweep_of(run, v), 0) + 1
    at_once = sum(n if s is None else min(v.lanes[s], n) for s, n in by_sweep.items())
    at_most = any(r.patience is None or r.planned is None or r.patience < r.planned - r.epochs_done for r in ahead)
    if not ahead:
        return Eta(0.0, 0, 0, False)
    if not everyone:
        return Eta(None, len(ahead), at_once, at_most, "no epoch has ended yet")
    overall = statistics.median(everyone)
    known = [r.planned for r in v.runs if r.planned]
    typical = int(statistics.median(known)) if known else None
    per_sweep: dict[Path | None, list[float]] = {}
    for run in ahead:
        planned = run.planned or typical
        if planned is None:
            return Eta(None, len(ahead), at_once, at_most, "no run says how many epochs it plans")
        per_epoch = statistics.median(run.epoch_times) if run.epoch_times else overall
        per_sweep.setdefault(_sweep_of(run, v), []).append(max(0, planned - run.epochs_done) * per_epoch)
    seconds = 0.0
    for sweep, durations in per_sweep.items():
        if sweep is None:  # runs of no sweep: each its own process
            seconds = max([seconds, *durations])
        else:
            seconds = max(seconds, makespan(durations, v.lanes[sweep]))
    return Eta(seconds, len(ahead), at_once, at_most)


def _sweep_of(run: Run, v: View) -> Path | None:
    return run.run_dir.parent if run.run_dir.parent in v.sweeps else None


def duration(seconds: float) -> str:
    """`2h 13m`, `13m`, `45 s` (to the nearest minute from a minute on)."""
    if seconds < 59.5:
        return f"{int(seconds + 0.5)} s"
    hours, minutes = divmod(int(seconds / 60 + 0.5), 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def eta_line(e: Eta, now: float | None = None) -> str:
    if e.runs_left == 0:
        return "ETA: nothing left to run"
    if e.seconds is None:
        return f"ETA: unknown ({e.why_unknown})"
    now = time.time() if now is None else now
    end = now + e.seconds
    clock = time.strftime("%H:%M" if time.strftime("%Y-%m-%d", time.localtime(end)) ==
                          time.strftime("%Y-%m-%d", time.localtime(now)) else "%a %d %b %H:%M", time.localtime(end))
    runs = f"{e.runs_left} run{'s' * (e.runs_left != 1)} left, {e.at_once} at once"
    return f"ETA: ~{duration(e.seconds)} ({'at most; ' * e.at_most}{runs}) — about {clock}"


# ---- the text -------------------------------------------------------------------------------------

def _epochs(run: Run) -> str:
    return f"epoch {run.epochs_done}/{run.planned if run.planned else '?'}"


def run_line(run: Run, root: Path) -> str:
    name = _name(run.run_dir, root)
    if run.status == "running":
        age = "no heartbeat yet" if run.heartbeat_age_s is None else f"heartbeat {duration(run.heartbeat_age_s)} ago"
        return f"  {run.status:<8} {name}  {_epochs(run)}  {age}"
    error = " ".join(str(run.error or "").split())[:120]
    return f"  {run.status:<8} {name}  {_epochs(run)}  {error}".rstrip()


def _name(run_dir: Path, root: Path) -> str:
    """The run's directory below the directory asked about (its name where it is that directory)."""
    try:
        relative = run_dir.relative_to(root.absolute())
    except ValueError:
        return run_dir.name
    return str(relative) if relative.parts else run_dir.name


def render(v: View, now: float | None = None) -> str:
    """The status block of one directory (plain text, no trailing newline)."""
    counts = v.counts()
    total = sum(counts.values())
    lines = [f"{v.root}: {total} run{'s' * (total != 1)}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
             if total else f"{v.root}: no runs"]
    listed = [r for r in v.runs if r.status in LISTED]
    lines += [run_line(r, v.root) for r in listed[:MAX_LINES]]
    if len(listed) > MAX_LINES:
        lines.append(f"  … and {len(listed) - MAX_LINES} more")
    for sweep in sorted(v.sweeps.values(), key=lambda s: str(s.dir)):
        if sweep.fail_fast is not None:
            reason = " ".join(str(sweep.fail_fast.get("reason") or sweep.fail_fast.get("error") or "").split())
            lines.append(f"fail-fast ({_name(sweep.dir, v.root)}): {reason}")
    lines.append(eta_line(eta(v), now))
    return "\n".join(lines)


def status(paths, queue=False) -> str:
    """The status view of each of `paths`, one block each."""
    return "\n\n".join(render(view(p, queue)) for p in paths)
