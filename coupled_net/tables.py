"""The review's tables as text (SPEC §11): which keys a table shows and under what names, the
headline table, summary.md, summary.tex and the terminal's summary, from coupled_net.review's
numeric frames. Numbers are formatted only here and in coupled_net.plots, when written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import review
from .collect import DERIVED, IDENTITY, LEADING, SHOWN, TRAILING, comparable, probed_columns, varying

DELTA_METRICS = ("test_top1", "val_top1")
NAMES = {"model.name": "model", "dataset.name": "dataset", "coupling.alpha": "alpha"}


@dataclass
class Summary:
    runs: pd.DataFrame       # review.runs()
    groups: pd.DataFrame     # review.summarize()
    deltas: pd.DataFrame     # review.compare() for DELTA_METRICS
    keys: list[str]          # review.group_keys()
    baseline: dict           # what compare() compared with ({"coupling.alpha": 0})
    headline: str            # what the terminal shows: the headline table and the runs not in it
    markdown: str            # summary.md
    epoch_rows: dict = field(default_factory=dict)  # review.runs_with_epochs()'s rows, by run dir (the curves')


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
            per_name = groups.groupby(groups[name].map(repr))[k].agg(lambda s: len({repr(comparable(v)) for v in s}))
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


def cell(v) -> str:
    """A config value as a table cell: 2.0 as 2, None and NaN as an empty cell."""
    v = comparable(v)
    return "" if v is None else str(v)


# ---- numbers as text ----------------------------------------------------------------------------

def number_text(v, fmt=".2f") -> str:
    """A number as a table shows it (`fmt`), empty for None or NaN."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _pm(row, metric: str, fmt=".2f", pm=" ± ") -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if isinstance(mean, float) and math.isnan(mean):
        return ""
    return number_text(mean, fmt) if math.isnan(std) else f"{number_text(mean, fmt)}{pm}{number_text(std, fmt)}"


def seconds_text(v) -> str:
    """Seconds: no decimal from 100, one from 10, two from 0.01, two significant digits below."""
    if v is None or math.isnan(v):
        return ""
    return format(v, ".0f" if v >= 100 else ".1f" if v >= 10 else ".2f" if v >= 0.01 else ".2g")


def share_text(v) -> str:
    """A fraction as a percentage with one decimal."""
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


def baseline_text(baseline: dict) -> str:
    return ", ".join(f"{NAMES.get(k, k)}={v}" for k, v in baseline.items())


# ---- tables -------------------------------------------------------------------------------------

def headline_frame(groups, deltas, keys, baseline, minus="-", pm=" ± ") -> pd.DataFrame:
    """One row per group, as text: its varying keys, n, test top-1, the paired delta to the baseline
    with its CI and p-value, KE drop, epoch time and KE overhead."""
    shown = table_keys(groups, keys)
    names = display_names(shown)
    by_group = {tuple(comparable(r[k]) for k in keys): r for _, r in deltas[deltas["metric"] == "test_top1"].iterrows()}
    rows = []
    for _, g in groups.iterrows():
        key = tuple(comparable(g[k]) for k in keys)
        d = by_group.get(key)
        is_base = d is None  # compare() has a row for every group but the baseline's
        rows.append({**{names[k]: cell(g[k]) for k in shown}, "n": int(g["n"]),
                     "test top-1": _pm(g, "test_top1", pm=pm),
                     f"Δ vs {baseline_text(baseline)} [95 % CI]": "baseline" if is_base else _delta(d, minus),
                     "p": "" if d is None else _p(d["p_value"]),
                     "KE drop": _pm(g, "ke_drop_mean", pm=pm),
                     "epoch s": "mixed" if pd.isna(g["device"]) else seconds_text(g["epoch_time_s_mean_mean"]),
                     "KE cost": share_text(g["ke_overhead_mean"])})
    return pd.DataFrame(rows)


def constants_text(groups: pd.DataFrame) -> str:
    """What every group shares (the model and dataset where only one), how many finished runs in how
    many groups, and the seeds per group: the headline's title."""
    what = []
    for k in ("model.name", "dataset.name"):
        if k in groups and len(groups) and not varying(groups, [k]):
            what.append(cell(groups[k].iloc[0]))
    seeds = groups["n"]  # a group's n is its counted runs: their sum is every counted run
    per_group = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}–{seeds.max()}"
    where = " on ".join(what)
    return (f"{where + ': ' if where else ''}{_plural(int(seeds.sum()), 'finished run')} in "
            f"{_plural(len(groups), 'group')}, {per_group} seed{'s' if seeds.max() > 1 else ''} per group")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


LEGEND = [
    "test top-1: %, mean ± std over seeds. Δ: test top-1 paired by seed against the baseline, mean and",
    "t-based 95 % CI; p: paired t-test. KE drop: val top-1 points lost at an equalization (mean over epochs).",
    "epoch s: train + validation, mean over the epochs after the first (the first carries the process's",
    "warm-up: its time is first_epoch_time_s in summary.csv); KE cost: equalization + second validation, as",
    "a share of an epoch.",
]


def headline(s: Summary, baseline: dict) -> str:
    if s.groups.empty:
        return "## What coupling costs\n\n_no finished runs_\n"
    table = _md(headline_frame(s.groups, s.deltas, s.keys, baseline), len(table_keys(s.groups, s.keys)))
    devices = sorted({d for d in s.groups["device"].dropna()})
    timing = f"Timings on {devices[0]}." if len(devices) == 1 else "Timings per device: see below."
    return "\n".join([f"## What coupling costs ({constants_text(s.groups)})", "", table, "",
                      *LEGEND, timing, ""])


def _full_groups(groups, keys) -> pd.DataFrame:
    names = display_names(keys)
    return pd.DataFrame([{
        **{names[k]: cell(g[k]) for k in keys}, "n": int(g["n"]), "seeds": ",".join(map(str, g["seeds"])),
        "val top-1": _pm(g, "val_top1"), "test top-1": _pm(g, "test_top1"), "test top-5": _pm(g, "test_top5"),
        "KE drop": _pm(g, "ke_drop_mean"), "KE drop (best)": _pm(g, "ke_drop_best"),
        "epochs": _pm(g, "epochs_run", ".1f"), "epoch s": seconds_text(g["epoch_time_s_mean_mean"]),
        "1st epoch s": seconds_text(g["first_epoch_time_s_mean"]), "KE s": number_text(g["ke_time_s_mean_mean"], ".2g"),
        "KE+val s": seconds_text(g["ke_eval_time_s_mean_mean"]),
        "KE cost": share_text(g["ke_overhead_mean"]), "ckpt s": seconds_text(g["checkpoint_time_s_mean_mean"]),
        "device": "mixed" if pd.isna(g["device"]) else g["device"],
    } for _, g in groups.iterrows()])


def full_deltas(deltas, keys) -> pd.DataFrame:
    """review.compare()'s rows as the full paired-differences table shows them (text cells)."""
    names = display_names(keys)
    return pd.DataFrame([{
        **{names[k]: cell(d[k]) for k in keys}, "metric": d["metric"], "pairs": int(d["n_pairs"]),
        "baseline": number_text(d["baseline_mean"]), "this": number_text(d["mean"]), "Δ [95 % CI]": _delta(d),
        "p (t)": _p(d["p_value"]), "p (Wilcoxon)": _p(d["wilcoxon_p"]), "unpaired": int(d["n_unpaired"]),
    } for _, d in deltas.iterrows()])


def _mixed_timings(runs, keys) -> pd.DataFrame:
    t = review.timings(runs)
    mixed = t.groupby([t[k].map(repr) for k in keys])["device"].transform("count") > 1
    names = display_names(keys)
    return pd.DataFrame([{
        **{names[k]: cell(r[k]) for k in keys}, "device": r["device"], "n": int(r["n"]),
        "epoch s": seconds_text(r["epoch_time_s_mean_mean"]), "KE+val s": seconds_text(r["ke_eval_time_s_mean_mean"]),
        "KE cost": share_text(r["ke_overhead_mean"]), "ckpt s": seconds_text(r["checkpoint_time_s_mean_mean"]),
    } for _, r in t[mixed].iterrows()])


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
        parts += [f"## Paired differences vs {baseline_text(baseline)} (by seed)", "",
                  _md(full_deltas(s.deltas, s.keys), len(s.keys) + 1), ""]
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
    caption = (f"What coupling costs ({_tex(constants_text(s.groups))}). Test top-1 in \\%, mean $\\pm$ std "
               f"over seeds; $\\Delta$: paired by seed against {_tex(baseline_text(baseline))}, mean and t-based "
               "95\\,\\% CI; p: paired t-test; KE drop: validation top-1 points lost at an equalization; "
               "epoch s: mean over the epochs after the first (its warm-up); "
               "KE cost: equalization and second validation as a share of an epoch.")
    styler = frame.style.hide(axis="index")
    return styler.to_latex(hrules=True, caption=caption, label="tab:coupled-net-summary",
                           position_float="centering", position="t",
                           column_format="l" * (len(frame.columns) - numeric) + "r" * numeric)


def summary_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: SPEC §6's columns first, coupling mode/schedule, the SLURM state of detached
    sweeps, every config key that varies (dotted), the derived metrics, the training-loop callbacks'
    numbers (`callbacks.<name>.<key>`), then bookkeeping."""
    slurm = [c for c in ("slurm_job_id", "slurm_state") if runs[c].notna().any()]
    keys = [k for k in varying(runs, review.config_columns(runs)) if k not in SHOWN]
    return runs[LEADING + IDENTITY + slurm + keys + DERIVED + probed_columns(runs) + TRAILING + ["duplicate_of"]]
