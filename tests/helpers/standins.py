"""In-memory stand-ins for the datasets that would otherwise be downloaded."""

from __future__ import annotations

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


STANDINS = {
    "emnist_letters": standin_loader(1, 28, 26, 1),
    "mnist": standin_loader(1, 28, 10, 0),
    "fashion_mnist": standin_loader(1, 28, 10, 0),
    "cifar10": standin_loader(3, 32, 10, 0),
}
