"""The re_model probe: a tiny CNN teacher trained here on a synthetic 4-class task (which quadrant of a
12x12 image is bright, plus noise), then distilled through LoopCallbacks.fit_end as a run would call it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from coupled_net.coupling import Coupling
from coupled_net.loopcallbacks import Context, LoopCallbacks
from coupled_net.remodel import ReModel, fresh_copy

CONF = Path(__file__).resolve().parents[1] / "conf" / "callbacks"
CPU = torch.device("cpu")


def quadrants(n: int, generator: torch.Generator) -> TensorDataset:
    """n images 1x12x12: noise (std 2), and the quadrant given by the label (0..3) brighter by 1."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = 2.0 * torch.randn(n, 1, 12, 12, generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, 0, 6 * row:6 * row + 6, 6 * col:6 * col + 6] += 1.0
    return TensorDataset(images, labels)


def top1(model: nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return 100.0 * correct / len(loader.dataset)


@pytest.fixture(scope="module")
def run():
    """(teacher, ctx, results): the teacher trained, left in train mode as a run's model may be."""
    with torch.random.fork_rng():  # the session's generator is not drawn from
        torch.manual_seed(0)
        data = torch.Generator().manual_seed(1)
        loaders = {"train": DataLoader(quadrants(400, data), batch_size=32, shuffle=True),
                   "val": DataLoader(quadrants(160, data), batch_size=32),
                   "test": DataLoader(quadrants(200, data), batch_size=50)}
        teacher = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                nn.Linear(32, 4))
        optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
        for _ in range(4):
            for x, y in loaders["train"]:
                optimizer.zero_grad()
                nn.functional.cross_entropy(teacher(x), y).backward()
                optimizer.step()
    results = {"val": {"top1": top1(teacher, loaders["val"])}, "test": {"top1": top1(teacher, loaders["test"])}}
    teacher.train()
    ctx = Context(model=teacher, coupling=Coupling(teacher, alpha=0), loaders=loaders, device=CPU)
    return teacher, ctx, results


def probe(ctx: Context, results: dict, **kwargs) -> dict:
    return LoopCallbacks({"re_model": ReModel(**kwargs)}).fit_end(ctx, results)["re_model"]


def test_the_teacher_is_well_above_chance(run):
    _, _, results = run
    assert results["test"]["top1"] > 80


def test_a_student_trained_on_the_teachers_val_outputs_alone_is_well_above_chance(run):
    teacher, ctx, results = run
    start = time.perf_counter()
    got = probe(ctx, results, epochs=3, lr=0.05, temperature=2.0, seed=0)
    print(f"teacher {results['test']['top1']:.1f} %, student {got['test_top1']:.1f} %, agreement "
          f"{got['agreement']:.1f} %, {time.perf_counter() - start:.2f} s")
    assert set(got) == {"test_top1", "gap", "agreement", "queries"}
    assert 40 < got["test_top1"] <= results["test"]["top1"] + 5
    assert got["gap"] == pytest.approx(results["test"]["top1"] - got["test_top1"])
    assert 0 <= got["agreement"] <= 100
    assert got["queries"] == len(ctx.loaders["val"].dataset)


def test_the_probe_leaves_the_teachers_weights_its_mode_and_the_random_generator_as_they_were(run):
    teacher, ctx, results = run
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    rng = torch.random.get_rng_state()
    probe(ctx, results, epochs=1)
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())
    assert all(m.training for m in teacher.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_the_student_starts_from_new_weights_not_the_teachers(run):
    teacher, _, _ = run
    with torch.random.fork_rng():
        student = fresh_copy(teacher, seed=0, device=CPU)
    pairs = list(zip(teacher.parameters(), student.parameters()))
    assert len(pairs) == 4 and all(t.shape == s.shape and not torch.equal(t, s) for t, s in pairs)


def test_the_same_seed_gives_the_same_numbers_twice(run):
    _, ctx, results = run
    assert probe(ctx, results, epochs=1, seed=3) == probe(ctx, results, epochs=1, seed=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "callbacks.re_model.epochs=0: must be an integer >= 1"),
    ({"epochs": 2.0}, "callbacks.re_model.epochs=2.0: must be an integer >= 1"),
    ({"lr": -1}, "callbacks.re_model.lr=-1: must be a number > 0"),
    ({"temperature": 0}, "callbacks.re_model.temperature=0: must be a number > 0"),
    ({"seed": -1}, "callbacks.re_model.seed=-1: must be an integer from 0 to 4294967295"),
])
def test_a_bad_argument_is_refused_naming_the_key_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError) as refused:
        ReModel(**kwargs)
    assert str(refused.value) == message


def test_the_config_builds_a_re_model_with_its_defaults():
    built = instantiate(OmegaConf.load(CONF / "re_model.yaml").re_model)
    assert isinstance(built, ReModel) and built.needs_grad
    assert (built.epochs, built.lr, built.temperature, built.seed) == (5, 0.05, 2.0, 0)
