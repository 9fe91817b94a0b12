"""Datasets and loaders: torchvision datasets (downloaded once per root, under a file lock), a
user's image folder, and the offline synthetic letters; seeded splits; the seed's PIL transforms."""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets as tvd
from torchvision.transforms import v2

from . import synthetic
from .errors import ConfigError, DatasetUnavailable, one_line

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 30


# ---- sources: where the images of one split come from ------------------------------------------

@dataclass
class ArraySource:
    """Images held in memory as uint8, [N, H, W] (grayscale) or [N, H, W, 3]."""
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

def _scan_folder(folder: Path, mode: str) -> tuple[FolderSource, list[str]]:
    try:
        ds = tvd.ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as e:
        raise ConfigError("dataset.root", str(folder),
                          f"must hold one sub-folder of images per class ({str(e).splitlines()[0]})") from None
    if len(ds.classes) < 2:
        raise ConfigError("dataset.root", str(folder), f"needs at least 2 class folders, found {len(ds.classes)}")
    paths = [p for p, _ in ds.samples]
    return FolderSource(paths, torch.tensor(ds.targets, dtype=torch.int64), mode), ds.classes


def image_folder_sources(dcfg, seed: int):
    """(train+val source, its indices, test source, its indices, class names)."""
    root = dataset_root(dcfg)
    if not root.is_dir():
        raise ConfigError("dataset.root", str(root), "must be a readable directory of class folders")
    mode = {1: "L", 3: "RGB"}.get(dcfg.channels)
    if mode is None:
        raise ConfigError("dataset.channels", dcfg.channels, "allowed: 1 or 3")
    if (root / "train").is_dir():
        train, classes = _scan_folder(root / "train", mode)
        test, test_classes = _scan_folder(root / "test", mode) if (root / "test").is_dir() else (None, classes)
        if test_classes != classes:
            raise ConfigError("dataset.root", str(root), "train/ and test/ must hold the same class folders")
        if test is not None:
            return train, torch.arange(len(train)), test, torch.arange(len(test)), classes
    else:
        train, classes = _scan_folder(root, mode)
    fraction = dcfg.get("test_fraction", 0.15)
    if not 0 < fraction < 1:
        raise ConfigError("dataset.test_fraction", fraction, "must be in (0, 1)")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    n_test = max(1, int(round(fraction * len(train))))
    return train, order[n_test:], train, order[:n_test], classes


def count_classes(dcfg) -> int:
    return len(image_folder_sources(dcfg, 0)[4])


# ---- transforms, splits and loaders ----------------------------------------------------------

def seed_transforms(size: int, mean, std) -> tuple[v2.Compose, v2.Compose]:
    """The seed notebook's train and val/test transforms, resizing to `size` x `size`."""
    finish = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    train = v2.Compose([
        v2.Resize((size, size)),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(20),
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=10),
        *finish,
    ])
    return train, v2.Compose([v2.Resize((size, size)), *finish])


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset


def build_splits(dcfg, input_size: int, seed: int) -> DataSplits:
    """Train/val split of the training set (seeded, `val_fraction` to validation, as the seed's
    random_split) and the dataset's own test set, with the seed's transforms."""
    if dcfg.name not in NAMES:
        raise ConfigError("dataset", dcfg.name, f"allowed: {', '.join(NAMES)}")
    if dcfg.get("pipeline", "pil") not in PIPELINES:
        raise ConfigError("dataset.pipeline", dcfg.get("pipeline"), f"allowed: {', '.join(PIPELINES)}")
    train_tf, eval_tf = seed_transforms(input_size, dcfg.mean, dcfg.std)
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
                 train: bool, seed: int, rank: int = 0, world_size: int = 1):
        src = split.source
        if not isinstance(src, ArraySource):
            raise ConfigError("dataset.pipeline", "tensor", "needs a dataset held in memory; use pil for image_folder")
        images = src.images[split.indices]
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        self.images = images.contiguous().to(device)
        self.labels = (src.labels[split.indices] - split.label_offset).to(device)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device)
        self.size, self.batch_size, self.train, self.seed, self.rank = size, batch_size, train, seed, rank
        self.sampler = EpochSampler(len(split), train, seed, rank, world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        from .augment import augment_batch

        order = self.sampler.positions()[0].to(self.images.device)
        start_batch = self.sampler.start // self.batch_size
        for b, first in enumerate(range(0, len(order), self.batch_size), start=start_batch):
            idx = order[first:first + self.batch_size]
            gen = None
            if self.train:
                key = ((self.seed * 1_000_003 + self.sampler.epoch) * 1_000_003 + b) * 4096 + self.rank
                gen = torch.Generator().manual_seed(key % 2**63)
            yield augment_batch(self.images[idx], self.size, self.mean, self.std, gen), self.labels[idx]


PIPELINES = ("tensor", "pil")


def build_loader(split: SplitDataset, dcfg, *, train: bool, device: torch.device, size: int, batch_size: int,
                 workers: int, seed: int, rank: int = 0, world_size: int = 1):
    """`dataset.pipeline`: tensor (the split in memory, batch augmentation) or pil (the seed's per-image
    transforms in DataLoader workers)."""
    if dcfg.pipeline == "tensor":
        return TensorLoader(split, device, size, dcfg.mean, dcfg.std, batch_size, train, seed, rank, world_size)
    return EpochLoader(split, batch_size, train, workers, device.type == "cuda", seed, rank, world_size)


def prepare(dcfg) -> str:
    """Fetch or build a dataset into its root; returns a one-line description."""
    if dcfg.name == "image_folder":
        train, pool, test, test_idx, classes = image_folder_sources(dcfg, 0)
        return f"image_folder at {dataset_root(dcfg)}: {len(classes)} classes, {len(pool)} train+val, {len(test_idx)} test images"
    if dcfg.name not in LOADERS:
        raise ConfigError("dataset", dcfg.name, f"allowed: {', '.join(NAMES)}")
    sizes = [len(load_source(dcfg, train)) for train in (True, False)]
    where = "generated in memory, nothing to store" if dcfg.name == "synthetic_letters" else f"in {dataset_root(dcfg)}"
    return f"{dcfg.name}: {sizes[0]} train + {sizes[1]} test images, {where}"
