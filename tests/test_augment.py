"""The batched tensor pipeline: parameters follow the seed's ranges, pixels move as torchvision's
functional transforms move them, output shape/dtype/normalization, determinism per seed."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from coupled_net import data, loaders
from coupled_net.augment import (AffineRanges, CropFlip, Letters, NoAugment, RandomPadCrop, affine_theta,
                                 augment_batch, pad_crop_flip, sample_crop_params, sample_params, warp)
from coupled_net.errors import ConfigError
from coupled_net.lifecycle import execute_run
from helpers import compose_cfg

BILINEAR = InterpolationMode.BILINEAR


def params(flip=False, angle=0.0, tx=0.0, ty=0.0, scale=1.0, shear=0.0):
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return {"flip": torch.tensor([flip]), "angle": one(angle), "tx": one(tx), "ty": one(ty), "scale": one(scale),
            "shear": one(shear)}


@pytest.fixture
def crafted():
    """An asymmetric image: a bright block up right, a dim bar down left."""
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 5:12, 16:24] = 1.0
    img[0, 0, 18:22, 4:9] = 0.5
    return img


def test_parameters_follow_the_seeds_ranges():
    p = sample_params(20000, torch.Generator().manual_seed(0))
    r = AffineRanges()
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.02
    for key, (lo, hi) in {"angle": (-20, 20), "tx": (-0.1, 0.1), "ty": (-0.1, 0.1), "scale": (0.8, 1.2),
                          "shear": (-10, 10)}.items():
        v = p[key]
        assert lo <= v.min().item() and v.max().item() <= hi, key
        # uniform: mean at the centre, standard deviation (hi - lo) / sqrt(12), both within sampling error
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo), key
        assert abs(v.std().item() - (hi - lo) / math.sqrt(12)) < 0.02 * (hi - lo), key
    assert (r.degrees, r.translate, r.scale, r.shear) == (20.0, 0.1, (0.8, 1.2), 10.0)


@pytest.mark.parametrize("case", [
    dict(flip=True),
    dict(angle=15.0), dict(angle=-20.0),
    dict(tx=0.1, ty=-0.05), dict(scale=0.8), dict(scale=1.2), dict(shear=10.0),
    dict(tx=-0.07, ty=0.04, scale=1.1, shear=-7.0),
])
def test_each_transform_moves_pixels_as_torchvision_does(crafted, case):
    ours = warp(crafted, affine_theta(params(**case)))
    if case.get("flip"):
        ref = TF.horizontal_flip(crafted)
    else:
        ref = TF.affine(crafted, angle=case.get("angle", 0.0), translate=[case.get("tx", 0) * 28, case.get("ty", 0) * 28],
                        scale=case.get("scale", 1.0), shear=[case.get("shear", 0.0), 0.0], interpolation=BILINEAR)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_the_composition_is_flip_then_rotation_then_affine(crafted):
    case = dict(flip=True, angle=-12.0, tx=-0.08, ty=0.03, scale=0.85, shear=-9.0)
    ours = warp(crafted, affine_theta(params(**case)))
    ref = TF.affine(TF.horizontal_flip(crafted), angle=-12.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                    interpolation=BILINEAR)
    ref = TF.affine(ref, angle=0.0, translate=[-0.08 * 28, 0.03 * 28], scale=0.85, shear=[-9.0, 0.0],
                    interpolation=BILINEAR)
    # torchvision interpolates twice, we once: equal up to that extra blur
    assert (ours - ref).abs().mean().item() < 0.01
    assert torch.allclose(ours.sum(), ref.sum(), rtol=0.05)
    wrong_order = warp(crafted, affine_theta(params(angle=-12.0, tx=-0.08, ty=0.03, scale=0.85, shear=-9.0)))
    assert (wrong_order - ref).abs().mean().item() > 5 * (ours - ref).abs().mean().item()


@pytest.mark.parametrize("size", [28, 64, 224])
def test_output_shape_dtype_and_normalization(size):
    u8 = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    mean, std = torch.tensor([0.25]), torch.tensor([0.5])
    plain = augment_batch(u8, size, mean, std, None)
    assert plain.shape == (16, 1, size, size) and plain.dtype == torch.float32
    if size == 28:  # no warp, no resize: exactly (x / 255 - mean) / std
        torch.testing.assert_close(plain, (u8.float() / 255 - 0.25) / 0.5)
    else:  # the seed's eval transform: a bilinear resize, then normalize
        ref = TF.normalize(TF.resize(u8.float() / 255, [size, size], interpolation=BILINEAR, antialias=False),
                          [0.25], [0.5])
        torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)
    augmented = augment_batch(u8, size, mean, std, torch.Generator().manual_seed(0))
    assert augmented.shape == (16, 1, size, size) and augmented.dtype == torch.float32
    assert augmented.min() >= (0 - 0.25) / 0.5 - 1e-5 and augmented.max() <= (1 - 0.25) / 0.5 + 1e-5
    assert augment_batch(u8, size, mean, std, None, dtype=torch.bfloat16).dtype == torch.bfloat16


def _direct_warp_by_hand(u8, size, mean, std, seed):
    """The GPU path's formula, written out: per-sample affine matrices from the seed's draws, one
    bilinear sample of the size x size output grid from the stored image, then normalize."""
    n = u8.shape[0]
    theta = affine_theta(sample_params(n, torch.Generator().manual_seed(seed)))
    grid = torch.nn.functional.affine_grid(theta, [n, u8.shape[1], size, size], align_corners=False)
    x = torch.nn.functional.grid_sample(u8.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


@pytest.mark.parametrize("shape,size", [((6, 1, 28, 28), 224), ((5, 3, 20, 36), 64), ((4, 1, 28, 28), 28)])
def test_a_cpu_batch_is_the_gpu_formula_one_warp_to_the_input_size(shape, size):
    # trainer.device is not part of a run's identity: a CPU run must see the images a GPU run sees
    # (before, the CPU warped at the stored size and resized after: a second bilinear pass)
    u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = torch.full((shape[1],), 0.2), torch.full((shape[1],), 0.4)
    ours = augment_batch(u8, size, mean, std, torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, _direct_warp_by_hand(u8, size, mean, std, seed=9), atol=1e-4, rtol=0)
    if size != shape[2] and shape[2] == shape[3]:  # the old CPU path (warp at the stored size, resize) differs
        two_passes = torch.nn.functional.interpolate(_direct_warp_by_hand(u8, shape[2], mean, std, seed=9),
                                                     size=(size, size), mode="bilinear", align_corners=False)
        assert (ours - two_passes).abs().max() > 0.05


@pytest.mark.requires_gpu
def test_a_gpu_batch_equals_the_cpu_batch_of_the_same_seed():
    u8 = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor([0.2]), torch.tensor([0.4])
    cpu = augment_batch(u8, 224, mean, std, torch.Generator().manual_seed(5))
    gpu = augment_batch(u8.cuda(), 224, mean.cuda(), std.cuda(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)


def tensor_loader(seed):
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    split = data.SplitDataset(data.ArraySource(images, torch.arange(300) % 26 + 1), torch.arange(300), None, 1)
    return loaders.TensorLoader(split, torch.device("cpu"), 56, [0.5], [0.5], 64, True, seed)


def test_the_pipeline_is_deterministic_for_a_seed_and_differs_across_seeds():
    def epoch(seed, e):
        loader = tensor_loader(seed)
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]
    a, b, c, d = epoch(0, 1), epoch(0, 1), epoch(1, 1), epoch(0, 2)
    assert len(a) == 5 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], d[0][0])  # other seed, other epoch


def test_a_resumed_epoch_yields_the_remaining_batches_unchanged():
    loader = tensor_loader(3)
    loader.set_epoch(4)
    whole = [x.clone() for x, _ in loader]
    loader.set_epoch(4, start_batch=2)
    rest = [x.clone() for x, _ in loader]
    assert len(rest) == len(whole) - 2 and all(torch.equal(p, q) for p, q in zip(rest, whole[2:]))


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_both_pipelines_run_a_quickstart_epoch(tmp_path, pipeline):
    cfg = compose_cfg("experiment=quickstart", f"dataset.pipeline={pipeline}", "dataset.train_per_class=20",
                      "dataset.test_per_class=5", "trainer.epochs=1", f"dataset.root={tmp_path}")
    res = execute_run(cfg, tmp_path / "run")
    assert res["status"] == "done" and res["epochs_run"] == 1
    assert 0 <= res["metrics"]["test"]["top1"] <= res["metrics"]["test"]["top5"] <= 100


@pytest.mark.parametrize("n, world, shuffle, start", [(10, 1, True, 0), (10, 3, True, 2), (10, 3, False, 1),
                                                      (7, 2, False, 0), (5, 4, True, 3)])
def test_the_sampler_length_is_what_it_yields(n, world, shuffle, start):
    for rank in range(world):
        sampler = loaders.EpochSampler(n, shuffle, seed=0, rank=rank, world_size=world)
        sampler.set_epoch(1, start)
        assert len(sampler) == len(list(sampler))


# ---- the augment group: Letters, CropFlip, NoAugment ------------------------------------------

ZERO, ONE = torch.tensor([0.0]), torch.tensor([1.0])  # mean 0, std 1: a pipeline's output is pixel / 255


def test_letters_defaults_draw_exactly_what_the_seeds_tensor_pipeline_draws():
    u8 = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    ours = Letters().batch(u8, 28, ZERO, ONE, torch.Generator().manual_seed(3))
    seed = augment_batch(u8, 28, ZERO, ONE, torch.Generator().manual_seed(3))
    assert torch.equal(ours, seed)
    assert Letters() == Letters(0.5, 20.0, 0.1, [0.8, 1.2], 10.0)  # a YAML list is kept as a tuple


def test_letters_configured_with_only_a_certain_flip_mirrors_every_image():
    u8 = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(3, 1, 1, 1)
    out = Letters(flip_p=1.0, degrees=0, translate=0, scale=[1, 1], shear=0).batch(
        u8, 4, ZERO, ONE, torch.Generator().manual_seed(0))
    row0 = [3, 2, 1, 0]  # the first row 0 1 2 3, mirrored
    assert (out[:, 0, 0] * 255).round().tolist() == [row0] * 3


def test_letters_parameters_follow_the_configured_ranges():
    r = Letters(flip_p=0.2, degrees=5, translate=0.3, scale=[0.5, 0.6], shear=2)
    p = sample_params(20000, torch.Generator().manual_seed(1), r)
    assert abs(p["flip"].double().mean().item() - 0.2) < 0.02
    for key, (lo, hi) in {"angle": (-5, 5), "tx": (-0.3, 0.3), "ty": (-0.3, 0.3), "scale": (0.5, 0.6),
                          "shear": (-2, 2)}.items():
        assert lo <= p[key].min().item() and p[key].max().item() <= hi, key
        assert p[key].max().item() - p[key].min().item() > 0.95 * (hi - lo), key  # the whole range is used


def test_crop_flip_offsets_cover_zero_to_twice_the_padding_and_flips_come_with_probability_p():
    p = sample_crop_params(20000, torch.Generator().manual_seed(0), padding=3, flip_p=0.3)
    for key in ("top", "left"):
        assert sorted(p[key].unique().tolist()) == [0, 1, 2, 3, 4, 5, 6], key
        assert abs(p[key].double().mean().item() - 3.0) < 0.05, key  # uniform on 0..6
    assert abs(p["flip"].double().mean().item() - 0.3) < 0.02


def test_crop_flip_pads_with_zeros_crops_and_flips_as_computed_by_hand():
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 4, 4)   # 1 2 3 4 / 5 6 7 8 / ...
    images = torch.stack([torch.cat([image, image + 100])] * 2)     # 2 images, 2 channels
    params = {"top": torch.tensor([0, 2]), "left": torch.tensor([2, 0]), "flip": torch.tensor([False, True])}
    out = pad_crop_flip(images, 1, params)
    # image 0: the padded 6x6 image's rows 0..3, columns 2..5: a zero row on top, a zero column right
    assert out[0, 0].tolist() == [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]
    assert out[0, 1].tolist() == [[0, 0, 0, 0], [102, 103, 104, 0], [106, 107, 108, 0], [110, 111, 112, 0]]
    # image 1: rows 2..5, columns 0..3 (0 5 6 7 / 0 9 10 11 / 0 13 14 15 / 0 0 0 0), then mirrored
    assert out[1, 0].tolist() == [[7, 6, 5, 0], [11, 10, 9, 0], [15, 14, 13, 0], [0, 0, 0, 0]]
    assert out.dtype == torch.uint8 and out.shape == (2, 2, 4, 4)


def every_crop(image, padding, flips=True):
    """Every window the CropFlip of `image` [h, w] may give (mirrored too, with `flips`), by numpy."""
    import numpy as np

    a = np.pad(image.numpy(), padding)
    h, w = image.shape
    crops = [a[t:t + h, le:le + w] for t in range(2 * padding + 1) for le in range(2 * padding + 1)]
    mirrored = [np.fliplr(c) for c in crops] if flips else []
    return {tuple(c.flatten().tolist()) for c in crops + mirrored}


def test_crop_flip_tensor_batches_are_the_hand_enumerated_crops_and_use_them_all():
    image = torch.arange(1, 17, dtype=torch.uint8).view(4, 4)
    allowed = every_crop(image, 1)
    assert len(allowed) == 18  # 9 offsets x (flipped or not), all different for this image
    out = CropFlip(padding=1, flip_p=0.5).batch(image.expand(400, 1, 4, 4), 4, ZERO, ONE,
                                                 torch.Generator().manual_seed(0))
    got = [tuple((o * 255).round().int().flatten().tolist()) for o in out]
    assert set(got) == allowed


def test_crop_flip_with_no_padding_and_no_flip_is_the_eval_path():
    u8 = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    out = CropFlip(padding=0, flip_p=0.0).batch(u8, 28, mean, std, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, augment_batch(u8, 28, mean, std, None))


def test_crop_flip_pil_transforms_pad_crop_flip_at_the_stored_size_then_resize_and_normalize():
    crop, flip, resize, to_image, to_float, normalize = CropFlip(padding=4, flip_p=0.25).pil(
        224, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]).transforms
    assert isinstance(crop, RandomPadCrop) and crop.padding == 4
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.25
    assert isinstance(resize, v2.Resize) and list(resize.size) == [224, 224] and resize.antialias is True
    assert isinstance(to_image, v2.ToImage) and isinstance(to_float, v2.ToDtype) and to_float.scale is True
    assert list(normalize.mean) == [0.1, 0.2, 0.3] and list(normalize.std) == [0.4, 0.5, 0.6]


def test_the_pil_random_pad_crop_gives_the_hand_enumerated_crops_of_a_pil_image():
    import numpy as np
    from PIL import Image

    image = torch.arange(1, 17, dtype=torch.uint8).view(4, 4)
    pil = Image.fromarray(image.numpy())
    torch.manual_seed(0)
    got = {tuple(np.asarray(RandomPadCrop(1)(pil)).flatten().tolist()) for _ in range(200)}
    assert got == every_crop(image, 1, flips=False)  # the 9 offsets, no mirror: the flip is the next transform


def test_letters_pil_transforms_carry_the_configured_numbers():
    _, flip, rotation, affine, *_ = Letters(0.3, 7, 0.2, [0.9, 1.1], 4).pil(28, [0.5], [0.5]).transforms
    assert flip.p == 0.3 and list(rotation.degrees) == [-7, 7]
    assert list(affine.translate) == [0.2, 0.2] and list(affine.scale) == [0.9, 1.1] and list(affine.shear) == [-4, 4]


@pytest.mark.parametrize("policy, expected", [
    (lambda: CropFlip(padding=-1), "augment.padding=-1: must be an integer >= 0"),
    (lambda: CropFlip(flip_p=1.5), "augment.flip_p=1.5: must be a number in [0, 1]"),
    (lambda: Letters(translate=1), "augment.translate=1: must be a number in [0, 1)"),
    (lambda: Letters(scale=[1.2, 0.8]), "augment.scale=[1.2, 0.8]: must be a list of two numbers > 0, the smaller first"),
])
def test_a_policy_with_an_impossible_number_is_refused_in_one_line(policy, expected):
    with pytest.raises(ConfigError) as e:
        policy()
    assert str(e.value) == expected


def policy_loader(policy, seed=0, train=True, pipeline="tensor"):
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    src = data.ArraySource(images, torch.arange(40) % 10)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    if pipeline == "tensor":
        split = data.SplitDataset(src, torch.arange(40), None, 0)
        return loaders.TensorLoader(split, torch.device("cpu"), 32, mean, std, 16, train, seed, augment=policy)
    train_tf, eval_tf = data.pil_transforms(32, mean, std, policy)
    split = data.SplitDataset(src, torch.arange(40), train_tf if train else eval_tf, 0)
    return loaders.EpochLoader(split, 16, train, 0, False, seed)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
@pytest.mark.parametrize("policy", [Letters(), CropFlip(padding=4)], ids=["letters", "crop_flip"])
def test_each_policy_is_deterministic_per_seed_and_epoch_in_both_pipelines(pipeline, policy):
    a = epoch_batches(policy_loader(policy, pipeline=pipeline), 1)
    b = epoch_batches(policy_loader(policy, pipeline=pipeline), 1)
    assert len(a) == 3 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = epoch_batches(policy_loader(policy, pipeline=pipeline), 2)
    assert a[0][0].shape == (16, 3, 32, 32) and not torch.equal(a[0][0], c[0][0])
    # the same images as the unaugmented eval path, moved: same labels, other pixels
    plain = {int(y): x for x, y in zip(*epoch_batches(policy_loader(NoAugment(), pipeline=pipeline), 1)[0])}
    assert any(not torch.equal(x, plain[int(y)]) for x, y in zip(*a[0]) if int(y) in plain)


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_augment_none_trains_on_images_prepared_exactly_like_eval_images(pipeline):
    train = policy_loader(NoAugment(), pipeline=pipeline)
    train.set_epoch(3)
    order = train.sampler.positions()[0]
    train_images = torch.cat([x for x, _ in train])
    eval_loader = policy_loader(NoAugment(), train=False, pipeline=pipeline)  # unshuffled: position k is image k
    eval_loader.set_epoch(0)
    eval_images = torch.cat([x for x, _ in eval_loader])
    assert not torch.equal(order, torch.arange(40))  # training is still shuffled
    torch.testing.assert_close(train_images, eval_images[order], atol=0, rtol=0)


def test_the_augment_group_reaches_the_training_loader(tmp_path):
    from coupled_net.build import build_loaders, resolve

    def policy(*overrides):
        spec = resolve(compose_cfg("experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=1",
                                   "trainer.batch_size=8", f"dataset.root={tmp_path}", *overrides))
        return build_loaders(spec)["train"].augment
    assert policy() == Letters()
    assert policy("augment=crop_flip", "augment.padding=2") == CropFlip(padding=2, flip_p=0.5)
    assert policy("augment=none") == NoAugment()


# ---- non-square images; DDP ranks ----------------------------------------------------------------

def test_the_pil_random_pad_crop_keeps_height_and_width_apart_on_a_non_square_image():
    import numpy as np
    from PIL import Image

    image = torch.arange(1, 16, dtype=torch.uint8).view(3, 5)  # 3 rows, 5 columns
    pil = Image.fromarray(image.numpy())
    torch.manual_seed(0)
    crops = [np.asarray(RandomPadCrop(1)(pil)) for _ in range(300)]
    assert {c.shape for c in crops} == {(3, 5)}
    got = {tuple(c.flatten().tolist()) for c in crops}
    assert got == every_crop(image, 1, flips=False)  # the 9 windows of the padded 5 x 7 image
    # the first window by hand: the padded image's rows 0..2, columns 0..4
    assert (0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 0, 6, 7, 8, 9) in got


def test_the_tensor_pad_crop_flip_keeps_height_and_width_apart_on_a_non_square_batch():
    image = torch.arange(1, 16, dtype=torch.uint8).view(3, 5)
    p = sample_crop_params(300, torch.Generator().manual_seed(0), padding=1, flip_p=0.5)
    out = pad_crop_flip(image.expand(300, 1, 3, 5), 1, p)
    assert out.shape == (300, 1, 3, 5)
    assert {tuple(o.flatten().tolist()) for o in out} == every_crop(image, 1)
    one = {"top": torch.tensor([2]), "left": torch.tensor([0]), "flip": torch.tensor([False])}
    assert pad_crop_flip(image.view(1, 1, 3, 5), 1, one)[0, 0].tolist() == [
        [0, 6, 7, 8, 9], [0, 11, 12, 13, 14], [0, 0, 0, 0, 0]]  # rows 2..4, columns 0..4 of the padded image


def rank_loader(policy, pipeline, rank, world_size, n=40):
    """A training loader of `n` copies of one image (so two equal outputs mean equal draws), as DDP rank `rank`."""
    image = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    src = data.ArraySource(image.expand(n, 32, 32, 3).contiguous(), torch.zeros(n, dtype=torch.int64))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    if pipeline == "tensor":
        split = data.SplitDataset(src, torch.arange(n), None, 0)
        return loaders.TensorLoader(split, torch.device("cpu"), 32, mean, std, 8, True, 0, rank, world_size,
                                    augment=policy)
    train_tf, _ = data.pil_transforms(32, mean, std, policy)
    return loaders.EpochLoader(data.SplitDataset(src, torch.arange(n), train_tf, 0), 8, True, 0, False, 0, rank,
                               world_size)


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
@pytest.mark.parametrize("policy", [Letters(), CropFlip(padding=4)], ids=["letters", "crop_flip"])
def test_ddp_ranks_draw_different_augmentations_for_their_samples(pipeline, policy):
    per_rank = []
    for rank in (0, 1):
        images = torch.cat([x for x, _ in epoch_batches(rank_loader(policy, pipeline, rank, 2), 1)])
        assert images.shape == (20, 3, 32, 32)  # 40 samples, 20 per rank
        per_rank.append(images)
    # one image, 40 draws: CropFlip has 9 x 9 offsets x 2 flips, Letters continuous parameters, so
    # rank 1 repeating rank 0's draws would make its batches equal to rank 0's, position by position
    same = [torch.equal(a, b) for a, b in zip(*per_rank)]
    assert sum(same) <= 2, same
    if isinstance(policy, Letters):
        assert len({x.numpy().tobytes() for x in torch.cat(per_rank)}) == 40  # every draw its own
    if pipeline == "pil":  # a sample's draw is its own, whatever rank loads it: the ranks interleave to one process
        alone = torch.cat([x for x, _ in epoch_batches(rank_loader(policy, pipeline, 0, 1), 1)])
        torch.testing.assert_close(torch.stack(per_rank, 1).flatten(0, 1), alone, atol=0, rtol=0)
