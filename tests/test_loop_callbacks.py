"""Training-loop callbacks (coupled_net.loopcallbacks, the `callbacks` group): when each hook is called
and with what, where their numbers land (epochs.csv, results.json, the review, the trackers), that a
probe changes no metric, and the one-line refusals and failures."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pandas as pd
import pytest
import torch
from helpers import REPO, compose_cfg, make_run, probes, run_cli
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from coupled_net import review
from coupled_net.coupling import Coupling
from coupled_net.errors import ConfigError
from coupled_net.identify import identity_of
from coupled_net.lifecycle import execute_run
from coupled_net.loaders import EpochLoader
from coupled_net.loggers import final_metrics
from coupled_net.loopcallbacks import Callback, CallbackFailed, Context, LoopCallbacks
from coupled_net.reevaluate import evaluate_run
from coupled_net.report import write_summary
from coupled_net.sweep import lacking_callbacks
from coupled_net.trainer import Trainer
from coupled_net.validation import check_config

FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10", "coupling.alpha=2"]
RECORDER = "+callbacks.rec._target_=helpers.probes.Recorder"
TIMING = {"epoch_time_s", "ke_time_s", "ke_eval_time_s", "checkpoint_time_s"}


def rows(run_dir):
    with open(run_dir / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


def metrics_of(run_dir):
    """epochs.csv's standard columns without the timings, and results.json's metrics."""
    table = [{k: v for k, v in r.items() if k not in TIMING and "." not in k} for r in rows(run_dir)]
    return table, json.loads((run_dir / "results.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The reference: FAST, 3 epochs, no callback."""
    root = tmp_path_factory.mktemp("plain")
    cfg = compose_cfg(*FAST, "trainer.epochs=3", f"dataset.root={root}")
    execute_run(cfg, root / "run", hydra_files={"config.yaml": OmegaConf.to_yaml(cfg)})
    return root / "run"


def test_each_hook_is_called_once_per_epoch_at_its_point_and_a_resume_keeps_the_columns_aligned(
        tmp_path, monkeypatch, plain_run):
    overrides = (*FAST, "trainer.epochs=3", "trainer.checkpoint_every=1", RECORDER, "callbacks=pair_drift",
                 f"dataset.root={tmp_path}")
    probes.CALLS.clear()
    real_save = Trainer._save_last

    def save_then_die(self, progress, *args, **kwargs):
        real_save(self, progress, *args, **kwargs)
        if progress.epoch == 2:
            raise KeyboardInterrupt  # a kill after epoch 2's last.pt, before its row
    monkeypatch.setattr(Trainer, "_save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*overrides), tmp_path / "run")
    monkeypatch.setattr(Trainer, "_save_last", real_save)
    res = execute_run(compose_cfg(*overrides), tmp_path / "run")
    assert (res["status"], res["resumes"]) == ("done", 1)

    # the order and the epoch each hook saw; the first coupled pair apart before KE, equal after it
    assert [(hook, epoch) for hook, epoch, _ in probes.CALLS] == [
        ("on_fit_start", 0), ("on_before_ke", 1), ("on_epoch_end", 1), ("on_before_ke", 2), ("on_epoch_end", 2),
        ("on_fit_start", 2), ("on_before_ke", 3), ("on_epoch_end", 3), ("on_fit_end", 3)]
    apart = {(hook, epoch): d for hook, epoch, d in probes.CALLS}
    assert all(apart["on_before_ke", e] > 0 for e in (1, 2, 3))
    assert all(apart["on_epoch_end", e] == 0.0 for e in (1, 2, 3)) and apart["on_fit_end", 3] == 0.0

    # epochs.csv: the callbacks' columns after the standard ones, in config order, one value per epoch
    table = rows(tmp_path / "run")
    header = list(table[0])
    assert header[:12] == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss",
                           "ke_val_acc", "epoch_time_s", "ke_time_s", "ke_eval_time_s", "checkpoint_time_s"]
    # in config order: the group's option first, then the `+callbacks.rec` override's
    assert header[12:] == [f"pair_drift.features.0.{s}" for s in ("coupled_mean", "coupled_max", "uncoupled_mean",
                                                                  "uncoupled_max")] + ["rec.epoch_seen", "rec.ke_gap"]
    assert [float(r["rec.epoch_seen"]) for r in table] == [1.0, 2.0, 3.0]
    for r in table:
        assert float(r["rec.ke_gap"]) == pytest.approx(float(r["val_acc"]) - float(r["ke_val_acc"]), abs=1e-12)
        assert float(r["pair_drift.features.0.coupled_mean"]) > 0 and float(r["pair_drift.features.0.uncoupled_max"]) > 0

    # results.json: on_fit_end's keys under callbacks.<name>, computed under no_grad; pair_drift has none
    assert res["callbacks"] == {"rec": {"test_top1_seen": res["metrics"]["test"]["top1"], "grad_enabled": False}}
    # and a probe that draws random numbers, switches modes and runs forward passes changed no metric
    assert metrics_of(tmp_path / "run") == metrics_of(plain_run)


def test_a_callback_that_raises_fails_the_run_with_one_line_naming_it(tmp_path):
    cfg = compose_cfg(*FAST, "trainer.epochs=2", "+callbacks.boom._target_=helpers.probes.Boom", "+callbacks.boom.at=2",
                      f"dataset.root={tmp_path}")
    with pytest.raises(CallbackFailed) as raised:
        execute_run(cfg, tmp_path / "run")
    assert str(raised.value) == "callbacks.boom: ZeroDivisionError: division by zero"
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (res["status"], res["error"], res["epochs_run"]) == ("failed", "callbacks.boom: ZeroDivisionError: "
                                                                           "division by zero", 1)


@pytest.mark.parametrize("override, line", [
    ("+callbacks.mine._target_=no.such.Probe",
     "callbacks.mine._target_='no.such.Probe': cannot be imported: no module named no"),
    ("+callbacks.rec._target_=helpers.probes.Recorder +callbacks.rec.scal=2",
     "callbacks.rec.scal=2: not a key of callbacks.rec helpers.probes.Recorder (did you mean callbacks.rec.scale?)"),
    ("callbacks=pair_drift +callbacks.pair_drift.every=2",
     "callbacks.pair_drift.every=2: not a key of callbacks.pair_drift coupled_net.pairdrift.PairDrift (it takes "
     "none)"),
])
def test_a_bad_target_or_key_is_refused_in_one_line_before_anything_starts(override, line):
    with pytest.raises(ConfigError) as refused:
        check_config(compose_cfg(*FAST, *override.split()))
    assert str(refused.value) == line


def test_callbacks_are_not_part_of_a_run_s_identity():
    assert identity_of(compose_cfg(*FAST, "callbacks=pair_drift")).fingerprint == \
        identity_of(compose_cfg(*FAST)).fingerprint


# test top-1 and a callback's number per (alpha, seed); the callback's paired Δ alpha 4 vs 0 per seed: 2, 4, 9
PROBED = {(0, 1): (80.0, 10.0), (0, 2): (82.0, 12.0), (0, 3): (84.0, 11.0),
          (4, 1): (81.0, 12.0), (4, 2): (83.0, 16.0), (4, 3): (85.0, 20.0)}


def test_the_review_averages_a_callback_s_numbers_per_group_and_pairs_them_by_seed(tmp_path):
    for (alpha, seed), (top1, attack) in PROBED.items():
        make_run(tmp_path / "sweep" / f"a{alpha}s{seed}", test_top1=top1, coupling__alpha=alpha, seed=seed,
                 results={"callbacks": {"re_model": {"test_top1": attack, "note": "text is not reviewed"}}})
    runs = review.runs(tmp_path / "sweep")
    assert review.probed_columns(runs) == ["callbacks.re_model.test_top1"]
    groups = review.summarize(runs).set_index("coupling.alpha")
    assert groups.loc[0, "callbacks.re_model.test_top1_mean"] == pytest.approx(11.0)
    assert groups.loc[4, "callbacks.re_model.test_top1_mean"] == pytest.approx(16.0)
    assert groups.loc[4, "callbacks.re_model.test_top1_std"] == pytest.approx(4.0)  # 12, 16, 20
    delta = review.compare(runs, metrics=("callbacks.re_model.test_top1",)).iloc[0]
    assert (delta["n_pairs"], delta["delta_mean"]) == (3, pytest.approx(5.0))  # (2 + 4 + 9) / 3
    assert delta["delta_std"] == pytest.approx(math.sqrt(((2 - 5) ** 2 + (4 - 5) ** 2 + (9 - 5) ** 2) / 2))
    # summary.csv carries each run's number after the derived metrics
    write_summary([tmp_path / "sweep"])
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(table.columns[list(table.columns).index("first_epoch_time_s") + 1:]) == [
        "callbacks.re_model.test_top1", "last_val_acc", "error", "duplicate_of"]
    assert sorted(table["callbacks.re_model.test_top1"]) == sorted(a for _, a in PROBED.values())
    with pytest.raises(ConfigError) as refused:
        review.compare(runs, metrics=("callbacks.re_model.top1",))
    assert str(refused.value).startswith("metrics='callbacks.re_model.top1': not a metric of these runs (metrics: "
                                         "test_top1, test_top5, ")
    assert str(refused.value).endswith(", callbacks.re_model.test_top1)")


def test_trackers_get_a_callback_s_numbers_with_the_final_metrics():
    got = final_metrics({"status": "done", "best_epoch": 2, "metrics": {"test": {"top1": 50.0}},
                         "callbacks": {"re_model": {"test_top1": 31.5, "gap": 18.5, "arch": "small_cnn"}}})
    assert got == {"status": "done", "best_epoch": 2, "test_top1": 50.0, "callbacks.re_model.test_top1": 31.5,
                   "callbacks.re_model.gap": 18.5}


def test_a_finished_run_is_said_to_lack_the_callbacks_added_after_it_ran(tmp_path):
    run = make_run(tmp_path / "run", results={"callbacks": {"re_model": {"test_top1": 30.0}}})
    assert lacking_callbacks(run, []) == []
    assert lacking_callbacks(run, ["pair_drift", "re_model", "rec"]) == ["pair_drift", "rec"]
    lines = (run / "epochs.csv").read_text().splitlines()  # a run that had pair_drift: its column is there
    (run / "epochs.csv").write_text("\n".join([lines[0] + ",pair_drift.features.0.coupled_mean",
                                               *(line + ",0.5" for line in lines[1:])]) + "\n")
    assert lacking_callbacks(run, ["pair_drift", "re_model", "rec"]) == ["rec"]
    assert lacking_callbacks(tmp_path / "no_such_run", ["pair_drift"]) == ["pair_drift"]


def test_a_pass_over_the_run_s_loaders_or_a_forward_in_train_mode_leaves_no_trace():
    class Pairs(Dataset):  # EpochSampler gives (position, sample seed), as coupled_net.data's splits take
        images, labels = torch.randn(20, 1, 6, 6), torch.arange(20) % 2

        def __len__(self):
            return 20

        def __getitem__(self, item):
            return self.images[item[0]], self.labels[item[0]]

    data = Pairs()
    loader = EpochLoader(data, batch_size=4, shuffle=True, num_workers=0, pin_memory=False, seed=3)
    loader.set_epoch(2, start_batch=1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2)).eval()

    class Careless(Callback):
        def on_fit_start(self, ctx):
            ctx.loaders["train"].set_epoch(7)
            ctx.model.train()
            for images, _ in ctx.loaders["train"]:  # moves BatchNorm's running statistics
                ctx.model(images)

    before = (loader.loader.generator.get_state(), torch.random.get_rng_state(),
              {k: v.clone() for k, v in model.state_dict().items()})
    LoopCallbacks({"careless": Careless()}).fit_start(
        Context(model=model, coupling=Coupling(model, 0), loaders={"train": loader}, device=torch.device("cpu")))
    assert torch.equal(loader.loader.generator.get_state(), before[0])
    assert torch.equal(torch.random.get_rng_state(), before[1])
    assert (loader.sampler.epoch, loader.sampler.start) == (2, 4)
    assert all(torch.equal(v, before[2][k]) for k, v in model.state_dict().items())
    assert not model.training and not model[1].training


def test_evaluate_fills_a_finished_run_s_results_with_a_callback_added_after_it_ran(tmp_path, plain_run):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    before = json.loads((run / "results.json").read_text())
    probe = tmp_path / "probe.yaml"
    probe.write_text("re_model:\n  _target_: coupled_net.remodel.ReModel\n  epochs: 1\n")
    for kwargs, line in (({"split": "test"}, "--callbacks='re_model': on_fit_end runs on the best, equalized model "
                          "over whole splits: use it with --checkpoint best --split both, without --limit-batches"),
                         ({"callbacks": ["nope"]}, "--callbacks='nope': no such callback (options: pair_drift, "
                                                   "re_model; or a YAML file)")):
        with pytest.raises(ConfigError) as refused:
            evaluate_run(run, **{"callbacks": ["re_model"], **kwargs})
        assert str(refused.value) == line
    assert json.loads((run / "results.json").read_text()) == before  # refused: nothing written

    out = evaluate_run(run, callbacks=[str(probe)])
    after = json.loads((run / "results.json").read_text())
    got = after["callbacks"]["re_model"]
    assert out["callbacks"] == {"re_model": got} and sorted(got) == ["agreement", "gap", "queries", "test_top1"]
    assert got["gap"] == pytest.approx(out["splits"]["test"]["after_ke"]["top1"] - got["test_top1"])
    assert out["splits"]["test"]["after_ke"]["top1"] == pytest.approx(before["metrics"]["test"]["top1"])
    assert {k: v for k, v in after.items() if k != "callbacks"} == \
        {k: v for k, v in before.items() if k != "callbacks"}  # nothing else of the record changed
    assert before["callbacks"] == {}


@pytest.mark.slow
def test_a_single_run_whose_callback_raises_ends_with_that_one_line_on_the_terminal(tmp_path):
    proc = run_cli(*FAST, "trainer.epochs=1", "+callbacks.boom._target_=helpers.probes.Boom", f"dataset.root={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"PYTHONPATH": str(REPO / "tests")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "coupled_net: error: callbacks.boom: ZeroDivisionError: division by zero"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


class _Says(Callback):
    """A callback whose columns() and on_before_ke() return what it is given."""

    def __init__(self, columns, values):
        self._columns, self._values = columns, values

    def columns(self, ctx):
        return self._columns

    def on_before_ke(self, ctx):
        return self._values


@pytest.mark.parametrize("columns, values, line", [
    (["a", "a"], {}, "callbacks.p: columns() returned ['a', 'a']: expected a list of distinct column names"),
    ("ab", {}, "callbacks.p: columns() returned 'ab': expected a list of distinct column names"),
    (["a"], {"b": 1.0}, "callbacks.p: on_before_ke() returned column 'b', which its columns() did not declare "
                        "(declared: a)"),
    (["a"], {"a": "high"}, "callbacks.p: column 'a' got 'high': an epoch column holds numbers"),
    (["a"], [1.0], "callbacks.p: on_before_ke() returned list: expected a dict of its columns' values"),
])
def test_what_a_callback_returns_that_its_records_cannot_hold_fails_in_one_line(columns, values, line):
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    ctx = Context(model=model, coupling=Coupling(model, 0), loaders={}, device=torch.device("cpu"))
    runner = LoopCallbacks({"p": _Says(columns, values)})
    with pytest.raises(CallbackFailed) as failed:
        runner.columns(ctx)
        runner.before_ke(ctx)
    assert str(failed.value) == line


def test_numbers_a_callback_returns_as_tensors_or_none_are_recorded_as_floats():
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    ctx = Context(model=model, coupling=Coupling(model, 0), loaders={}, device=torch.device("cpu"))
    runner = LoopCallbacks({"p": _Says(["a", "b", "c"], {"a": torch.tensor([2.5]), "b": None, "c": 3})})
    assert runner.columns(ctx) == ["p.a", "p.b", "p.c"]
    got = runner.before_ke(ctx)
    assert got["p.a"] == 2.5 and math.isnan(got["p.b"]) and got["p.c"] == 3.0 and type(got["p.c"]) is float
