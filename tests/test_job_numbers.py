"""`hydra.sweep.subdir=run_${hydra.job.num}` (Hydra's own default, common in users' configs): what only
a job has may be interpolated in a hydra override, and a job keeps its number in the whole sweep when a
re-launch leaves finished runs out. Pure functions here; tests/test_slurm.py runs such a sweep on the
real cluster and with Hydra's basic launcher, first launch and re-launch."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coupled_net import sweep
from coupled_net.sweep import PlannedJob, numbered_runs
from hydra_plugins.coupled_net_launcher.launcher import given_keys
from hydra_plugins.coupled_net_launcher.sweeper import PlannedNumbers


def test_given_keys_reads_the_hydra_overrides_as_typed_without_resolving_them():
    """The SLURM launcher's setup read them resolved: `${hydra.job.num}` is only set in a job, so the
    launch ended with MissingMandatoryValue before anything was submitted."""
    config = OmegaConf.create({"hydra": {"job": {"num": "???"}, "overrides": {"hydra": [
        "hydra/launcher=slurm", "hydra.sweep.subdir=run_${hydra.job.num}", "hydra.launcher.mem_gb=2",
        "+hydra.launcher.additional_parameters.mem=2G", "~hydra.launcher.qos"]}}})
    assert given_keys(config) == {"hydra/launcher", "hydra.sweep.subdir", "hydra.launcher.mem_gb",
                                  "hydra.launcher.additional_parameters.mem", "hydra.launcher.qos"}


@pytest.fixture
def planned(monkeypatch):
    """A launch of six jobs (#0-#5, one override each) as the sweeper remembers its plan."""
    jobs = [PlannedJob(num, [f"seed={num}"], Path(f"run_{num}"), None) for num in range(6)]
    monkeypatch.setattr(sweep, "_launch", jobs)
    return jobs


@pytest.mark.parametrize("left, first, expected", [
    ([0, 1, 2, 3, 4, 5], 0, [(0, [0, 1, 2, 3, 4, 5])]),   # nothing finished: one launch, numbered from 0
    ([1, 2, 3, 4, 5], 0, [(1, [1, 2, 3, 4, 5])]),         # #0 finished: #1 is still #1, not #0
    ([0, 2, 3, 5], 0, [(0, [0]), (2, [2, 3]), (5, [5])]),  # gaps: one launch per run of consecutive numbers
    ([3, 4], 2, [(3, [3, 4])]),                           # a later batch (BasicSweeper counted 2 launched)
])
def test_a_batch_is_launched_as_runs_of_consecutive_planned_numbers(planned, left, first, expected):
    jobs = [[f"seed={num}"] for num in left]
    assert numbered_runs(jobs, first) == [(num, [[f"seed={n}"] for n in nums]) for num, nums in expected]


def test_without_a_plan_a_batch_is_numbered_as_hydra_numbers_it(monkeypatch):
    monkeypatch.setattr(sweep, "_launch", None)
    assert numbered_runs([["a=1"], ["a=2"]], 4) == [(4, [["a=1"], ["a=2"]])]


def test_a_launcher_that_numbers_from_initial_job_idx_is_given_each_run_from_its_number(planned):
    """Hydra's basic launcher, wrapped by the coupled_net sweeper: its returns in the batch's order."""
    calls = []

    class Numbering:  # as Hydra's BasicLauncher numbers a batch's jobs
        def launch(self, jobs, initial_job_idx):
            calls.append((initial_job_idx, [job[0] for job in jobs]))
            return [f"#{num}" for num in range(initial_job_idx, initial_job_idx + len(jobs))]

    returns = PlannedNumbers(Numbering()).launch([["seed=1"], ["seed=3"], ["seed=4"]], initial_job_idx=0)
    assert calls == [(1, ["seed=1"]), (3, ["seed=3", "seed=4"])]
    assert returns == ["#1", "#3", "#4"]
