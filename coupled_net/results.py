"""A run directory's files (SPEC §5): epochs.csv, system.csv, results.json, checkpoints.
Whole-file writes are atomic (temp file + fsync + rename); CSV rows are appended and fsynced."""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .identity import model_name

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss", "ke_val_acc",
                 "epoch_time_s", "ke_time_s", "ke_eval_time_s"]
STATUSES = ("running", "done", "diverged", "failed", "interrupted")
FINISHED = ("done", "diverged")  # a run in one of these is never trained again: starting it does nothing
_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFull(OSError):
    """No space left where a run writes: names the file and the space left there."""

    def __str__(self) -> str:
        return self.strerror


def _free(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return ""


def _no_space(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, or what torch.save's C++ writer says when the disk fills
    ("[enforce fail at inline_container.cc:672] ... file write failed")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("file write failed" in str(e) or "No space left" in str(e))


def disk_full(e: BaseException, path: Path | None = None) -> str | None:
    """The one line for a full disk (None when `e` is something else)."""
    if isinstance(e, DiskFull):
        return str(e)
    if not _no_space(e):
        return None
    where = Path(path or getattr(e, "filename", None) or ".")
    return f"No space left on device writing {where} ({_free(where.parent)} free there)"


def atomic_write(path: Path, write) -> None:
    """Call write(binary_file) on a temp file beside `path`, fsync it, then rename it over `path`.
    A full disk raises DiskFull naming `path` and the space left (not torch's C++ assertion)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        full = disk_full(e, path)
        raise (DiskFull(errno.ENOSPC, full) if full else e) from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(e, path)
        if full:
            raise DiskFull(errno.ENOSPC, full) from e
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class CsvLog:
    """An append-only CSV with a fixed header; each row is on disk when append() returns. A row that
    is not whole — a line cut by a kill or a full disk, a cell of a `numeric` column (all, unless
    given) that is not a number, a missing or extra cell — is left out by rows() and dropped, with
    one warning line, by keep_epochs_upto() (which a resumed run calls: the epoch replays)."""

    def __init__(self, path: Path, columns: list[str], numeric: list[str] | None = None):
        self.path, self.columns = Path(path), list(columns)
        self.numeric = list(self.columns if numeric is None else numeric)

    def _read(self) -> tuple[list[str] | None, list[dict], list[str]]:
        """(the file's header, its whole rows, the other lines as `line N: text`)."""
        if not self.path.exists():
            return None, [], []
        lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
        if not lines:
            return None, [], []
        header = next(csv.reader([lines[0]]), [])
        if not lines[0].endswith("\n") or "epoch" not in header:  # not even the header is whole
            return None, [], [f"line {i}: {line.strip()[:60]!r}" for i, line in enumerate(lines, start=1)]
        rows, bad = [], []
        for i, line in enumerate(lines[1:], start=2):
            row = self._whole(header, line)
            if row is None:
                bad.append(f"line {i}: {line.strip()[:60]!r}")
            else:
                rows.append(row)
        return header, rows, bad

    def _whole(self, header: list[str], line: str) -> dict | None:
        if not line.endswith("\n"):  # cut short: the last write did not finish
            return None
        try:
            cells = next(csv.reader([line]), [])
        except csv.Error:  # NUL bytes, stray quotes
            return None
        if len(cells) != len(header):
            return None
        row = dict(zip(header, cells))
        try:
            int(row["epoch"])
            for name in self.numeric:
                if name in row:
                    float(row[name])
        except ValueError:
            return None
        return row

    def rows(self) -> list[dict]:
        return self._read()[1]

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
                    import logging

                    logging.getLogger(__name__).warning("%s: its last line was cut short: dropped", self.path)
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
        atomic_write(self.path, lambda f: f.write(buf.getvalue().encode()))

    def keep_epochs_upto(self, epoch: int) -> None:
        """Drop rows past `epoch` (written after the checkpoint a resumed run starts from), and rows
        that are not whole (with one warning line)."""
        import logging

        header, rows, bad = self._read()
        if bad:
            logging.getLogger(__name__).warning(
                "%s: %d line(s) not a whole row, dropped (%s%s); their epoch replays", self.path, len(bad),
                "; ".join(bad[:3]), "; ..." if len(bad) > 3 else "")
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(kept) == len(rows) and not bad:
            return
        if not kept:
            self.path.unlink()
            return
        self._rewrite(kept, header)


# ---- results.json (SPEC §5): the one place its keys are made ------------------------------------

def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_results(cfg, identity, *, owner: dict, resumes: int, world_size: int, provenance: dict) -> dict:
    """The record a run starts with (`status: running`); run.py fills in the rest as it goes."""
    return {
        "status": "running", "stopped_early": False, "epochs_run": 0, "best_epoch": None, "resumes": resumes,
        "model": model_name(cfg.model), "dataset": cfg.dataset.get("name"), "alpha": cfg.coupling.get("alpha"),
        "coupling_mode": cfg.coupling.get("mode"), "coupling_schedule": cfg.coupling.get("schedule"),
        "seed": cfg.get("seed"), "coupled_layers": None, "metrics": None,
        "ke_time_s_mean": None, "epoch_time_s_mean": None, "total_time_s": None,
        "best_val_acc": None, "best_ke_val_acc": None, "error": None,
        **identity.record(),  # fingerprint, identity (the keys it digests), labels
        "owner": owner, "heartbeat_at": now_iso(), "started_at": now_iso(), "finished_at": None,
        "world_size": world_size, "provenance": provenance,
    }


def epoch_aggregates(rows: list[dict]) -> dict:
    """What results.json reports from epochs.csv once a run ends."""
    if not rows:
        return {"ke_time_s_mean": None, "epoch_time_s_mean": None, "best_val_acc": None, "best_ke_val_acc": None}
    col = lambda name: [float(r[name]) for r in rows]  # noqa: E731
    mean = lambda name: sum(col(name)) / len(rows)  # noqa: E731
    return {"ke_time_s_mean": mean("ke_time_s"), "epoch_time_s_mean": mean("epoch_time_s"),
            "best_val_acc": max(col("val_acc")), "best_ke_val_acc": max(col("ke_val_acc"))}


class RunFiles:
    """Paths of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.results = self.dir / "results.json"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.summary = self.dir / "model_summary.txt"
        self.epochs = CsvLog(self.dir / "epochs.csv", EPOCH_COLUMNS)

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def hydra(self) -> Path:
        return self.dir / ".hydra"

    def periodic(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    def read_results(self) -> dict | None:
        return read_json(self.results)

    def write_results(self, results: dict) -> None:
        write_json(self.results, results)


@functools.lru_cache(maxsize=None)  # the code this process runs was loaded when it started
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def slurm_job_id() -> str | None:
    """This process's SLURM job (`13_0` for an array task), or None: also inside submitit's local
    executor (hydra/launcher=local), whose job ids are process ids, not SLURM's."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        if env.cluster == "slurm":
            return str(env.job_id)
    except Exception:  # noqa: BLE001 - not inside a submitit job
        pass
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device | None) -> dict:
    """Where and with what a run executes; `device` None: not chosen yet."""
    import torchvision

    status = _git("status", "--porcelain", "--untracked-files=no")
    if device is None:
        shown = None
    elif device.type == "cuda":
        shown = torch.cuda.get_device_name(device)
    else:
        shown = f"cpu ({_cpu_name()})"
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": shown,
        "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
    }
