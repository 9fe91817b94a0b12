"""One run twice is counted once (SPEC §6, §11): a group's `n` is its number of distinct seeds, and a
second run of a seed — however it came about — is reported, never averaged in (issue 18, item 2)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from coupled_net import review
from coupled_net.report import write_summary
from helpers import REPO, make_run, run_cli


@pytest.fixture
def typed_twice(tmp_path):
    """Two seeds of alpha 0 and 2, and the same two runs again recorded by the version that typed
    `trainer.label_smoothing=0` into a fingerprint of its own (other fingerprints, other numbers)."""
    sweep = tmp_path / "sweep"
    top1 = {}
    for alpha in (0, 2):
        for seed in (1, 2):
            top1[alpha, seed] = 70.0 + alpha + 3 * seed
            make_run(sweep / f"coupling.alpha={alpha},seed={seed}", coupling__alpha=alpha, seed=seed,
                     test_top1=top1[alpha, seed])
            make_run(sweep / f"coupling.alpha={alpha},seed={seed},trainer.label_smoothing=0", coupling__alpha=alpha,
                     seed=seed, test_top1=top1[alpha, seed] + 10, trainer__label_smoothing=0)
    return sweep, top1


def test_a_run_recorded_with_a_default_typed_out_is_the_run_it_repeats(typed_twice, caplog):
    sweep, top1 = typed_twice
    with caplog.at_level(logging.WARNING):
        runs = review.runs(sweep)
    repeats = runs[runs["duplicate_of"].notna()]
    assert sorted(p.rsplit("/", 1)[1] for p in repeats["run_dir"]) == [
        "coupling.alpha=0,seed=1,trainer.label_smoothing=0", "coupling.alpha=0,seed=2,trainer.label_smoothing=0",
        "coupling.alpha=2,seed=1,trainer.label_smoothing=0", "coupling.alpha=2,seed=2,trainer.label_smoothing=0"]
    groups = review.summarize(runs)
    assert list(groups["n"]) == [2, 2] and [list(s) for s in groups["seeds"]] == [[1, 2], [1, 2]]
    assert list(groups["test_top1_mean"]) == [(top1[0, 1] + top1[0, 2]) / 2, (top1[2, 1] + top1[2, 2]) / 2]


def test_a_group_counts_each_seed_once_and_names_the_repeat(tmp_path, caplog):
    """Two runs of one seed in one group that the collector cannot tell to be one run (records without
    their identity keys, other fingerprints): n is 2 seeds, not 3 runs; the first by path is kept; the
    other is reported."""
    sweep = tmp_path / "sweep"
    make_run(sweep / "a", seed=1, test_top1=60.0, fingerprint="aaaaaaaaaaaaaaaa", results={"identity": None})
    make_run(sweep / "b", seed=1, test_top1=90.0, fingerprint="bbbbbbbbbbbbbbbb", results={"identity": None})
    make_run(sweep / "c", seed=2, test_top1=70.0, fingerprint="cccccccccccccccc", results={"identity": None})
    with caplog.at_level(logging.WARNING):
        runs = review.runs(sweep)
    assert [m for m in caplog.messages if "repeats seed" in m] == [
        f"{sweep / 'b'} repeats seed 1 of {sweep / 'a'} in the same group: counted once"]
    groups = review.summarize(runs)
    assert list(groups["n"]) == [2] and list(groups["seeds"].iloc[0]) == [1, 2]
    assert groups["test_top1_mean"].iloc[0] == (60.0 + 70.0) / 2
    assert len(review.counted(runs)) == 2
    # a frame built without review.runs() (a notebook's own) is counted the same way
    raw = runs.assign(duplicate_of=None)
    assert list(review.summarize(raw)["n"]) == [2]


def test_the_summary_says_how_many_distinct_seeds_each_group_has(typed_twice):
    sweep, _ = typed_twice
    s = write_summary([sweep])
    assert "4 finished runs in 2 groups, 2 seeds per group" in s.headline
    assert s.headline.count("repeats ") == 4


@pytest.mark.slow
def test_extending_a_sweep_with_a_default_typed_as_an_integer_trains_nothing_new(tmp_path):
    """The issue's repro: the same sweep plus `trainer.label_smoothing=0` (the default 0.0)."""
    sweep = ("-m", "experiment=quickstart", "trainer.epochs=1", "coupling.alpha=0,2", "seed=1",
             f"hydra.sweep.dir={tmp_path / 's'}", f"dataset.root={tmp_path}")
    first = run_cli(*sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(*sweep, "trainer.label_smoothing=0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 of 2 runs of this sweep are already done" in again.stdout + again.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == [
        "coupling.alpha=0,experiment=quickstart,seed=1,trainer.epochs=1",
        "coupling.alpha=2,experiment=quickstart,seed=1,trainer.epochs=1"]  # no directory made for the repeat
    review_ = run_cli(str(tmp_path / "s"), script=REPO / "launch" / "collect.py", cwd=tmp_path)
    assert review_.returncode == 0, review_.stderr[-2000:]
    assert "2 finished runs in 2 groups, 1 seed per group" in review_.stdout
    groups = pd.read_csv(tmp_path / "s" / "summary_groups.csv")
    assert list(groups["n"]) == [1, 1] and list(groups["seeds"]) == [1, 1]
