"""dataset=image_folder (SPEC §4): a user's folder of class sub-folders, with a seeded held-out test
set, or with its own train/ and test/ sub-folders; the class count is inferred; bad roots are
refused with a ConfigError naming dataset.root."""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from coupled_net import data, imagecheck
from coupled_net.errors import ConfigError, RunRefused
from coupled_net.build import prepare_config
from coupled_net.identify import identity_of
from coupled_net.identity import differences
from coupled_net.lifecycle import execute_run

from helpers import REPO, compose_cfg, run_cli, snapshot

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
    results = execute_run(cfg, run_dir)
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
        execute_run(folder_cfg(root), run_dir)
    assert err.value.key == "dataset.root"
    assert str(root) in str(err.value)
    assert "found 1" in str(err.value)
    assert not (run_dir / "checkpoints").exists()


def test_nonexistent_root_is_refused(tmp_path):
    root = tmp_path / "does_not_exist"
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        execute_run(folder_cfg(root), run_dir)
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
    first = execute_run(folder_cfg(root, "trainer.epochs=1", "trainer.batch_size=8", "trainer.num_workers=0"), tmp_path / "run")
    rows = (tmp_path / "run" / "epochs.csv").read_bytes()
    # num_classes is inferred again before the "already done" check, so the config is recognised as the same
    again = execute_run(folder_cfg(root, "trainer.epochs=1", "trainer.batch_size=8", "trainer.num_workers=0"), tmp_path / "run")
    assert again == first and (tmp_path / "run" / "epochs.csv").read_bytes() == rows


# ---- the images are the run's data, so they are part of its identity (issue 18, item 1) ------------

def fingerprint_of(root: Path) -> str:
    return identity_of(folder_cfg(root)).fingerprint


def test_a_copied_or_moved_image_folder_is_the_same_run(flat_root, tmp_path):
    root, _ = flat_root
    before = identity_of(folder_cfg(root))
    assert before.keys["dataset.contents.classes"] == CLASSES and before.keys["dataset.contents.images"] == 36
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # other mtimes, other inodes, another root
    data.image_folder_sources(folder_cfg(copy).dataset, 0)  # the decoding check's cache beside the images is not an image
    assert fingerprint_of(copy) == before.fingerprint
    moved = tmp_path / "moved"
    copy.rename(moved)
    assert fingerprint_of(moved) == before.fingerprint


@pytest.mark.parametrize("change, key", [
    (lambda root: (root / "cross" / "000.png").write_bytes((root / "cross" / "000.png").read_bytes() + b"\0"),
     "dataset.contents.digest"),                                                        # a file resized
    (lambda root: (root / "cross" / "000.png").rename(root / "cross" / "900.png"), "dataset.contents.digest"),
    (lambda root: (root / "cross" / "000.png").unlink(), "dataset.contents.images"),     # a file removed
    (lambda root: (root / "cross").rename(root / "plus"), "dataset.contents.classes"),  # a class renamed
], ids=["resized", "renamed", "removed", "class-renamed"])
def test_a_changed_image_folder_is_another_run_and_the_difference_is_named(flat_root, change, key):
    root, _ = flat_root
    before = identity_of(folder_cfg(root))
    change(root)
    after = identity_of(folder_cfg(root))
    assert after.fingerprint != before.fingerprint
    assert key in [line.split(":")[0] for line in differences(before.keys, after.keys)]


def test_another_folder_in_a_finished_or_interrupted_run_directory_is_refused_unchanged(flat_root, tmp_path):
    root, _ = flat_root
    other = tmp_path / "other"
    for cls in ("x", "y"):
        (other / cls).mkdir(parents=True)
        for k in range(12):
            Image.fromarray(pattern("circle" if cls == "x" else "stripes", k), mode="L").save(other / cls / f"{k}.png")
    run_dir = tmp_path / "run"
    assert execute_run(folder_cfg(root), run_dir)["status"] == "done"
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "status": "interrupted"}))  # as a kill leaves it
    before = snapshot(run_dir)
    with pytest.raises(RunRefused) as err:
        execute_run(folder_cfg(other), run_dir)
    assert 'dataset.contents.classes: ["circle", "cross", "stripes"] → ["x", "y"]' in str(err.value)
    assert snapshot(run_dir) == before


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
        execute_run(cfg, tmp_path / "run")


# ---- every file is checked to decode before training (issue 11) --------------------------------

@pytest.fixture(autouse=True)
def user_cache_dir(tmp_path, monkeypatch) -> Path:
    """The user cache directory (a read-only root's image-check cache) inside tmp_path, never ~/.cache."""
    cache = tmp_path / "user_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def write_bad_files(root: Path) -> dict[str, Path]:
    """A truncated JPEG, a zero-byte PNG and a text file named .png: files ImageFolder takes and PIL cannot decode."""
    whole = root / "whole.jpg"
    Image.fromarray(pattern("circle", 0), mode="L").save(whole, quality=95)
    truncated = root / "train" / "circle" / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    whole.unlink()
    empty = root / "train" / "cross" / "empty.png"
    empty.write_bytes(b"")
    text = root / "test" / "stripes" / "notes.png"
    text.write_text("these are my notes, not an image\n")
    return {"truncated": truncated, "empty": empty, "text": text}


def write_junk(root: Path) -> None:
    """What real folders hold besides images: all of it is ignored by the scan, so never checked."""
    (root / "README.txt").write_text("my dataset\n")
    for folder in (root / "train" / "circle", root / "test" / "cross"):
        (folder / "README.txt").write_text("about this class\n")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")


@pytest.fixture
def bad_root(split_root) -> tuple[Path, list[Path], list[Path], dict[str, Path]]:
    root, train_files, test_files = split_root
    return root, train_files, test_files, write_bad_files(root)


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The paths PIL is asked to decode, in any order (the check runs in threads)."""
    calls, real = [], imagecheck.decode_problem

    def counting(path):
        calls.append(Path(path).name)
        return real(path)
    monkeypatch.setattr(imagecheck, "decode_problem", counting)
    return calls


def splits_of(root: Path, *extra: str):
    cfg = folder_cfg(root, *extra)
    prepare_config(cfg)
    return data.build_splits(cfg.dataset, 28, cfg.seed)


def test_non_image_and_hidden_files_are_ignored_not_refused(split_root, decodes):
    root, train_files, test_files = split_root
    write_junk(root)
    splits = splits_of(root)
    assert len(splits.train) + len(splits.val) == 30 and len(splits.test) == 12
    assert sorted(decodes) == sorted(f.name for f in train_files + test_files)


def test_bad_images_in_any_split_are_refused_in_one_line_naming_each(bad_root):
    root = bad_root[0]
    write_junk(root)
    with pytest.raises(ConfigError) as err:
        splits_of(root)
    assert str(err.value) == (
        f"dataset.root='{root}': 3 unreadable images (test/stripes/notes.png: not an image PIL can read; "
        "train/circle/truncated.jpg: truncated; train/cross/empty.png: empty file): fix or remove them, "
        "or set dataset.skip_bad_images=true")


def test_more_than_five_bad_images_are_named_five_and_counted(flat_root):
    root, _ = flat_root
    for k in range(7):
        (root / "cross" / f"bad{k}.png").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        splits_of(root)
    assert str(err.value) == (
        f"dataset.root='{root}': 7 unreadable images (cross/bad0.png: empty file; cross/bad1.png: empty file; "
        "cross/bad2.png: empty file; cross/bad3.png: empty file; cross/bad4.png: empty file; and 2 more): "
        "fix or remove them, or set dataset.skip_bad_images=true")


def test_skip_bad_images_leaves_out_exactly_the_bad_files_with_one_warning(bad_root, caplog):
    root, train_files, test_files, bad = bad_root
    with caplog.at_level("WARNING", logger="coupled_net"):
        splits = splits_of(root, "dataset.skip_bad_images=true")
    train_paths = {Path(p) for p in splits.train.source.paths}
    assert train_paths == set(train_files) and len(splits.train) + len(splits.val) == 30
    assert {Path(p) for p in splits.test.source.paths} == set(test_files) and len(splits.test) == 12
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"dataset.root={root}: leaving out 3 unreadable images (test/stripes/notes.png: not an image PIL can read; "
        "train/circle/truncated.jpg: truncated; train/cross/empty.png: empty file) (dataset.skip_bad_images=true)"]
    # labels still follow the folders once files are left out
    for src in (splits.train.source, splits.test.source):
        assert all(CLASSES[int(label)] == Path(p).parent.name for p, label in zip(src.paths, src.labels))


def test_skip_bad_images_must_be_true_or_false(split_root):
    with pytest.raises(ConfigError) as err:
        splits_of(split_root[0], "dataset.skip_bad_images=maybe")
    assert str(err.value) == "dataset.skip_bad_images='maybe': allowed: true, false"


def test_a_second_check_decodes_nothing_and_a_changed_file_is_decoded_again(bad_root, decodes):
    root, train_files, test_files, bad = bad_root
    with pytest.raises(ConfigError) as first:
        splits_of(root)
    assert len(decodes) == 30 + 12 + 3
    assert (root / ".coupled_net_image_check.json").is_file()

    decodes.clear()  # the same files: the verdicts, bad ones included, come from the cache
    with pytest.raises(ConfigError) as second:
        splits_of(root)
    assert str(second.value) == str(first.value) and decodes == []

    bad["empty"].unlink()  # fixed by the user; another file changes size, a third only its mtime
    Image.fromarray(pattern("cross", 50), mode="L").save(train_files[0])
    st = test_files[0].stat()
    os.utime(test_files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    bad["text"].write_text("still not an image, and longer than before\n")
    with pytest.raises(ConfigError) as third:
        splits_of(root)
    assert sorted(decodes) == sorted([train_files[0].name, test_files[0].name, "notes.png"])
    assert "2 unreadable images (test/stripes/notes.png: not an image PIL can read; train/circle/truncated.jpg: " \
        "truncated)" in str(third.value)


def test_a_read_only_root_keeps_the_verdicts_in_the_user_cache(split_root, decodes, monkeypatch, user_cache_dir):
    root = split_root[0]
    real = imagecheck.atomic_write

    def read_only_root(path, write):
        if Path(path).parent == root:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, write)
    monkeypatch.setattr(imagecheck, "atomic_write", read_only_root)
    splits_of(root)
    assert len(decodes) == 42
    assert not (root / ".coupled_net_image_check.json").exists()
    assert len(list((user_cache_dir / "coupled_net" / "image_check").glob("*.json"))) == 1
    decodes.clear()
    splits_of(root)
    assert decodes == []


def test_a_cache_that_cannot_be_saved_or_read_does_not_fail_the_run(split_root, decodes, monkeypatch, caplog):
    root = split_root[0]
    (root / ".coupled_net_image_check.json").write_text('{"version": 1, "files": {"train/circ')  # a torn file

    def full_disk(path, write):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(imagecheck, "atomic_write", full_disk)
    with caplog.at_level("WARNING", logger="coupled_net"):
        splits = splits_of(root)
    assert len(splits.test) == 12 and len(decodes) == 42
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("could not save the image check (")
    assert warnings[0].endswith("No space left on device); the next run checks the images again")


def test_a_corrupt_test_image_is_refused_before_the_first_epoch(split_root, tmp_path):
    root, _, test_files = split_root
    whole = test_files[0].read_bytes()
    (root / "test" / "cross" / "broken.png").write_bytes(whole[:len(whole) // 2])  # an interrupted copy
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        execute_run(folder_cfg(root, "trainer.epochs=3"), run_dir)
    line = (f"dataset.root='{root}': 1 unreadable image (test/cross/broken.png: truncated): fix or remove them, "
            "or set dataset.skip_bad_images=true")
    assert str(err.value) == line
    assert not (run_dir / "epochs.csv").exists()
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == line and results["epochs_run"] == 0


@pytest.mark.slow
def test_the_command_line_ends_with_the_refusal_line_before_training(bad_root, tmp_path):
    root = bad_root[0]
    proc = run_cli("dataset=image_folder", f"dataset.root={root}", "model=small_cnn", "model.input_size=28",
                   "trainer.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"coupled_net: error: dataset.root='{root}': 3 unreadable images (test/stripes/notes.png: not an image PIL "
        "can read; train/circle/truncated.jpg: truncated; train/cross/empty.png: empty file): fix or remove them, "
        "or set dataset.skip_bad_images=true")
    assert not (tmp_path / "run" / "epochs.csv").exists()


def test_prepare_checks_every_image_so_training_decodes_none_again(split_root, decodes):
    root = split_root[0]
    cfg = folder_cfg(root)
    assert data.prepare(cfg.dataset) == (f"image_folder at {root}: 3 classes, 30 train+val, 12 test images, "
                                         "every one checked to decode")
    assert len(decodes) == 42
    decodes.clear()
    splits_of(root)
    assert decodes == []


def test_runs_that_check_the_same_folder_at_once_decode_each_file_once(split_root, decodes, monkeypatch):
    root = split_root[0]
    # both runs have looked for cached verdicts (and found none) before either decodes anything
    both_looked, real, calls = threading.Barrier(2), imagecheck._read_verdicts, []

    def read_verdicts(path):
        calls.append(path)
        if len(calls) <= 2:
            both_looked.wait(timeout=60)
        return real(path)
    monkeypatch.setattr(imagecheck, "_read_verdicts", read_verdicts)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: imagecheck.check_images(root, [str(f) for f in split_root[1]]), range(2)))
    assert results == [{}, {}]
    assert sorted(decodes) == sorted(f.name for f in split_root[1])


@pytest.mark.slow
def test_a_sweep_relaunched_on_another_folder_is_refused_and_two_folders_sweeps_are_both_reviewed(flat_root, tmp_path):
    """The issue's repro: a sweep on folder A, then the same command on folder B into the same sweep
    directory, answered "already done" with A's numbers; and collecting A's and B's sweeps dropped B's."""
    a, _ = flat_root
    b = tmp_path / "b"
    for cls in ("x", "y"):
        for k in range(12):
            (b / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pattern("circle" if cls == "x" else "cross", k), mode="L").save(b / cls / f"{k}.png")
    sweep = ("-m", "experiment=quickstart", "trainer.epochs=1", "dataset=image_folder", "trainer.batch_size=8",
             "coupling.alpha=0,2", "trainer.num_workers=0")
    first = run_cli(*sweep, f"dataset.root={a}", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(tmp_path / "s")
    again = run_cli(*sweep, f"dataset.root={b}", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert again.returncode != 0 and "already done" not in again.stdout + again.stderr
    assert 'dataset.contents.classes: ["circle", "cross", "stripes"] → ["x", "y"]' in again.stderr
    assert snapshot(tmp_path / "s") == before  # refused before anything was written

    other = run_cli(*sweep, f"dataset.root={b}", f"hydra.sweep.dir={tmp_path / 't'}", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-2000:]
    review = run_cli(str(tmp_path / "s"), str(tmp_path / "t"), "--out", str(tmp_path / "out"),
                     script=REPO / "launch" / "collect.py", cwd=tmp_path)
    assert review.returncode == 0, review.stderr[-2000:]
    runs = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert len(runs) == 4 and runs["duplicate_of"].isna().all()
    groups = pd.read_csv(tmp_path / "out" / "summary_groups.csv")
    assert len(groups) == 4 and set(groups["n"]) == {1}  # A's and B's runs are other groups, none dropped
