"""Datasets and loaders: torchvision datasets (downloaded once per root, under a file lock), a
user's image folder, and the offline synthetic letters; seeded splits; the augment policy's PIL
transforms (pil pipeline) or batches (tensor pipeline); trainer.overfit_batches' fixed subset."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from . import synthetic
from .augment import Letters, augment_batch, eval_transforms
from .errors import ConfigError, DatasetUnavailable, one_line
from .machine import affinity_cpus
from .storage import atomic_write, read_json

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 30
IN_MEMORY_ONLY = "needs a dataset held in memory; use pil for image_folder"  # dataset.pipeline=tensor


# ---- sources: where the images of one split come from ------------------------------------------

@dataclass
class ArraySource:
    """Images held in memory as uint8, [N, H, W] (grayscale) or [N, H, W, 3] (channels last, as PIL
    and CIFAR keep them; a channels-first source such as SVHN is permuted when loaded)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i].numpy())


@dataclass
class FolderSource:
    """Image files read on demand, converted to `mode` ('L' or 'RGB')."""
    paths: list[str]
    labels: torch.Tensor
    mode: str

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            return img.convert(self.mode)


class SplitDataset(Dataset):
    """The samples `indices` of a source, transformed, with labels shifted to start at 0."""

    def __init__(self, source, indices: torch.Tensor, transform, label_offset: int):
        self.source, self.indices, self.transform, self.label_offset = source, indices, transform, label_offset

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        """`item` is a position k, or (k, sample_seed) from an EpochSampler: then the random
        augmentation of this sample is drawn from its own seed, not from whichever process's
        RNG stream happens to load it, so batches do not depend on worker count, rank or resume."""
        k, sample_seed = item if isinstance(item, tuple) else (item, None)
        i = int(self.indices[k])
        image, label = self.source.image(i), int(self.source.labels[i]) - self.label_offset
        if sample_seed is None:
            return self.transform(image), label
        rng = torch.default_generator  # the CPU generator torchvision's transforms draw from
        saved = rng.get_state()        # (torch.random.fork_rng does the same, 50x slower)
        rng.manual_seed(sample_seed)
        try:
            return self.transform(image), label
        finally:
            rng.set_state(saved)


# ---- torchvision datasets --------------------------------------------------------------------

def _torchvision(cls, **kwargs):
    def load(root: Path, train: bool, download: bool) -> ArraySource:
        ds = cls(root=str(root), train=train, download=download, **kwargs)
        images = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
        return ArraySource(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64))
    return load


def _svhn(cls):
    """SVHN differs from the others: split='train'|'test' (not train=), `labels` (not targets; torchvision
    already maps the digit 0's label 10 to 0), and channels-first data [N, 3, 32, 32]."""
    def load(root: Path, train: bool, download: bool) -> ArraySource:
        ds = cls(root=str(root), split="train" if train else "test", download=download)
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 2, 3, 1)  # -> ArraySource's [N, H, W, 3]
        return ArraySource(images.contiguous(), torch.as_tensor(np.asarray(ds.labels), dtype=torch.int64))
    return load


def _synthetic(dcfg):
    def load(root: Path, train: bool, download: bool) -> ArraySource:
        per_class = dcfg.train_per_class if train else dcfg.test_per_class
        return ArraySource(*synthetic.letters(int(per_class), int(dcfg.generator_seed), train))
    return load


# name -> factory(dataset config) -> load(root, train, download) -> ArraySource.
# Tests replace entries with in-memory stand-ins.
LOADERS = {
    "emnist_letters": lambda dcfg: _torchvision(tvd.EMNIST, split="letters"),
    "mnist": lambda dcfg: _torchvision(tvd.MNIST),
    "fashion_mnist": lambda dcfg: _torchvision(tvd.FashionMNIST),
    "cifar10": lambda dcfg: _torchvision(tvd.CIFAR10),
    "cifar100": lambda dcfg: _torchvision(tvd.CIFAR100),
    "svhn": lambda dcfg: _svhn(tvd.SVHN),
    "kmnist": lambda dcfg: _torchvision(tvd.KMNIST),
    "synthetic_letters": _synthetic,
}
NAMES = (*LOADERS, "image_folder")


def dataset_root(dcfg) -> Path:
    return Path(os.path.expanduser(str(dcfg.root))).resolve()


def _unavailable(name: str, root: Path, reason: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset={name}: not found in {root} and it could not be downloaded ({reason}). Ways out: "
        f"run `python launch/prepare.py dataset={name} dataset.root=DIR` on a machine with internet and "
        f"pass dataset.root=DIR (or set COUPLED_NET_DATA=DIR); or train offline with dataset=synthetic_letters")


def load_source(dcfg, train: bool) -> ArraySource:
    """One split of a named dataset, downloading it first if needed (once per root, under a lock)."""
    name, root = dcfg.name, dataset_root(dcfg)
    load = LOADERS[name](dcfg)
    try:
        return load(root, train, download=False)
    except (RuntimeError, FileNotFoundError) as missing:
        if not dcfg.download:
            raise _unavailable(name, root, f"dataset.download=false; {missing}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("dataset.root", str(root), f"must be a writable directory ({e.strerror})") from None
    with FileLock(str(root / f".{name}.download.lock")):
        try:  # another run may have finished the download while this one waited for the lock
            return load(root, train, download=False)
        except (RuntimeError, FileNotFoundError):
            pass
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            log.info("downloading %s into %s", name, root)
            return load(root, train, download=True)
        except Exception as e:  # noqa: BLE001 - any failure means: not downloadable from here
            raise _unavailable(name, root, one_line(e, 300)) from None
        finally:
            socket.setdefaulttimeout(previous)


# ---- image folders ---------------------------------------------------------------------------

# Every file an image_folder run will read is opened and fully decoded once before training, so a
# corrupt file (even one in test/, which is read only after the last epoch) ends the run at the start.
# The verdicts are cached by (path, size, mtime) in CHECK_CACHE beside the images, or, where the root
# is read-only, in the user's cache directory: a re-run pays only a stat per file.
CHECK_CACHE = ".coupled_net_image_check.json"
CHECK_VERSION = 1
SHOWN_BAD = 5  # the refusal names this many files, then counts the rest
CHECK_CHUNK = 64  # files per task of the checking threads


def is_image_file(path: str) -> bool:
    """What a class folder contributes: ImageFolder's image extensions, without hidden files (macOS's
    `._x.jpg` resource forks are not images); README.txt, .DS_Store, Thumbs.db and the like are ignored."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _scan_folder(folder: Path, mode: str) -> tuple[FolderSource, list[str]]:
    try:
        ds = tvd.ImageFolder(str(folder), is_valid_file=is_image_file)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError("dataset.root", str(folder),
                          f"must hold one sub-folder of images per class ({str(e).splitlines()[0]})") from None
    if len(ds.classes) < 2:
        raise ConfigError("dataset.root", str(folder), f"needs at least 2 class folders, found {len(ds.classes)}")
    paths = [p for p, _ in ds.samples]
    return FolderSource(paths, torch.tensor(ds.targets, dtype=torch.int64), mode), ds.classes


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


def _describe_bad(root: Path, bad: dict[str, str]) -> str:
    """'3 unreadable images (test/cat/a.jpg: truncated; ...)': the first SHOWN_BAD by path, then a count."""
    listed = sorted(zip(_relative(list(bad), root), bad.values()))
    shown = "; ".join(f"{rel}: {why}" for rel, why in listed[:SHOWN_BAD])
    more = f"; and {len(listed) - SHOWN_BAD} more" if len(listed) > SHOWN_BAD else ""
    return f"{len(listed)} unreadable image{'s' if len(listed) != 1 else ''} ({shown}{more})"


def _without(source: FolderSource, bad: dict[str, str]) -> FolderSource:
    keep = [i for i, p in enumerate(source.paths) if p not in bad]
    return FolderSource([source.paths[i] for i in keep], source.labels[keep], source.mode)


def _refuse_or_drop_bad(root: Path, sources: list[FolderSource], skip: bool) -> list[FolderSource]:
    """Check every file the run will read; refuse them in one line, or drop them with one warning."""
    bad = check_images(root, [p for src in sources for p in src.paths])
    if not bad:
        return sources
    if not skip:
        raise ConfigError("dataset.root", str(root), f"{_describe_bad(root, bad)}: fix or remove them, or set "
                          "dataset.skip_bad_images=true")
    log.warning("dataset.root=%s: leaving out %s (dataset.skip_bad_images=true)", root, _describe_bad(root, bad))
    return [_without(src, bad) for src in sources]


def image_folder_sources(dcfg, seed: int, check: bool = True):
    """(train+val source, its indices, test source, its indices, class names). With `check`, every
    file is first checked to decode (check_images): refused, or dropped with dataset.skip_bad_images."""
    root = dataset_root(dcfg)
    if not root.is_dir():
        raise ConfigError("dataset.root", str(root), "must be a readable directory of class folders")
    mode = {1: "L", 3: "RGB"}.get(dcfg.channels)
    if mode is None:
        raise ConfigError("dataset.channels", dcfg.channels, "allowed: 1 or 3")
    skip = dcfg.get("skip_bad_images", False)
    if not isinstance(skip, bool):
        raise ConfigError("dataset.skip_bad_images", skip, "allowed: true, false")
    test = None
    if (root / "train").is_dir():
        train, classes = _scan_folder(root / "train", mode)
        test, test_classes = _scan_folder(root / "test", mode) if (root / "test").is_dir() else (None, classes)
        if test_classes != classes:
            raise ConfigError("dataset.root", str(root), "train/ and test/ must hold the same class folders")
    else:
        train, classes = _scan_folder(root, mode)
    fraction = dcfg.get("test_fraction", 0.15)
    if test is None and not 0 < fraction < 1:
        raise ConfigError("dataset.test_fraction", fraction, "must be in (0, 1)")
    if check:
        checked = _refuse_or_drop_bad(root, [train] if test is None else [train, test], skip)
        train, test = checked[0], checked[1] if test is not None else None
    if test is not None:
        return train, torch.arange(len(train)), test, torch.arange(len(test)), classes
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    n_test = max(1, int(round(fraction * len(train))))
    return train, order[n_test:], train, order[:n_test], classes


def count_classes(dcfg) -> int:
    """The class folders; no image is checked here (build_splits does it, once)."""
    return len(image_folder_sources(dcfg, 0, check=False)[4])


# ---- transforms, splits and loaders ----------------------------------------------------------

def pil_transforms(size: int, mean, std, augment=None) -> tuple[v2.Compose, v2.Compose]:
    """The train transforms of the augment policy `augment` (default: the seed notebook's, Letters())
    and the val/test transforms, resizing to `size` x `size`."""
    return (Letters() if augment is None else augment).pil(size, mean, std), eval_transforms(size, mean, std)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset


def build_splits(dcfg, input_size: int, seed: int, augment=None) -> DataSplits:
    """Train/val split of the training set (seeded, `val_fraction` to validation, as the seed's
    random_split) and the dataset's own test set; the training split's transforms are the augment
    policy's (default: the seed's, Letters()), used by the pil pipeline."""
    if dcfg.name not in NAMES:
        raise ConfigError("dataset", dcfg.name, f"allowed: {', '.join(NAMES)}")
    if dcfg.get("pipeline", "pil") not in PIPELINES:
        raise ConfigError("dataset.pipeline", dcfg.get("pipeline"), f"allowed: {', '.join(PIPELINES)}")
    train_tf, eval_tf = pil_transforms(input_size, dcfg.mean, dcfg.std, augment)
    if dcfg.name == "image_folder":
        train_src, pool, test_src, test_idx, _ = image_folder_sources(dcfg, seed)
    else:
        train_src, test_src = load_source(dcfg, train=True), load_source(dcfg, train=False)
        pool, test_idx = torch.arange(len(train_src)), torch.arange(len(test_src))
    for src in (train_src, test_src):
        _check_labels(src.labels, dcfg)
    n_train = int((1 - dcfg.val_fraction) * len(pool))
    sizes = {"train": n_train, "val": len(pool) - n_train, "test": len(test_idx)}
    if min(sizes.values()) < 1:
        raise ConfigError("dataset.root", str(dataset_root(dcfg)),
                          f"too few images for the splits ({', '.join(f'{k} {v}' for k, v in sizes.items())}); "
                          "each needs at least one")
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    offset = int(dcfg.label_offset)
    return DataSplits(
        train=SplitDataset(train_src, order[:n_train], train_tf, offset),
        val=SplitDataset(train_src, order[n_train:], eval_tf, offset),
        test=SplitDataset(test_src, test_idx, eval_tf, offset),
    )


def overfit_split(splits: DataSplits, n: int) -> SplitDataset:
    """trainer.overfit_batches: the first `n` samples of the training split (its seeded order), with the
    eval transforms (unaugmented). Loaded with train=False (unshuffled), every epoch yields them alike."""
    train = splits.train
    return SplitDataset(train.source, train.indices[:n], splits.val.transform, train.label_offset)


def _check_labels(labels: torch.Tensor, dcfg) -> None:
    lo, hi = int(labels.min()) - dcfg.label_offset, int(labels.max()) - dcfg.label_offset
    if lo < 0 or hi >= dcfg.num_classes:
        raise ConfigError("dataset.label_offset", dcfg.label_offset,
                          f"labels minus the offset span {lo}..{hi}, outside 0..{dcfg.num_classes - 1}")


class EpochSampler(Sampler):
    """Yields (position, sample_seed) pairs. The order (shuffled or not) and every sample's seed
    are functions of (seed, epoch) alone. With `world_size` > 1 each rank takes every
    world_size-th position of the same order (the remainder dropped when training, so all ranks
    take the same number of steps). `start` skips the positions a resumed epoch already did."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        if self.shuffle:  # training: equal shares, so every rank steps the same number of times
            usable = self.n - self.n % self.world_size
            order, seeds = order[:usable], seeds[:usable]
        return order[self.rank::self.world_size], seeds[self.rank::self.world_size]

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (positions, sample seeds) for the current epoch, from `start` on."""
        order, seeds = self._order()
        return order[self.start:], seeds[self.start:]

    def __iter__(self):
        return iter(zip(*(t.tolist() for t in self.positions())))

    def __len__(self) -> int:
        usable = self.n - self.n % self.world_size if self.shuffle else self.n
        return max(0, len(range(self.rank, usable, self.world_size)) - self.start)


class EpochLoader:
    """A DataLoader over an EpochSampler: `set_epoch(epoch, start_batch)` before each pass."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                 pin_memory: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.batch_size = batch_size
        self.sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size)
        # its own generator: each iterator draws a worker base seed, which must not come from the global
        # RNG (dropout's), or a run resumed mid-epoch would draw it at a different point
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


class TensorLoader:
    """Batches of a split held as one uint8 tensor on the training device, augmented a whole batch
    at a time (coupled_net.augment) instead of image by image; no DataLoader, no workers. The order
    and every batch's random parameters are functions of (seed, epoch, batch, rank) alone."""

    def __init__(self, split: SplitDataset, device: torch.device, size: int, mean, std, batch_size: int,
                 train: bool, seed: int, rank: int = 0, world_size: int = 1, augment=None):
        src = split.source
        if not isinstance(src, ArraySource):
            raise ConfigError("dataset.pipeline", "tensor", IN_MEMORY_ONLY)
        images = src.images[split.indices]
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        self.images = images.contiguous().to(device)
        self.labels = (src.labels[split.indices] - split.label_offset).to(device)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device)
        self.size, self.batch_size, self.train, self.seed, self.rank = size, batch_size, train, seed, rank
        self.augment = Letters() if augment is None else augment  # training batches only; eval: resized
        self.sampler = EpochSampler(len(split), train, seed, rank, world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = self.sampler.positions()[0].to(self.images.device)
        start_batch = self.sampler.start // self.batch_size
        for b, first in enumerate(range(0, len(order), self.batch_size), start=start_batch):
            idx = order[first:first + self.batch_size]
            if not self.train:
                yield augment_batch(self.images[idx], self.size, self.mean, self.std, None), self.labels[idx]
                continue
            key = ((self.seed * 1_000_003 + self.sampler.epoch) * 1_000_003 + b) * 4096 + self.rank
            gen = torch.Generator().manual_seed(key % 2**63)
            yield self.augment.batch(self.images[idx], self.size, self.mean, self.std, gen), self.labels[idx]


PIPELINES = ("tensor", "pil")


def build_loader(split: SplitDataset, dcfg, *, train: bool, device: torch.device, size: int, batch_size: int,
                 workers: int, seed: int, rank: int = 0, world_size: int = 1, augment=None):
    """`dataset.pipeline`: tensor (the split in memory, batches augmented by `augment`, default the
    seed's Letters()) or pil (per-image transforms in DataLoader workers: the split's own, which
    build_splits made from the same policy). `train`: shuffled, remainder dropped under DDP, augmented."""
    if dcfg.pipeline == "tensor":
        return TensorLoader(split, device, size, dcfg.mean, dcfg.std, batch_size, train, seed, rank, world_size,
                            augment)
    return EpochLoader(split, batch_size, train, workers, device.type == "cuda", seed, rank, world_size)


def prepare(dcfg) -> str:
    """Fetch or build a dataset into its root; returns a one-line description."""
    if dcfg.name == "image_folder":
        train, pool, test, test_idx, classes = image_folder_sources(dcfg, 0)
        return (f"image_folder at {dataset_root(dcfg)}: {len(classes)} classes, {len(pool)} train+val, "
                f"{len(test_idx)} test images, every one checked to decode")
    if dcfg.name not in LOADERS:
        raise ConfigError("dataset", dcfg.name, f"allowed: {', '.join(NAMES)}")
    sizes = [len(load_source(dcfg, train)) for train in (True, False)]
    where = "generated in memory, nothing to store" if dcfg.name == "synthetic_letters" else f"in {dataset_root(dcfg)}"
    return f"{dcfg.name}: {sizes[0]} train + {sizes[1]} test images, {where}"
