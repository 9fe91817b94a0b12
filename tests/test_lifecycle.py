"""A sweep's life (SPEC §5, §6): extending, re-launching, resuming and double-starting runs never
re-trains, mixes or double-counts them; a refused start changes no byte; a status tells the truth.
The real CLI into tmp_path, on the CPU."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from coupled_net.lifecycle import execute_run

from helpers import (REPO, TRAIN, compose_cfg, epoch_numbers, metric_table, read_results, run_cli, run_dirs,
                     run_sweep, snapshot, wait_for)

pytestmark = pytest.mark.slow

FAST = ["experiment=quickstart", "dataset.train_per_class=20", "dataset.test_per_class=5", "trainer.epochs=1"]
LONGER = ["experiment=quickstart", "dataset.train_per_class=300", "dataset.test_per_class=10", "trainer.epochs=3"]


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_extending_a_sweep_from_another_data_root_trains_only_the_new_runs(tmp_path):
    first, sweep, old = run_sweep(tmp_path, *FAST, "coupling.alpha=0,8", "seed=1,2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {run_dir.name: snapshot(run_dir) for run_dir in old}
    (tmp_path / "copy").mkdir()  # the same (generated) data from another root: not part of a run's identity

    again = run_cli("-m", *FAST, "coupling.alpha=0,8", "seed=1,2,3", f"hydra.sweep.dir={sweep}",
                    f"dataset.root={tmp_path / 'copy'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 6 runs of this sweep are already done; launching the other 2" in again.stdout
    assert {run_dir.name: snapshot(run_dir) for run_dir in old} == before  # bytes and mtimes
    runs = run_dirs(sweep)
    assert [p.name.split(",")[0] + "," + p.name.split(",")[4] for p in runs] == [
        f"coupling.alpha={a},seed={s}" for a in (0, 8) for s in (1, 2, 3)]
    assert all(read_results(p)["status"] == "done" and read_results(p)["resumes"] == 0 for p in runs)
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(zip(summary["alpha"], summary["seed"])) == [(a, s) for a in (0, 8) for s in (1, 2, 3)]
    groups = pd.read_csv(sweep / "summary_groups.csv")
    assert list(zip(groups["coupling.alpha"], groups["n"])) == [(0, 3), (8, 3)]  # none counted twice

    # the same runs spelt another way (a default typed out, a value quoted): found where they are
    spelt = run_cli("-m", *FAST, "coupling.alpha=0,8", "seed=1,2,3", "coupling.mode='copy'", "optimizer.lr=0.05",
                    f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path)
    assert spelt.returncode == 0, spelt.stderr[-3000:]
    assert "6 of 6 runs of this sweep are already done; launching the other 0" in spelt.stdout
    assert run_dirs(sweep) == runs


def test_relaunching_with_an_edited_preset_is_refused_listing_every_conflict_and_changes_nothing(tmp_path):
    preset = tmp_path / "conf" / "experiment" / "mine.yaml"  # a user's own preset, found through --config-dir
    preset.parent.mkdir(parents=True)
    preset.write_text((REPO / "conf" / "experiment" / "quickstart.yaml").read_text())
    args = ["-cd", str(tmp_path / "conf"), "experiment=mine", *FAST[1:]]
    first, sweep, runs = run_sweep(tmp_path, *args, "coupling.alpha=0,8")
    assert first.returncode == 0, first.stderr[-3000:]
    preset.write_text(preset.read_text().replace("lr: 0.05", "lr: 0.04").replace("patience: 4", "patience: 2"))
    before = snapshot(sweep)

    again, _, _ = run_sweep(tmp_path, *args, "coupling.alpha=0,8,4")  # extended too: nothing may start
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert lines[-1] == f"coupled_net: error: 2 conflict(s) in sweep {sweep} (listed above): nothing was started " \
                        "or submitted"
    for run_dir in runs:
        assert (f"coupled_net: error: {run_dir}: results.json is a run of another config: optimizer.lr: 0.05 → 0.04; "
                "trainer.patience: 4 → 2; choose another hydra.sweep.dir, or launch with the config it was made with"
                in lines)
    assert "Traceback" not in again.stderr
    assert snapshot(sweep) == before  # multirun.yaml and every run directory, .hydra/ included
    assert run_dirs(sweep) == runs  # alpha=4 did not start


def test_labels_swept_in_one_sweep_are_one_run_and_refused_up_front(tmp_path):
    proc, sweep, runs = run_sweep(tmp_path, *FAST, "+copy=a,b")
    assert proc.returncode == 2 and runs == []
    name = "dataset.test_per_class=5,dataset.train_per_class=20,experiment=quickstart,trainer.epochs=1"
    assert proc.stderr.strip().splitlines()[0].startswith(
        f"coupled_net: error: {sweep / name}: 2 jobs of this sweep would share it (")


def test_a_second_process_in_a_run_directory_is_refused_at_once_naming_the_first(tmp_path):
    args = [*LONGER, f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}"]
    first = start(*args, cwd=tmp_path)
    wait_for(lambda: (tmp_path / "run" / "results.json").exists(), what="the first run to start")
    owner = read_results(tmp_path / "run")["owner"]
    assert owner["pid"] == first.pid
    started = time.perf_counter()
    second = run_cli(*args, cwd=tmp_path, timeout=120)
    took = time.perf_counter() - started
    assert second.returncode == 2 and first.poll() is None
    assert second.stderr.strip().splitlines() == [
        f"coupled_net: error: {tmp_path / 'run'}: in use by pid {first.pid} on host {owner['host']}, since "
        f"{owner['since']}; wait for it to end, or stop it, then start again"]
    print(f"second process refused after {took:.1f} s (interpreter start included)")
    assert took < 30
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert epoch_numbers(tmp_path / "run") == [1, 2, 3]
    assert read_results(tmp_path / "run")["status"] == "done"


def test_a_checkpoint_of_another_config_is_not_resumed_and_a_refused_start_changes_no_byte(tmp_path, monkeypatch):
    from coupled_net.trainer import Trainer

    common = ["experiment=quickstart", "dataset.train_per_class=20", "dataset.test_per_class=5", "trainer.epochs=2",
              f"dataset.root={tmp_path}"]

    def stop_after_first_epoch(self, progress, *args, **kwargs):
        real_save(self, progress, *args, **kwargs)
        raise KeyboardInterrupt  # a kill after the first checkpoint
    real_save = Trainer._save_last
    monkeypatch.setattr(Trainer, "_save_last", stop_after_first_epoch)
    for name, lr in (("mine", "0.05"), ("other", "0.02")):
        with pytest.raises(KeyboardInterrupt):
            execute_run(compose_cfg(*common, f"optimizer.lr={lr}"), tmp_path / name)
    mine = tmp_path / "mine"
    (mine / "checkpoints" / "last.pt").write_bytes((tmp_path / "other" / "checkpoints" / "last.pt").read_bytes())
    (mine / ".hydra").mkdir()
    (mine / ".hydra" / "config.yaml").write_text("# the config this run was started with\n")
    (mine / ".lock").unlink()  # as a directory copied from elsewhere would be: a refusal must not create it
    before = snapshot(mine)
    mtime = mine.stat().st_mtime_ns

    proc = run_cli(*common, f"hydra.run.dir={mine}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"coupled_net: error: {mine}: checkpoints/last.pt is a run of another config: optimizer.lr: 0.02 → 0.05; "
        "choose another directory, or start it with the config it was made with"]
    assert snapshot(mine) == before  # .hydra/config.yaml, results.json, train.log: bytes and mtimes
    assert mine.stat().st_mtime_ns == mtime  # nothing created or removed either


def test_a_start_in_a_finished_run_with_another_config_changes_no_byte(tmp_path):
    args = [*FAST, f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}"]
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "run")
    again = run_cli(*args, cwd=tmp_path)  # the same config: nothing to do
    assert again.returncode == 0
    assert "already holds a finished run (status: done); nothing to do" in again.stdout
    other = run_cli(*args, "coupling.alpha=4", "optimizer.lr=0.02", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"coupled_net: error: {tmp_path / 'run'}: results.json is a run of another config: coupling.alpha: 0 → 4; "
        "optimizer.lr: 0.05 → 0.02; choose another directory, or start it with the config it was made with")
    assert snapshot(tmp_path / "run") == before
    assert "alpha: 0" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()  # what evaluate.py will read


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("whole")
    proc = run_cli(*LONGER, f"hydra.run.dir={base / 'run'}", f"dataset.root={base}", cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_mid_epoch_ends_the_run_interrupted_and_the_same_command_resumes_it(tmp_path, sig,
                                                                                         uninterrupted):
    run_dir = tmp_path / "run"
    args = [*LONGER, f"hydra.run.dir={run_dir}", f"dataset.root={tmp_path}"]
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: (run_dir / "epochs.csv").exists(), what="the first epoch")
    time.sleep(1.0)  # into the second epoch's training
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    last = err.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    match = re.fullmatch(rf"coupled_net: error: interrupted by {name} at step (\d+) of epoch 2: {run_dir} is "
                         rf"`interrupted`; the same command with hydra.run.dir={run_dir} resumes it", last)
    assert match, err[-2000:]
    assert "Traceback" not in err
    res = read_results(run_dir)
    assert (res["status"], res["epochs_run"]) == ("interrupted", 1)
    assert res["error"] == f"interrupted by {name} at step {match[1]} of epoch 2; the same command resumes it"

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after step {match[1]} of epoch 2 (resume #1)" in again.stdout
    res = read_results(run_dir)
    assert (res["status"], res["resumes"], res["error"]) == ("done", 1, None)
    assert epoch_numbers(run_dir) == [1, 2, 3]
    pd.testing.assert_frame_equal(metric_table(run_dir), metric_table(uninterrupted))
    assert res["metrics"] == read_results(uninterrupted)["metrics"]


def test_ctrl_c_stops_a_whole_sweep_and_relaunching_finishes_it(tmp_path):
    sweep = tmp_path / "sweep"
    common = ["-m", *LONGER, "trainer.epochs=2", f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}"]
    args = [*common, "coupling.alpha=0,2"]
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: run_dirs(sweep) and (run_dirs(sweep)[0] / "epochs.csv").exists(), what="the first epoch")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].endswith(f"the same command with hydra.sweep.dir={sweep} resumes it")
    (first,) = run_dirs(sweep)  # the second run never started
    assert read_results(first)["status"] == "interrupted"
    other = run_cli(*common, "coupling.alpha=2", cwd=tmp_path)  # another launch into the sweep: judged on its run
    assert other.returncode == 0, other.stderr[-3000:]
    assert [read_results(p)["status"] for p in run_dirs(sweep)] == ["interrupted", "done"]
    again = run_cli(*args[1:], "-m", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [read_results(p)["status"] for p in run_dirs(sweep)] == ["done", "done"]
    assert read_results(first)["resumes"] == 1


def test_ctrl_c_on_a_local_launcher_sweep_stops_its_jobs_too_and_the_same_command_finishes_them(tmp_path):
    sweep = tmp_path / "sweep"
    # two epochs are enough: the signal comes once both runs have one, with a whole epoch to spare
    shorter = [*LONGER, "dataset.train_per_class=200", "trainer.epochs=2"]
    args = ["-m", "hydra/launcher=local", "hydra.launcher.gpus=[]", "hydra.launcher.cpus_per_run=1", *shorter,
            "coupling.alpha=0,2,4", f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}"]
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: sum((p / "epochs.csv").exists() for p in run_dirs(sweep)) == 2, what="two first epochs")
    proc.send_signal(signal.SIGINT)  # the launching process only, as `kill -INT` would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopping the 2 running run(s): each saves a checkpoint at the end of its step and records " \
           "`interrupted`; 1 not started" in out + err and "Traceback" not in err
    statuses = [read_results(p) for p in run_dirs(sweep)]
    assert [r["status"] for r in statuses] == ["interrupted", "interrupted"]  # the third never started
    assert all(r["owner"]["slurm_job_id"] is None for r in statuses)  # the pool's runs are not SLURM's
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    finished = [read_results(p) for p in run_dirs(sweep)]
    assert [r["status"] for r in finished] == ["done"] * 3
    assert [r["resumes"] for r in finished] == [1, 1, 0]