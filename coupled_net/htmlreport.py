"""summary.html: the review in one file a co-author opens anywhere, offline — the tables as HTML
(pandas Styler), the plots inline as base64 PNGs, a small inline style, and no script, stylesheet,
font or image fetched from anywhere. Its tables are summary.md's (coupled_net.tables builds them),
numbers formatted only here, as summary.md formats them; the sweep's provenance (commit, versions,
devices, hosts, dates) is what the runs' results.json recorded (collect's PROVENANCE columns)."""

from __future__ import annotations

import base64
from collections import Counter
from datetime import datetime
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from . import review
from .collect import PROVENANCE as RECORDED
from .storage import atomic_write
from .tables import (
    LEGEND,
    Summary,
    baseline_text,
    cell,
    constants_text,
    display_names,
    full_deltas,
    headline_frame,
    not_aggregated,
    number_text,
    seconds_text,
    share_text,
    table_keys,
)

NAME = "summary.html"
# the groups table: per metric its mean and t-based 95 % CI, as summary_groups.csv holds them
GROUP_METRICS = {"test_top1": "test top-1", "test_top5": "test top-5", "val_top1": "val top-1",
                 "ke_drop_mean": "KE drop", "ke_drop_best": "KE drop (best)", "epochs_run": "epochs"}
GROUP_STATS = {"mean": "mean", "ci_low": "95 % CI low", "ci_high": "95 % CI high"}
TIMING_NAMES = {"epoch_time_s_mean": "epoch s", "ke_time_s_mean": "KE s", "ke_eval_time_s_mean": "KE+val s",
                "ke_overhead": "KE cost", "checkpoint_time_s_mean": "ckpt s", "first_epoch_time_s": "1st epoch s",
                "total_time_s": "run s"}
# collect()'s provenance columns shown, and under what name
PROVENANCE_SHOWN = {"python_version": "python", "torch_version": "torch", "torchvision_version": "torchvision",
                    "device": "devices", "host": "hosts"}
DIRTY = {True: " (dirty tree)", False: " (clean)", None: " (dirty: unknown)"}  # provenance.git_dirty
MAX_LISTED = 12  # distinct values listed per provenance field; the rest counted

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; text-align: right; white-space: nowrap; }
th { background: #f2f4f7; } tbody tr:nth-child(even) { background: #fafbfc; }
.wide { overflow-x: auto; } .note { color: #555; font-size: 0.85em; }
.counts span { display: inline-block; margin-right: 1.2em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="counts">{% for status, n in counts %}<span><b>{{ n }}</b> {{ status }}</span>{% endfor %}</p>
<p class="note">{{ where }} · written {{ written }}</p>
{% for section in sections %}
<section id="{{ section.id }}">
<h2>{{ section.title }}</h2>
{% if section.table %}<div class="wide">{{ section.table }}</div>{% endif %}
{% for line in section.notes %}<p class="note">{{ line }}</p>{% endfor %}
{% for image in section.images %}<figure><img alt="{{ image.name }}" src="{{ image.src }}">
<figcaption class="note">{{ image.name }}</figcaption></figure>{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


def _html(styler, table_id: str, text_columns: int = 0) -> Markup:
    """A Styler as an HTML table: every cell escaped, no index, the first `text_columns` left-aligned."""
    styler = (styler.hide(axis="index").format_index(escape="html", axis=1).set_uuid(table_id)
              .set_table_attributes(f'class="{table_id}"'))
    if text_columns:  # one rule per column (`.colN`), not one per cell: a long table stays small
        styler = styler.set_table_styles({c: [{"selector": "", "props": "text-align: left"}]
                                          for c in styler.data.columns[:text_columns]}, overwrite=False)
    return Markup(styler.to_html())


def _text_table(frame: pd.DataFrame, table_id: str, text_columns: int) -> Markup:
    """A table already written as text (coupled_net.tables' frames)."""
    return _html(frame.style.format(escape="html", na_rep=""), table_id, text_columns)


def groups_table(s: Summary) -> Markup:
    """summary_groups.csv's numbers: per group its keys, n, seeds and device, then each metric's mean
    and 95 % CI (two decimals, epochs one), formatted only here."""
    names = display_names(s.keys)
    columns = {(names[k], ""): [cell(v) for v in s.groups[k]] for k in s.keys}
    columns[("n", "")] = s.groups["n"].astype(int).tolist()
    columns[("seeds", "")] = [",".join(map(str, v)) for v in s.groups["seeds"]]
    columns[("device", "")] = ["mixed" if pd.isna(v) else v for v in s.groups["device"]]
    formats = {}
    for metric, label in GROUP_METRICS.items():
        for stat, stat_label in GROUP_STATS.items():
            columns[(label, stat_label)] = s.groups[f"{metric}_{stat}"].to_numpy()
            formats[(label, stat_label)] = lambda v, fmt=".1f" if metric == "epochs_run" else ".2f": number_text(v, fmt)
    frame = pd.DataFrame(columns)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return _html(frame.style.format(formats, escape="html", na_rep=""), "groups", len(s.keys) + 3)


def timings_table(s: Summary) -> Markup:
    """Per group and device (review.timings: never pooled across devices, nor packed runs with runs
    alone): the mean of each timing, formatted like summary.md's."""
    t = review.timings(s.runs)
    names = display_names(s.keys)
    frame = pd.DataFrame({**{names[k]: [cell(v) for v in t[k]] for k in s.keys}, "device": t["device"],
                          "n": t["n"].astype(int)})
    formats = {}
    for metric in review.TIMINGS:
        label = TIMING_NAMES.get(metric, metric)
        frame[label] = t[f"{metric}_mean"].to_numpy()
        formats[label] = share_text if metric == "ke_overhead" else seconds_text
    return _html(frame.style.format(formats, escape="html", na_rep=""), "timings", len(s.keys) + 1)


def left_out_table(runs: pd.DataFrame) -> Markup:
    """The runs not in the aggregate (summary.md's last table): status, last epoch, error, repeat."""
    others = not_aggregated(runs)
    formats = {"epochs_run": lambda v: number_text(v, ".0f"), "last_val_acc": number_text}
    return _html(others.style.format(formats, escape="html", na_rep=""), "left-out", len(others.columns))


def _when(text) -> datetime | None:
    """results.now_iso()'s stamp; fromisoformat first: 20 times faster than strptime, where Python
    (3.11+) reads the `+0000` offset."""
    for parse in (datetime.fromisoformat, lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%S%z")):
        try:
            return parse(text)
        except (TypeError, ValueError):
            continue
    return None


def _listed(values: list) -> str:
    """Distinct values, the most common first, each with its run count where they differ."""
    counts = Counter(str(v) for v in values if v not in (None, ""))
    if len(counts) <= 1:
        return next(iter(counts), "not recorded")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{v} ({n} run{'' if n == 1 else 's'})" for v, n in ranked[:MAX_LISTED]]
    more = len(counts) - MAX_LISTED
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def provenance(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(field, what the runs recorded) for the sweep's provenance: git commit and whether the tree was
    dirty, library versions, devices and GPUs, hosts, the first and last start and end: collect()'s
    PROVENANCE columns, as each run's results.json recorded them."""
    recorded = runs[[*RECORDED, "device"]].notna().any(axis=1)
    prov = runs[recorded]
    commits = [None if commit is None or commit != commit else commit + DIRTY.get(dirty, DIRTY[None])
               for commit, dirty in zip(prov["git_commit"], prov["git_dirty"])]
    gpus = [f"{g.get('name')} (driver {g.get('driver')}, CUDA {g.get('cuda')})" if isinstance(g, dict) else None
            for g in prov["gpu"]]
    rows = [("commit", _listed(commits))]
    rows += [(label, _listed(prov[column].tolist())) for column, label in PROVENANCE_SHOWN.items()]
    if any(gpus):
        rows.append(("GPUs", _listed(gpus)))
    for column, label in (("started_at", "started"), ("finished_at", "finished")):
        times = [t for t in map(_when, prov[column]) if t is not None]
        if times:  # by timestamp: a stamp without an offset (naive) is taken as local time, not refused
            first, last = (f(times, key=datetime.timestamp).isoformat() for f in (min, max))
            rows.append((f"{label} (first … last)", first if first == last else f"{first} … {last}"))
    rows.append(("runs read", f"{int(recorded.sum())} of {len(runs)} results.json"))
    return rows


def _image(path: Path) -> dict:
    return {"name": path.name, "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}


def summary_html(s: Summary, baseline: dict, paths, images: list[Path], written: datetime | None = None) -> str:
    """The page: headline, groups, paired differences, timings, plots, runs left out, provenance."""
    written = written or datetime.now().astimezone()
    where = ", ".join(str(Path(p)) for p in paths)
    counts = s.runs["status"].value_counts()
    repeats = int(s.runs["duplicate_of"].notna().sum())
    sections = []
    if s.groups.empty:
        sections.append({"id": "headline", "title": "What coupling costs", "notes": ["no finished runs"]})
    else:
        devices = sorted({d for d in s.groups["device"].dropna()})
        timing = f"Timings on {devices[0]}." if len(devices) == 1 else "Timings per device: see below."
        sections += [
            {"id": "headline", "title": f"What coupling costs ({constants_text(s.groups)})",
             "table": _text_table(headline_frame(s.groups, s.deltas, s.keys, baseline), "headline",
                                  len(table_keys(s.groups, s.keys))),
             "notes": [" ".join(LEGEND), timing]},
            {"id": "groups", "title": "Groups (mean and t-based 95 % CI over seeds)", "table": groups_table(s)}]
    if not s.deltas.empty:
        sections.append({"id": "deltas", "title": f"Paired differences vs {baseline_text(baseline)} (by seed)",
                         "table": _text_table(full_deltas(s.deltas, s.keys), "deltas", len(s.keys) + 1)})
    if not s.groups.empty:
        sections.append({"id": "timings", "title": "Timings (mean per group and device)", "table": timings_table(s)})
    if images:
        sections.append({"id": "plots", "title": "Plots", "images": [_image(Path(p)) for p in images]})
    if not not_aggregated(s.runs).empty:
        sections.append({"id": "left-out", "title": "Runs not in the aggregate", "table": left_out_table(s.runs)})
    prov = pd.DataFrame(provenance(s.runs), columns=["", "recorded by the runs"])
    sections.append({"id": "provenance", "title": "Provenance", "table": _text_table(prov, "provenance", 2)})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        title=f"coupled_net summary: {where}", where=f"{len(s.runs)} runs below {where}"
        + (f", {repeats} repeating another" if repeats else ""),
        counts=list(counts.items()), written=written.strftime("%Y-%m-%d %H:%M %Z"),
        sections=[{"table": None, "notes": [], "images": [], **section} for section in sections])


def write_html(s: Summary, baseline: dict, paths, out: Path, images: list[Path]) -> Path:
    """summary.html into `out`, atomically."""
    text = summary_html(s, baseline, paths, images)
    atomic_write(Path(out) / NAME, lambda f: f.write(text.encode()))
    return Path(out) / NAME
