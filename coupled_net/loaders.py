"""Batches of a split for one epoch: the order and every sample's augmentation are functions of
(seed, epoch) alone, so a resumed, sharded (DDP) or re-run epoch yields the same batches. The pil
pipeline loads images one by one in DataLoader workers (EpochLoader); the tensor pipeline holds the
split as one uint8 tensor on the training device and augments a whole batch at a time (TensorLoader)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import Letters, augment_batch, to_device
from .data import IN_MEMORY_ONLY, ArraySource, SplitDataset
from .errors import ConfigError


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
        order = to_device(self.sampler.positions()[0], self.images.device)  # no host stall, even once an epoch
        start_batch = self.sampler.start // self.batch_size
        for b, first in enumerate(range(0, len(order), self.batch_size), start=start_batch):
            idx = order[first:first + self.batch_size]
            if not self.train:
                yield augment_batch(self.images[idx], self.size, self.mean, self.std, None), self.labels[idx]
                continue
            key = ((self.seed * 1_000_003 + self.sampler.epoch) * 1_000_003 + b) * 4096 + self.rank
            gen = torch.Generator().manual_seed(key % 2**63)
            yield self.augment.batch(self.images[idx], self.size, self.mean, self.std, gen), self.labels[idx]


def build_loader(split: SplitDataset, dcfg, *, train: bool, device: torch.device, size: int, batch_size: int,
                 workers: int, seed: int, rank: int = 0, world_size: int = 1, augment=None):
    """`dataset.pipeline`: tensor (the split in memory, batches augmented by `augment`, default the
    seed's Letters()) or pil (per-image transforms in DataLoader workers: the split's own, which
    build_splits made from the same policy). `train`: shuffled, remainder dropped under DDP, augmented."""
    if dcfg.pipeline == "tensor":
        return TensorLoader(split, device, size, dcfg.mean, dcfg.std, batch_size, train, seed, rank, world_size,
                            augment)
    return EpochLoader(split, batch_size, train, workers, device.type == "cuda", seed, rank, world_size)
