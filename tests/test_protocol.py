"""The seed's protocol, checked against numbers worked out in the test itself (SPEC §2, §5): which
epoch is best and what best.pt and the final metrics hold, when early stopping triggers, the
epochs.csv header, the evaluation statistics, and the PIL pipeline's transform parameters."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from coupled_net.build import build, make_trainer, resolve
from coupled_net.lifecycle import execute_run
from coupled_net.trainer import LoopState, Trainer, evaluate_batches
from helpers import compose_cfg

TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.batch_size=16",
        "trainer.limit_batches=1", "trainer.epochs=10", "trainer.patience=2", "coupling.alpha=2"]
MARKER = "classifier.4.bias"  # its first element is set to the epoch number: the weights say which epoch they are

# val loss improves (1, 2), worsens (3), improves again (4), then worsens twice (5, 6): with patience 2
# the best epoch is 4, and the run stops after epoch 6 only if the counter restarted at epoch 4
VAL = [1.0, 0.8, 0.9, 0.7, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0]
# after KE the story differs: best at 3, worse at 4 and 5 -> stop after epoch 5
KE_VAL = [0.9, 0.95, 0.6, 0.65, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1]


def scripted_epochs(monkeypatch):
    """Trainer.evaluate replaced: during epoch N the validation before KE reports VAL[N-1] (top-1
    10+N), after KE KE_VAL[N-1] (top-1 20+N), and it stamps N into the weights after KE, i.e. into
    the state _save_best stores. Final evaluations report the stamp of the weights they are given."""
    def scripted(self, name, desc=""):
        marker = self.model.get_parameter(MARKER)
        if desc.startswith("epoch"):
            epoch = int(desc.split()[1])
            if desc.endswith("after KE"):
                with torch.no_grad():
                    marker[0] = epoch
                return {"loss": KE_VAL[epoch - 1], "top1": 20.0 + epoch, "top5": 90.0}
            return {"loss": VAL[epoch - 1], "top1": 10.0 + epoch, "top5": 90.0}
        return {"loss": marker[0].item(), "top1": 50.0, "top5": 90.0}
    monkeypatch.setattr(Trainer, "evaluate_split", scripted)


def read_epochs(run_dir):
    with open(run_dir / "epochs.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("select_by, best, stopped_after", [("val_loss", 4, 6), ("ke_val_loss", 3, 5)])
def test_best_pt_and_final_metrics_hold_the_best_epoch_and_patience_restarts_on_improvement(
        tmp_path, monkeypatch, select_by, best, stopped_after):
    scripted_epochs(monkeypatch)
    res = execute_run(compose_cfg(*TINY, f"trainer.select_by={select_by}", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done", res["error"]
    assert (res["best_epoch"], res["epochs_run"], res["stopped_early"]) == (best, stopped_after, True)
    assert [row[0] for row in read_epochs(tmp_path / "run")[1:]] == [str(e) for e in range(1, stopped_after + 1)]
    weights = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert weights[MARKER][0].item() == best
    assert torch.equal(weights["features.0.weight"][0], weights["features.0.weight"][1])  # stored equalized
    # the final evaluation ran on the weights stamped with the best epoch
    assert res["metrics"]["val"]["loss"] == best and res["metrics"]["test"]["loss"] == best


def test_a_trainer_without_run_directory_keeps_the_best_epochs_weights_in_memory(tmp_path, monkeypatch):
    scripted_epochs(monkeypatch)
    spec = resolve(compose_cfg(*TINY, f"dataset.root={tmp_path}"))
    trainer = make_trainer(spec, build(spec))
    progress = trainer.fit(LoopState())
    assert (progress.best_epoch, progress.epoch, progress.stopped_early, progress.bad_epochs) == (4, 6, True, 2)
    assert trainer.best_state[MARKER][0].item() == 4
    assert trainer.final_metrics()["test"]["loss"] == 4


def test_epochs_csv_has_the_spec_columns_in_order_with_each_value_in_its_column(tmp_path, monkeypatch):
    scripted_epochs(monkeypatch)
    res = execute_run(compose_cfg(*TINY, "trainer.epochs=2", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done", res["error"]
    header, *rows = read_epochs(tmp_path / "run")
    assert header[:11] == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss",
                           "ke_val_acc", "epoch_time_s", "ke_time_s", "ke_eval_time_s"]
    table = [dict(zip(header, row)) for row in rows]
    assert [(float(r["val_loss"]), float(r["val_acc"]), float(r["ke_val_loss"]), float(r["ke_val_acc"]))
            for r in table] == [(1.0, 11.0, 0.9, 21.0), (0.8, 12.0, 0.95, 22.0)]
    assert float(table[0]["lr"]) == pytest.approx(0.05)  # quickstart's optimizer.lr, before any scheduler step
    for r in table:  # ke_eval_time_s = KE + the second validation, so never below KE alone
        assert 0 <= float(r["ke_time_s"]) <= float(r["ke_eval_time_s"])
        assert 0 <= float(r["train_acc"]) <= 100 and math.isfinite(float(r["train_loss"]))


# ---- evaluate: per-sample statistics ------------------------------------------------------------

# softmax of log(P) is P itself, so each sample's loss is -log P[label], its rank known by eye
P = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]


def logits(*labels):
    """A batch whose 'images' are already the logits (an identity model), one row of log(P) per label."""
    return torch.log(torch.tensor([P] * len(labels), dtype=torch.float32)), torch.tensor(labels)


def test_evaluate_averages_loss_and_accuracy_per_sample_over_unequal_batches():
    # batch 1 (one sample): label 5 has the smallest probability -> outside the top 5
    # batch 2 (three samples): label 0 top-1 hit; labels 4 and 1 within the top 5 only
    batches = [logits(5), logits(0, 4, 1)]
    out = evaluate_batches(nn.Identity(), batches, torch.device("cpu"))
    per_sample = (-math.log(0.04) - math.log(0.4) - math.log(0.06) - math.log(0.25)) / 4  # 2.0837
    per_batch = (-math.log(0.04) + (-math.log(0.4) - math.log(0.06) - math.log(0.25)) / 3) / 2  # 2.4621: wrong
    assert out["loss"] == pytest.approx(per_sample, rel=1e-6) and abs(out["loss"] - per_batch) > 0.3
    assert out["top1"] == pytest.approx(25.0)   # 1 of 4 (a per-batch mean would say 16.7)
    assert out["top5"] == pytest.approx(75.0)   # 3 of 4 (a per-batch mean would say 50)
    assert out["top5"] >= out["top1"]


def test_evaluate_with_fewer_than_five_classes_counts_every_sample_in_the_top_five():
    images = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    out = evaluate_batches(nn.Identity(), [(images, torch.tensor([2, 0]))], torch.device("cpu"))
    assert (out["top1"], out["top5"]) == (pytest.approx(50.0), pytest.approx(100.0))
    assert out["loss"] == pytest.approx((-math.log(0.1) - math.log(0.7)) / 2, rel=1e-6)


# ---- dataset.pipeline=pil: the seed notebook's transforms ---------------------------------------

def pil_transforms(tmp_path):
    """The train and val transforms of the loaders a default run (AlexNet @224, EMNIST letters) builds
    with dataset.pipeline=pil."""
    spec = resolve(compose_cfg("dataset.pipeline=pil", "trainer.device=cpu", "trainer.batch_size=32",
                                   f"dataset.root={tmp_path}"))
    from coupled_net.build import build_loaders

    loaders = build_loaders(spec)
    return loaders["train"].loader.dataset.transform, loaders["val"].loader.dataset.transform


def mode(transform) -> str:
    """A transform's interpolation by name (torchvision keeps an InterpolationMode or its string)."""
    return getattr(transform.interpolation, "value", transform.interpolation)


def test_pil_pipeline_train_transforms_are_the_seed_notebooks(tmp_path, standin_datasets):
    # the seed: Resize(224), RandomHorizontalFlip(), RandomRotation(20),
    # RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=10), ToTensor(),
    # Normalize(mean=[0.17222732305526733], std=[0.3309466242790222])
    train, _ = pil_transforms(tmp_path)
    resize, flip, rotation, affine, to_image, to_float, normalize = train.transforms
    assert isinstance(resize, v2.Resize) and list(resize.size) in ([224], [224, 224])
    assert mode(resize) == "bilinear" and resize.antialias is True
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(rotation, v2.RandomRotation) and list(rotation.degrees) == [-20, 20]
    assert mode(rotation) == "nearest" and rotation.expand is False
    assert rotation.center is None and rotation.fill == 0
    assert isinstance(affine, v2.RandomAffine) and list(affine.degrees) == [0, 0]
    assert list(affine.translate) == [0.1, 0.1] and list(affine.scale) == [0.8, 1.2]
    assert list(affine.shear) == [-10, 10]  # torchvision's meaning of shear=10: x-shear in [-10, 10]
    assert mode(affine) == "nearest" and affine.fill == 0 and affine.center is None
    assert isinstance(to_image, v2.ToImage)
    assert isinstance(to_float, v2.ToDtype) and to_float.dtype == torch.float32 and to_float.scale is True
    assert isinstance(normalize, v2.Normalize)
    assert list(normalize.mean) == [0.17222732305526733] and list(normalize.std) == [0.3309466242790222]
    assert train(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape == (1, 224, 224)


def test_pil_pipeline_val_transforms_resize_and_normalize_only(tmp_path, standin_datasets):
    _, val = pil_transforms(tmp_path)
    resize, to_image, to_float, normalize = val.transforms
    assert isinstance(resize, v2.Resize) and list(resize.size) in ([224], [224, 224])
    assert mode(resize) == "bilinear" and resize.antialias is True
    assert isinstance(to_image, v2.ToImage) and isinstance(to_float, v2.ToDtype) and to_float.scale is True
    assert list(normalize.mean) == [0.17222732305526733] and list(normalize.std) == [0.3309466242790222]
    # deterministic: a black image becomes -mean/std everywhere
    out = val(torch.zeros(1, 28, 28, dtype=torch.uint8))
    assert out.shape == (1, 224, 224)
    assert torch.allclose(out, torch.full_like(out, -0.17222732305526733 / 0.3309466242790222))


def test_tensor_pipeline_draws_from_the_seed_notebooks_ranges():
    from coupled_net.augment import AffineRanges

    r = AffineRanges()
    assert (r.flip_p, r.degrees, r.translate, tuple(r.scale), r.shear) == (0.5, 20, 0.1, (0.8, 1.2), 10)


# ---- launch/bench.py: one measuring protocol for both sides -------------------------------------

def test_the_bench_gives_every_side_one_warm_up_then_the_same_number_of_interleaved_passes():
    from coupled_net.bench import compare

    calls = []
    pil, tensor = compare([lambda: calls.append("pil"), lambda: calls.append("tensor")], images=10, repeats=3)
    assert calls == ["pil", "tensor"] * 4  # the warm-up pass of each, then three timed passes each, alternating
    assert (pil.n, tensor.n) == (3, 3)


def test_the_bench_warms_up_with_the_given_short_passes_when_there_are_some():
    from coupled_net.bench import compare

    calls = []
    compare([lambda: calls.append("a"), lambda: calls.append("b")], images=10, repeats=2,
            warmups=[lambda: calls.append("a-warm"), lambda: calls.append("b-warm")])
    assert calls == ["a-warm", "b-warm", "a", "b", "a", "b"]


def test_a_bench_rate_is_the_median_images_per_second_with_the_slowest_and_fastest_pass():
    from coupled_net.bench import Rate

    rate = Rate(100, [1.0, 4.0, 2.0])  # 100, 25 and 50 images/s
    assert (float(rate), rate.lo, rate.hi, rate.n) == (50.0, 25.0, 100.0, 3)


def test_the_bench_table_prints_each_sides_median_and_spread_and_the_ratio_of_the_medians():
    from coupled_net.bench import Rate, table

    rows = [("input pipeline @224px", Rate(100, [1.0, 4.0, 2.0]), Rate(300, [1.0, 4.0, 2.0]))]
    line = table(rows, torch.device("cpu"), 2).splitlines()[-1]
    assert line == "| input pipeline @224px | 50 img/s (25–100, n=3) | 150 img/s (75–300, n=3) | 3.00× |"


def test_the_bench_sweep_rows_give_runs_per_hour_the_ratio_and_whether_the_packed_runs_match():
    from coupled_net.bench import table

    rows = [("sweep of 8 quickstart-size runs, one at a time: runs/hour", None, 400.0),
            ("  … packed 4 at a time: runs/hour, ratio; per-run slowdown 2.10×, metrics identical", 400.0, 1000.0)]
    lines = table(rows, torch.device("cpu"), 2).splitlines()[-2:]
    assert lines == ["| sweep of 8 quickstart-size runs, one at a time: runs/hour |  | 400 |  |",
                     "|   … packed 4 at a time: runs/hour, ratio; per-run slowdown 2.10×, metrics identical | 400 | "
                     "1,000 | 2.50× |"]


@pytest.mark.slow
def test_the_bench_sweep_trains_the_same_runs_one_at_a_time_and_packed_to_the_same_metrics():
    from coupled_net.bench import sweep_rows

    rows = sweep_rows(torch.device("cpu"), "tiny", ["experiment=quickstart", "dataset.train_per_class=20",
                                                    "dataset.test_per_class=5", "trainer.epochs=1",
                                                    "trainer.threads=1"], n_runs=2, ks=(2,))
    (first, none, sequential), (packed, base, rate) = rows
    assert first == "sweep of 2 tiny runs, one at a time: runs/hour" and none is None
    assert packed.startswith("  … packed 2 at a time: runs/hour, ratio; per-run slowdown ")
    assert packed.endswith("metrics identical")  # one thread each side: the same arithmetic, the same seeds
    assert base == sequential and sequential > 0 and rate > 0
