"""Reviewing results (SPEC §11): what does coupling cost, in accuracy and in time?

Numeric pandas frames, for a notebook as for the summary files:

    from coupled_net import review
    r = review.runs(["outputs/multirun/2026-11-25/10-00-00"])   # one row per run
    review.summarize(r)     # one row per group: mean, std, n, 95 % CI per metric
    review.compare(r)       # paired by seed: delta vs alpha=0 per group, CI, p-values
    review.epochs(r)        # learning curves, one row per run and epoch

A *group* is the runs that differ only by `seed`: grouped by every config key (identity keys and
+labels) that varies across the finished runs, except `seed` — the same rule for tables, deltas and
plots. Only finished runs (`status: done`, not a repeat of another) are counted; the others stay in
`runs()` with their status. A group counts each seed once: `n` is its number of distinct seeds, and a
second run of a seed already in the group is a repeat (`duplicate_of`, warned about). Timings are
aggregated only within one device type and one degree of sharing (timed_on: packed runs are timed
under contention).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

from .collect import READERS, collect_with_epochs, comparable, config_columns, probed_columns, varying
from .epochlog import read_epochs_fast
from .errors import ConfigError

log = logging.getLogger(__name__)

# always the first group columns (the facets and the x axis), whether they vary or not
FIRST = ["model.name", "dataset.name", "coupling.alpha"]
ORDER = FIRST + ["coupling.mode", "coupling.schedule", "coupling.layer"]
ACCURACY = ["test_top1", "test_top5", "val_top1", "val_top5", "best_val_acc", "best_ke_val_acc",
            "ke_drop_mean", "ke_drop_best", "epochs_run"]
TIMINGS = ["epoch_time_s_mean", "ke_time_s_mean", "ke_eval_time_s_mean", "ke_overhead", "checkpoint_time_s_mean",
           "first_epoch_time_s", "total_time_s"]
METRICS = ACCURACY + TIMINGS
STATS = ["mean", "std", "n", "ci_low", "ci_high"]
CONFIDENCE = 0.95


def runs(paths) -> pd.DataFrame:
    """One row per run directory at or below `paths` (str or Path, or a list of them), every status
    included: SPEC §6's columns (`model, dataset, alpha, seed, status, …, run_dir` absolute), the
    derived metrics `ke_drop_mean`, `ke_drop_best`, `ke_eval_time_s_mean`, `ke_overhead`,
    `duplicate_of`, the SLURM state of detached sweeps, then every config key (`coupling.alpha`,
    `optimizer.lr`, a `+label` by its name …)."""
    return runs_with_epochs(paths)[0]


def runs_with_epochs(paths) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """runs(paths), and each run's epochs.csv rows as they were read (run_dir -> rows): what epochs()
    takes to build the learning curves without reading every file again."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    df, read_rows = collect_with_epochs(paths)
    for index, first in repeated_seeds(df).items():
        log.warning("%s repeats seed %s of %s in the same group: counted once", df.at[index, "run_dir"],
                    comparable(df.at[index, "seed"]), first)
        df.at[index, "duplicate_of"] = first
    return df, read_rows


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows (runs, or epochs() rows) of finished runs that repeat no other: those a runs() frame counts
    (runs() marks a repeated seed `duplicate_of` too)."""
    return runs[(runs["status"] == "done") & runs["duplicate_of"].isna()]


def counted(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that enter aggregates: done, not a repeat of another run, one run per seed of a group."""
    return counted_with_keys(runs)[0]


def counted_with_keys(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(counted(runs), group_keys(runs)), the group keys worked out once: finding a group's repeated
    seeds needs them, and working them out is most of a review's grouping time at 10,000 runs."""
    done = finished(runs)
    keys = _group_keys(done, runs)
    return done.drop(index=list(_repeats(done, keys))), keys


def repeated_seeds(runs: pd.DataFrame) -> dict:
    """index -> run dir, for each finished run whose group already has a run of its seed (the one
    kept: the first by run dir). Two runs of one seed in a group are one run twice however they came
    about (a record that typed a default another way, a copied sweep): counting both would shrink the
    error bars with no new evidence."""
    done = finished(runs)
    return _repeats(done, _group_keys(done, runs))


def _repeats(done: pd.DataFrame, keys: list[str]) -> dict:
    done = done.sort_values("run_dir")
    kept, repeats = {}, {}
    for index, run_dir, seed, key in zip(done.index, done["run_dir"], done["seed"].tolist(), _keys(done, keys)):
        at = (key, comparable(seed))
        if at in kept:
            repeats[index] = kept[at]
        else:
            kept[at] = run_dir
    return repeats


def group_keys(runs: pd.DataFrame) -> list[str]:
    """The columns that define groups: model, dataset and alpha, then every other config key that
    varies across the counted runs, except `seed`."""
    return _group_keys(finished(runs), runs)


def _group_keys(done: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    keys = [k for k in config_columns(runs) if k != "seed"]
    order = {k: i for i, k in enumerate(ORDER)}
    others = sorted(varying(done, [k for k in keys if k not in FIRST]), key=lambda k: (order.get(k, len(ORDER)), k))
    # model=torchvision/timm: model.name is the arch (identity.model_name); one column says it
    others = [k for k in others if not (k == "model.arch" and "model.name" in done
                                        and done[k].astype(str).equals(done["model.name"].astype(str)))]
    return [k for k in FIRST if k in runs] + others


def _keys(frame: pd.DataFrame, keys) -> list[tuple]:
    """Each row's values of `keys`, made comparable (2.0 as 2, NaN as None): a group's key. Each column's
    distinct values are made comparable once, without a Series per row
    (pandas.factorize; its missing values, code -1, are None as comparable makes them)."""
    if not keys or frame.empty:  # no run done yet (a detached sweep just submitted): its keys may be no columns
        return [()] * len(frame)
    columns = []
    for k in keys:
        try:
            codes, uniques = pd.factorize(frame[k])
        except TypeError:  # an unhashable value: one by one
            columns.append([comparable(v) for v in frame[k].tolist()])
            continue
        values = [comparable(v) for v in uniques.tolist()] + [None]
        columns.append([values[c] for c in codes.tolist()])
    return list(zip(*columns))


def mean_ci(values) -> dict:
    """mean, sample std, n and the t-based 95 % confidence interval of the mean (NaN where n < 2)."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


@functools.lru_cache(maxsize=None)
def t_quantile(dof: int) -> float:
    """Student's t quantile at 0.5 + CONFIDENCE / 2 for `dof` degrees of freedom (scipy.special.stdtrit,
    what scipy.stats.t.ppf computes), once per dof: a review's groups share a handful of sizes, and
    t.ppf's own overhead per call was a quarter of summarizing 2,000 runs."""
    return float(special.stdtrit(dof, 0.5 + CONFIDENCE / 2))


def _groups(done: pd.DataFrame, keys: list[str]):
    """(key tuple, runs of the group) for the counted runs `done`, in the order summarize() sorts them."""
    out: dict[tuple, list] = {}
    for index, key in zip(done.index, _keys(done, keys)):
        out.setdefault(key, []).append(index)
    return [(key, done.loc[index]) for key, index in sorted(out.items(), key=lambda kv: _sortable(kv[0]))]


def _sortable(key: tuple) -> tuple:
    return tuple((v is None, not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v))
                 for v in key)


def timed_on(runs: pd.DataFrame) -> pd.Series:
    """What each run's timings were taken on: its device type and, for a run that shared its device
    with others of its launch (hydra.launcher.runs_per_gpu, runs_per_task, max_parallel on CPUs), how
    many: a packed run is timed under contention, and is never pooled with runs that ran alone."""
    shared = runs["shared_by"].fillna(1).astype(int) if "shared_by" in runs else pd.Series(1, index=runs.index)
    label = runs["device"].astype(object).where(shared <= 1, runs["device"].astype(str) + ", shared by "
                                                + shared.astype(str) + " runs")
    return label.where(runs["device"].notna())


def _devices(group: pd.DataFrame) -> list[str]:
    return sorted({str(d) for d in timed_on(group).dropna()})


def summarize(runs: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """One row per group (group_keys(runs), then `n`, `seeds`, `device`), and for each metric
    `<metric>_mean`, `_std`, `_n`, `_ci_low`, `_ci_high`; the metrics: METRICS, then the training-loop
    callbacks' numbers (`callbacks.<name>.<key>`), unless given. A group whose runs ran on more than one
    device type has no timings here (`device` is NaN): see timings()."""
    metrics = [*METRICS, *probed_columns(runs)] if metrics is None else list(metrics)
    _known_metrics(runs, metrics)
    done, keys = counted_with_keys(runs)
    rows = []
    for key, group in _groups(done, keys):
        devices = _devices(group)
        row = {**dict(zip(keys, key)), "n": len(group), "seeds": sorted(comparable(s) for s in group["seed"]),
               "device": devices[0] if len(devices) == 1 else None}
        for m in metrics:
            values = group[m] if (m not in TIMINGS or len(devices) <= 1) else []
            row.update({f"{m}_{s}": v for s, v in mean_ci(values).items()})
        rows.append(row)
    columns = keys + ["n", "seeds", "device"] + [f"{m}_{s}" for m in metrics for s in STATS]
    return pd.DataFrame(rows, columns=columns)


def timings(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group and device type (and number of runs sharing it, timed_on): the timing
    metrics, never mixing devices, nor packed runs with runs alone."""
    done, keys = counted_with_keys(runs)
    rows = []
    for key, group in _groups(done, keys):
        for device, runs_on in group.groupby(timed_on(group).fillna("unknown"), sort=True):
            row = {**dict(zip(keys, key)), "device": device, "n": len(runs_on)}
            for m in TIMINGS:
                row.update({f"{m}_{s}": v for s, v in mean_ci(runs_on[m]).items()})
            rows.append(row)
    return pd.DataFrame(rows, columns=keys + ["device", "n"] + [f"{m}_{s}" for m in TIMINGS for s in STATS])


def compare(runs: pd.DataFrame, baseline: dict | None = None, metrics=("test_top1",)) -> pd.DataFrame:
    """Each group against its baseline group (the same group keys, with `baseline`'s values; default
    alpha=0), runs paired by seed: one row per non-baseline group and metric with `n_pairs`,
    `baseline_mean` and `mean` (over the pairs), `delta_mean` (this - baseline), `delta_std`,
    `ci_low`/`ci_high` (t-based 95 % CI of the paired mean delta), `p_value` (scipy's paired t-test),
    `wilcoxon_p` (signed-rank test, where n_pairs >= 6), and the runs left unpaired on either side
    (`n_unpaired`, `unpaired`: their run dirs) — reported, never silently dropped."""
    from scipy import stats

    baseline = {"coupling.alpha": 0} if baseline is None else dict(baseline)
    _known_metrics(runs, metrics)
    done, keys = counted_with_keys(runs)
    for k, v in baseline.items() if len(done) else ():  # nothing finished (yet): nothing to compare
        if k not in config_columns(runs) or k == "seed":
            allowed = ", ".join(varying(done, config_columns(runs))) or "none vary"
            raise ConfigError("baseline", f"{k}={v}", f"not a config key of these runs (keys that vary: {allowed})")
        have = sorted({comparable(x) for x in done[k]}, key=lambda x: _sortable((x,)))
        if baseline != {"coupling.alpha": 0} and comparable(v) not in have:  # the default's may be in another sweep
            raise ConfigError("baseline", f"{k}={v}", f"no finished run has {k}={v} (the finished runs' values: "
                                                      f"{', '.join(map(str, have))})")
    keys += [k for k in baseline if k not in keys]
    groups = dict(_groups(done, keys))
    at = {k: keys.index(k) for k in baseline}
    rows = []
    for key, group in groups.items():
        if all(key[i] == comparable(baseline[k]) for k, i in at.items()):
            continue
        base_key = list(key)
        for k, i in at.items():
            base_key[i] = comparable(baseline[k])
        base = groups.get(tuple(base_key), group.iloc[:0])
        mine, theirs = _by_seed(group, ["run_dir", *metrics]), _by_seed(base, ["run_dir", *metrics])
        seeds = sorted(set(mine) & set(theirs), key=str)
        unpaired = [mine[s]["run_dir"] for s in mine if s not in theirs] + [theirs[s]["run_dir"] for s in theirs
                                                                              if s not in mine]
        for m in metrics:
            this = np.array([float(mine[s][m]) for s in seeds])
            that = np.array([float(theirs[s][m]) for s in seeds])
            delta = mean_ci(this - that)
            p = w = math.nan
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant differences: scipy warns and returns NaN or 0
                if len(seeds) >= 2:
                    p = float(stats.ttest_rel(this, that).pvalue)
                if len(seeds) >= 6 and np.any(this != that):
                    w = float(stats.wilcoxon(this, that).pvalue)
            rows.append({**dict(zip(keys, key)), "metric": m, "n_pairs": len(seeds),
                         "baseline_mean": float(that.mean()) if len(seeds) else math.nan,
                         "mean": float(this.mean()) if len(seeds) else math.nan,
                         "delta_mean": delta["mean"], "delta_std": delta["std"], "ci_low": delta["ci_low"],
                         "ci_high": delta["ci_high"], "p_value": p, "wilcoxon_p": w,
                         "n_unpaired": len(unpaired), "unpaired": unpaired})
    return pd.DataFrame(rows, columns=keys + ["metric", "n_pairs", "baseline_mean", "mean", "delta_mean", "delta_std",
                                              "ci_low", "ci_high", "p_value", "wilcoxon_p", "n_unpaired", "unpaired"])


def _known_metrics(runs: pd.DataFrame, metrics) -> None:
    """Refuse a metric that is no column of the runs, in one line naming the ones there are."""
    for m in metrics:
        if m not in runs:
            names = [*METRICS, *probed_columns(runs)]
            raise ConfigError("metrics", m, f"not a metric of these runs (metrics: {', '.join(names)})")


def _by_seed(group: pd.DataFrame, columns: list[str]) -> dict:
    """seed -> the group's first run of it, as a record of `columns` (column -> value)."""
    first = {}
    for position, seed in enumerate(group["seed"].tolist()):
        first.setdefault(comparable(seed), position)
    return dict(zip(first, group[columns].iloc[list(first.values())].to_dict("records")))


def epochs(runs_or_paths, read_rows: dict[str, list[dict]] | None = None) -> pd.DataFrame:
    """Learning curves in long form: one row per run and epoch, epochs.csv's columns plus `ke_drop`
    (val_acc - ke_val_acc), `run_dir`, `status`, `duplicate_of` and the run's config keys. Takes a
    runs() frame or the paths runs() takes; `read_rows` (runs_with_epochs()'s): rows already read, by
    run dir (a run not in it is read)."""
    if isinstance(runs_or_paths, pd.DataFrame):
        frame = runs_or_paths
    else:
        frame, read_rows = runs_with_epochs(runs_or_paths)
    carried = ["run_dir", "status", "duplicate_of", "device", *config_columns(frame)]
    read_rows = read_rows or {}
    unread = [d for d in frame["run_dir"] if d not in read_rows]
    with ThreadPoolExecutor(READERS) as pool:
        read_rows = {**read_rows, **dict(zip(unread, pool.map(lambda d: read_epochs_fast(Path(d))[0], unread)))}
    per_run = [read_rows[d] for d in frame["run_dir"]]
    # one frame of every run's rows, then the runs' columns taken by position: a frame per run, and
    # its columns set one by one, cost minutes at 10,000 runs
    at = [i for i, rows in enumerate(per_run) for _ in rows]
    if not at:
        return pd.DataFrame(columns=["epoch", "ke_drop", *carried])
    e = pd.DataFrame([row for rows in per_run for row in rows]).apply(pd.to_numeric, errors="coerce")
    e = e.drop(columns=[c for c in carried if c in e])  # the run's own value wins, as it always has
    e["ke_drop"] = e["val_acc"] - e["ke_val_acc"]
    taken = frame[carried].iloc[at]
    return pd.concat([e, pd.DataFrame({name: taken[name].to_numpy() for name in carried})], axis=1)
