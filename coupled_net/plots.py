"""The review's plots (summary_*.png, drawn with matplotlib directly), each grouped exactly like the
tables (coupled_net.tables): test top-1 vs alpha, the paired difference vs alpha, and the learning curves
before and after KE. One constrained-layout figure per plot, a facet per model / dataset, one legend
outside on the right; the learning curves' mean and 95 % t-CI are aggregated once with pandas."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from . import review
from .collect import comparable
from .tables import Summary, baseline_text, cell, display_names, table_keys

PLOTS = ("summary_test_top1_vs_alpha.png", "summary_delta_vs_alpha.png", "summary_learning_curves.png")
# An accuracy axis spans at least this many points: autoscaling a 0.3-point spread over the whole
# height draws noise as an effect (the issue-10 review); 10 points keeps a 1-point effect visible.
MIN_SPAN = 10.0
# past 10 groups a line's marker tells it apart too (curve_grid)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


def _facet(row) -> str:
    return f"{cell(row.get('model.name'))} / {cell(row.get('dataset.name'))}"


def _line(row, others: list[str], names: dict) -> str:
    return ", ".join(f"{names[k]}={cell(row[k])}" for k in others) or "all runs"


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
    e = review.finished(epochs)
    shown = [k for k in table_keys(groups, keys)]
    names = display_names(shown)
    n = {tuple(comparable(g[k]) for k in keys): int(g["n"]) for _, g in groups.iterrows()}
    # a run's facet and label, worked out once per distinct key rather than once per epoch row
    needed = list(dict.fromkeys(["model.name", "dataset.name", *shown, *keys]))
    columns = [e[k].tolist() if k in e else [None] * len(e) for k in needed]
    memo, facet, label = {}, [], []
    for values in zip(*columns):
        at = tuple(map(comparable, values))
        if at not in memo:
            r = {k: v for k, v in zip(needed, at) if k in e}
            memo[at] = (_facet(r), f"{_line(r, shown, names)} (n={n.get(tuple(r[k] for k in keys), 0)})")
        facet.append(memo[at][0])
        label.append(memo[at][1])
    base = pd.DataFrame({"facet": facet, "group": label,
                         "alpha": e["coupling.alpha"].to_numpy(), "epoch": e["epoch"].to_numpy()})
    before = base.assign(when="before KE", top1=e["val_acc"].to_numpy())
    after = base.assign(when="after KE", top1=e["ke_val_acc"].to_numpy())
    return pd.concat([before, after], ignore_index=True).sort_values(["facet", "alpha", "group", "epoch"])


def _min_span(ax, span=MIN_SPAN) -> None:
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


# a facet's size, as the seaborn grids drew it: 3.6 in high, 1.35 times as wide
HEIGHT, ASPECT = 3.6, 1.35


def _facets(names: list[str], labels: list[str], xlabel: str, ylabel: str, title: str):
    """A constrained-layout figure of one facet per name (three to a row, y not shared), titled and
    labelled like the seaborn grids were, its unused axes removed: (figure, {name: axes}, the legend's
    number of columns, so that `labels` fit in the figure's height)."""
    cols = max(1, min(3, len(names)))
    rows = max(1, -(-len(names) // cols))
    # the legend's room on the right: its longest label at about 0.075 in a character (10 pt), in
    # columns of at most as many entries as the figure's height holds
    per_column = max(1, int((rows * HEIGHT) / 0.24))
    legend_cols = max(1, -(-len(labels) // per_column))
    legend = legend_cols * (0.6 + 0.075 * max((len(x) for x in labels), default=0))
    # the title is centred over the facets, not the legend (whose top it would run into), and one
    # facet is widened to the title's width rather than clip it
    facets = max(cols * HEIGHT * ASPECT, 0.075 * len(title) + 0.5)
    # a Figure of its own, not pyplot's: no backend chosen for the process (a notebook keeps its own), and
    # nothing to close; savefig draws it with Agg
    fig = Figure(figsize=(facets + legend, rows * HEIGHT + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    fig.suptitle(title, fontsize=10, x=facets / 2 / (facets + legend))
    flat = list(axes.flat)
    for ax in flat[len(names):]:
        ax.remove()
    at = {}
    for i, (name, ax) in enumerate(zip(names, flat)):
        at[name] = ax
        ax.set_title(name, fontsize="medium", y=1.0)  # y given: no title placement work per draw
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        if i + cols >= len(names):  # nothing drawn below: the x axis is labelled here
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
        if i % cols == 0:
            ax.set_ylabel(ylabel)
    flat[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every facet (sharex)
    return fig, at, legend_cols


def _draw_points(frame: pd.DataFrame, path: Path, ylabel: str, title: str, zero_line=False,
                 over="seeds") -> Path:
    single = int(frame["n"].max()) <= 1
    facets = list(frame["facet"].unique())
    labels = list(frame["label"].unique())
    colours = dict(zip(labels, palette(len(labels))))
    note = "single seed: one run per point, no error bars" if single else f"error bars: 95 % t-CI over {over}"
    fig, axes, legend_cols = _facets(facets, labels, "alpha (coupled filter pairs)", ylabel, f"{title} ({note})")
    for (facet, label), data in frame.groupby(["facet", "label"], sort=False):
        data = data.sort_values("alpha")
        has_ci = not single and data["ci_low"].notna().any()
        yerr = ([(data["mean"] - data["ci_low"]).fillna(0).to_numpy(),
                 (data["ci_high"] - data["mean"]).fillna(0).to_numpy()] if has_ci else None)
        axes[facet].errorbar(data["alpha"].to_numpy(), data["mean"].to_numpy(), yerr=yerr, marker="o", capsize=3,
                             color=colours[label], label=label)
    for ax in axes.values():
        if zero_line:
            ax.axhline(0, color="grey", linewidth=1, linestyle=":")
        _min_span(ax)
    handles = [Line2D([], [], color=colours[x], marker="o") for x in labels]
    fig.legend(handles, labels, loc="outside right upper", frameon=False, ncols=legend_cols)
    return _save(fig, path)


def palette(n: int) -> list:
    """`n` colours every pair of which tells apart: tab10's up to 10 groups, tab20's (five hues more,
    and each hue light and dark) up to 20, then husl's evenly spaced hues. viridis's neighbours, the
    earlier palette, differed by a shade the eye loses on a line."""
    if n <= 20:
        return list(matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors[:n])
    import seaborn as sns

    return list(sns.color_palette("husl", n))


def curve_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """curve_frame's rows aggregated once: per facet, group, before/after KE and epoch the mean val top-1,
    its sample std, n and the 95 % t-CI (coupled_net.review.mean_ci's interval, NaN where n < 2)."""
    data = frame.dropna(subset=["epoch", "top1"])
    stats = (data.groupby(["facet", "group", "when", "epoch"], sort=True)["top1"].agg(["mean", "std", "count"])
             .rename(columns={"count": "n"}).reset_index())  # pandas' std: ddof=1
    t = np.array([review.t_quantile(n - 1) if n >= 2 else np.nan for n in stats["n"].tolist()])
    half = t * stats["std"].to_numpy() / np.sqrt(stats["n"].to_numpy(dtype=float))
    return stats.assign(ci_low=stats["mean"] - half, ci_high=stats["mean"] + half)


STYLES = {"before KE": "-", "after KE": "--"}


def curve_grid(frame: pd.DataFrame, single: bool):
    """The learning curves' figure, titled but not saved: a facet per model / dataset, a line colour per
    group (solid before KE, dashed after) with its 95 % t-CI band unless `single`, and past 10 groups
    (where colours alone get close) a marker per group too. Returns the matplotlib Figure, its legend
    (a group per entry, then the two line styles) placed outside on the right."""
    facets = list(frame["facet"].unique())
    groups = list(frame["group"].unique())
    colours = dict(zip(groups, palette(len(groups))))
    marked = len(groups) > 10
    marker = {g: (MARKERS[i % len(MARKERS)] if marked else "None") for i, g in enumerate(groups)}
    note = "single seed: one run per line" if single else "mean over seeds, band: 95 % t-CI"
    fig, axes, legend_cols = _facets(facets, [*groups, *STYLES], "epoch", "val top-1 (%)",
                                     f"Validation top-1 before (solid) and after KE (dashed); {note}")
    stats = curve_stats(frame)
    drawn = {key: sub for key, sub in stats.groupby(["facet", "group", "when"], sort=False)}
    for facet in facets:
        ax = axes[facet]
        for group in groups:
            for when, style in STYLES.items():
                sub = drawn.get((facet, group, when))
                if sub is None or sub.empty:
                    continue
                x = sub["epoch"].to_numpy()
                ax.plot(x, sub["mean"].to_numpy(), color=colours[group], linestyle=style, marker=marker[group],
                        markersize=4)
                if not single and sub["ci_low"].notna().any():
                    ax.fill_between(x, sub["ci_low"].to_numpy(), sub["ci_high"].to_numpy(), color=colours[group],
                                    alpha=0.2, linewidth=0)
        _min_span(ax)
    handles = [Line2D([], [], color=colours[g], marker=marker[g], markersize=4) for g in groups]
    handles += [Line2D([], [], color="grey", linestyle=style) for style in STYLES.values()]
    fig.legend(handles, [*groups, *STYLES], loc="outside right upper", frameon=False, ncols=legend_cols)
    return fig


def _draw_curves(frame: pd.DataFrame, path: Path, single: bool) -> Path:
    return _save(curve_grid(frame, single), path)


def _save(fig, path: Path) -> Path:
    """Write a titled figure atomically (its constrained layout makes the title's and the outside
    legend's room: no tight_layout)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def plots(s: Summary, out: Path) -> list[Path]:
    """The three plots, each grouped exactly like the tables; a plot with nothing to draw is removed
    rather than left from an earlier collection."""
    written = []
    if not s.groups.empty:
        written.append(_draw_points(alpha_plot_frame(s.groups, s.keys), out / PLOTS[0], "test top-1 (%)",
                                    "Test top-1 vs coupling"))
        delta = delta_plot_frame(s.deltas, s.keys, s.groups)
        if not delta.empty:
            versus = baseline_text(s.baseline)
            written.append(_draw_points(delta, out / PLOTS[1], f"Δ test top-1 vs {versus} (points)",
                                        f"Paired difference to {versus}", zero_line=True, over="seed pairs"))
        curves = curve_frame(review.epochs(review.counted(s.runs), s.epoch_rows), s.groups, s.keys)
        if not curves.empty:
            written.append(_draw_curves(curves, out / PLOTS[2], single=int(s.groups["n"].max()) <= 1))
    for name in PLOTS:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written
