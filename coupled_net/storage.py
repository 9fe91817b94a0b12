"""Writes that matter are atomic (SPEC §5): a whole file is written to a temp file beside its place,
fsynced and renamed over it, so a kill or a full disk leaves the old file or the new one, never half
of one. A full disk is said in one line naming the file and the space left (DiskFull). The reader
and writer of the project's small JSON records (results.json, manifest.json, caches, tracker state);
a record's reader opens regular files only (read_bytes), so a FIFO never blocks it (NotAFile)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFull(OSError):
    """No space left where a run writes: names the file and the space left there."""

    def __str__(self) -> str:
        return self.strerror


class NotAFile(OSError):
    """A path that is there but is not a regular file (a FIFO, a socket, a device, a directory):
    read_bytes does not read it, so a reader never blocks on it. `kind` says what it is."""

    def __init__(self, path, kind: str):
        super().__init__(errno.EINVAL, f"{path} is {kind}, not a regular file: not read", str(path))
        self.kind = kind

    def __str__(self) -> str:
        return self.strerror


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _not_regular(path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotAFile(path, next((kind for test, kind in _KINDS if test(mode)), "not a file"))


def read_bytes(path) -> bytes:
    """The bytes of the regular file `path`. Anything else is NotAFile without being read: opening a
    FIFO for reading blocks until a writer comes (forever, for a stray one). It is checked before the
    open, then the open itself is non-blocking and checked again (a path replaced in between)."""
    _not_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _not_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        return f.read()


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


def _chain(e: BaseException):
    """`e`, then what it was raised from or while handling (__cause__, __context__), down the chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _no_space(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere down the exception chain (torch.save into a Python file raises its C++
    writer's "[enforce fail at inline_container.cc:672] . unexpected pos ..." with the OSError only as
    the context), or what that writer says itself when the disk fills ("... file write failed")."""
    for link in _chain(e):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(link, RuntimeError) and ("file write failed" in str(link) or "No space left" in str(link)):
            return True
    return False


def disk_full(e: BaseException, path: Path | None = None) -> str | None:
    """The one line for a full disk (None when `e` is something else)."""
    if isinstance(e, DiskFull):
        return str(e)
    if not _no_space(e):
        return None
    named = next((link.filename for link in _chain(e) if getattr(link, "filename", None)), None)
    where = Path(path or named or ".")
    return f"No space left on device writing {where} ({_free(where if where.is_dir() else where.parent)} free there)"


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
    """The JSON object in `path`; None when the file is absent, unreadable, not a regular file (a FIFO:
    never waited on), not JSON or not an object."""
    try:
        value = json.loads(read_bytes(path))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
