"""dataset=image_folder (SPEC §4): a user's folder of class sub-folders, with a seeded held-out test
set, or with its own train/ and test/ sub-folders; the class count is inferred; bad roots are
refused with a ConfigError naming dataset.root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coupled_net import data
from coupled_net.errors import ConfigError
from coupled_net.build import prepare_config
from coupled_net.run import run

from helpers import compose_cfg

CLASSES = ["circle", "cross", "stripes"]
SIZE = 28


def pattern(cls: str, k: int) -> np.ndarray:
    """A 28x28 uint8 grayscale image: a different simple shape per class, shifted by k."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    shift = k % 5 - 2
    if cls == "circle":
        mask = (ys - 14 - shift) ** 2 + (xs - 14 + shift) ** 2 <= (6 + k % 3) ** 2
    elif cls == "cross":
        mask = (abs(ys - 14 - shift) <= 1 + k % 2) | (abs(xs - 14 - shift) <= 1 + k % 2)
    else:
        mask = ((ys + shift) // 3) % 2 == 0
    img = np.where(mask, 230, 20).astype(np.uint8)
    return img


def write_class_folders(root: Path, per_class: int, start: int = 0) -> list[Path]:
    """root/<class>/<n>.png for every class; returns the files written."""
    files = []
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(start, start + per_class):
            path = root / cls / f"{k:03d}.png"
            Image.fromarray(pattern(cls, k), mode="L").save(path)
            files.append(path)
    return files


def folder_cfg(root: Path, *extra: str):
    return compose_cfg("dataset=image_folder", f"dataset.root='{root}'", "model=small_cnn",
                       "model.input_size=28", "trainer.epochs=1", "trainer.batch_size=8",
                       "trainer.num_workers=0", *extra)


def indices(split) -> set[int]:
    return {int(i) for i in split.indices}


def check_end_to_end(cfg, run_dir: Path) -> None:
    results = run(cfg, run_dir)
    assert results["status"] == "done", results["error"]
    assert results["epochs_run"] == 1
    assert results["model"] == "small_cnn" and results["dataset"] == "image_folder"
    assert set(results["metrics"]) == {"val", "test"}
    assert cfg.dataset.num_classes == 3 and cfg.model.num_classes == 3
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["classifier.4.weight"].shape[0] == 3
    assert state["features.0.weight"].shape[1] == 1


# ---- (a) root/<class>/*.png: a seeded test_fraction is held out ------------------------------

@pytest.fixture
def flat_root(tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "images"
    return root, write_class_folders(root, per_class=12)


def test_flat_layout_infers_classes_and_holds_out_a_seeded_test_set(flat_root):
    root, files = flat_root
    n = len(files)
    assert n == 36
    cfg = folder_cfg(root)
    assert cfg.dataset.num_classes is None
    prepare_config(cfg)
    assert cfg.dataset.num_classes == 3
    assert cfg.model.num_classes == 3  # by interpolation from the dataset

    splits = data.build_splits(cfg.dataset, 28, cfg.seed)
    sizes = len(splits.train), len(splits.val), len(splits.test)
    assert sum(sizes) == n
    n_test = max(1, round(0.15 * n))
    assert n_test == 5
    n_train = int((1 - 0.15) * (n - n_test))
    assert sizes == (n_train, n - n_test - n_train, n_test) == (26, 5, 5)

    # all three splits index the same source, the whole folder, with no overlap
    assert splits.train.source is splits.test.source and splits.val.source is splits.test.source
    assert len(splits.test.source) == n
    train, val, test = indices(splits.train), indices(splits.val), indices(splits.test)
    assert len(train) == sizes[0] and len(val) == sizes[1] and len(test) == sizes[2]
    assert not test & (train | val)
    assert not train & val
    assert train | val | test == set(range(n))
    assert {Path(p).resolve() for p in splits.test.source.paths} == {f.resolve() for f in files}

    # labels follow the folders (0..2) and every image reads as a 1x28x28 tensor
    image, label = splits.test[0]
    assert tuple(image.shape) == (1, 28, 28)
    assert label in (0, 1, 2)
    assert sorted(set(splits.test.source.labels.tolist())) == [0, 1, 2]

    # the same seed gives the same split; another seed another one
    again = data.build_splits(cfg.dataset, 28, cfg.seed)
    assert indices(again.test) == test and indices(again.train) == train and indices(again.val) == val
    assert torch.equal(again.test.indices, splits.test.indices)
    other = data.build_splits(cfg.dataset, 28, cfg.seed + 1)
    assert len(other.test) == n_test
    assert indices(other.test) != test


def test_flat_layout_test_fraction_is_configurable(flat_root):
    root, files = flat_root
    cfg = folder_cfg(root, "dataset.test_fraction=0.5")
    prepare_config(cfg)
    splits = data.build_splits(cfg.dataset, 28, cfg.seed)
    assert len(splits.test) == 18
    assert len(splits.train) + len(splits.val) == 18


def test_flat_layout_trains_end_to_end(flat_root, tmp_path):
    root, _ = flat_root
    run_dir = tmp_path / "run"
    check_end_to_end(folder_cfg(root), run_dir)


# ---- (b) root/train/<class> and root/test/<class> ----------------------------------------------

@pytest.fixture
def split_root(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path / "images"
    train_files = write_class_folders(root / "train", per_class=10)
    test_files = write_class_folders(root / "test", per_class=4, start=100)
    return root, train_files, test_files


def test_train_test_layout_uses_the_test_folder_as_test_set(split_root):
    root, train_files, test_files = split_root
    cfg = folder_cfg(root)
    prepare_config(cfg)
    assert cfg.dataset.num_classes == 3

    splits = data.build_splits(cfg.dataset, 28, cfg.seed)
    assert len(splits.test) == len(test_files) == 12
    assert len(splits.train) + len(splits.val) == len(train_files) == 30
    assert splits.test.source is not splits.train.source
    test_paths = {Path(splits.test.source.paths[i]).resolve() for i in indices(splits.test)}
    assert test_paths == {f.resolve() for f in test_files}
    train_paths = {Path(splits.train.source.paths[i]).resolve() for i in indices(splits.train) | indices(splits.val)}
    assert train_paths == {f.resolve() for f in train_files}
    assert not indices(splits.train) & indices(splits.val)
    # test labels follow the same class order as train
    for i in indices(splits.test):
        assert CLASSES[int(splits.test.source.labels[i])] == Path(splits.test.source.paths[i]).parent.name


def test_train_test_layout_trains_end_to_end(split_root, tmp_path):
    root, _, _ = split_root
    check_end_to_end(folder_cfg(root), tmp_path / "run")


# ---- bad roots ---------------------------------------------------------------------------------

def test_root_with_one_class_folder_is_refused(tmp_path):
    root = tmp_path / "one_class"
    (root / "only").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(pattern("circle", k), mode="L").save(root / "only" / f"{k}.png")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run(folder_cfg(root), run_dir)
    assert err.value.key == "dataset.root"
    assert str(root) in str(err.value)
    assert "found 1" in str(err.value)
    assert not (run_dir / "checkpoints").exists()


def test_nonexistent_root_is_refused(tmp_path):
    root = tmp_path / "does_not_exist"
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run(folder_cfg(root), run_dir)
    assert err.value.key == "dataset.root"
    assert str(root) in str(err.value)
    assert not root.exists()
    assert not (run_dir / "checkpoints").exists()
    # the same error when only the config is prepared
    cfg = folder_cfg(root)
    with pytest.raises(ConfigError) as err:
        prepare_config(cfg)
    assert err.value.key == "dataset.root" and str(root) in str(err.value)


def test_a_finished_image_folder_run_is_not_run_again(flat_root, tmp_path):
    root, _ = flat_root
    first = run(folder_cfg(root, "trainer.epochs=1", "trainer.batch_size=8", "trainer.num_workers=0"), tmp_path / "run")
    rows = (tmp_path / "run" / "epochs.csv").read_bytes()
    # num_classes is inferred again before the "already done" check, so the config is recognised as the same
    again = run(folder_cfg(root, "trainer.epochs=1", "trainer.batch_size=8", "trainer.num_workers=0"), tmp_path / "run")
    assert again == first and (tmp_path / "run" / "epochs.csv").read_bytes() == rows


def test_too_few_images_for_the_splits_is_refused(tmp_path):
    write_class_folders(tmp_path / "tiny", per_class=1)
    cfg = folder_cfg(tmp_path / "tiny", "dataset.val_fraction=0.9")  # 3 images: 1 test, 2 left, int(0.1*2) = 0 train
    prepare_config(cfg)
    with pytest.raises(ConfigError) as err:
        data.build_splits(cfg.dataset, 28, 0)
    assert err.value.key == "dataset.root" and "too few images for the splits (train 0" in str(err.value)


def test_image_folder_without_a_root_names_the_key(tmp_path):
    cfg = compose_cfg("dataset=image_folder", "model=small_cnn")
    with pytest.raises(ConfigError, match=r"^dataset.root='\?\?\?': is required here"):
        run(cfg, tmp_path / "run")
