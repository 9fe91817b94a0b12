"""A run directory's files (SPEC §5): epochs.csv, system.csv, results.json, checkpoints.
Whole-file writes are atomic (temp file + fsync + rename); CSV rows are appended and fsynced."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path

import torch

EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss", "ke_val_acc",
                 "epoch_time_s", "ke_time_s", "ke_eval_time_s"]
STATUSES = ("running", "done", "diverged", "failed")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Call write(binary_file) on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    """An append-only CSV with a fixed header; each row is on disk when append() returns."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = Path(path), list(columns)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def keep_epochs_upto(self, epoch: int) -> None:
        """Drop rows past `epoch` (written after the checkpoint a resumed run starts from)."""
        rows = self.rows()
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(kept) == len(rows):
            return
        if not kept:
            self.path.unlink()
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(self.path, lambda f: f.write(buf.getvalue().encode()))


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

    def periodic(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    def read_results(self) -> dict | None:
        return read_json(self.results)

    def write_results(self, results: dict) -> None:
        write_json(self.results, results)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def slurm_job_id() -> str | None:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
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


def provenance(device: torch.device) -> dict:
    import torchvision

    status = _git("status", "--porcelain", "--untracked-files=no")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": name if device.type == "cuda" else f"cpu ({name})",
        "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
    }
