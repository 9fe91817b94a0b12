"""The review's plots (summary_*.png, seaborn), each grouped exactly like the tables (coupled_net.tables):
test top-1 vs alpha, the paired difference vs alpha, and the learning curves before and after KE."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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
    e = review.counted(epochs)
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
    labels = list(dict.fromkeys(frame["label"]))
    grid = sns.FacetGrid(frame, col="facet", hue="label", hue_order=labels, palette=palette(len(labels)),
                         col_wrap=min(3, len(facets)), sharey=False, height=3.6, aspect=1.35, col_order=facets)
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


def palette(n: int) -> list:
    """`n` colours every pair of which tells apart: tab10's up to 10 groups, tab20's (five hues more,
    and each hue light and dark) up to 20, then husl's evenly spaced hues. viridis's neighbours, the
    earlier palette, differed by a shade the eye loses on a line."""
    import seaborn as sns

    return sns.color_palette("tab10" if n <= 10 else "tab20" if n <= 20 else "husl", n)


def curve_grid(frame: pd.DataFrame, single: bool):
    """The learning curves' seaborn grid, drawn but not saved: a line colour per group and, past 10
    groups (where colours alone get close), a marker per group too."""
    import seaborn as sns

    facets = list(dict.fromkeys(frame["facet"]))
    groups = list(dict.fromkeys(frame["group"]))
    colours = dict(zip(groups, palette(len(groups))))
    grid = sns.relplot(data=frame, kind="line", x="epoch", y="top1", hue="group", hue_order=groups, style="when",
                       style_order=["before KE", "after KE"], col="facet", col_order=facets,
                       col_wrap=min(3, len(facets)), errorbar=None if single else review.ci_interval,
                       height=3.6, aspect=1.35, facet_kws={"sharey": False}, palette=colours)
    if len(groups) > 10:
        _mark_groups(grid, list(colours.values()))
    for ax in grid.axes.flat:
        _min_span(ax)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    grid.set_axis_labels("epoch", "val top-1 (%)")
    grid.set_titles("{col_name}")
    return grid


def _mark_groups(grid, colours: list) -> None:
    """Give each group's lines, and its legend entry, the marker of its colour's position: seaborn's
    `style` already says before/after KE, so the group's marker is set on the drawn lines."""
    from matplotlib.colors import to_hex

    marker = {to_hex(c): MARKERS[i % len(MARKERS)] for i, c in enumerate(colours)}
    legend = grid.legend
    handles = list(getattr(legend, "legend_handles", None) or getattr(legend, "legendHandles", [])) if legend else []
    for line in [*(line for ax in grid.axes.flat for line in ax.lines), *handles]:
        m = marker.get(to_hex(line.get_color())) if hasattr(line, "get_color") else None
        if m:
            line.set_marker(m)
            line.set_markersize(4)


def _draw_curves(frame: pd.DataFrame, path: Path, single: bool) -> Path:
    note = "single seed: one run per line" if single else "mean over seeds, band: 95 % t-CI"
    return _save(curve_grid(frame, single), path, f"Validation top-1 before (solid) and after KE (dashed); {note}")


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
            versus = baseline_text(s.baseline)
            written.append(_draw_points(delta, out / PLOTS[1], f"Δ test top-1 vs {versus} (points)",
                                        f"Paired difference to {versus}", zero_line=True, over="seed pairs"))
        curves = curve_frame(review.epochs(review.counted(s.runs)), s.groups, s.keys)
        if not curves.empty:
            written.append(_draw_curves(curves, out / PLOTS[2], single=int(s.groups["n"].max()) <= 1))
    for name in PLOTS:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written
