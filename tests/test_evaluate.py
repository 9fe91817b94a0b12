"""launch/evaluate.py and coupled_net.reevaluate: re-evaluating a trained run's checkpoint."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil

import pytest
import torch
from helpers import REPO, compose_cfg, read_results, run_cli
from omegaconf import OmegaConf

from coupled_net.build import build_coupled_model, build_loaders, instantiate, resolve
from coupled_net.distributed import World
from coupled_net.errors import ConfigError
from coupled_net.reevaluate import evaluate_run
from coupled_net.lifecycle import execute_run
from coupled_net.trainer import evaluate_batches

EVALUATE = REPO / "launch" / "evaluate.py"
# 26 classes x 4 training images: 88 train and 16 val (val_fraction 0.15); 26 x 2 = 52 test images; a batch
# is at most the training split
TINY = ["experiment=quickstart", "dataset.train_per_class=4", "dataset.test_per_class=2", "trainer.device=cpu",
        "trainer.batch_size=88"]
VAL_SAMPLES, TEST_SAMPLES = 16, 52
METRICS = ("loss", "top1", "top5")


def train(root, name, *overrides):
    cfg = compose_cfg(*TINY, f"dataset.root={root}", *overrides)
    run_dir = root / name
    results = execute_run(cfg, run_dir, hydra_files={"config.yaml": OmegaConf.to_yaml(cfg)})
    assert results["status"] == "done"
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """alpha2 and alpha4: the same run but for coupling.alpha, 2 epochs over whole splits; limited:
    trained with trainer.limit_batches=1 in batches of 16 (its results.json saw 16 of the 52 test images)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "alpha2": train(root, "alpha2", "coupling.alpha=2", "trainer.epochs=2"),
        "alpha4": train(root, "alpha4", "coupling.alpha=4", "trainer.epochs=2"),
        "limited": train(root, "limited", "coupling.alpha=2", "trainer.epochs=1", "trainer.batch_size=16",
                         "trainer.limit_batches=1"),
    }


@pytest.fixture(scope="module")
def cli():
    """launch/evaluate.py as a module: its main(argv) runs in this process."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(cli, capsys, *argv):
    """main(argv): (exit code, stdout, stderr)."""
    code = 0
    try:
        cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def just_metrics(m: dict) -> dict:
    return {k: m[k] for k in METRICS}


def last_epoch_row(run_dir) -> dict:
    with open(run_dir / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_evaluate_reproduces_the_runs_test_metrics(runs, tmp_path):
    run_dir = shutil.copytree(runs["alpha2"], tmp_path / "run")
    proc = run_cli(str(run_dir), "--split", "test", "--device", "cpu", script=EVALUATE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = read_results(run_dir)
    got = json.loads((run_dir / "evaluation.json").read_text())
    assert list(got["splits"]) == ["test"]
    assert list(got["splits"]["test"]) == ["after_ke"]  # best.pt is equalized: no separate before-KE metrics
    test = got["splits"]["test"]["after_ke"]
    assert just_metrics(test) == results["metrics"]["test"]  # the run trained on whole splits: exactly its numbers
    assert test["samples"] == TEST_SAMPLES
    assert (got["checkpoint"], got["checkpoint_kind"], got["device"], got["limit_batches"], got["fingerprint"]) == \
        (str(run_dir / "checkpoints" / "best.pt"), "best", "cpu", None, results["fingerprint"])
    assert got["already_equalized"] is True and got["checkpoint_epoch"] == results["best_epoch"]
    out = proc.stdout
    assert "best.pt holds equalized weights (saved after KE, alpha=2): before and after KE are the same model" in out
    rows = [line for line in out.splitlines() if line.startswith("test ")]
    assert rows == [(f"test   {'equalized, as saved':22} {TEST_SAMPLES:8d} {test['top1']:8.2f} {test['top5']:8.2f} "
                     f"{test['loss']:9.4f}")]
    assert "before KE" not in out.replace("before and after KE", "")


def test_evaluate_refuses_a_config_that_is_not_the_runs(runs, tmp_path):
    run_dir = shutil.copytree(runs["alpha2"], tmp_path / "run")
    other = compose_cfg(*TINY, f"dataset.root={runs['alpha2'].parent}", "coupling.alpha=8", "trainer.epochs=2")
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(other))
    with pytest.raises(ConfigError, match=r"\.hydra/config.yaml is not the config of the run in results.json "
                                          r"\(coupling.alpha: 2 → 8\): it cannot be re-evaluated from it"):
        evaluate_run(run_dir, device="cpu")
    (run_dir / "results.json").unlink()  # the checkpoint's fingerprint says so too
    with pytest.raises(ConfigError, match=r"\.hydra/config.yaml is not the config of the run in checkpoints/best.pt"):
        evaluate_run(run_dir, device="cpu")
    assert not (run_dir / "evaluation.json").exists()


def test_a_run_trained_with_limit_batches_is_evaluated_on_whole_splits(runs):
    run_dir = runs["limited"]
    results = read_results(run_dir)
    out = evaluate_run(run_dir, device="cpu")
    test = out["splits"]["test"]["after_ke"]
    assert (out["limit_batches"], out["trained_limit_batches"]) == (None, 1)
    assert (test["samples"], test["batches"]) == (TEST_SAMPLES, 4)  # 16 + 16 + 16 + 4
    assert out["splits"]["val"]["after_ke"]["samples"] == VAL_SAMPLES

    # the same as evaluating best.pt by hand over the whole test loader...
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    spec = resolve(cfg, World())
    model, _ = build_coupled_model(spec)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True))
    assert just_metrics(test) == evaluate_batches(model, build_loaders(spec)["test"], spec.device)
    # ...and not what the run measured on its first batch
    assert just_metrics(test) != results["metrics"]["test"]


def test_limit_batches_cuts_each_split(runs, cli, capsys):
    run_dir = runs["limited"]
    code, out, err = run_main(cli, capsys, str(run_dir), "--limit-batches", "1", "--device", "cpu")
    assert code == 0, err
    got = json.loads((run_dir / "evaluation.json").read_text())
    assert got["limit_batches"] == 1
    test = got["splits"]["test"]["after_ke"]
    assert (test["samples"], test["batches"]) == (16, 1)
    # the run's own final evaluation saw the same first batch of best.pt's equalized weights
    assert just_metrics(test) == read_results(run_dir)["metrics"]["test"]
    assert "device      cpu; at most 1 batch per split (--limit-batches)" in out


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_limit_batches_must_be_a_positive_integer(runs, cli, capsys, value):
    code, out, err = run_main(cli, capsys, str(runs["alpha2"]), f"--limit-batches={value}")
    assert code == 2 and out == ""
    assert err.splitlines() == [(f"evaluate: error: argument --limit-batches: {value!r} is not a positive integer "
                                 f"(usage: {cli.USAGE})")]


def test_checkpoint_last_is_the_last_epochs_state_after_ke(runs, cli, capsys):
    run_dir = runs["alpha2"]
    code, out, err = run_main(cli, capsys, str(run_dir), "--checkpoint", "last", "--split", "val", "--device", "cpu")
    assert code == 0, err
    got = json.loads((run_dir / "evaluation.json").read_text())
    assert (got["checkpoint_kind"], got["checkpoint_epoch"], got["already_equalized"]) == ("last", 2, True)
    val = got["splits"]["val"]["after_ke"]
    row = last_epoch_row(run_dir)  # epoch 2's validation after KE, measured by the trainer
    assert (val["loss"], val["top1"]) == (float(row["ke_val_loss"]), float(row["ke_val_acc"]))
    assert "checkpoints/last.pt: the training state at the end of epoch 2, saved after KE" in out
    assert "weights already equalized (alpha=2): before and after KE are the same model" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("val ")] == [["val", "equalized,"]]


def test_weights_that_ke_changes_are_evaluated_before_and_after(runs, cli, capsys, tmp_path):
    run_dir = runs["alpha2"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    # as an interrupted run's mid-epoch last.pt (coupling.schedule=epoch: not equalized since the last epoch):
    # filter 1 of the coupled pair (0, 1) no longer equals filter 0
    ckpt["model"]["features.0.weight"][1] += 0.5
    ckpt["progress"]["partial"] = {"epoch": 3, "step": 2, "sums": [0.0, 0.0, 0], "elapsed_s": 0.0}
    path = tmp_path / "perturbed.pt"
    torch.save(ckpt, path)
    code, out, err = run_main(cli, capsys, str(run_dir), "--checkpoint", str(path), "--split", "val",
                              "--device", "cpu")
    assert code == 0, err
    got = json.loads((run_dir / "evaluation.json").read_text())
    assert (got["checkpoint"], got["checkpoint_kind"], got["already_equalized"]) == (str(path), "path", False)
    before, after = got["splits"]["val"]["before_ke"], got["splits"]["val"]["after_ke"]
    row = last_epoch_row(run_dir)  # KE (copy) overwrites filter 1 with filter 0: last.pt's model again
    assert (after["loss"], after["top1"]) == (float(row["ke_val_loss"]), float(row["ke_val_acc"]))
    assert before["loss"] != after["loss"]
    assert got["checkpoint_mid_epoch"] == {"epoch": 3, "step": 2}
    assert f"checkpoint  {path}: a training state saved mid-epoch (interrupted at step 2 of epoch 3)" in out
    assert "KE changes these weights (alpha=2): metrics as saved (before KE) and after KE" in out
    labels = [line[7:29].strip() for line in out.splitlines() if line.startswith("val ")]
    assert labels == ["as saved (before KE)", "after KE"]


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_checkpoint_of_another_run_is_refused(runs, cli, capsys, name):
    path = runs["alpha4"] / "checkpoints" / name
    code, out, err = run_main(cli, capsys, str(runs["alpha2"]), "--checkpoint", str(path), "--device", "cpu")
    assert code == 2 and out == ""
    assert err.splitlines() == [(f"evaluate: error: --checkpoint='{path}': a checkpoint of another run "
                                 f"(its config → this run's: coupling.alpha: 4 → 2)")]


def test_a_state_dict_that_does_not_fit_the_model_is_refused(runs, cli, capsys, tmp_path):
    narrow = instantiate(compose_cfg(*TINY, "model.width=16").model)  # another architecture: 16 filters, not 32
    path = tmp_path / "narrow.pt"
    torch.save(dict(narrow.state_dict()), path)  # a plain state_dict: no fingerprint to check
    code, out, err = run_main(cli, capsys, str(runs["alpha2"]), "--checkpoint", str(path), "--device", "cpu")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        (f"evaluate: error: --checkpoint='{path}': does not fit this run's model (small_cnn): 13 shape mismatches "
         f"(features.0.weight (file 16x1x3x3 / model 32x1x3x3), features.0.bias (file 16 / model 32), …)")]

    state = dict(torch.load(runs["alpha2"] / "checkpoints" / "best.pt", weights_only=True))
    state["head.weight"] = state.pop("classifier.4.bias")
    torch.save(state, path)
    code, _, err = run_main(cli, capsys, str(runs["alpha2"]), "--checkpoint", str(path), "--device", "cpu")
    assert code == 2
    assert err.splitlines() == [(f"evaluate: error: --checkpoint='{path}': does not fit this run's model (small_cnn): "
                                 f"1 missing key (classifier.4.bias); 1 unexpected key (head.weight)")]


class Pickled:
    """Not a tensor: torch.load(weights_only=True) will not rebuild it."""


def test_a_file_that_is_not_a_state_dict_is_refused(runs, cli, capsys, tmp_path):
    path = tmp_path / "x.pt"
    refusals = {}
    for what, write in {
        "text": lambda: path.write_text("not a checkpoint\n"),
        "truncated": lambda: path.write_bytes((runs["alpha2"] / "checkpoints" / "best.pt").read_bytes()[:50_000]),
        "object": lambda: torch.save({"model": Pickled()}, path),
        "list": lambda: torch.save([torch.zeros(1)], path),
    }.items():
        write()
        code, out, err = run_main(cli, capsys, str(runs["alpha2"]), "--checkpoint", str(path), "--device", "cpu")
        assert (code, out, len(err.splitlines())) == (2, "", 1), what
        assert err.startswith(f"evaluate: error: --checkpoint='{path}': "), what
        refusals[what] = err.split(f"'{path}': ", 1)[1].strip()
    assert refusals["text"].startswith("cannot be read by torch.load: not a torch checkpoint (")
    assert refusals["truncated"].startswith("cannot be read by torch.load (")
    assert refusals["truncated"].endswith("): truncated or not a checkpoint?")
    assert refusals["object"] == (f"holds Python objects besides tensors ({__name__}.Pickled), which "
                                  "torch.load(weights_only=True) does not run: save the model's state_dict() instead")
    assert refusals["list"] == ("holds neither a state_dict nor a training checkpoint (a dict with the state_dict "
                                "under 'model'): it holds a list")


def test_a_missing_checkpoint_or_run_is_one_line(runs, cli, capsys, tmp_path):
    code, _, err = run_main(cli, capsys, str(tmp_path / "nowhere"))
    assert (code, err) == (2, f"evaluate: error: run_dir='{tmp_path / 'nowhere'}': no such directory\n")
    code, _, err = run_main(cli, capsys, str(runs["alpha2"]), "--checkpoint", str(tmp_path / "x.pt"))
    assert (code, err) == (2, f"evaluate: error: --checkpoint='{tmp_path / 'x.pt'}': no such file\n")


def test_cuda_without_a_gpu_is_refused_in_one_line(runs, cli, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_main(cli, capsys, str(runs["alpha2"]), "--device", "cuda")
    assert code == 2 and out == ""
    assert err == "evaluate: error: --device='cuda': no CUDA GPU is visible to this process; use cpu or auto\n"
    code, _, err = run_main(cli, capsys, str(runs["alpha2"]), "--device", "tpu")
    assert (code, err) == (2, "evaluate: error: --device='tpu': allowed: auto, cpu, cuda, cuda:N\n")


def test_ctrl_c_ends_with_one_line(runs, cli, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate_run", interrupted)
    code, out, err = run_main(cli, capsys, str(runs["alpha2"]))
    assert (code, out) == (130, "")
    assert err.strip().splitlines() == ["evaluate: error: interrupted (SIGINT); evaluation.json was not written"]


@pytest.mark.requires_gpu
def test_cuda_evaluates_what_the_cpu_does(runs):
    cpu = evaluate_run(runs["alpha2"], split="test", device="cpu")["splits"]["test"]["after_ke"]
    out = evaluate_run(runs["alpha2"], split="test", device="cuda")
    gpu = out["splits"]["test"]["after_ke"]
    assert out["device"] == f"cuda:{torch.cuda.current_device()}"
    assert gpu["samples"] == cpu["samples"] == TEST_SAMPLES
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    assert abs(gpu["top1"] - cpu["top1"]) <= 100 / TEST_SAMPLES + 1e-9  # at most one prediction differs
