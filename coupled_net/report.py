"""The summary files of a set of runs (SPEC §6, §11), written by launch/collect.py and at the end of a
local sweep, from coupled_net.review's frames — numbers are formatted only here, when written:

    summary.csv          one row per run (collect's columns; config keys that vary)
    summary_groups.csv   review.summarize(): one row per group, mean/std/n/CI per metric
    summary_delta.csv    review.compare(): paired difference to alpha=0 per group
    summary.md           the headline table, then the full tables and the runs not in them
    summary.tex          the headline table for a paper (booktabs, caption, label)
    summary_*.png        test top-1 vs alpha, delta vs alpha, learning curves (matplotlib)
    summary.html         all of it in one self-contained page: the tables, the plots inline, the
                         runs left out and the sweep's provenance (coupled_net.htmlreport)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import review
from .htmlreport import write_html
from .plots import plots
from .storage import atomic_write
from .tables import DELTA_METRICS, Summary, latex, markdown, summary_frame, terminal


def summarize_runs(runs: pd.DataFrame, baseline: dict | None = None, out: Path | None = None,
                   epoch_rows: dict | None = None) -> Summary:
    baseline = baseline or {"coupling.alpha": 0}
    s = Summary(runs=runs, groups=review.summarize(runs), deltas=review.compare(runs, baseline, DELTA_METRICS),
                keys=review.group_keys(runs), baseline=baseline, headline="", markdown="",
                epoch_rows=epoch_rows or {})
    s.markdown = markdown(s, baseline)
    s.headline = terminal(s, baseline, Path(out or "."))
    return s


def _csv(frame: pd.DataFrame) -> bytes:
    lists = {c: frame[c].map(lambda v: ";".join(map(str, v)) if isinstance(v, list) else v)
             for c in frame.columns if frame[c].map(lambda v: isinstance(v, list)).any()}
    return frame.assign(**lists).to_csv(index=False).encode()


def write_summary(paths, out: Path | None = None, baseline: dict | None = None) -> Summary:
    """Collect the runs below `paths` and write every summary file into `out` (default: the first path)."""
    runs, epoch_rows = review.runs_with_epochs(paths)
    if runs.empty:
        raise FileNotFoundError(f"no run directories below {', '.join(map(str, paths))}")
    out = Path(out or paths[0])
    baseline = baseline or {"coupling.alpha": 0}
    s = summarize_runs(runs, baseline, out, epoch_rows)  # a bad baseline is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary.csv": _csv(summary_frame(runs)), "summary_groups.csv": _csv(s.groups),
             "summary_delta.csv": _csv(s.deltas), "summary.md": s.markdown.encode(),
             "summary.tex": latex(s, baseline).encode()}
    for name, blob in files.items():
        atomic_write(out / name, lambda f, blob=blob: f.write(blob))
    write_html(s, baseline, paths, out, plots(s, out))
    return s


