"""In-memory stand-ins for the datasets that would otherwise be downloaded."""

from __future__ import annotations

import numpy as np
import torch

from coupled_net import data


def standin_loader(channels: int, size: int, num_classes: int, label_offset: int, n_train=64, n_test=32):
    """A loader factory for data.LOADERS: random uint8 images in the dataset's own layout."""
    def factory(dcfg):
        def load(root, train, download):
            n = n_train if train else n_test
            g = torch.Generator().manual_seed(1 if train else 2)
            shape = (n, size, size) if channels == 1 else (n, size, size, 3)
            images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            labels = torch.arange(n) % num_classes + label_offset
            return data.ArraySource(images, labels)
        return load
    return factory


# ---- fake torchvision dataset classes: the real loaders (data._torchvision, data._svhn) run on them,
# conversion included. Each holds what its torchvision class holds, in the same types and layout.

N_TRAIN, N_TEST = 64, 32


def fake_pixels(shape: tuple, train: bool) -> np.ndarray:
    """uint8 pixels of a fixed pattern: pixel k of the flattened array is (k * 7 + train) % 256, so a test
    can compute any pixel, in any layout, by hand."""
    return ((np.arange(int(np.prod(shape)), dtype=np.int64) * 7 + int(train)) % 256).astype(np.uint8).reshape(shape)


class FakeCIFAR100:
    """torchvision.datasets.CIFAR100(root, train, download): `data` a numpy uint8 [N, 32, 32, 3] (channels
    last), `targets` a list of ints 0..99."""
    def __init__(self, root, train=True, download=False):
        n = N_TRAIN if train else N_TEST
        self.data = fake_pixels((n, 32, 32, 3), train)
        self.targets = [(3 * i) % 100 for i in range(n)]


class FakeSVHN:
    """torchvision.datasets.SVHN(root, split='train'|'test', download): `data` a numpy uint8 [N, 3, 32, 32]
    (channels first), `labels` a numpy int64 array 0..9 (torchvision maps the digit 0's 10 to 0)."""
    def __init__(self, root, split="train", download=False):
        assert split in ("train", "test", "extra"), split
        n = N_TRAIN if split == "train" else N_TEST
        self.data = fake_pixels((n, 3, 32, 32), split == "train")
        self.labels = np.arange(n, dtype=np.int64) % 10


class FakeKMNIST:
    """torchvision.datasets.KMNIST(root, train, download): `data` a torch uint8 [N, 28, 28], `targets` a
    torch int64 tensor 0..9."""
    def __init__(self, root, train=True, download=False):
        n = N_TRAIN if train else N_TEST
        self.data = torch.from_numpy(fake_pixels((n, 28, 28), train))
        self.targets = torch.arange(n) % 10


STANDINS = {
    "emnist_letters": standin_loader(1, 28, 26, 1),
    "mnist": standin_loader(1, 28, 10, 0),
    "fashion_mnist": standin_loader(1, 28, 10, 0),
    "cifar10": standin_loader(3, 32, 10, 0),
    "cifar100": lambda dcfg: data._torchvision(FakeCIFAR100),
    "svhn": lambda dcfg: data._svhn(FakeSVHN),
    "kmnist": lambda dcfg: data._torchvision(FakeKMNIST),
}
