"""The datasets cifar100, svhn and kmnist beside the seed's (their loaders' conversion runs on fake
torchvision classes holding what the real ones hold, so no test downloads), and
trainer.overfit_batches (debug=overfit): the same first batches of the training split every epoch,
unshuffled and unaugmented."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from coupled_net import data, synthetic
from coupled_net.augment import augment_batch
from coupled_net.build import build_loaders, resolve
from coupled_net.errors import DatasetUnavailable
from coupled_net.lifecycle import execute_run
from helpers import REPO, compose_cfg, run_cli
from helpers.standins import N_TEST, N_TRAIN, FakeSVHN

# name: (channels, classes, mean, std, augment, image size) as the YAML must say (torchvision's usual statistics)
NEW = {
    "cifar100": (3, 100, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762], "coupled_net.augment.CropFlip", 32),
    "svhn": (3, 10, [0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970], "coupled_net.augment.CropFlip", 32),
    "kmnist": (1, 10, [0.1918], [0.3483], "coupled_net.augment.Letters", 28),
}


def fake_pixel(name: str, i: int, c: int, y: int, x: int, train: bool) -> int:
    """Pixel (c, y, x) of image i of a fake dataset, from its own storage layout (helpers.standins.fake_pixels:
    element k of the flattened array is (7k + train) % 256)."""
    n = N_TRAIN if train else N_TEST
    k = {"cifar100": lambda: ((i * 32 + y) * 32 + x) * 3 + c,    # [N, 32, 32, 3], channels last
         "svhn": lambda: ((i * 3 + c) * 32 + y) * 32 + x,       # [N, 3, 32, 32], channels first
         "kmnist": lambda: (i * 28 + y) * 28 + x}[name]()       # [N, 28, 28]
    assert k < n * (3 if name != "kmnist" else 1) * (32 * 32 if name != "kmnist" else 28 * 28)
    return (7 * k + int(train)) % 256


def fake_label(name: str, i: int) -> int:
    return (3 * i) % 100 if name == "cifar100" else i % 10


def cfg_for(name, tmp_path, *more):
    size = NEW[name][5]
    return compose_cfg(f"dataset={name}", "model=small_cnn", f"model.input_size={size}", "trainer.device=cpu",
                       "trainer.batch_size=8", f"dataset.root={tmp_path}", *more)


@pytest.mark.parametrize("name", list(NEW))
def test_each_new_dataset_composes_with_its_statistics_and_its_default_augmentation(name, tmp_path):
    channels, classes, mean, std, augment, _ = NEW[name]
    cfg = cfg_for(name, tmp_path)
    d = cfg.dataset
    assert (d.name, d.channels, d.num_classes, d.label_offset, d.download) == (name, channels, classes, 0, True)
    assert list(d.mean) == mean and list(d.std) == std
    assert cfg.augment._target_ == augment
    assert (cfg.model.in_channels, cfg.model.num_classes) == (channels, classes)


def test_the_svhn_loader_asks_for_a_split_and_stores_its_channels_first_data_channels_last(tmp_path):
    calls = []

    class Recording(FakeSVHN):
        def __init__(self, root, split="train", download=False):
            calls.append((root, split, download))
            super().__init__(root, split, download)
    src = data._svhn(Recording)(tmp_path, False, False)
    assert calls == [(str(tmp_path), "test", False)]
    assert src.images.shape == (N_TEST, 32, 32, 3) and src.images.dtype == torch.uint8
    assert src.labels.dtype == torch.int64 and src.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # image 5, row 3, column 7, channel 2 of the [N, 3, 32, 32] original: element ((5*3 + 2)*32 + 3)*32 + 7 = 17511
    assert int(src.images[5, 3, 7, 2]) == (7 * 17511 + 0) % 256 == 209
    data._svhn(Recording)(tmp_path, True, True)
    assert calls[-1] == (str(tmp_path), "train", True)


@pytest.mark.parametrize("name", list(NEW))
@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_a_validation_batch_is_the_datasets_pixels_normalized_with_its_labels(name, pipeline, tmp_path,
                                                                               standin_datasets):
    channels, _, mean, std, _, size = NEW[name]
    loaders = build_loaders(resolve(cfg_for(name, tmp_path, f"dataset.pipeline={pipeline}")))
    loaders["val"].set_epoch(0)
    images, labels = next(iter(loaders["val"]))
    assert images.shape == (8, channels, size, size) and images.dtype == torch.float32
    # the seed's split: a permutation of the 64 training images by the run's seed (42), 85 % (54) to training
    val = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(42))[54:62].tolist()
    assert labels.tolist() == [fake_label(name, i) for i in val]
    for k, c, y, x in [(0, 0, 0, 0), (3, channels - 1, 5, 9), (7, channels // 2, size - 1, 17)]:
        expected = (fake_pixel(name, val[k], c, y, x, train=True) / 255 - mean[c]) / std[c]
        assert images[k, c, y, x].item() == pytest.approx(expected, abs=1e-5), (k, c, y, x)


@pytest.mark.parametrize("name", list(NEW))
def test_each_new_dataset_trains_and_tests_a_short_run(name, tmp_path, standin_datasets):
    res = execute_run(cfg_for(name, tmp_path, "trainer.epochs=1", "trainer.limit_batches=2"), tmp_path / "run")
    assert res["status"] == "done" and res["epochs_run"] == 1 and res["dataset"] == name
    assert 0 <= res["metrics"]["test"]["top1"] <= res["metrics"]["test"]["top5"] <= 100


def test_prepare_takes_the_same_launcher_overrides_as_train(tmp_path):
    # a sweep's command line, launcher and all, prepares its data on the login node (the launcher's
    # configs are coupled_net's own plugin's, which prepare.py registers as train.py does)
    proc = run_cli("dataset=synthetic_letters", "dataset.train_per_class=2", "dataset.test_per_class=1",
                   "hydra/launcher=slurm", cwd=tmp_path, script=REPO / "launch" / "prepare.py")
    assert (proc.returncode, proc.stdout) == (0, "synthetic_letters: 52 train + 26 test images, generated in memory, "
                                                 "nothing to store\n"), proc.stderr


def test_prepare_reports_the_sizes_of_a_new_dataset(tmp_path, standin_datasets):
    assert data.prepare(cfg_for("svhn", tmp_path).dataset) == f"svhn: 64 train + 32 test images, in {tmp_path}"


# the real torchvision classes, an empty root, dataset.download=false: no network is tried
NOT_FOUND = {"cifar100": "Dataset not found or corrupted. You can use download=True to download it",
             "svhn": "Dataset not found or corrupted. You can use download=True to download it",
             "kmnist": "Dataset not found. You can use download=True to download it"}


def unavailable(name, root):
    return (f"dataset={name}: not found in {root} and it could not be downloaded (dataset.download=false; "
            f"{NOT_FOUND[name]}). Ways out: run `python launch/prepare.py dataset={name} dataset.root=DIR` on a "
            f"machine with internet and pass dataset.root=DIR (or set COUPLED_NET_DATA=DIR); or train offline with "
            f"dataset=synthetic_letters")


@pytest.mark.parametrize("name", list(NEW))
def test_a_new_dataset_missing_with_download_false_names_the_ways_out(name, tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        data.load_source(cfg_for(name, tmp_path, "dataset.download=false").dataset, train=True)
    assert str(e.value) == unavailable(name, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing made


@pytest.mark.slow
def test_a_run_on_missing_svhn_ends_with_that_one_line(tmp_path):
    proc = run_cli("dataset=svhn", "model=small_cnn", "model.input_size=32", "dataset.download=false",
                   f"dataset.root={tmp_path}", "trainer.device=cpu", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"coupled_net: error: {unavailable('svhn', tmp_path)}"


# ---- trainer.overfit_batches ------------------------------------------------------------------

def overfit_cfg(tmp_path, *more):
    return compose_cfg("experiment=quickstart", "debug=overfit", "trainer.batch_size=16", "dataset.train_per_class=4",
                       "dataset.test_per_class=1", "trainer.device=cpu", f"dataset.root={tmp_path}", *more)


def test_debug_overfit_sets_two_batches_for_thirty_epochs():
    t = compose_cfg("debug=overfit").trainer
    assert (t.overfit_batches, t.epochs, t.patience, t.checkpoint_every) == (2, 30, 30, None)
    assert compose_cfg().trainer.overfit_batches == 0


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_overfit_batches_yield_the_first_training_images_unshuffled_and_unaugmented_every_epoch(tmp_path, pipeline):
    loaders = build_loaders(resolve(overfit_cfg(tmp_path, f"dataset.pipeline={pipeline}")))
    train = loaders["train"]
    assert len(train) == 2
    epochs = {}
    for epoch in (1, 2, 9):
        train.set_epoch(epoch)
        epochs[epoch] = [(x.clone(), y.clone()) for x, y in train]
    assert [len(b) for b in epochs.values()] == [2, 2, 2]
    for other in (2, 9):
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(epochs[1], epochs[other]))
    # the first 32 images of the seeded training split (26 classes x 4 = 104 images, seed 42), eval-prepared
    images, labels = synthetic.letters(4, 0, True)
    first = torch.randperm(104, generator=torch.Generator().manual_seed(42))[:32]
    got_x, got_y = torch.cat([x for x, _ in epochs[1]]), torch.cat([y for _, y in epochs[1]])
    assert got_y.tolist() == (labels[first] - 1).tolist()
    mean, std = torch.tensor([0.1125]), torch.tensor([0.2285])
    torch.testing.assert_close(got_x, augment_batch(images[first].unsqueeze(1), 28, mean, std, None), atol=1e-5, rtol=0)
    # a resumed epoch goes on with the second batch
    train.set_epoch(4, start_batch=1)
    rest = list(train)
    assert len(rest) == 1 and torch.equal(rest[0][0], epochs[1][1][0])
    # validation is untouched: every validation image, in order
    assert sum(len(y) for _, y in loaders["val"]) == 104 - int(0.85 * 104)


def test_debug_overfit_drives_the_training_loss_down(tmp_path):
    # measured on a CPU: 3.34 -> 0.17 in 6 epochs (without overfit_batches, 12 epochs: 3.65 -> 2.68)
    res = execute_run(overfit_cfg(tmp_path, "trainer.epochs=6", "trainer.patience=6"), tmp_path / "run")
    assert res["status"] == "done" and res["epochs_run"] == 6
    loss = list(pd.read_csv(tmp_path / "run" / "epochs.csv")["train_loss"])
    assert loss[-1] < 0.25 * loss[0], loss
