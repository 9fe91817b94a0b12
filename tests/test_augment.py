"""The batched tensor pipeline: parameters follow the seed's ranges, pixels move as torchvision's
functional transforms move them, output shape/dtype/normalization, determinism per seed."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from coupled_net import data
from coupled_net.augment import AffineRanges, affine_theta, augment_batch, sample_params, warp
from coupled_net.run import run
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


def tensor_loader(seed):
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    split = data.SplitDataset(data.ArraySource(images, torch.arange(300) % 26 + 1), torch.arange(300), None, 1)
    return data.TensorLoader(split, torch.device("cpu"), 56, [0.5], [0.5], 64, True, seed)


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
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "done" and res["epochs_run"] == 1
    assert 0 <= res["metrics"]["test"]["top1"] <= res["metrics"]["test"]["top5"] <= 100


def test_the_gpu_benchmark_row_runs_on_a_cpu_at_toy_size():
    """launch/bench.py adds the seed-protocol epoch only on a GPU; its code path runs here, tiny."""
    from coupled_net.bench import seed_protocol_epoch, table

    rows = seed_protocol_epoch(torch.device("cpu"), workers=0, per_class=1, batch=13)
    (name, seed_rate, ours), (_, none, floor) = rows
    assert name.startswith("seed-protocol epoch (AlexNet@224, 26 images)") and none is None
    assert seed_rate > 0 and ours > 0 and floor > 0
    assert "× |" in table(rows, torch.device("cpu"), 0)


@pytest.mark.parametrize("n, world, shuffle, start", [(10, 1, True, 0), (10, 3, True, 2), (10, 3, False, 1),
                                                      (7, 2, False, 0), (5, 4, True, 3)])
def test_the_sampler_length_is_what_it_yields(n, world, shuffle, start):
    for rank in range(world):
        sampler = data.EpochSampler(n, shuffle, seed=0, rank=rank, world_size=world)
        sampler.set_epoch(1, start)
        assert len(sampler) == len(list(sampler))
