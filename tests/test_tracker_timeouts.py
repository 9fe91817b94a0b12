"""A tracker's server never holds a run: one that refuses, one that accepts and never answers, one that
falls silent mid-run. Each run goes through the CLI as a user starts it, against 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import re
import time

import pandas as pd
import pytest

from helpers import read_results, run_cli
from helpers.servers import FakeMLflow, refused_port, silent_port

RUN = ["experiment=quickstart", "trainer.limit_batches=2", "logger=mlflow"]
# A hang check, not a speed claim: such a run takes ~10 s here (the tracker's part ≤ 5 s at the start,
# ≤ 10 s mid-run); before, MLflow's retries held it 4 minutes (refused) to 16 (silent) per call.
BOUND_S = 90


def run_against(uri: str, tmp_path, *overrides: str):
    """One CLI run with its MLflow tracker at `uri`: (process, run dir, seconds it took, warning lines)."""
    start = time.monotonic()
    proc = run_cli(*RUN, f"logger.mlflow.tracking_uri={uri}", *overrides, f"dataset.root={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=BOUND_S + 30)
    took = time.monotonic() - start
    output = proc.stdout + proc.stderr
    warnings = [re.sub(r"^.*\]\[WARNING\] - ", "", line) for line in output.splitlines()
                if "WARNING" in line or "Warning" in line]
    return proc, tmp_path / "run", took, warnings


@contextlib.contextmanager
def refusing_port():
    yield refused_port()


@pytest.mark.parametrize(("server", "reason"), [(refusing_port, "connection refused"),
                                                (silent_port, "no answer within 5 s")],
                         ids=["refuses-connections", "accepts-and-never-answers"])
def test_a_run_whose_mlflow_server_does_not_answer_trains_without_it_after_one_warning(server, reason, tmp_path):
    with server() as port:
        uri = f"http://127.0.0.1:{port}"
        proc, run_dir, took, warnings = run_against(uri, tmp_path, "trainer.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < BOUND_S
    assert warnings == [f"logger mlflow: ConnectionError: nothing answers at {uri} ({reason}); "
                        "the run goes on without it"]
    assert read_results(run_dir)["status"] == "done"
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1]
    assert not (run_dir / "mlflow_run.json").exists()


def test_an_mlflow_server_that_falls_silent_mid_run_is_left_out_after_one_warning_and_the_run_finishes(tmp_path):
    with FakeMLflow(silent_after=1) as server:
        proc, run_dir, took, warnings = run_against(server.uri, tmp_path, "trainer.epochs=2")
        logged = sorted(step for key, step in server.metrics if key == "val_acc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < BOUND_S
    assert logged == [1]  # the server took epoch 1, then stopped answering
    assert warnings == [f"logger mlflow: ConnectionError: {server.uri} stopped answering (timed out); "
                        "the run goes on without it"]
    assert read_results(run_dir)["status"] == "done"
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1, 2]
