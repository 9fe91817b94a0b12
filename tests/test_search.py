"""Hyper-parameter search (hparams_search=optuna_lr): what a run returns to the sweeper (its
optimized_metric, the worst value when it has none), the study through the real CLI, and what the
sweep leaves behind (optimization_results.yaml, one run directory per trial, the summary)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from coupled_net import sweep
from coupled_net.callbacks import SweepReport
from coupled_net.cli import train_task
from coupled_net.errors import ConfigError
from coupled_net.identify import identity_of
from coupled_net.objectives import objective
from coupled_net.sweep import best_trial
from helpers import CONF, make_run, read_results, run_cli, run_dirs

optuna = pytest.importorskip("optuna")  # the [optuna] extra (CI installs it)

MAX_FLOAT = 1.7976931348623157e308  # sys.float_info.max, typed out
METRICS = {"val": {"top1": 41.5, "top5": 88.25, "loss": 0.75}, "test": {"top1": 40.0, "top5": 87.0, "loss": 0.8}}
# 20 images a class (26 classes) -> 442 train / 78 val images after the 15 % split: batch 16 fits both
SMALL = ["experiment=quickstart", "trainer.epochs=1", "trainer.limit_batches=2", "dataset.train_per_class=20",
         "dataset.test_per_class=5", "trainer.batch_size=16"]
MNIST = ["experiment=quickstart", "dataset=mnist", "trainer.epochs=1", "trainer.limit_batches=2"]


# ---- the value of one run ---------------------------------------------------------------------------

@pytest.mark.parametrize("metric, expected", [("val_top1", 41.5), ("val_top5", 88.25), ("val_loss", 0.75)])
def test_each_optimized_metric_is_read_from_the_validation_metrics_of_a_done_run(metric, expected):
    assert objective({"status": "done", "metrics": METRICS}, metric) == expected


@pytest.mark.parametrize("status", ["diverged", "failed", "interrupted", "running", None])
@pytest.mark.parametrize("metric, worst", [("val_top1", 0.0), ("val_top5", 0.0), ("val_loss", MAX_FLOAT)])
def test_a_run_that_is_not_done_returns_the_worst_value_even_with_metrics(status, metric, worst):
    results = None if status is None else {"status": status, "metrics": METRICS}
    assert objective(results, metric) == worst


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), None])
def test_a_done_run_without_a_finite_number_returns_the_worst_value_never_nan(loss):
    metrics = {"val": {"top1": 41.5, "top5": 88.25, "loss": loss}}
    assert objective({"status": "done", "metrics": metrics}, "val_loss") == MAX_FLOAT
    assert objective({"status": "done", "metrics": None}, "val_top1") == 0.0


def test_an_unknown_optimized_metric_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        objective({"status": "done", "metrics": METRICS}, "val_acc")
    assert str(e.value) == "optimized_metric='val_acc': allowed: val_top1, val_top5, val_loss"


def test_optuna_takes_the_worst_values_and_ranks_them_last_but_refuses_nan():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for direction, worst, real in (("maximize", 0.0, 12.5), ("minimize", MAX_FLOAT, 0.5)):
        study = optuna.create_study(direction=direction)
        for value in (worst, real, worst):
            study.tell(study.ask(), value)
        assert study.best_value == real
    with pytest.raises(ValueError, match="returned nan"):  # why the worst value is never NaN
        study = optuna.create_study()
        study.tell(study.ask(), float("nan"))


# ---- train_task in-process: the float a sweeper receives --------------------------------------------

def job(tmp_path, *overrides, run_dir, base=SMALL):
    """The task config of a sweep job running in `run_dir`, with HydraConfig set as Hydra sets it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[*base, f"dataset.root={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return task


@pytest.fixture
def hydra_reset():
    yield
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("metric, expected", [("val_top1", 41.5), ("val_top5", 88.25), ("val_loss", 0.75)])
def test_a_run_found_done_in_its_directory_returns_its_stored_value(tmp_path, hydra_reset, metric, expected):
    run_dir = tmp_path / "trial"
    cfg = job(tmp_path, f"optimized_metric={metric}", run_dir=run_dir)
    make_run(run_dir, fingerprint=identity_of(cfg).fingerprint, results={"metrics": METRICS})
    before = (run_dir / "results.json").read_bytes()
    assert train_task(cfg) == expected
    assert (run_dir / "results.json").read_bytes() == before  # not trained again


@pytest.mark.parametrize("metric, worst", [("val_top1", 0.0), ("val_loss", MAX_FLOAT)])
def test_a_run_found_diverged_returns_the_worst_value(tmp_path, hydra_reset, metric, worst):
    run_dir = tmp_path / "trial"
    cfg = job(tmp_path, f"optimized_metric={metric}", run_dir=run_dir)
    make_run(run_dir, status="diverged", fingerprint=identity_of(cfg).fingerprint, results={"metrics": METRICS})
    assert train_task(cfg) == worst


def test_a_refused_run_returns_the_worst_value_and_the_sweep_goes_on(tmp_path, hydra_reset):
    run_dir = make_run(tmp_path / "trial", fingerprint="0123456789abcdef")  # another config's run
    cfg = job(tmp_path, "optimized_metric=val_loss", run_dir=run_dir)
    assert train_task(cfg) == MAX_FLOAT  # returned: no SystemExit in a sweep
    assert read_results(run_dir)["fingerprint"] == "0123456789abcdef"


def test_a_failed_run_returns_the_worst_value(tmp_path, hydra_reset):
    run_dir = tmp_path / "trial"  # MNIST, not on disk and not to be downloaded: the run fails in build
    cfg = job(tmp_path, "dataset.download=false", run_dir=run_dir, base=MNIST)
    assert train_task(cfg) == 0.0
    assert read_results(run_dir)["status"] == "failed"


def test_a_run_not_started_returns_the_worst_value(tmp_path, hydra_reset, monkeypatch):
    run_dir = tmp_path / "trial"
    cfg = job(tmp_path, run_dir=run_dir, base=MNIST)
    monkeypatch.setitem(sweep._unavailable, f"mnist@{tmp_path}", "not there")
    monkeypatch.setattr(sweep, "not_started", {})
    assert train_task(cfg) == 0.0
    assert not run_dir.exists()


# ---- the search's config ----------------------------------------------------------------------------

@pytest.mark.parametrize("metric, direction", [("val_top1", "maximize"), ("val_top5", "maximize"),
                                               ("val_loss", "minimize")])
def test_the_study_direction_follows_optimized_metric(metric, direction):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["hparams_search=optuna_lr", f"optimized_metric={metric}"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == direction
    assert cfg.hydra.sweeper.params == {"optimizer.lr": "tag(log, interval(0.001, 0.3))",
                                        "optimizer.weight_decay": "tag(log, interval(1.0e-6, 1.0e-3))"}


@pytest.mark.parametrize("overrides, line", [
    (["coupling.alpha=17"], "coupling.alpha=17: at most 16: layer features.0 has 32 filters"),
    (["optimized_metric=val_loss", "hydra.sweeper.direction=maximize"],
     ("hydra.sweeper.direction='maximize': optimized_metric=val_loss is to minimize: set "
      "hydra.sweeper.direction=minimize, or leave it out (it follows optimized_metric)")),
])
def test_a_search_with_a_bad_config_is_refused_before_its_first_trial(overrides, line, capsys):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["hparams_search=optuna_lr", *SMALL, *overrides], return_hydra_config=True)
    with pytest.raises(SystemExit) as e:
        SweepReport().on_multirun_start(cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"coupled_net: error: {line}"


def test_a_listed_sweep_is_left_to_the_plan_of_coupled_nets_own_sweeper():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[*SMALL, "coupling.alpha=17"], return_hydra_config=True)
    SweepReport().on_multirun_start(cfg)  # no SystemExit: CoupledSweeper refuses it, job by job


def test_only_a_sweeper_other_than_the_listing_ones_counts_as_a_search():
    assert not sweep.searching({"_target_": "hydra_plugins.coupled_net_launcher.sweeper.CoupledSweeper"})
    assert not sweep.searching({"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"})
    assert sweep.searching({"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"})


def test_the_best_trial_is_found_by_the_overrides_of_its_run_directory(tmp_path):
    for name, lr in (("a", 0.0123), ("b", 0.2)):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(
            f"- optimizer.lr={lr}\n- optimizer.weight_decay=1.0e-05\n- experiment=quickstart\n")
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  optimizer.lr: 0.2\n  optimizer.weight_decay: 1.0e-05\nbest_value: 61.5\n")
    study, run_dir = best_trial(tmp_path)
    assert (study["best_value"], run_dir) == (61.5, tmp_path / "b")
    assert best_trial(tmp_path / "a") is None


# ---- through the real CLI ---------------------------------------------------------------------------

def returned(proc) -> dict[str, float]:
    """run dir name -> the value its job returned, from the console lines train_task writes."""
    found = re.findall(r"\] - (\S+): (?:val_top1|val_top5|val_loss) = (\S+) returned to the sweeper",
                       proc.stdout + proc.stderr)
    return [(name, float(value)) for name, value in found]


@pytest.mark.slow
def test_an_optuna_study_of_three_trials_returns_numbers_and_writes_its_best_trial(tmp_path):
    sweep_dir = tmp_path / "study"
    proc = run_cli("-m", "hparams_search=optuna_lr", *SMALL, "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=3", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = run_dirs(sweep_dir)
    assert len(runs) == 3
    top1 = {p: read_results(p)["metrics"]["val"]["top1"] for p in runs}
    assert sorted(v for _, v in returned(proc)) == sorted(top1.values())
    study = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(top1, key=top1.get)
    assert study["best_value"] == top1[best]
    config = yaml.safe_load((best / ".hydra" / "config.yaml").read_text())
    assert study["best_params"] == {"optimizer.lr": config["optimizer"]["lr"],
                                    "optimizer.weight_decay": config["optimizer"]["weight_decay"]}
    assert f"best trial: val_top1 = {top1[best]:g} with optimizer.lr=" in proc.stdout
    assert f": {best} (all trials: {sweep_dir / 'optimization_results.yaml'})" in proc.stdout
    assert (sweep_dir / "summary.csv").is_file()  # SweepReport collected the trials too


@pytest.mark.slow
def test_a_diverged_trial_gets_the_worst_value_and_the_study_completes(tmp_path):
    # lr is a choice of a working value and one that diverges at once (1e30: the weights overflow at the
    # first step); with two values, three trials repeat one: that trial finds its run directory finished
    # (done or diverged) and returns the stored value
    sweep_dir = tmp_path / "study"
    proc = run_cli("-m", "hparams_search=optuna_lr", *SMALL, "optimizer.lr=choice(0.05,1e30)",
                   "optimizer.weight_decay=0.0001", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=3", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = returned(proc)
    assert len(values) == 3 and len({name for name, _ in values}) == 2  # one trial found its run finished
    status = {p.name: read_results(p) for p in run_dirs(sweep_dir)}
    for name, value in values:
        res = status[name]
        lr = float(re.search(r"optimizer.lr=([^,]+)", name).group(1))
        if lr == 1e30:
            assert (res["status"], value) == ("diverged", 0.0)
        else:
            assert (res["status"], value) == ("done", res["metrics"]["val"]["top1"])
    assert {float(re.search(r"optimizer.lr=([^,]+)", n).group(1)) for n, _ in values} == {0.05, 1e30}
    study = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert study["best_params"] == {"optimizer.lr": 0.05}


@pytest.mark.slow
def test_a_study_refuses_a_direction_against_its_metric_before_any_trial(tmp_path):
    proc = run_cli("-m", "hparams_search=optuna_lr", *SMALL, "optimized_metric=val_loss",
                   "hydra.sweeper.direction=maximize", f"hydra.sweep.dir={tmp_path / 'study'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "coupled_net: error: hydra.sweeper.direction='maximize': optimized_metric=val_loss is to minimize: set "
        "hydra.sweeper.direction=minimize, or leave it out (it follows optimized_metric)")
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_a_detached_launcher_is_refused_for_a_search(tmp_path):
    proc = run_cli("-m", "hparams_search=optuna_lr", *SMALL, "hydra/launcher=local", "hydra.launcher.detach=true",
                   f"hydra.sweep.dir={tmp_path / 'study'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "coupled_net: error: hydra.launcher.detach=True: a search (hparams_search=...) needs every trial's value "
        "before it samples the next one: leave detach out (the sweep waits)")



@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_a_study_through_the_slurm_launcher_gets_each_jobs_value(tmp_path):
    """hydra-optuna-sweeper calls our SLURM launcher once per trial and reads the float each job returned
    (the real one-node cluster of .ci/slurm_up.sh, as tests/test_slurm.py uses)."""
    sweep_dir = tmp_path / "study"
    proc = run_cli("-m", "hparams_search=optuna_lr", *SMALL, "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
                   "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_per_cpu=1G", "hydra.launcher.timeout_min=20",
                   "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top1 = [read_results(p)["metrics"]["val"]["top1"] for p in run_dirs(sweep_dir)]
    assert len(top1) == 2 and len(manifest_jobs(sweep_dir)) == 2
    study = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert study["best_value"] == max(top1)


def manifest_jobs(sweep_dir):
    return json.loads((sweep_dir / "manifest.json").read_text())["jobs"]
