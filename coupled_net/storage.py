"""Writes that matter are atomic (SPEC §5): a whole file is written to a temp file beside its place,
fsynced and renamed over it, so a kill or a full disk leaves the old file or the new one, never half
of one. A full disk is said in one line naming the file and the space left (DiskFull). The reader
and writer of the project's small JSON records (results.json, manifest.json, caches, tracker state)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

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


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when the file is absent, unreadable, not JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
