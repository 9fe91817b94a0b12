"""Read the runs below some directories into one frame, one row per run (SPEC §6 and §11): what each
run's results.json, epochs.csv and config say, whether a `running` run's owner is gone, the SLURM state
of a detached sweep's jobs, and which runs repeat another. `coupled_net.review` builds its tables from
this frame; `coupled_net.report` writes the summary files."""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf._utils import get_yaml_loader

from .epochlog import epoch_summary, read_epochs, read_epochs_fast
from .identity import NEUTRAL, flatten, is_non_identity, model_name, run_key
from .liveness import owner_gone, squeue_states
from .results import load_results
from .storage import read_json
from .sweepfiles import FAIL_FAST_FILE

log = logging.getLogger(__name__)

LEADING = ["model", "dataset", "alpha", "seed", "status", "epochs_run", "best_epoch", "val_top1", "val_top5",
           "test_top1", "test_top5", "best_val_acc", "best_ke_val_acc", "ke_time_s_mean", "epoch_time_s_mean",
           "total_time_s", "device", "run_dir"]
IDENTITY = ["coupling_mode", "coupling_schedule"]
# per run, from epochs.csv (SPEC §11): val top-1 lost at each equalization, and what the second
# validation costs next to an epoch, and the mean time an epoch's checkpoint writes took (timing means
# leave the first epoch out, coupled_net.epochlog.epoch_summary; that one's time is first_epoch_time_s)
DERIVED = ["ke_drop_mean", "ke_drop_best", "ke_eval_time_s_mean", "ke_overhead", "checkpoint_time_s_mean",
           "first_epoch_time_s"]
TRAILING = ["last_val_acc", "error"]  # what a run that is not done shows instead of metrics
# shared_by: how many runs shared the run's GPU (or, without one, ran beside it), from the slot it was
# started in (coupled_net.slots); 1 for a run alone. Its timings are only compared with runs alike.
BOOKKEEPING = ["slurm_job_id", "slurm_state", "duplicate_of", "shared_by"]
# where and with what each run ran, as its results.json's provenance recorded it (SPEC §5), and when:
# the review's provenance section (coupled_net.htmlreport) reads them here, not from the files again
PROVENANCE = ["git_commit", "git_dirty", "python_version", "torch_version", "torchvision_version", "host", "gpu",
              "started_at", "finished_at"]
# each training-loop callback's numbers in results.json (`callbacks.<name>.<key>`, coupled_net.loopcallbacks)
# are a column of their own, after RUN_COLUMNS: reviewed like the metrics, never a config key
PROBED = "callbacks."
# every column of collect()'s frame that is not a config key or a callback's number; the rest are the runs'
# config keys
RUN_COLUMNS = LEADING + IDENTITY + DERIVED + TRAILING + BOOKKEEPING + PROVENANCE
# config keys already shown under another name
SHOWN = {"model.name": "model", "dataset.name": "dataset", "coupling.alpha": "alpha", "seed": "seed",
         "coupling.mode": "coupling_mode", "coupling.schedule": "coupling_schedule"}
NUMERIC = ["alpha", "seed", "epochs_run", "best_epoch", "val_top1", "val_top5", "test_top1", "test_top5",
           "best_val_acc", "best_ke_val_acc", "ke_time_s_mean", "epoch_time_s_mean", "total_time_s",
           *DERIVED, "last_val_acc"]
# threads reading run directories: the reads wait on the disk (a network file system on a cluster), so a
# few threads pay off there; parsing holds the GIL, so on a local disk more threads only contend for it
# (collect() of 2,000 synthetic runs on this 2-core host, page cache warm: 1 thread 1.16-1.31 s, 2 threads
# 1.26 s, 4 threads 1.64 s, 8 threads 1.77 s)
READERS = 2
MARKERS = ("results.json", "epochs.csv")
RUN_FOLDERS = (".hydra", "checkpoints")  # what a run directory holds besides its files (coupled_net.results.RunFiles)


def find_runs(paths) -> list[Path]:
    """Every run directory at or below `paths`: one with a Hydra config, results.json or epochs.csv."""
    return sorted({run for root in paths for run in _walk(Path(root).absolute())[0]})


def _walk(root: Path) -> tuple[set[Path], list[Path], list[Path]]:
    """(the run directories, the manifest.json files, the fail_fast.json files) at or below `root`, in
    one walk of the tree (os.scandir; symlinked directories are not entered, as Path.rglob does not)."""
    runs, manifests, stops = set(), [root / "manifest.json"], []
    if any((root / m).is_file() for m in (*MARKERS, ".hydra/config.yaml")):
        runs.add(root)
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError:  # unreadable or gone meanwhile: as rglob, skipped
            continue
        names, subdirs = set(), []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry)
                    continue
            except OSError:
                continue
            names.add(entry.name)
        run = not names.isdisjoint(MARKERS)
        # a run's own folders hold no runs: not listing them halves the walk (10,000 synthetic runs: 0.50 s
        # to 0.25 s)
        stack.extend(d.path for d in subdirs if not (run and d.name in RUN_FOLDERS))
        if FAIL_FAST_FILE in names:
            stops.append(Path(top, FAIL_FAST_FILE))
        if top == str(root):
            continue
        if run:
            runs.add(Path(top))
        if "config.yaml" in names and os.path.basename(top) == ".hydra":
            runs.add(Path(top).parent)
        if "manifest.json" in names:
            manifests.append(Path(top, "manifest.json"))
    return runs, manifests, stops


def _flatten(node) -> dict:
    """A config as the review's columns: dotted keys, lists as one text (`0.8,1.2`)."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flatten(node).items() if v != {}}


_NEUTRAL_COLUMNS = _flatten(NEUTRAL)


def run_config(run_dir: Path, res: dict | None = None) -> dict:
    """The keys that tell this run from others: its identity keys and +labels (SPEC §5), from
    results.json, else from .hydra/config.yaml without the keys that only say where it ran. A key
    the fingerprint leaves out at its neutral value (identity.NEUTRAL) is shown with that value, and
    `model.name` is the model's display name whatever its config (model=torchvision: its arch)."""
    return _completed(_run_config(run_dir, res))


def _completed(cfg: dict) -> dict:
    if not cfg:
        return cfg
    for key, value in _NEUTRAL_COLUMNS.items():
        cfg.setdefault(key, value)
    model = {k[len("model."):]: v for k, v in cfg.items() if k.startswith("model.")}
    if model and "model.name" not in cfg:
        cfg["model.name"] = model_name(model)
    return cfg


def _run_config(run_dir: Path, res: dict | None) -> dict:
    if res and isinstance(res.get("identity"), dict):
        return _flatten({**res["identity"], **(res.get("labels") or {})})
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        plain = _load_config(path)
    except Exception:  # noqa: BLE001
        return {}
    if not isinstance(plain, dict):
        return {}
    plain.pop("hydra", None)
    return {k: v for k, v in _flatten(plain).items() if not is_non_identity(k)}


if yaml.__with_libyaml__:
    class _ConfigLoader(yaml.cyaml.CParser, get_yaml_loader()):
        """OmegaConf's own YAML rules (its float syntax, no timestamps, duplicate keys refused) on
        libyaml's parser: the values OmegaConf.load gives, without building a DictConfig."""

        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
else:
    _ConfigLoader = get_yaml_loader()


def _load_config(path: Path):
    """A Hydra config.yaml as plain values; one with an interpolation (`${...}`) through OmegaConf, which
    resolves it (or, one this process cannot resolve, leaves it as written)."""
    text = path.read_text()
    if "${" not in text:
        return yaml.load(text, Loader=_ConfigLoader) or {}
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve
        return OmegaConf.to_container(cfg, resolve=False)


def run_row(run_dir: Path, cfg: dict, res: dict | None, queue: dict | None = None,
            problem: str | None = None, epochs: tuple | Exception | None = None) -> dict:
    """One run's row (`problem`: why its results.json cannot be used, coupled_net.results.load_results;
    `epochs`: read_epochs(run_dir) when already read, or what reading it raised); a run whose files cannot
    be read is `unreadable`, with the file and why."""
    try:
        return _run_row(run_dir, cfg, res, queue, problem, epochs)
    except Exception as e:  # noqa: BLE001 - one bad directory never stops the review of the others
        return {"run_dir": str(run_dir), "status": "unreadable", "error": f"{type(e).__name__}: {e}"[:300]}


def _run_row(run_dir: Path, cfg: dict, res: dict | None, queue: dict | None, problem: str | None,
             epochs: tuple | Exception | None) -> dict:
    if isinstance(epochs, Exception):
        raise epochs
    rows, bad_epochs = read_epochs(run_dir) if epochs is None else epochs
    error = None
    if res is None:
        error = problem
        status = "unreadable" if error else "no results"
        res = {}
    else:
        status = res.get("status", "unknown")
        if status == "running":
            gone = owner_gone(res, epoch_summary(rows)["epoch_time_s_mean"], queue)
            if gone:
                status, error = "stale", f"{gone}: it ended without recording why; the same command resumes it"
    if bad_epochs:
        status, error = "unreadable", bad_epochs
    metrics = res.get("metrics") or {}
    prov = res.get("provenance") or {}
    row = {
        "model": res.get("model", cfg.get("model.name")), "dataset": res.get("dataset", cfg.get("dataset.name")),
        "alpha": res.get("alpha", cfg.get("coupling.alpha")), "seed": res.get("seed", cfg.get("seed")),
        "status": status,
        "epochs_run": res.get("epochs_run", max(r["epoch"] for r in rows) if rows else 0),
        "best_epoch": res.get("best_epoch"),
        "total_time_s": res.get("total_time_s"), "device": prov.get("device"),
        "shared_by": int((prov.get("sharing") or {}).get("shared_by") or 1),
        "run_dir": str(run_dir), "error": error or res.get("error"),
        "coupling_mode": res.get("coupling_mode", cfg.get("coupling.mode")),
        "coupling_schedule": res.get("coupling_schedule", cfg.get("coupling.schedule")),
        **epoch_summary(rows, res.get("best_epoch")),
        "git_commit": prov.get("git_commit"), "git_dirty": prov.get("git_dirty"),
        **{f"{k}_version": prov.get(k) for k in ("python", "torch", "torchvision")}, "host": prov.get("host"),
        "gpu": prov.get("gpu"), "started_at": res.get("started_at"), "finished_at": res.get("finished_at"),
    }
    for split in ("val", "test"):
        for k in ("top1", "top5"):
            row[f"{split}_{k}"] = (metrics.get(split) or {}).get(k)
    return row


def manifest_jobs(paths) -> dict[str, str]:
    """run_dir -> SLURM job id, from the manifest.json of every sweep at or below `paths`. A run
    directory is taken as a child of the manifest's own directory (so a copied or moved sweep names
    its own runs, not the original's)."""
    return _jobs(manifest for root in paths for manifest in _walk(Path(root).absolute())[1])


def _jobs(manifests) -> dict[str, str]:
    jobs = {}
    for manifest in manifests:
        for job in (read_json(manifest) or {}).get("jobs", []):
            if job.get("executor", "slurm") != "slurm":
                continue  # the local executor's job ids are not SLURM's
            run_dir = manifest.parent / Path(job["run_dir"]).name
            jobs[str(run_dir)] = job["job_id"]  # a later submission of the same run wins
    return jobs


def slurm_state(job_id: str, status: str, queue: dict) -> str:
    """A finished run's own record first; else pending / running / requeued from squeue while SLURM
    knows the job; else what the run dir says."""
    if status == "done":
        return "completed"
    if status == "interrupted":
        return "interrupted"
    if status in ("failed", "diverged", "unreadable", "stale"):
        return "failed"
    if job_id in queue:
        state, reason = queue[job_id]
        if state in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") or (state == "PENDING" and reason == "BeginTime"):
            return "requeued"
        return {"PENDING": "pending", "RUNNING": "running", "COMPLETING": "running",
                "CONFIGURING": "running", "SUSPENDED": "suspended"}.get(state, state.lower())
    if status == "not_started":
        return "cancelled"  # fail-fast cancelled the sweep's pending tasks
    return "pending" if status == "no results" else "failed"  # running, but SLURM no longer has it


def duplicates(runs: list[Path], results: list[dict | None]) -> dict[Path, Path]:
    """run dir -> the run dir it repeats: two directories holding the same fingerprint and labels are
    one run twice (SPEC §6). The one kept is a finished one if any, else the first by path."""
    seen: dict[str, Path] = {}
    order = sorted(range(len(runs)), key=lambda i: ((results[i] or {}).get("status") != "done", str(runs[i])))
    repeats = {}
    for i in order:
        res = results[i] or {}
        if not res.get("fingerprint"):
            continue
        key = run_key(res)
        if key in seen:
            repeats[runs[i]] = seen[key]
        else:
            seen[key] = runs[i]
    return repeats


def _stopped(records) -> dict[Path, tuple[str, list[Path]]]:
    """sweep dir -> (why its launch stopped starting runs, the run dirs it did not start), from each
    fail_fast.json. A run dir is taken as a child of the record's own directory, as manifest_jobs does."""
    stopped = {}
    for path in records:
        record = read_json(path) or {}
        named = [path.parent / Path(str(r)).name for r in record.get("not_started") or []]
        stopped[path.parent] = (str(record.get("reason") or record.get("error") or "fail-fast"), named)
    return stopped


def _not_started(run_dir: Path, stopped: dict) -> str | None:
    """The fail-fast reason of the nearest stopped sweep at or above `run_dir` (None: none): a run
    with no results there will not start until the sweep is launched again."""
    for sweep in sorted(stopped, key=lambda p: len(p.parts), reverse=True):
        if run_dir == sweep or sweep in run_dir.parents:
            return stopped[sweep][0]
    return None


def _read_run(run_dir: Path) -> tuple:
    """What collect() reads of one run, in a reader thread: (results.json, why it cannot be used, its
    config keys, read_epochs() or what reading it raised)."""
    res, problem = load_results(run_dir)
    try:
        epochs = read_epochs_fast(run_dir)
    except Exception as e:  # noqa: BLE001 - run_row shows the run as unreadable
        epochs = e
    return res, problem, run_config(run_dir, res), epochs


def collect(paths) -> pd.DataFrame:
    """One row per run below `paths` (several sweeps at once are fine): RUN_COLUMNS (SPEC §6's
    columns, the derived metrics, what a run that is not done shows, the SLURM state of detached
    sweeps, `duplicate_of`, where it ran), then every config key of the runs (identity keys and
    +labels, dotted). A run found twice (same fingerprint and labels) is marked `duplicate_of` and
    warned about."""
    return collect_with_epochs(paths)[0]


def collect_with_epochs(paths) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """collect(paths), and each run's epochs.csv rows as it read them (run_dir -> rows; none for a run
    whose epochs.csv cannot be read): the learning curves need them, and reading 10,000 files twice
    was a fifth of a review's time."""
    walks = [_walk(Path(p).absolute()) for p in paths]
    jobs = _jobs(manifest for _, manifests, _ in walks for manifest in manifests)
    stopped = _stopped(stop for _, _, stops in walks for stop in stops)
    # submitted runs, and those a fail-fast stop did not start, may not have a dir yet
    runs = sorted({run for found, _, _ in walks for run in found} | {Path(r) for r in jobs}
                  | {run for _, named in stopped.values() for run in named})
    with ThreadPoolExecutor(READERS) as pool:
        read = list(pool.map(_read_run, runs))
    results = [res for res, _, _, _ in read]
    configs = [cfg for _, _, cfg, _ in read]
    owners = [(res or {}).get("owner") or {} for res in results]
    queue = squeue_states() if jobs or any(o.get("slurm_job_id") for o in owners) else None
    rows = [run_row(r, cfg, res, queue, problem, epochs) for r, (res, problem, cfg, epochs) in zip(runs, read)]
    for row in rows:
        reason = _not_started(Path(row["run_dir"]), stopped) if row["status"] == "no results" else None
        if reason is not None:
            row["status"], row["error"] = "not_started", reason
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for column in NUMERIC:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    repeats = duplicates(runs, results)
    for run_dir, first in repeats.items():
        log.warning("%s holds the same run as %s (same fingerprint and labels): counted once", run_dir, first)
    df["duplicate_of"] = [str(repeats[r]) if r in repeats else None for r in runs]
    df["slurm_job_id"] = [jobs.get(str(r)) for r in runs]
    df["slurm_state"] = [slurm_state(job, status, queue or {}) if job else None
                         for job, status in zip(df["slurm_job_id"], df["status"])]
    keys = sorted({k for c in configs for k in c} - set(RUN_COLUMNS))
    config = pd.DataFrame([[c.get(k) for k in keys] for c in configs], columns=keys, index=df.index)
    probed = [_probed(res) for res in results]
    names = sorted({k for p in probed for k in p})
    numbers = pd.DataFrame([[p.get(k) for k in names] for p in probed], columns=names, index=df.index, dtype=float)
    read_rows = {str(r): epochs[0] for r, (_, _, _, epochs) in zip(runs, read) if isinstance(epochs, tuple)}
    return pd.concat([df, numbers, config], axis=1), read_rows


def _probed(res: dict | None) -> dict:
    """A run's training-loop callbacks' numbers from results.json, as `callbacks.<name>.<key>` columns."""
    found = (res or {}).get("callbacks")
    if not isinstance(found, dict):
        return {}
    return {k: float(v) for k, v in flatten(found, PROBED).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns of a collect() frame that are config keys (identity keys and +labels)."""
    return [c for c in df.columns if (c not in RUN_COLUMNS or c == "seed") and not c.startswith(PROBED)]


def probed_columns(df: pd.DataFrame) -> list[str]:
    """The columns of a collect() frame that hold training-loop callbacks' numbers (`callbacks.<name>.<key>`)."""
    return [c for c in df.columns if c.startswith(PROBED)]


def varying(df: pd.DataFrame, columns) -> list[str]:
    """The columns whose value is not the same in every row (None counts as a value)."""
    return [c for c in columns if _distinct(df[c]) > 1]


def _distinct(values: pd.Series) -> int:
    """How many values differ once comparable; the distinct values (by type, so True stays apart from 1)
    are found first: a column of 10,000 runs holds a handful."""
    if values.dtype != object:  # numbers or booleans, one type: pandas finds the distinct ones
        return len({repr(comparable(v)) for v in values.drop_duplicates().tolist()})
    try:
        distinct = pd.DataFrame({"type": values.map(type), "value": values}).drop_duplicates()["value"].tolist()
    except TypeError:  # an unhashable value: compared one by one
        distinct = values.tolist()
    return len({repr(comparable(v)) for v in distinct})


def comparable(value):
    """A value as comparable across runs: NaN and None alike, 2.0 as 2."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
