"""The summary files of a set of runs (SPEC §6, §11), written by launch/collect.py and at the end of a
local sweep, from coupled_net.review's frames — numbers are formatted only here, when written:

    summary.csv          one row per run (collect's columns; config keys that vary)
    summary_groups.csv   review.summarize(): one row per group, mean/std/n/CI per metric
    summary_delta.csv    review.compare(): paired difference to alpha=0 per group
    summary.md           the headline table, then the full tables and the runs not in them
    summary.tex          the headline table for a paper (booktabs, caption, label)
    summary_*.png        test top-1 vs alpha, delta vs alpha, learning curves (seaborn)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import review
from .collect import DERIVED, IDENTITY, LEADING, SHOWN, TRAILING, _plain, varying
from .storage import atomic_write

DELTA_METRICS = ("test_top1", "val_top1")
PLOTS = ("summary_test_top1_vs_alpha.png", "summary_delta_vs_alpha.png", "summary_learning_curves.png")
NAMES = {"model.name": "model", "dataset.name": "dataset", "coupling.alpha": "alpha"}
# An accuracy axis spans at least this many points: autoscaling a 0.3-point spread over the whole
# height draws noise as an effect (the issue-10 review); 10 points keeps a 1-point effect visible.
MIN_SPAN = 10.0


@dataclass
class Summary:
    runs: pd.DataFrame       # review.runs()
    groups: pd.DataFrame     # review.summarize()
    deltas: pd.DataFrame     # review.compare() for DELTA_METRICS
    keys: list[str]          # review.group_keys()
    baseline: dict           # what compare() compared with ({"coupling.alpha": 0})
    headline: str            # what the terminal shows: the headline table and the runs not in it
    markdown: str            # summary.md


# ---- which keys a table shows -------------------------------------------------------------------

def table_keys(groups: pd.DataFrame, keys: list[str]) -> list[str]:
    """The group keys worth a column: alpha always; the others where they vary across the groups,
    except a model.*/dataset.* key that only follows the model or dataset name."""
    shown = []
    for k in keys:
        if k == "coupling.alpha":
            shown.append(k)
        elif not varying(groups, [k]):
            continue
        elif k.startswith(("model.", "dataset.")) and k not in NAMES:
            name = "model.name" if k.startswith("model.") else "dataset.name"
            per_name = groups.groupby(groups[name].map(repr))[k].agg(lambda s: len({repr(_plain(v)) for v in s}))
            if per_name.max() > 1:
                shown.append(k)
        else:
            shown.append(k)
    return shown


def display_names(keys: list[str]) -> dict[str, str]:
    """`optimizer.lr` -> `lr`; the dotted name where two keys would read alike."""
    short = {k: NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


def _value(v) -> str:
    v = _plain(v)
    return "" if v is None else str(v)


# ---- numbers as text ----------------------------------------------------------------------------

def _num(v, fmt=".2f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _pm(row, metric: str, fmt=".2f", pm=" ± ") -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if isinstance(mean, float) and math.isnan(mean):
        return ""
    return _num(mean, fmt) if math.isnan(std) else f"{_num(mean, fmt)}{pm}{_num(std, fmt)}"


def _seconds(v) -> str:
    if v is None or math.isnan(v):
        return ""
    return format(v, ".0f" if v >= 100 else ".1f" if v >= 10 else ".2f" if v >= 0.01 else ".2g")


def _share(v) -> str:
    return "" if v is None or math.isnan(v) else f"{100 * v:.1f} %"


def _p(v) -> str:
    return "" if v is None or math.isnan(v) else "<0.001" if v < 0.001 else f"{v:.3f}"


def _delta(d, minus="-") -> str:
    """`+0.53 [-1.92, +2.98]`; without a CI (one pair) the mean alone; `no pairs` without pairs."""
    if d is None:
        return ""
    if d["n_pairs"] == 0:
        return "no pairs"
    text = f"{d['delta_mean']:+.2f}"
    if not math.isnan(d["ci_low"]):
        text += f" [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
    return text.replace("-", minus)


def _baseline_text(baseline: dict) -> str:
    return ", ".join(f"{NAMES.get(k, k)}={v}" for k, v in baseline.items())


# ---- tables -------------------------------------------------------------------------------------

def headline_frame(groups, deltas, keys, baseline, minus="-", pm=" ± ") -> pd.DataFrame:
    """One row per group, as text: its varying keys, n, test top-1, the paired delta to the baseline
    with its CI and p-value, KE drop, epoch time and KE overhead."""
    shown = table_keys(groups, keys)
    names = display_names(shown)
    by_group = {tuple(_plain(r[k]) for k in keys): r for _, r in deltas[deltas["metric"] == "test_top1"].iterrows()}
    rows = []
    for _, g in groups.iterrows():
        key = tuple(_plain(g[k]) for k in keys)
        d = by_group.get(key)
        is_base = d is None  # compare() has a row for every group but the baseline's
        rows.append({**{names[k]: _value(g[k]) for k in shown}, "n": int(g["n"]),
                     "test top-1": _pm(g, "test_top1", pm=pm),
                     f"Δ vs {_baseline_text(baseline)} [95 % CI]": "baseline" if is_base else _delta(d, minus),
                     "p": "" if d is None else _p(d["p_value"]),
                     "KE drop": _pm(g, "ke_drop_mean", pm=pm),
                     "epoch s": "mixed" if pd.isna(g["device"]) else _seconds(g["epoch_time_s_mean_mean"]),
                     "KE cost": _share(g["ke_overhead_mean"])})
    return pd.DataFrame(rows)


def _constants(groups: pd.DataFrame, runs: pd.DataFrame) -> str:
    what = []
    for k in ("model.name", "dataset.name"):
        if k in groups and len(groups) and not varying(groups, [k]):
            what.append(_value(groups[k].iloc[0]))
    counted = review.counted(runs)
    seeds = groups["n"]
    per_group = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}–{seeds.max()}"
    where = " on ".join(what)
    return (f"{where + ': ' if where else ''}{_plural(len(counted), 'finished run')} in "
            f"{_plural(len(groups), 'group')}, {per_group} seed{'s' if seeds.max() > 1 else ''} per group")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


LEGEND = [
    "test top-1: %, mean ± std over seeds. Δ: test top-1 paired by seed against the baseline, mean and",
    "t-based 95 % CI; p: paired t-test. KE drop: val top-1 points lost at an equalization (mean over epochs).",
    "epoch s: train + validation; KE cost: equalization + second validation, as a share of an epoch.",
]


def headline(s: Summary, baseline: dict) -> str:
    if s.groups.empty:
        return "## What coupling costs\n\n_no finished runs_\n"
    table = _md(headline_frame(s.groups, s.deltas, s.keys, baseline), len(table_keys(s.groups, s.keys)))
    devices = sorted({d for d in s.groups["device"].dropna()})
    timing = f"Timings on {devices[0]}." if len(devices) == 1 else "Timings per device: see below."
    return "\n".join([f"## What coupling costs ({_constants(s.groups, s.runs)})", "", table, "",
                      *LEGEND, timing, ""])


def _full_groups(groups, keys) -> pd.DataFrame:
    names = display_names(keys)
    return pd.DataFrame([{
        **{names[k]: _value(g[k]) for k in keys}, "n": int(g["n"]), "seeds": ",".join(map(str, g["seeds"])),
        "val top-1": _pm(g, "val_top1"), "test top-1": _pm(g, "test_top1"), "test top-5": _pm(g, "test_top5"),
        "KE drop": _pm(g, "ke_drop_mean"), "KE drop (best)": _pm(g, "ke_drop_best"),
        "epochs": _pm(g, "epochs_run", ".1f"), "epoch s": _seconds(g["epoch_time_s_mean_mean"]),
        "KE s": _num(g["ke_time_s_mean_mean"], ".2g"), "KE+val s": _seconds(g["ke_eval_time_s_mean_mean"]),
        "KE cost": _share(g["ke_overhead_mean"]), "device": "mixed" if pd.isna(g["device"]) else g["device"],
    } for _, g in groups.iterrows()])


def _full_deltas(deltas, keys) -> pd.DataFrame:
    names = display_names(keys)
    return pd.DataFrame([{
        **{names[k]: _value(d[k]) for k in keys}, "metric": d["metric"], "pairs": int(d["n_pairs"]),
        "baseline": _num(d["baseline_mean"]), "this": _num(d["mean"]), "Δ [95 % CI]": _delta(d),
        "p (t)": _p(d["p_value"]), "p (Wilcoxon)": _p(d["wilcoxon_p"]), "unpaired": int(d["n_unpaired"]),
    } for _, d in deltas.iterrows()])


def _mixed_timings(runs, keys) -> pd.DataFrame:
    t = review.timings(runs)
    mixed = t.groupby([t[k].map(repr) for k in keys])["device"].transform("count") > 1
    names = display_names(keys)
    return pd.DataFrame([{
        **{names[k]: _value(r[k]) for k in keys}, "device": r["device"], "n": int(r["n"]),
        "epoch s": _seconds(r["epoch_time_s_mean_mean"]), "KE+val s": _seconds(r["ke_eval_time_s_mean_mean"]),
        "KE cost": _share(r["ke_overhead_mean"])} for _, r in t[mixed].iterrows()])


def _md(frame: pd.DataFrame, keys: int) -> str:
    """A Markdown table of text cells: the first `keys` columns left-aligned, the numbers right."""
    align = ["left"] * keys + ["right"] * (len(frame.columns) - keys)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


def not_aggregated(df: pd.DataFrame) -> pd.DataFrame:
    """Runs not done, and done runs that repeat another (duplicate_of)."""
    cols = ["run_dir", "status", *[c for c in ("slurm_job_id", "slurm_state") if df[c].notna().any()],
            "epochs_run", "last_val_acc", "error", "duplicate_of"]
    return df.loc[(df["status"] != "done") | df["duplicate_of"].notna(), cols]


def markdown(s: Summary, baseline: dict) -> str:
    parts = [headline(s, baseline)]
    if not s.groups.empty:
        parts += ["## Groups (mean ± std over seeds; CIs in summary_groups.csv)", "",
                  _md(_full_groups(s.groups, s.keys), len(s.keys)), ""]
    if not s.deltas.empty:
        parts += [f"## Paired differences vs {_baseline_text(baseline)} (by seed)", "",
                  _md(_full_deltas(s.deltas, s.keys), len(s.keys) + 1), ""]
    if not s.groups.empty and s.groups["device"].isna().any():
        parts += ["## Timings per device (groups that ran on several)", "",
                  _md(_mixed_timings(s.runs, s.keys), len(s.keys) + 1), ""]
    others = not_aggregated(s.runs)
    if not others.empty:
        parts += ["## Runs not in the aggregate", "", others.to_markdown(index=False), ""]
    return "\n".join(parts)


def terminal(s: Summary, baseline: dict, out: Path) -> str:
    """The headline table, then one line per run not in it."""
    lines = [headline(s, baseline)]
    others = not_aggregated(s.runs)
    for r in others.itertuples():
        why = f"repeats {r.duplicate_of}" if isinstance(r.duplicate_of, str) else \
            (r.error if isinstance(r.error, str) else "")  # NaN: no error recorded
        lines.append(f"not in the table: {r.run_dir} ({r.status}{': ' + why if why else ''})")
    lines.append(f"Full tables: {out / 'summary.md'}")
    return "\n".join(lines)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text)


def latex(s: Summary, baseline: dict) -> str:
    """The headline table as a LaTeX table (booktabs rules, `$\\pm$`, caption, label)."""
    if s.groups.empty:
        return "% no finished runs\n"
    frame = headline_frame(s.groups, s.deltas, s.keys, baseline, minus="\0", pm="\1")
    frame = frame.map(lambda v: _tex(str(v)).replace("\0", "$-$").replace("\1", r" $\pm$ ").replace("<", "$<$")
                      .replace(" \\% CI", r"\,\% CI").replace("Δ", r"$\Delta$"))
    frame.columns = [r"$\alpha$" if c == "alpha" else _tex(c).replace("Δ", r"$\Delta$").replace(" \\% CI", r"\,\% CI")
                     for c in frame.columns]
    numeric = len(frame.columns) - len(table_keys(s.groups, s.keys))
    caption = (f"What coupling costs ({_tex(_constants(s.groups, s.runs))}). Test top-1 in \\%, mean $\\pm$ std "
               f"over seeds; $\\Delta$: paired by seed against {_tex(_baseline_text(baseline))}, mean and t-based "
               "95\\,\\% CI; p: paired t-test; KE drop: validation top-1 points lost at an equalization; "
               "KE cost: equalization and second validation as a share of an epoch.")
    styler = frame.style.hide(axis="index")
    return styler.to_latex(hrules=True, caption=caption, label="tab:coupled-net-summary",
                           position_float="centering", position="t",
                           column_format="l" * (len(frame.columns) - numeric) + "r" * numeric)


def summary_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: SPEC §6's columns first, coupling mode/schedule, the SLURM state of detached
    sweeps, every config key that varies (dotted), the derived metrics, then bookkeeping."""
    slurm = [c for c in ("slurm_job_id", "slurm_state") if runs[c].notna().any()]
    keys = [k for k in varying(runs, review.config_columns(runs)) if k not in SHOWN]
    return runs[LEADING + IDENTITY + slurm + keys + DERIVED + TRAILING + ["duplicate_of"]]


# ---- plots --------------------------------------------------------------------------------------

def _facet(row) -> str:
    return f"{_value(row.get('model.name'))} / {_value(row.get('dataset.name'))}"


def _line(row, others: list[str], names: dict) -> str:
    return ", ".join(f"{names[k]}={_value(row[k])}" for k in others) or "all runs"


def alpha_plot_frame(groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """What summary_test_top1_vs_alpha.png draws: one row per group (facet = model / dataset, line =
    its other varying keys, alpha, mean, CI, n)."""
    others = [k for k in table_keys(groups, keys) if k not in review.FIRST]
    names = display_names(others)
    frame = pd.DataFrame({
        "facet": [_facet(r) for _, r in groups.iterrows()],
        "line": [_line(r, others, names) for _, r in groups.iterrows()],
        "alpha": groups["coupling.alpha"].to_numpy(), "mean": groups["test_top1_mean"].to_numpy(),
        "ci_low": groups["test_top1_ci_low"].to_numpy(), "ci_high": groups["test_top1_ci_high"].to_numpy(),
        "n": groups["n"].to_numpy()})
    return _with_n(frame)


def delta_plot_frame(deltas: pd.DataFrame, keys: list[str], groups: pd.DataFrame) -> pd.DataFrame:
    """What summary_delta_vs_alpha.png draws: one row per compared group (test top-1)."""
    d = deltas[(deltas["metric"] == "test_top1") & (deltas["n_pairs"] > 0)]
    others = [k for k in table_keys(groups, keys) if k not in review.FIRST]
    names = display_names(others)
    frame = pd.DataFrame({
        "facet": [_facet(r) for _, r in d.iterrows()], "line": [_line(r, others, names) for _, r in d.iterrows()],
        "alpha": d["coupling.alpha"].to_numpy(), "mean": d["delta_mean"].to_numpy(),
        "ci_low": d["ci_low"].to_numpy(), "ci_high": d["ci_high"].to_numpy(), "n": d["n_pairs"].to_numpy()})
    return _with_n(frame)


def _with_n(frame: pd.DataFrame) -> pd.DataFrame:
    """The line's label says how many runs (pairs) each point averages."""
    if frame.empty:
        return frame.assign(label=[])
    lo = frame.groupby(["facet", "line"])["n"].transform("min").astype(int)
    hi = frame.groupby(["facet", "line"])["n"].transform("max").astype(int)
    frame["label"] = [f"{line} (n={a})" if a == b else f"{line} (n={a}–{b})"
                      for line, a, b in zip(frame["line"], lo, hi)]
    return frame.sort_values(["facet", "line", "alpha"]).reset_index(drop=True)


def curve_frame(epochs: pd.DataFrame, groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """What summary_learning_curves.png draws: counted runs' val top-1 per epoch, before and after
    KE, labelled by group (alpha and the other varying keys, n runs)."""
    e = review.counted(epochs)
    shown = [k for k in table_keys(groups, keys)]
    names = display_names(shown)
    n = {tuple(_plain(g[k]) for k in keys): int(g["n"]) for _, g in groups.iterrows()}
    label = [f"{_line(r, shown, names)} (n={n.get(tuple(_plain(r[k]) for k in keys), 0)})" for _, r in e.iterrows()]
    base = pd.DataFrame({"facet": [_facet(r) for _, r in e.iterrows()], "group": label,
                         "alpha": e["coupling.alpha"].to_numpy(), "epoch": e["epoch"].to_numpy()})
    before = base.assign(when="before KE", top1=e["val_acc"].to_numpy())
    after = base.assign(when="after KE", top1=e["ke_val_acc"].to_numpy())
    return pd.concat([before, after], ignore_index=True).sort_values(["facet", "alpha", "group", "epoch"])


def _min_span(ax, span=MIN_SPAN) -> None:
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def _errorbars(data, color=None, label=None, bars=True, **_):
    import matplotlib.pyplot as plt

    data = data.sort_values("alpha")
    has_ci = bars and data["ci_low"].notna().any()
    yerr = [(data["mean"] - data["ci_low"]).fillna(0), (data["ci_high"] - data["mean"]).fillna(0)] if has_ci else None
    plt.errorbar(data["alpha"], data["mean"], yerr=yerr, marker="o", capsize=3, color=color, label=label)


def _draw_points(frame: pd.DataFrame, path: Path, ylabel: str, title: str, zero_line=False,
                 over="seeds") -> Path:
    import seaborn as sns

    single = int(frame["n"].max()) <= 1
    facets = list(dict.fromkeys(frame["facet"]))
    grid = sns.FacetGrid(frame, col="facet", hue="label", col_wrap=min(3, len(facets)), sharey=False,
                         height=3.6, aspect=1.35, col_order=facets)
    grid.map_dataframe(_errorbars, bars=not single)
    for ax in grid.axes.flat:
        if zero_line:
            ax.axhline(0, color="grey", linewidth=1, linestyle=":")
        _min_span(ax)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    grid.set_axis_labels("alpha (coupled filter pairs)", ylabel)
    grid.set_titles("{col_name}")
    grid.add_legend(title="")
    note = "single seed: one run per point, no error bars" if single else f"error bars: 95 % t-CI over {over}"
    return _save(grid, path, f"{title} ({note})")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _draw_curves(frame: pd.DataFrame, path: Path, single: bool) -> Path:
    import seaborn as sns

    facets = list(dict.fromkeys(frame["facet"]))
    grid = sns.relplot(data=frame, kind="line", x="epoch", y="top1", hue="group", style="when",
                       style_order=["before KE", "after KE"], col="facet", col_order=facets,
                       col_wrap=min(3, len(facets)), errorbar=None if single else review.ci_interval,
                       height=3.6, aspect=1.35, facet_kws={"sharey": False}, palette="viridis")
    for ax in grid.axes.flat:
        _min_span(ax)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    grid.set_axis_labels("epoch", "val top-1 (%)")
    grid.set_titles("{col_name}")
    note = "single seed: one run per line" if single else "mean over seeds, band: 95 % t-CI"
    return _save(grid, path, f"Validation top-1 before (solid) and after KE (dashed); {note}")


def _save(grid, path: Path, title: str) -> Path:
    """Title a seaborn grid's figure, then write it atomically."""
    import matplotlib.pyplot as plt

    grid.tight_layout()  # keeps the legend's room outside the axes
    grid.figure.subplots_adjust(top=1 - 0.5 / grid.figure.get_figheight())  # room for the title
    grid.figure.suptitle(title, fontsize=10)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.figure.savefig(tmp, dpi=110)
    plt.close(grid.figure)
    tmp.replace(path)
    return path


def plots(s: Summary, out: Path) -> list[Path]:
    """The three plots, each grouped exactly like the tables; a plot with nothing to draw is removed
    rather than left from an earlier collection."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    if not s.groups.empty:
        written.append(_draw_points(alpha_plot_frame(s.groups, s.keys), out / PLOTS[0], "test top-1 (%)",
                                    "Test top-1 vs coupling"))
        delta = delta_plot_frame(s.deltas, s.keys, s.groups)
        if not delta.empty:
            versus = _baseline_text(s.baseline)
            written.append(_draw_points(delta, out / PLOTS[1], f"Δ test top-1 vs {versus} (points)",
                                        f"Paired difference to {versus}", zero_line=True, over="seed pairs"))
        curves = curve_frame(review.epochs(review.counted(s.runs)), s.groups, s.keys)
        if not curves.empty:
            written.append(_draw_curves(curves, out / PLOTS[2], single=int(s.groups["n"].max()) <= 1))
    for name in PLOTS:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written


# ---- writing ------------------------------------------------------------------------------------

def summarize_runs(runs: pd.DataFrame, baseline: dict | None = None, out: Path | None = None) -> Summary:
    baseline = baseline or {"coupling.alpha": 0}
    s = Summary(runs=runs, groups=review.summarize(runs), deltas=review.compare(runs, baseline, DELTA_METRICS),
                keys=review.group_keys(runs), baseline=baseline, headline="", markdown="")
    s.markdown = markdown(s, baseline)
    s.headline = terminal(s, baseline, Path(out or "."))
    return s


def _csv(frame: pd.DataFrame) -> bytes:
    lists = {c: frame[c].map(lambda v: ";".join(map(str, v)) if isinstance(v, list) else v)
             for c in frame.columns if frame[c].map(lambda v: isinstance(v, list)).any()}
    return frame.assign(**lists).to_csv(index=False).encode()


def write_summary(paths, out: Path | None = None, baseline: dict | None = None) -> Summary:
    """Collect the runs below `paths` and write every summary file into `out` (default: the first path)."""
    runs = review.runs(paths)
    if runs.empty:
        raise FileNotFoundError(f"no run directories below {', '.join(map(str, paths))}")
    out = Path(out or paths[0])
    baseline = baseline or {"coupling.alpha": 0}
    s = summarize_runs(runs, baseline, out)  # a bad baseline is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary.csv": _csv(summary_frame(runs)), "summary_groups.csv": _csv(s.groups),
             "summary_delta.csv": _csv(s.deltas), "summary.md": s.markdown.encode(),
             "summary.tex": latex(s, baseline).encode()}
    for name, blob in files.items():
        atomic_write(out / name, lambda f, blob=blob: f.write(blob))
    plots(s, out)
    return s


