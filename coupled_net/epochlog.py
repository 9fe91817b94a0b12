"""The epoch table (epochs.csv, SPEC §5) and the append-only CSV it is written with (system.csv
too): the one reader of its rows, what makes a row whole, and the per-run aggregates results.json
and the review both take from it.

A row is whole when its line ends with a newline, has one cell per header column, an integer
`epoch`, a number in every numeric cell (nan and inf are numbers: a diverged epoch's loss is nan)
and a number other than nan in each `required` column. Anything else (a line cut short by a kill
or a full disk, NUL bytes, a stray cell) is left out by every reader and named; a blank line is
no row at all."""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
from pathlib import Path

from .storage import read_bytes, write_text

log = logging.getLogger(__name__)

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss", "ke_val_acc",
                 "epoch_time_s", "ke_time_s", "ke_eval_time_s", "checkpoint_time_s"]
# columns a row may leave empty: added after runs were written (their rows gain an empty cell when such a
# run resumes), or unknown (checkpoint_time_s of a row restored from last.pt is nan); read as nan
OPTIONAL = ["checkpoint_time_s"]
# columns every written epochs.csv row has a number in (a loss may be nan: a diverged epoch)
REQUIRED = ["epoch", "val_acc", "ke_val_acc", "epoch_time_s"]


class CsvLog:
    """An append-only CSV with a fixed header; each row is on disk when append() returns. A row that
    is not whole (see the module's docstring) is left out by rows() and dropped, with one warning
    line, by keep_epochs_upto() (which a resumed run calls: the epoch replays)."""

    def __init__(self, path: Path, columns: list[str], numeric: list[str] | None = None,
                 required: list[str] = ()):
        self.path, self.columns = Path(path), list(columns)
        self.numeric = list(self.columns if numeric is None else numeric)
        self.required = list(required)

    def read(self) -> tuple[list[str] | None, list[dict], list[tuple[int, str, str]]]:
        """(the file's header, its whole rows as text, the other lines as (line number, text, why))."""
        if not self.path.exists():
            return None, [], []
        lines = read_bytes(self.path).decode("utf-8", errors="replace").splitlines(keepends=True)  # not a FIFO
        if not lines:
            return None, [], []
        header = next(csv.reader([lines[0]]), [])
        if not lines[0].endswith("\n") or "epoch" not in header:  # not even the header is whole
            return None, [], [(i, line, "no header") for i, line in enumerate(lines, start=1)]
        rows, bad = [], []
        for i, line in enumerate(lines[1:], start=2):
            if not line.strip():  # a blank line holds no row: nothing to drop or name
                continue
            row, why = self._whole(header, line)
            if row is None:
                bad.append((i, line, why))
            else:
                rows.append(row)
        return header, rows, bad

    def _whole(self, header: list[str], line: str) -> tuple[dict | None, str]:
        """The row of `line`, or None and why it is not whole: `not numbers` (a cell that is not a
        number, a required one that is nan, cells missing, a line cut short) or `more cells`."""
        if not line.endswith("\n"):  # cut short: the last write did not finish
            return None, "not numbers"
        try:
            cells = next(csv.reader([line]), [])
        except csv.Error:  # NUL bytes, stray quotes
            return None, "not numbers"
        if len(cells) != len(header):
            return None, "more cells" if len(cells) > len(header) else "not numbers"
        row = dict(zip(header, cells))
        try:
            int(row["epoch"])
            values = {name: float(row[name]) for name in self.numeric if name in row}
        except ValueError:
            return None, "not numbers"
        if any(math.isnan(values[name]) for name in self.required if name in values):
            return None, "not numbers"
        return row, ""

    def rows(self) -> list[dict]:
        return self.read()[1]

    def header(self) -> list[str] | None:
        """The file's header (None: no file, or not even a whole header line)."""
        try:
            return self._header_on_disk()
        except FileNotFoundError:
            return None

    def _header_on_disk(self) -> list[str] | None:
        with open(self.path, newline="") as f:
            first = f.readline()
        return next(csv.reader([first]), None) if first.endswith("\n") else None

    def append(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        fields = self.columns
        if not new:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"  # a kill cut the last line short: this row must not be glued to it
            header = self._header_on_disk()
            if cut or header is None or set(self.columns) - set(header):  # or other columns (another host's GPUs)
                if cut:
                    log.warning("%s: its last line was cut short: dropped", self.path)
                self._rewrite(self.rows(), header or [])
                header = self._header_on_disk()
            fields = header
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, rows: list[dict], header: list[str]) -> None:
        """The file with `rows` only, under `header` plus this log's columns it lacks (atomic)."""
        fields = list(header) + [c for c in self.columns if c not in header]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path, buf.getvalue())

    def keep_epochs_upto(self, epoch: int) -> None:
        """Drop rows past `epoch` (written after the checkpoint a resumed run starts from), and rows
        that are not whole (with one warning line)."""
        header, rows, bad = self.read()
        if bad:
            shown = [f"line {i}: {line.strip()[:60]!r}" for i, line, _ in bad]
            log.warning("%s: %d line(s) not a whole row, dropped (%s%s); their epoch replays", self.path, len(bad),
                        "; ".join(shown[:3]), "; ..." if len(shown) > 3 else "")
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(kept) == len(rows) and not bad:
            return
        if not kept:
            self.path.unlink()
            return
        self._rewrite(kept, header)


def epoch_log(run_dir: Path) -> CsvLog:
    """A run directory's epochs.csv."""
    return CsvLog(Path(run_dir) / "epochs.csv", EPOCH_COLUMNS, required=REQUIRED,
                  numeric=[c for c in EPOCH_COLUMNS if c not in OPTIONAL])


def read_epochs(run_dir: Path) -> tuple[list[dict], str | None]:
    """epochs.csv's whole rows as numbers (column -> float, `epoch` an int), and what is wrong with the
    file (None: nothing): a header without a required column, or the lines that are not whole rows."""
    try:
        header, rows, bad = epoch_log(run_dir).read()
    except OSError as e:
        return [], f"epochs.csv: {' '.join(str(e).split())[:200]}"
    if header is None and not bad:  # no file, or an empty one
        return [], None
    columns = header if header is not None else next(csv.reader([bad[0][1]]), [])  # a header cut short
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        return [], f"epochs.csv: no column {missing[0]!r} in its header"
    numbers = [{k: int(v) if k == "epoch" else _number(v) for k, v in row.items()} for row in rows]
    said = []
    for why, text in (("not numbers", "not numbers"), ("more cells", "more cells than its header")):
        lines = [str(i) for i, _, reason in bad if reason == why]
        if lines:
            said.append(f"line{'s' if len(lines) > 1 else ''} {', '.join(lines[:5])} {text}")
    return numbers, f"epochs.csv: {'; '.join(said)}" if said else None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # a column outside the numeric ones
        return math.nan


def _mean(rows: list[dict], column: str) -> float | None:
    values = [r[column] for r in rows if column in r and not math.isnan(r[column])]
    return sum(values) / len(values) if values else None


def _steady_mean(rows: list[dict], column: str) -> float | None:
    """The mean of a timing column over the epochs after the run's first, where there are more: the
    first epoch carries the process's warm-up (allocator, kernels, imports, file caches), and only the
    first run of a process pays it. README line 1's sweep (basic launcher, one process): epoch 1 of
    its first run took 14.3 s against 5.6-6.1 s for every other epoch of every run, which made that
    run's mean 7.9 s and coupling look faster. The first epoch is kept as `first_epoch_time_s`."""
    later = _mean(rows[1:], column)  # rows are in epoch order (read_epochs)
    return later if later is not None else _mean(rows, column)


TIMED = {"ke_time_s_mean": "ke_time_s", "epoch_time_s_mean": "epoch_time_s", "ke_eval_time_s_mean": "ke_eval_time_s",
         "checkpoint_time_s_mean": "checkpoint_time_s"}


def epoch_summary(rows: list[dict], best_epoch: int | None = None) -> dict:
    """A run's numbers from its epoch rows (read_epochs): mean timings over the epochs after the first
    where there are more (_steady_mean; the first epoch's time is `first_epoch_time_s`); best and last
    val top-1 and the best after KE; `ke_drop` = val_acc - ke_val_acc (top-1 points lost at an
    equalization) as the mean over epochs and at the best epoch; `ke_overhead` = mean ke_eval_time_s /
    mean epoch_time_s (what the second validation costs, as a share of an epoch); `checkpoint_time_s_mean`
    over the epochs that recorded it. None where there is nothing to say."""
    out = {name: _steady_mean(rows, column) for name, column in TIMED.items()}
    out.update(first_epoch_time_s=rows[0]["epoch_time_s"] if rows else None, ke_drop_mean=None, ke_drop_best=None,
               ke_overhead=None, best_val_acc=None, best_ke_val_acc=None, last_val_acc=None)
    if rows:
        drops = [r["val_acc"] - r["ke_val_acc"] for r in rows]
        out.update(ke_drop_mean=sum(drops) / len(drops), best_val_acc=max(r["val_acc"] for r in rows),
                   best_ke_val_acc=max(r["ke_val_acc"] for r in rows), last_val_acc=rows[-1]["val_acc"])
        at_best = [d for r, d in zip(rows, drops) if best_epoch and r["epoch"] == best_epoch]
        out["ke_drop_best"] = at_best[-1] if at_best else None
    if out["ke_eval_time_s_mean"] is not None and out["epoch_time_s_mean"]:
        out["ke_overhead"] = out["ke_eval_time_s_mean"] / out["epoch_time_s_mean"]
    return out


def _epoch(cell: str) -> int:
    float(cell)  # read_epochs: a number, and an integer
    return int(cell)


@functools.lru_cache(maxsize=64)
def _converters(header: tuple[str, ...]) -> tuple[list, list[int]]:
    """read_epochs_fast's per-column converters for a header (read_epochs's: `epoch` an int, the numeric
    columns floats, any other column a number or NaN), and the positions of the required columns, where
    a NaN sends the file to read_epochs. Once per header: every run of a sweep has the same."""
    log = epoch_log(Path("."))
    numeric = set(log.numeric)
    convert = [_epoch if name == "epoch" else float if name in numeric else _number for name in header]
    return convert, [i for i, name in enumerate(header) if name in log.required and name in numeric and name != "epoch"]


def read_epochs_fast(run_dir: Path) -> tuple[list[dict], str | None]:
    """read_epochs(run_dir), the same rows and verdict, faster on the file every run writes: a whole
    file, no quotes, NUL or carriage return, every line a whole row, is split by hand (csv.reader per
    line costs most of a 10,000-run review); anything else is read by read_epochs itself."""
    log = epoch_log(run_dir)
    try:
        text = read_bytes(log.path).decode("utf-8")
    except FileNotFoundError:
        return [], None
    except (OSError, UnicodeDecodeError):
        return read_epochs(run_dir)
    # a quote, a NUL, or a character str.splitlines (read_epochs) also ends a line at
    if not text.endswith("\n") or any(c in text for c in '"\0\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029'):
        return read_epochs(run_dir)
    lines = text.split("\n")[:-1]
    header = lines[0].split(",")
    if "epoch" not in header or any(c not in header for c in REQUIRED):
        return read_epochs(run_dir)
    convert, checked = _converters(tuple(header))
    rows = []
    try:
        for line in lines[1:]:
            if not line.strip():
                continue
            cells = line.split(",")
            if len(cells) != len(header):
                return read_epochs(run_dir)
            values = [f(cell) for f, cell in zip(convert, cells)]
            if any(math.isnan(values[i]) for i in checked):
                return read_epochs(run_dir)
            rows.append(dict(zip(header, values)))
    except ValueError:  # a cell that is not a number: read_epochs names the line
        return read_epochs(run_dir)
    return rows, None
