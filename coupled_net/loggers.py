"""Optional experiment trackers (`logger=tensorboard|mlflow|wandb`, several at once:
`logger=[tensorboard,mlflow]`), fed what the run directory records anyway: the run's hyperparameters
(its identity config, flattened, with its labels and fingerprint), one epochs.csv row per epoch and
results.json's final metrics.

Every tracker implements

    log_hparams(params)   dotted config key -> value, once at the start
    log_epoch(row)        one epochs.csv row, keyed by its column names
    log_final(metrics)    val_/test_ top1/top5/loss of the best (equalized) model, best_epoch, status
    close()

A tracker is a convenience, the run directory is the record: the builder (coupled_net.build.
build_trackers) starts them, `Loggers` fans each call out to all of them, and a tracker that raises
is warned about once (`logger mlflow: <one line>`) and left out for the rest of the run, which goes
on. A tracker whose package is not installed is a ConfigError before anything runs
(coupled_net.extras, one table for every optional extra).

A tracker on a server never holds a run for long: MLflow with an http(s) URI first asks the server for
any answer at all, within SERVER_ANSWER_S (refused, unresolvable or silent: left out with one warning),
and its later calls run under bounded timeouts and retries; W&B online gets bounded init and finish
timeouts. Trackers that write files (TensorBoard, an MLflow file store, W&B offline) are untouched."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import numbers
import os
import re
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from filelock import FileLock

from .errors import ConfigError, one_line
from .extras import missing_extra
from .identity import flatten
from .results import FINISHED
from .storage import read_json, write_json

log = logging.getLogger(__name__)

FINAL_SPLITS = ("val", "test")
FINAL_METRICS = ("top1", "top5", "loss")

# How long starting a tracker may wait for its server to answer at all, name lookup included. A healthy
# tracking server answers in milliseconds, a loaded one across a slow link within a second or two;
# MLflow's own defaults (7 retries, backoff 2, 120 s per request) held a run 4 minutes on a refused
# port and about 16 on a silent one, before its first batch.
SERVER_ANSWER_S = 5.0
# MLflow's knobs for every later call of the run (read per request; a user's own settings win). One
# retry absorbs a pooled connection the server dropped between epochs, or a 503 blip; 5 s is far more
# than a log_batch of 100 params takes on a working server; a rate limiter's Retry-After could ask for
# any wait, so it is not obeyed. A server that dies mid-run costs one call of at most ~10 s, then the
# tracker is left out (and not called again, not even to close it).
MLFLOW_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
# W&B online: wandb.init waits 90 s for its server by default and run.finish() forever for its uploads.
# Starting needs a service process and the run's upsert (seconds on a healthy server); a run's history
# is epochs.csv-sized; what finish could not upload stays on disk for `wandb sync`.
WANDB_ONLINE_INIT_S, WANDB_ONLINE_FINISH_S = 30.0, 60.0


def _require(target: str, name: str) -> None:
    problem = missing_extra(target)
    if problem:
        raise ConfigError("logger", name, problem)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception under a failed request (requests -> urllib3 -> the socket's OSError)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        reason = getattr(e, "reason", None)
        inner = (reason if isinstance(reason, BaseException)
                 else e.args[0] if e.args and isinstance(e.args[0], BaseException) else e.__cause__ or e.__context__)
        if inner is None:
            break
        e = inner
    return e


def server_silence(url: str, seconds: float = SERVER_ANSWER_S) -> str | None:
    """None when anything answers HTTP at `url` within `seconds` (any status: a 404 or 401 is a server
    there; a TLS complaint too, MLflow's own settings judge certificates); otherwise why not, in a few
    words ("connection refused", "no answer within 5 s"). The request runs in a daemon thread so that a
    hung name lookup, which requests' timeout does not cover, cannot hold the caller past `seconds`."""
    import requests

    verdict: list[str | None] = []

    def ask() -> None:
        try:
            requests.get(url, timeout=seconds, allow_redirects=False)
            verdict.append(None)
        except requests.exceptions.SSLError:
            verdict.append(None)
        except requests.exceptions.Timeout:
            verdict.append(f"no answer within {seconds:g} s")
        except requests.exceptions.RequestException as e:
            root = _root_cause(e)
            verdict.append((getattr(root, "strerror", None) or one_line(root, 120)).lower())

    asking = threading.Thread(target=ask, name="coupled_net tracker probe", daemon=True)
    asking.start()
    asking.join(seconds)
    return verdict[0] if verdict else f"no answer within {seconds:g} s"


def sweep_label(sweep_dir: Path) -> str:
    """A sweep's name in a tracker (W&B group, MLflow parent run): its directory's name; Hydra's default
    `multirun/<date>/<time>` keeps its date (`2026-11-25/10-00-00`), else every day's 10 o'clock sweep
    would share one group."""
    sweep_dir = Path(sweep_dir).resolve()
    if re.fullmatch(r"\d\d-\d\d-\d\d", sweep_dir.name) and re.fullmatch(r"\d{4}-\d\d-\d\d", sweep_dir.parent.name):
        return f"{sweep_dir.parent.name}/{sweep_dir.name}"
    return sweep_dir.name


def final_metrics(results: dict) -> dict:
    """results.json -> what log_final takes: {val_top1, …, test_loss, best_epoch, status, and each
    training-loop callback's numbers as `callbacks.<name>.<key>`}; the metrics are absent when the run
    has none (it failed, or stopped before an epoch finished)."""
    out = {"status": results.get("status"), "best_epoch": results.get("best_epoch")}
    for split in FINAL_SPLITS:
        for name in FINAL_METRICS:
            value = ((results.get("metrics") or {}).get(split) or {}).get(name)
            if value is not None:
                out[f"{split}_{name}"] = value
    for name, values in (results.get("callbacks") or {}).items():  # training-loop callbacks' numbers
        for key, value in flatten(values if isinstance(values, dict) else {}, f"callbacks.{name}.").items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value
    return out


def scalar_params(params: dict) -> dict:
    """Values a tracker that takes only numbers and strings can hold: lists and mappings as JSON,
    None as `null` (as in the YAML)."""
    def scalar(value):
        if value is None:
            return "null"
        if isinstance(value, (bool, int, float, str)):
            return value
        return json.dumps(value, default=str)
    return {k: scalar(v) for k, v in params.items()}


def _numbers(metrics: dict) -> dict:
    """The numeric values (numpy scalars included; NaN and inf kept: a diverged run's loss is one)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


class Loggers(list):
    """All of a run's trackers as one: every call goes to each; one that raises is warned about once
    and dropped, so a tracker (a full quota, a dead server) never takes a run down."""

    def describe(self) -> str:
        return "; ".join(f"{lg.name} ({getattr(lg, 'where', '')})" for lg in self)

    def _each(self, method: str, *args) -> None:
        for logger in list(self):
            try:
                getattr(logger, method)(*args)
            except Exception as e:  # noqa: BLE001 - the run matters more than its tracker
                log.warning("logger %s: %s", getattr(logger, "name", type(logger).__name__), one_line(e, 300))
                self.remove(logger)
                if method != "close":
                    try:  # let it release what it holds (files, a W&B service process)
                        logger.close()
                    except Exception:  # noqa: BLE001, S110 - already warned about this one
                        pass

    def log_hparams(self, params: dict) -> None:
        self._each("log_hparams", params)

    def log_epoch(self, row: dict) -> None:
        self._each("log_epoch", row)

    def log_final(self, metrics: dict) -> None:
        self._each("log_final", metrics)

    def close(self) -> None:
        self._each("close")
        self.clear()


class NullLogger:
    name = "none"

    def __init__(self, run_dir: Path | None = None, **context):
        pass

    def log_hparams(self, params: dict) -> None:
        pass

    def log_epoch(self, row: dict) -> None:
        pass

    def log_final(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Losses, accuracies before/after KE, lr and KE time as scalars per epoch; the hyperparameters in
    the HParams tab, with the final metrics (`final/val_top1` …) as its metrics."""

    name = "tensorboard"
    SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "ke_val_loss": "loss/val_after_ke",
               "train_acc": "accuracy/train", "val_acc": "accuracy/val", "ke_val_acc": "accuracy/val_after_ke",
               "lr": "lr", "ke_time_s": "time/ke_s", "epoch_time_s": "time/epoch_s"}

    def __init__(self, run_dir: Path, subdir: str = "tensorboard", **context):
        _require("coupled_net.loggers.TensorBoardLogger", self.name)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))
        self.where, self.restarted = self.writer.log_dir, False

    def log_hparams(self, params: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"final/{split}_{name}": 0.0 for split in FINAL_SPLITS for name in FINAL_METRICS}
        # written into this run's own event file (SummaryWriter.add_hparams would make a sub-run)
        writer = self.writer._get_file_writer()
        for summary in hparams(scalar_params(params), metrics):
            writer.add_summary(summary)
        self.writer.flush()

    def log_epoch(self, row: dict) -> None:
        epoch = int(row["epoch"])
        if not self.restarted:
            # a resumed run appends another event file; a restart marker at its first epoch makes
            # TensorBoard hide what an earlier session logged from that epoch on (SummaryWriter's
            # purge_step, known only now): an epoch trained again after a kill is shown once
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self.writer._get_file_writer().add_event(Event(step=epoch, session_log=SessionLog(status=SessionLog.START)))
            self.restarted = True
        for column, tag in self.SCALARS.items():
            self.writer.add_scalar(tag, float(row[column]), epoch)
        for column, value in row.items():  # the training-loop callbacks' columns: `<callback>.<column>`
            if "." in column:
                self.writer.add_scalar(f"callbacks/{column}", float(value), epoch)
        self.writer.flush()

    def log_final(self, metrics: dict) -> None:
        step = metrics.get("best_epoch") or 0
        for key, value in _numbers(metrics).items():
            if key != "best_epoch":
                self.writer.add_scalar(f"final/{key}", value, step)
        self.writer.add_text("final/status", str(metrics.get("status")), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _server_calls(method):
    """A method of a tracker on a server (`self.remote`, `self.tracking_uri`): a failure of the network
    under it (refused, reset, timed out; the library's own long message around it) becomes one line
    naming the server, and the tracker makes no more calls to it (`Loggers` closes a tracker it
    leaves out: that would wait for the dead server once more). A tracker that writes files keeps its
    errors as they are."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.unreachable:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            root = _root_cause(e)
            if not self.remote or root is e or not isinstance(root, OSError):
                raise
            self.unreachable = True
            why = (root.strerror or str(root) or type(root).__name__).lower()
            raise ConnectionError(f"{self.tracking_uri} stopped answering ({why}); "
                                  "the run goes on without it") from e
    return call


def _quiet_mlflow() -> None:
    """MLflow's own INFO lines (a new experiment, a run's URL) and its deprecation notice for the file
    store say nothing a coupled_net user needs."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*[Ff]ile ?[Ss]tore.*")
    warnings.filterwarnings("ignore", module="mlflow.*", category=FutureWarning)


class MLflowLogger:
    """One MLflow run per coupled_net run, named after the run directory and tagged with its fingerprint
    and path: params = the hyperparameters, per-epoch metrics (epochs.csv's columns, step = epoch),
    `final/val_top1` … at the end. Without `tracking_uri`, a file store beside the runs: the sweep's
    `<sweep dir>/mlruns` (a single run: `<run dir>/mlruns`). In a sweep each run is nested under one
    parent run per sweep (`mlflow.parentRunId`; the parent is tagged `coupled_net.sweep`). The MLflow
    run id is kept in `<run dir>/mlflow_run.json`, so a resumed run continues the same MLflow run (epochs it logged
    before are not logged twice). Explicit run ids throughout (MlflowClient): no global active run
    leaks from one run of an in-process sweep into the next."""

    name = "mlflow"
    STATE = "mlflow_run.json"
    SWEEP_TAG = "coupled_net.sweep"  # on a sweep's parent run: the sweep directory
    SWEEP_LOCK = ".mlflow.lock"
    MAX_PARAM = 500  # the length every MLflow store accepts for a param value

    def __init__(self, run_dir: Path, tracking_uri: str | None = None, experiment_name: str = "coupled_net",
                 sweep_dir: Path | None = None, run_name: str | None = None, fingerprint: str | None = None,
                 **context):
        _require("coupled_net.loggers.MLflowLogger", self.name)
        run_dir = Path(run_dir).resolve()
        if not tracking_uri:
            store = (Path(sweep_dir).resolve() if sweep_dir else run_dir) / "mlruns"
            tracking_uri = store.as_uri()
        if tracking_uri.startswith("file:") or "://" not in tracking_uri:
            # MLflow 3 refuses a file store unless asked: it is the one that needs no server or database,
            # and the one many sweep jobs can write to at once (a directory per run)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.remote, self.unreachable = tracking_uri.lower().startswith(("http://", "https://")), False
        if self.remote:
            # MLflow's server answers /health; any answer at all is a server there
            silence = server_silence(tracking_uri.rstrip("/") + "/health")
            if silence:
                raise ConnectionError(f"nothing answers at {tracking_uri} ({silence}); the run goes on without it")
            for key, value in MLFLOW_HTTP_LIMITS.items():
                os.environ.setdefault(key, value)
            # urllib3 says so on every retry of MLflow's; the one line worth reading is the tracker's
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.client, self.state_path = MlflowClient(tracking_uri), run_dir / self.STATE
        # closed without a final word: the run ended as a kill would end it
        self.tracking_uri, self.status = tracking_uri, "KILLED"
        self._open(run_dir, experiment_name, run_name, fingerprint, sweep_dir)

    @_server_calls
    def _open(self, run_dir: Path, experiment_name: str, run_name: str | None, fingerprint: str | None,
              sweep_dir: Path | None) -> None:
        tracking_uri = self.tracking_uri
        state = read_json(self.state_path) or {}
        self.run_id, self.logged_steps = None, set()
        if state.get("tracking_uri") == tracking_uri and state.get("run_id"):
            try:
                self.client.get_run(state["run_id"])
                self.run_id = state["run_id"]
            except Exception as e:  # noqa: BLE001 - deleted from the store: start another
                if self.remote and isinstance(_root_cause(e), OSError):
                    raise  # the server is gone, not the run
                log.warning("logger mlflow: run %s is not in %s any more; starting a new MLflow run",
                            state["run_id"], tracking_uri)
        if self.run_id is not None:  # a resume: the same MLflow run, running again
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_steps = {m.step for m in self.client.get_metric_history(self.run_id, "val_acc")}
        else:
            tags = {"run_dir": str(run_dir), **({"fingerprint": fingerprint} if fingerprint else {})}
            sweep_dir = Path(sweep_dir).resolve() if sweep_dir is not None else None
            # A lock file in the sweep directory (shared by its SLURM tasks too) makes get-or-create
            # atomic: concurrent tasks each created an experiment of the same name in a file store,
            # and each a parent run
            with FileLock(str(sweep_dir / self.SWEEP_LOCK)) if sweep_dir is not None else nullcontext():
                experiment = self._experiment(experiment_name)
                if sweep_dir is not None:  # nested under the sweep's run (MLflow's own parent tag)
                    tags["mlflow.parentRunId"] = self._sweep_parent(experiment, sweep_dir)
            run = self.client.create_run(experiment, run_name=run_name or run_dir.name, tags=tags)
            self.run_id = run.info.run_id
            write_json(self.state_path, {"tracking_uri": tracking_uri, "experiment_id": experiment,
                                         "run_id": self.run_id}, indent=1)
        self.where = f"{tracking_uri}, run {self.run_id}"

    def _sweep_parent(self, experiment: str, sweep_dir: Path) -> str:
        """The id of the sweep's parent run, created by whichever run of the sweep comes first (the
        caller holds the sweep's lock). Found by its tag, compared here: a path in a filter string
        would need quoting MLflow does not offer."""
        for run in self.client.search_runs([experiment], filter_string=f"tags.`{self.SWEEP_TAG}` != ''"):
            if run.data.tags.get(self.SWEEP_TAG) == str(sweep_dir):
                return run.info.run_id
        parent = self.client.create_run(experiment, run_name=sweep_label(sweep_dir),
                                        tags={self.SWEEP_TAG: str(sweep_dir)})
        # it logs nothing itself and no process knows when the sweep ends: it is finished at once, its
        # nested runs carry their own status
        self.client.set_terminated(parent.info.run_id, status="FINISHED")
        return parent.info.run_id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    @_server_calls
    def log_hparams(self, params: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params  # a resume logs only what is new
        values = {k: str(v)[:self.MAX_PARAM] for k, v in scalar_params(params).items()}
        new = [Param(k, v) for k, v in values.items() if k not in have]
        for start in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    @_server_calls
    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        step = int(row["epoch"])
        if step in self.logged_steps:  # logged before an interruption, re-run by the resume
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _numbers(row).items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged_steps.add(step)

    @_server_calls
    def log_final(self, metrics: dict) -> None:
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), metrics.get("best_epoch") or 0
        self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", v, now, step)
                                                    for k, v in _numbers(metrics).items()],
                              tags=[RunTag("status", str(metrics.get("status")))])
        self.status = {"done": "FINISHED", "diverged": "FINISHED", "interrupted": "KILLED"}.get(
            metrics.get("status"), "FAILED")

    @_server_calls
    def close(self) -> None:
        self.client.set_terminated(self.run_id, status=self.status)


class WandbLogger:
    """A Weights & Biases run per coupled_net run, offline by default (no network, no API key, no
    prompt): its files go to `<run dir>/wandb`, to be uploaded with `wandb sync`. Named after the run
    directory, grouped by sweep (`group` = sweep_label), config = the hyperparameters, history =
    epochs.csv's columns (step = epoch), summary = the final metrics. Its id is kept in
    `<run dir>/wandb_run.json`, so a resumed run continues it."""

    name = "wandb"
    STATE = "wandb_run.json"
    exit_code = 1  # closed without a final word: the run ended as a kill would end it

    def __init__(self, run_dir: Path, project: str = "coupled_net", mode: str = "offline", entity: str | None = None,
                 run_name: str | None = None, fingerprint: str | None = None, sweep_dir: Path | None = None,
                 **context):
        _require("coupled_net.loggers.WandbLogger", self.name)
        for key, value in {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}.items():
            os.environ.setdefault(key, value)
        import wandb

        run_dir = Path(run_dir).resolve()
        self.state_path = run_dir / self.STATE
        state = read_json(self.state_path) or {}
        run_id = state.get("id") or hashlib.sha256(f"{run_dir}:{fingerprint}".encode()).hexdigest()[:16]
        self.last_step = int(state.get("last_step") or 0)
        self.state = {"id": run_id, "project": project, "last_step": self.last_step}
        write_json(self.state_path, self.state, indent=1)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        online = {"init_timeout": WANDB_ONLINE_INIT_S, "finish_timeout": WANDB_ONLINE_FINISH_S,
                  "finish_timeout_raises": True} if mode == "online" else {}
        self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity,
                              name=run_name or run_dir.name, id=run_id, resume="allow", reinit="create_new",
                              group=sweep_label(sweep_dir) if sweep_dir else None,
                              tags=[fingerprint] if fingerprint else None, notes=str(run_dir),
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, **online))
        self.where = f"{mode}, {Path(self.run.dir).parent}"

    def log_hparams(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_epoch(self, row: dict) -> None:
        step = int(row["epoch"])
        if step <= self.last_step:  # logged before an interruption, re-run by the resume
            return
        self.run.log({k: v for k, v in row.items() if k != "epoch"}, step=step)
        self.last_step = self.state["last_step"] = step
        write_json(self.state_path, self.state, indent=1)

    def log_final(self, metrics: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items() if v is not None})
        self.exit_code = 0 if metrics.get("status") in FINISHED else 1

    def close(self) -> None:
        self.run.finish(exit_code=self.exit_code)
