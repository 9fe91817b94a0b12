"""Experiment trackers (logger=tensorboard|mlflow|wandb, several at once), each read back through its
own library and compared with what the run directory itself recorded: epochs.csv and results.json."""

from __future__ import annotations

import json
import logging
import struct
import sys
import threading

import pandas as pd
import pytest

from coupled_net import loggers
from coupled_net.build import start_trackers
from coupled_net.errors import ConfigError
from coupled_net.extras import missing_extra
from coupled_net.identify import identity_of
from coupled_net.lifecycle import execute_run
from coupled_net.trainer import Trainer
from helpers import compose_cfg, read_results, run_sweep

QUICK = ["experiment=quickstart", "trainer.limit_batches=2"]
FAST = [*QUICK, "trainer.epochs=2"]
ROW_METRICS = ["lr", "train_loss", "train_acc", "val_loss", "val_acc", "ke_val_loss", "ke_val_acc", "epoch_time_s",
               "ke_time_s", "ke_eval_time_s", "checkpoint_time_s"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One real two-epoch run with all three trackers at once: (run dir, epochs.csv, results.json, cfg)."""
    root = tmp_path_factory.mktemp("tracked")
    cfg = compose_cfg(*FAST, "logger=[tensorboard,mlflow,wandb]", f"dataset.root={root}")
    execute_run(cfg, root / "run")
    return root / "run", pd.read_csv(root / "run" / "epochs.csv"), read_results(root / "run"), cfg


def final_of(results: dict) -> dict:
    m = results["metrics"]
    return {"final/val_top1": m["val"]["top1"], "final/val_top5": m["val"]["top5"], "final/val_loss": m["val"]["loss"],
            "final/test_top1": m["test"]["top1"], "final/test_top5": m["test"]["top5"],
            "final/test_loss": m["test"]["loss"], "final/best_epoch": results["best_epoch"]}


@pytest.fixture(autouse=True)
def file_store_allowed(monkeypatch):
    """MLflow 3 opens a file store only when asked to, readers included (the logger asks for itself)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    return client, client.get_run(state["run_id"]), state


# ---- MLflow ------------------------------------------------------------------------------------------

def test_mlflow_holds_the_epochs_csv_columns_per_epoch_the_params_and_the_final_metrics(tracked):
    run_dir, rows, results, cfg = tracked
    client, mrun, state = mlflow_run(run_dir)
    # a single run's default store is <run dir>/mlruns, a file store
    assert state["tracking_uri"] == (run_dir.resolve() / "mlruns").as_uri()
    assert mrun.info.run_name == "run" and mrun.info.status == "FINISHED"
    assert mrun.data.tags["fingerprint"] == results["fingerprint"]
    assert mrun.data.tags["run_dir"] == str(run_dir.resolve()) and mrun.data.tags["status"] == "done"
    for column in ROW_METRICS:
        history = client.get_metric_history(mrun.info.run_id, column)
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == pytest.approx(list(rows[column]), rel=1e-9)
    assert mrun.data.metrics == pytest.approx({**{c: rows[c].iloc[-1] for c in ROW_METRICS}, **final_of(results)})
    params = mrun.data.params
    assert params["fingerprint"] == results["fingerprint"]
    assert params["optimizer.lr"] == "0.05" and params["model.name"] == cfg.model.name
    assert params["coupling.layer"] == "null"  # None as in the YAML
    assert params["dataset.mean"] == json.dumps(list(cfg.dataset.mean))  # a list, as JSON
    assert set(params) == {*identity_of(cfg).keys, "fingerprint"}


def test_a_resumed_run_continues_the_same_tracker_runs_and_shows_an_epoch_trained_again_once(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = (*FAST, "logger=[mlflow,wandb,tensorboard]", f"dataset.root={tmp_path}")
    real_save = Trainer._save_last

    def die_before_second_checkpoint(self, progress, *args, **kwargs):
        if progress.epoch == 2:
            raise KeyboardInterrupt  # like a kill: epoch 2 trained, its checkpoint is not written
        real_save(self, progress, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_save_last", die_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        execute_run(compose_cfg(*overrides), tmp_path / "run")
    first_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    monkeypatch.setattr(Trainer, "_save_last", real_save)
    assert execute_run(compose_cfg(*overrides), tmp_path / "run")["resumes"] == 1  # epoch 2 is trained again

    client, mrun, _ = mlflow_run(tmp_path / "run")
    assert mrun.info.run_id == first_id and mrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first_id, "val_acc")] == [1, 2]
    assert len(client.search_runs([mrun.info.experiment_id])) == 1
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({p.name for p in runs}) == 1  # two sessions of one W&B run id
    steps = [r.history.step.num for p in runs for r in wandb_records(p) if r.WhichOneof("record_type") == "history"]
    assert steps == [1, 2]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = pd.read_csv(tmp_path / "run" / "epochs.csv")  # epoch 2 as trained the second time
    assert [(s.step, s.value) for s in events.Scalars("loss/train")] == [
        (1, pytest.approx(rows["train_loss"][0], rel=1e-6)), (2, pytest.approx(rows["train_loss"][1], rel=1e-6))]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_runs_of_a_sweep_nest_under_one_mlflow_parent_in_the_sweep_store_and_share_a_wandb_group(tmp_path):
    from mlflow.tracking import MlflowClient

    proc, sweep, dirs = run_sweep(tmp_path, *QUICK, "trainer.epochs=1", "seed=1,2", "logger=[mlflow,wandb]",
                                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = [d for d in dirs if d.name != "mlruns"]  # the store sits beside the run directories
    client = MlflowClient((sweep / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("coupled_net")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert (parent.info.run_name, parent.data.tags["coupled_net.sweep"]) == ("sweep", str(sweep.resolve()))
    children = [r for r in runs if r is not parent]
    assert sorted(r.info.run_name for r in children) == sorted(d.name for d in dirs) and len(children) == 2
    assert [r.data.tags["mlflow.parentRunId"] for r in children] == [parent.info.run_id] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not any((d / "mlruns").exists() for d in dirs)
    for d in dirs:  # W&B: group = the sweep directory's name, read from the offline run's own records
        (path,) = (d / "wandb").glob("offline-run-*/run-*.wandb")
        (info,) = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
        assert (info.run_group, info.display_name) == ("sweep", d.name)


def test_concurrent_runs_of_a_sweep_create_one_mlflow_parent_named_after_the_sweep(tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "multirun" / "2026-11-25" / "10-00-00"  # Hydra's default layout keeps the date
    sweep.mkdir(parents=True)
    started, barrier = {}, threading.Barrier(4)

    def start(i: int) -> None:  # as SLURM tasks starting together: each its own lock file descriptor
        barrier.wait()
        started[i] = loggers.MLflowLogger(sweep / f"run{i}", sweep_dir=sweep)
    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for logger in started.values():
        logger.close()
    client = MlflowClient((sweep / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("coupled_net").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("coupled_net.sweep") == str(sweep.resolve())]
    assert parent.info.run_name == "2026-11-25/10-00-00" and len(runs) == 5
    assert sorted((r.info.run_name, r.data.tags["mlflow.parentRunId"]) for r in runs if r is not parent) == [
        (f"run{i}", parent.info.run_id) for i in range(4)]


# ---- Weights & Biases (offline) ----------------------------------------------------------------------

def wandb_records(path):
    """The records of an offline run's `run-<id>.wandb` file: a 7-byte header (`:W&B`, magic, version),
    then LevelDB-log blocks of 32 KiB whose chunks (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last) carry protobuf `Record`s. wandb has no public reader for them."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            yield pb.Record.FromString(record)


def items(updates) -> dict:
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}


def test_wandb_offline_holds_the_epochs_csv_columns_as_history_the_config_and_the_final_summary(tracked):
    run_dir, rows, results, _ = tracked
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(path))
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.display_name == "run" and info.project == "coupled_net" and info.run_group == ""  # no sweep
    assert info.run_id == json.loads((run_dir / "wandb_run.json").read_text())["id"]
    history = [(r.history.step.num, items(r.history.item)) for r in records if r.WhichOneof("record_type") == "history"]
    assert [step for step, _ in history] == [1, 2]
    for column in ROW_METRICS:
        assert [h[column] for _, h in history] == pytest.approx(list(rows[column]), rel=1e-9)
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update(items(r.config.update))
    assert config["fingerprint"] == results["fingerprint"] and config["optimizer.lr"] == 0.05
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    expected = {**final_of(results), "final/status": "done"}
    assert {k: summary[k] for k in expected} == pytest.approx(expected)


# ---- TensorBoard ---------------------------------------------------------------------------------------

def test_tensorboard_holds_the_epoch_scalars_the_hparams_and_the_final_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir, rows, results, cfg = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, column in (("accuracy/val_after_ke", "ke_val_acc"), ("loss/train", "train_loss"), ("lr", "lr"),
                        ("accuracy/val", "val_acc"), ("time/epoch_s", "epoch_time_s")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx(list(rows[column]), rel=1e-6)
    for tag, value in final_of(results).items():
        if tag != "final/best_epoch":
            (scalar,) = events.Scalars(tag)
            assert (scalar.step, scalar.value) == (results["best_epoch"], pytest.approx(value, rel=1e-6))
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["fingerprint"].string_value == results["fingerprint"]
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.05)
    assert hparams["model.name"].string_value == cfg.model.name


# ---- what goes wrong ----------------------------------------------------------------------------------

def test_a_logger_that_raises_mid_run_is_dropped_with_one_warning_and_the_run_finishes(tmp_path, monkeypatch,
                                                                                       caplog):
    def refuse(self, row):
        raise RuntimeError("quota exceeded\n  try again later")
    monkeypatch.setattr(loggers.MLflowLogger, "log_epoch", refuse)
    with caplog.at_level(logging.WARNING, logger="coupled_net"):
        res = execute_run(compose_cfg(*FAST, "logger=[mlflow,tensorboard]", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["logger mlflow: RuntimeError: quota exceeded try again later"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("accuracy/val")] == [1, 2]  # the other tracker went on


def test_a_tracker_that_cannot_start_is_left_out_with_one_warning_and_the_others_start(tmp_path, monkeypatch,
                                                                                      caplog):
    from omegaconf import OmegaConf

    def server_down(self, run_dir, **kwargs):
        raise ConnectionError("http://tracking:5000 refused the connection")
    monkeypatch.setattr(loggers.MLflowLogger, "__init__", server_down)
    nodes = OmegaConf.create({"mlflow": {"_target_": "coupled_net.loggers.MLflowLogger"}, "off": None,
                              "none": {"_target_": "coupled_net.loggers.NullLogger"}})
    with caplog.at_level(logging.WARNING, logger="coupled_net"):
        started = start_trackers(nodes, {"run_dir": tmp_path}, {"optimizer.lr": 0.05})
    assert [type(lg).__name__ for lg in started] == ["NullLogger"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "logger mlflow: ConnectionError: http://tracking:5000 refused the connection"]


@pytest.mark.parametrize("name", ["mlflow", "wandb", "tensorboard"])
def test_a_tracker_whose_package_is_missing_is_one_config_error_naming_the_extra(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    target = {"mlflow": "MLflowLogger", "wandb": "WandbLogger", "tensorboard": "TensorBoardLogger"}[name]
    expected = f"needs the {name} package: pip install -e '.[{name}]'"
    assert missing_extra(f"coupled_net.loggers.{target}") == expected
    with pytest.raises(ConfigError) as error:
        getattr(loggers, target)(run_dir=tmp_path)
    assert str(error.value) == f"logger='{name}': needs the {name} package: pip install -e '.[{name}]'"


def test_installed_trackers_and_targets_without_an_extra_need_nothing():
    assert missing_extra("coupled_net.loggers.MLflowLogger") is None
    assert missing_extra("coupled_net.loggers.WandbLogger") is None
    assert missing_extra("coupled_net.loggers.NullLogger") is None


def test_no_logger_builds_no_tracker_and_writes_no_tracker_files(tmp_path):
    cfg = compose_cfg(*QUICK, "trainer.epochs=1", f"dataset.root={tmp_path}")
    assert not cfg.get("logger")  # logger=none: an empty group
    execute_run(cfg, tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert not names & {"tensorboard", "mlruns", "wandb", "mlflow_run.json", "wandb_run.json"}


def test_trackers_receive_the_runs_plus_labels_in_their_hparams(tmp_path, monkeypatch):
    from omegaconf import open_dict

    from coupled_net.build import build_trackers

    received = []
    monkeypatch.setattr(loggers.NullLogger, "log_hparams", lambda self, params: received.append(dict(params)))
    cfg = compose_cfg(*QUICK, "+note=first try", "+label=x", f"dataset.root={tmp_path}")
    with open_dict(cfg):
        cfg.logger = {"mlflow": {"_target_": "coupled_net.loggers.MLflowLogger"},
                      "recorder": {"_target_": "coupled_net.loggers.NullLogger"}}
    identity = identity_of(cfg)
    assert "note" not in identity.keys and "label" not in identity.keys  # labels are not identity keys
    (tmp_path / "run").mkdir()
    started = build_trackers(cfg, tmp_path / "run", identity)
    started.close()
    assert len(received) == 1
    params = received[0]
    assert (params["note"], params["label"]) == ("first try", "x")
    assert params["fingerprint"] == identity.fingerprint and params["optimizer.lr"] == 0.05
    _, mrun, _ = mlflow_run(tmp_path / "run")  # a real tracker holds them too
    assert (mrun.data.params["note"], mrun.data.params["label"]) == ("first try", "x")
