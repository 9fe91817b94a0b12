"""A sweep's verdict (SPEC §8): its exit status and last lines name the runs that did not finish, and
do not depend on writing the summary (issue 18, items 3 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coupled_net import sweep as sweep_module
from coupled_net.callbacks import SweepReport, run_statuses, verdict
from coupled_net.sweep import PlannedJob
from helpers import make_run, run_cli

OWNER = {"host": "node7", "pid": 4242, "slurm_job_id": None, "since": "2026-12-02T10:00:00+0000"}


def sweep_config(sweep_dir: Path):
    return OmegaConf.create({"optimized_metric": "val_top1", "hydra": {
        "sweep": {"dir": str(sweep_dir)}, "launcher": {},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}}})


def planned(*run_dirs: Path) -> list[PlannedJob]:
    return [PlannedJob(i, [f"seed={i}"], d, None) for i, d in enumerate(run_dirs)]


def test_a_run_another_launch_is_running_is_named_with_its_owner_not_called_failed(tmp_path):
    """Two launches raced into one sweep: the other one holds this run, has locked it and not yet
    recorded itself in results.json (its owner is null there)."""
    run = make_run(tmp_path / "s" / "a", status="running", results={"owner": None})
    (run / ".lock").write_text(json.dumps(OWNER) + "\n")
    done = make_run(tmp_path / "s" / "b")
    lines = verdict(run_statuses(tmp_path / "s"), planned(run, done), tmp_path / "s")
    assert lines == [f"1 of 2 runs are still running in another process in {tmp_path / 's'}: a (running: in use by "
                     "pid 4242 on host node7, since 2026-12-02T10:00:00+0000)"]


def test_a_run_that_finished_since_it_was_collected_is_not_in_the_verdict(tmp_path):
    run = make_run(tmp_path / "s" / "a", status="running")
    seen = run_statuses(tmp_path / "s")  # collected while it ran ...
    make_run(tmp_path / "t" / "a")
    (run / "results.json").write_bytes((tmp_path / "t" / "a" / "results.json").read_bytes())  # ... then done
    assert verdict(seen, planned(run), tmp_path / "s") == []


def test_a_sweep_whose_runs_all_finished_has_an_empty_verdict(tmp_path):
    """An empty frame of unfinished runs once raised KeyError('run_dir') there (a Python list of no
    booleans selects no columns), which Hydra turned into a warning at the end of every good sweep."""
    a, b = make_run(tmp_path / "s" / "a"), make_run(tmp_path / "s" / "b")
    assert verdict(run_statuses(tmp_path / "s"), planned(a, b), tmp_path / "s") == []
    assert verdict(run_statuses(tmp_path / "s"), None, tmp_path / "s") == []


def test_failed_runs_and_runs_never_started_are_counted_against_the_launch(tmp_path):
    failed = make_run(tmp_path / "s" / "a", status="failed", results={"error": "ValueError: boom"})
    never = tmp_path / "s" / "b"
    lines = verdict(run_statuses(tmp_path / "s"), planned(failed, never), tmp_path / "s")
    assert lines == [f"2 of 2 runs failed in {tmp_path / 's'}: a (failed: ValueError: boom); b (not_started)"]


def test_a_summary_that_cannot_be_written_is_one_line_and_a_non_zero_exit(tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "s" / "a")
    (tmp_path / "s" / "summary.md").mkdir()  # the summary cannot be written there
    monkeypatch.setattr(sweep_module, "_launch", None)
    with pytest.raises(SystemExit) as end:
        SweepReport().on_multirun_end(sweep_config(tmp_path / "s"))
    assert end.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"coupled_net: error: the sweep summary could not be written into {tmp_path / 's'}: "
                           "IsADirectoryError: [Errno 21] Is a directory: ")


@pytest.mark.slow
def test_a_sweep_with_a_failed_run_and_an_unwritable_summary_names_both_and_exits_1(tmp_path):
    """The issue's repro: `mkdir S/summary.md`, then a sweep into S with one run that fails."""
    (tmp_path / "s" / "summary.md").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    proc = run_cli("-m", "experiment=quickstart", "dataset=mnist", f"dataset.root={tmp_path / 'empty'}",
                   "dataset.download=false", "coupling.alpha=0", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert proc.returncode == 1
    *_, failed, summary = proc.stderr.strip().splitlines()
    run = "coupling.alpha=0,dataset=mnist,experiment=quickstart"
    error = json.loads((tmp_path / "s" / run / "results.json").read_text())["error"]
    assert failed == f"coupled_net: error: 1 of 1 runs failed in {tmp_path / 's'}: {run} (failed: {error})"
    assert summary.startswith(f"coupled_net: error: the sweep summary could not be written into {tmp_path / 's'}: "
                              "IsADirectoryError: ")
    assert "warnings.warn" not in proc.stderr
