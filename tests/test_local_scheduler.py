"""hydra/launcher=local as a scheduler (issue 19): each run of a sweep gets one physical GPU of those
the launch sees and its own cores, at most max_parallel at once. GPUs are injected with a stand-in
NVML (tests/helpers/fake_nvml): the runs still train on this machine's CPU, and report what their
process received."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from helpers import REPO, read_results, run_cli, run_dirs

pytestmark = pytest.mark.slow

FAST = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10", "trainer.epochs=1"]
FAKE_NVML = REPO / "tests" / "helpers" / "fake_nvml"
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def log_span(run_dir: Path) -> tuple[datetime, datetime]:
    """When the run itself started and ended: the first and last stamped lines of its train.log."""
    stamps = [m.group(1) for m in map(STAMP.match, (run_dir / "train.log").read_text().splitlines()) if m]
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return parse(stamps[0]), parse(stamps[-1])


def test_a_sweep_on_gpus_3_and_5_puts_one_run_on_each_with_disjoint_cores_two_at_a_time(tmp_path):
    sweep = tmp_path / "sweep"
    env = {"FAKE_NVML_GPUS": "0,1,2,3,4,5", "CUDA_VISIBLE_DEVICES": "3,5",
           "PYTHONPATH": f"{FAKE_NVML}:{REPO}"}
    proc = run_cli("-m", "hydra/launcher=local", *FAST, "trainer.device=cpu", "coupling.alpha=0,2", "seed=0,1",
                   f"hydra.sweep.dir={sweep}", f"dataset.root={tmp_path}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 run(s) over 2 slot(s): GPU(s) 3, 5" in proc.stdout + proc.stderr
    dirs = run_dirs(sweep)
    results = [read_results(d) for d in dirs]
    assert [r["status"] for r in results] == ["done"] * 4
    shares = [r["provenance"]["sharing"] for r in results]
    assert {s["cuda_visible_devices"] for s in shares} == {"3", "5"}  # what each run's process was given
    assert all(s["cuda_visible_devices"] == str(s["slot_gpu"]) for s in shares)
    assert all((s["shared_by"], s["parallel"], s["packed_in"]) == (1, 2, "local") for s in shares)
    spans = [log_span(d) for d in dirs]
    for i, (a_start, a_end) in enumerate(spans):  # runs alive at the same time never share a GPU or a core
        for j, (b_start, b_end) in enumerate(spans[i + 1:], start=i + 1):
            if a_start < b_end and b_start < a_end:
                assert shares[i]["slot_gpu"] != shares[j]["slot_gpu"]
                assert not set(shares[i]["slot_cpus"]) & set(shares[j]["slot_cpus"])
    moments = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    alive = [sum(d for _, d in moments[:i + 1]) for i in range(len(moments))]
    assert max(alive) == 2  # two GPUs, one run each: two at once, never three
    threads = [re.search(r", (\d+) threads,", (d / "train.log").read_text()).group(1) for d in dirs]
    assert threads == ["1"] * 4  # trainer.threads=auto divides the 2 cores instead of taking both


def test_a_launch_refuses_a_gpu_it_does_not_see_in_one_line_before_anything_is_written(tmp_path):
    env = {"FAKE_NVML_GPUS": "0,1", "PYTHONPATH": f"{FAKE_NVML}:{REPO}"}
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.gpus=[7]", *FAST, "coupling.alpha=0,2",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "coupled_net: error: hydra.launcher.gpus=[7]: GPU 7 is not on this machine (this process sees GPUs 0, 1): "
        "choose among those, or gpus=[] to run on CPUs")
    assert not (tmp_path / "sweep").exists()
