"""Every file an image_folder run will read is opened and fully decoded once before training, so a
corrupt file (even one in test/, which is read only after the last epoch) ends the run at the start.
The verdicts are cached by (path, size, mtime) in CHECK_CACHE beside the images, or, where the root
is read-only, in the user's cache directory: a re-run pays only a stat per file."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock, Timeout
from PIL import Image, UnidentifiedImageError

from .errors import one_line
from .machine import affinity_cpus
from .storage import atomic_write, read_json

log = logging.getLogger(__name__)

CHECK_CACHE = ".coupled_net_image_check.json"
CHECK_VERSION = 1
SHOWN_BAD = 5  # the refusal names this many files, then counts the rest
CHECK_CHUNK = 64  # files per task of the checking threads


def decode_problem(path: str) -> str | None:
    """Why the file at `path` cannot be trained on ('truncated', 'empty file', ...), or None when it
    opens and decodes completely with PIL, the library the training reads it with."""
    try:
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "empty file" if empty else "not an image PIL can read"
    except OSError as e:
        if e.strerror:  # the file itself: permission denied, an I/O error, vanished
            return e.strerror.lower()
        return "truncated" if "truncated" in str(e) else one_line(e, 120)
    except Exception as e:  # noqa: BLE001 - any decoder failure (a broken PNG's SyntaxError, a decompression bomb)
        return one_line(e, 120)
    return None


def _user_cache_file(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "coupled_net" / "image_check" / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"


def check_cache_files(root: Path) -> list[Path]:
    """Where the verdicts are kept, in order of preference: beside the images, else the user's cache."""
    return [root / CHECK_CACHE, _user_cache_file(root)]


def _read_verdicts(root: Path) -> dict[tuple[str, int, int], str | None]:
    """(relative path, size, mtime_ns) -> problem or None, from every cache file that can be read;
    an unreadable or foreign cache is ignored (the files are then decoded again)."""
    known = {}
    for path in check_cache_files(root):
        cache = read_json(path)
        if not isinstance(cache, dict) or cache.get("version") != CHECK_VERSION or \
                not isinstance(cache.get("files"), dict):
            continue
        for rel, entry in cache["files"].items():
            if isinstance(entry, list) and len(entry) == 3 and all(isinstance(v, int) for v in entry[:2]) \
                    and (entry[2] is None or isinstance(entry[2], str)):
                known.setdefault((rel, entry[0], entry[1]), entry[2])
    return known


def _write_verdicts(root: Path, files: dict[str, list]) -> None:
    """Save the verdicts atomically (concurrent runs of a sweep each write a whole, valid file). A
    cache that cannot be saved anywhere costs the next run a new check, never this run."""
    text = json.dumps({"version": CHECK_VERSION, "root": str(root), "files": files}, separators=(",", ":"))
    failures = []
    for path in check_cache_files(root):
        try:
            atomic_write(path, lambda f: f.write(text.encode()))
            return
        except OSError as e:
            failures.append(f"{path}: {e.strerror or e}")
    log.warning("could not save the image check (%s); the next run checks the images again", "; ".join(failures))


def _check_threads() -> int:
    """PIL releases the GIL while it decodes, so threads decode in parallel; a few more threads than
    cores also hide the file reads' latency on a network filesystem."""
    return min(16, 2 * affinity_cpus())


def _relative(paths: list[str], root: Path) -> list[str]:
    """`paths` below `root`, '/'-separated (the cache's keys; a string cut: relpath costs more than a stat)."""
    prefix = os.path.join(str(root), "")
    rels = [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]
    return rels if os.sep == "/" else [rel.replace(os.sep, "/") for rel in rels]


def _check_lock(root: Path) -> FileLock | None:
    """Held while the verdicts of `root` are decided: of the runs of a sweep that start together, one
    decodes and the others wait, then read its cache. Beside the cache; None where no lock file can be made."""
    for cache in check_cache_files(root):
        lock = FileLock(str(cache.with_suffix(".lock")))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("waiting for another run that is checking the images of %s", root)
                lock.acquire()
            return lock
        except OSError:
            continue
    return None


def _match(stats: list, known: dict) -> tuple[dict[str, list], list]:
    """The verdicts `known` for the files of `stats` whose size and mtime are unchanged, and the files to decode."""
    verdicts, pending = {}, []
    for path, rel, st in stats:
        key = (rel, st.st_size, st.st_mtime_ns)
        if key in known:
            verdicts[rel] = [st.st_size, st.st_mtime_ns, known[key]]
        else:
            pending.append((path, rel, st))
    return verdicts, pending


def _decode_all(pending: list) -> list[str | None]:
    """decode_problem of each pending file, in threads, in chunks: a small file decodes in less time than
    a task costs to schedule. `decode_problem` is looked up at call time, so a test can count the decodes."""
    threads = _check_threads()
    size = max(1, min(CHECK_CHUNK, math.ceil(len(pending) / threads)))
    chunks = [pending[i:i + size] for i in range(0, len(pending), size)]
    with ThreadPoolExecutor(threads, thread_name_prefix="image-check") as pool:
        done = pool.map(lambda chunk: [decode_problem(item[0]) for item in chunk], chunks)
        return [problem for chunk in done for problem in chunk]


def check_images(root: Path, paths: list[str]) -> dict[str, str]:
    """{path: problem} for the files among `paths` that cannot be trained on. A file whose size and
    mtime match a cached verdict is not decoded again; the others are, under a lock (_check_lock)."""
    start = time.perf_counter()
    bad: dict[str, str] = {}
    stats = []
    for path, rel in zip(paths, _relative(paths, root)):
        try:
            stats.append((path, rel, os.stat(path)))
        except OSError as e:  # not cached: the next run looks again
            bad[path] = (e.strerror or str(e)).lower()
    verdicts, pending = _match(stats, _read_verdicts(root))
    decoded = 0
    if pending:  # all known: nothing is locked or written (a read-only root is fine)
        lock = _check_lock(root)
        try:
            verdicts, pending = _match(stats, _read_verdicts(root))  # another run may have checked them meanwhile
            if pending:
                for (path, rel, st), problem in zip(pending, _decode_all(pending)):
                    verdicts[rel] = [st.st_size, st.st_mtime_ns, problem]
                decoded = len(pending)
                _write_verdicts(root, verdicts)  # only the files found now: nothing stale is kept
        finally:
            if lock is not None:
                lock.release()
    for path, rel, _ in stats:
        if verdicts[rel][2] is not None:
            bad[path] = verdicts[rel][2]
    log.info("checked the %d images of %s in %.1f s: %d decoded, %d known from an earlier check, %d unreadable",
             len(paths), root, time.perf_counter() - start, decoded, len(stats) - decoded, len(bad))
    return bad


def describe_bad(root: Path, bad: dict[str, str]) -> str:
    """'3 unreadable images (test/cat/a.jpg: truncated; ...)': the first SHOWN_BAD by path, then a count."""
    listed = sorted(zip(_relative(list(bad), root), bad.values()))
    shown = "; ".join(f"{rel}: {why}" for rel, why in listed[:SHOWN_BAD])
    more = f"; and {len(listed) - SHOWN_BAD} more" if len(listed) > SHOWN_BAD else ""
    return f"{len(listed)} unreadable image{'s' if len(listed) != 1 else ''} ({shown}{more})"
