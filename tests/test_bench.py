"""launch/bench.py's trainer sections and launch/gpu_check.py, at toy sizes on a CPU: structure only
(rows, named flags, ratios from the medians, flags restored after every pass), never a timing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import pytest
import torch

from coupled_net import bench
from coupled_net import trainer as trainer_module
from coupled_net.build import seed_everything

from helpers import REPO

TINY = ["experiment=quickstart", "dataset.train_per_class=8", "dataset.test_per_class=2", "trainer.batch_size=16",
        "trainer.threads=1"]
SENTINEL = (True, True, False, False)  # a combination no side sets: anything left behind shows


@pytest.fixture
def sentinel_flags():
    with bench.flags_restored():
        bench.set_flag_state(SENTINEL)
        yield
        assert bench.flag_state() == SENTINEL  # every side's flags were undone


@pytest.fixture
def flags_seen(monkeypatch):
    """The flags in force at each Trainer training pass and each pass of the seed's loop."""
    seen = {"trainer": [], "seed": []}
    train_one_epoch, seed_steps = trainer_module.Trainer.train_one_epoch, bench.seed_steps

    def trainer_pass(self, *args, **kwargs):
        seen["trainer"].append(bench.flag_state())
        return train_one_epoch(self, *args, **kwargs)

    def seed_pass(*args, **kwargs):
        seen["seed"].append(bench.flag_state())
        return seed_steps(*args, **kwargs)
    monkeypatch.setattr(trainer_module.Trainer, "train_one_epoch", trainer_pass)
    monkeypatch.setattr(bench, "seed_steps", seed_pass)
    return seen


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_bench_switches_are_exactly_what_a_run_sets(deterministic):
    with bench.flags_restored():
        seed_everything(0, deterministic)
        assert bench.flag_state() == bench.run_switches(deterministic)


def test_a_sides_flags_are_restored_after_its_pass_even_when_it_fails(sentinel_flags):
    def fails():
        assert bench.flag_state() == bench.run_switches(False)
        raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError):
        bench.under(bench.run_switches(False), fails)()
    assert bench.flag_state() == SENTINEL


def test_a_trainer_section_times_both_deterministic_sides_under_their_flags(sentinel_flags, flags_seen):
    rows, summary = bench.trainer_section("toy", TINY, torch.device("cpu"), repeats=2, baseline="pil", workers=0,
                                          floor_batches=2, floor_steps=3)
    on, off = bench.run_switches(True), bench.run_switches(False)
    # every training pass (the pil baseline's too: the run's flags) ran under one side's flags, both sides did
    assert set(flags_seen["trainer"]) == {on, off} and flags_seen["seed"] == []

    header, pass_, floor, pass_over, epoch, epoch_over, ckpt, base_header, base = rows
    assert header.title == ("toy; the run's flags: deterministic=true, precision=fp32, channels_last=false, "
                            "compile=false, pipeline=tensor")
    assert (header.left, header.right) == ("deterministic=true", "deterministic=false")
    assert pass_[0] == "training pass: Trainer.train_one_epoch, tensor pipeline, 176 images"  # 85 % of 26 x 8
    assert floor[0] == "  … compute floor: the same step on 2 batches built beforehand, 3 steps"
    assert epoch[0].startswith("whole epoch: Trainer.fit (train, val, KE, val after KE, epochs.csv row, checkpoints)")
    for row in (pass_, floor, epoch, base):
        assert isinstance(row[1], bench.Rate) and isinstance(row[2], bench.Rate) and row[1].n == row[2].n == 2
        assert row[3] == pytest.approx(float(row[2]) / float(row[1]))  # right over left
    # time per image over the floor's, from the medians printed beside them
    for ratio, timed in ((pass_over, pass_), (epoch_over, epoch)):
        assert isinstance(ratio[1], bench.Ratio) and ratio[3] is None
        assert ratio[1] == pytest.approx(float(floor[1]) / float(timed[1]))
        assert ratio[2] == pytest.approx(float(floor[2]) / float(timed[2]))
    # the checkpoints as the trainer times them (checkpoint_time_s), a share of its whole epoch
    assert "checkpoint_time_s" in ckpt[0] and isinstance(ckpt[1], bench.Share)
    assert ckpt[1] == pytest.approx(summary["checkpoint_s"]["true"] / (176 / float(epoch[1])))
    assert 0 < summary["checkpoint_s"]["true"] and 0 < ckpt[1] < 1
    assert base_header.left == "pil pipeline (num_workers=0, pin_memory=false), Trainer"
    assert base_header.right == "Trainer, tensor, deterministic=true"
    assert base[0] == "training pass (176 images)"
    assert summary["pass_over_floor"]["false"] == pytest.approx(float(pass_over[2]))

    text = bench.table(rows, torch.device("cpu"), 0)
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in text and "num_workers=16 clamped to the" in text
    lines = text.splitlines()
    assert f"| {header.title} | deterministic=true | deterministic=false | false / true |" in lines
    assert f"| {pass_over[0]} | {pass_over[1]:.2f}× | {pass_over[2]:.2f}× |  |" in lines
    assert f"| {ckpt[0]} | {100 * ckpt[1]:.2f} % | {100 * ckpt[2]:.2f} % |  |" in lines
    assert all(line.count("|") == 5 for line in lines if line.startswith("|"))  # no cell holds a bar


def test_the_warm_up_meets_the_short_last_batches_a_timed_pass_will_meet(monkeypatch):
    # cudnn.benchmark autotunes each new shape once: not in a timed pass
    run = bench.bench_run_of([*TINY, "trainer.batch_size=24", "trainer.eval_batch_size=20"], torch.device("cpu"))
    met = []
    monkeypatch.setattr(bench, "training_pass", lambda trainer, loader: met.extend(len(y) for _, y in loader))
    monkeypatch.setattr(bench, "evaluate_batches", lambda model, batches, *a: met.extend(len(y) for _, y in batches))
    bench.batch_shapes(run.trainer, next(iter(run.trainer.loaders["train"])))()
    assert met == [8, 8, 12, 12]  # 176 training images in 24s, 32 validation images in 20s


def test_the_seed_baseline_runs_the_seeds_loop_under_the_seeds_flags(sentinel_flags, flags_seen):
    rows, summary = bench.trainer_section("toy", [*TINY, "trainer.precision=bf16"], torch.device("cpu"), repeats=1,
                                          baseline="seed", workers=0, floor_batches=1)
    assert set(flags_seen["seed"]) == {bench.SEED_SWITCHES} and len(flags_seen["seed"]) == 2  # warm-up, 1 timed
    header, row = rows[-2:]
    assert header.left == "the seed's loop: pil (num_workers=0, pin_memory=false), .item() per batch, cudnn.deterministic"
    assert "precision=bf16" in rows[0].title  # the run's flags named; the seed's side stays fp32
    assert summary["pass_over_baseline"] == pytest.approx(float(row[2]) / float(row[1]))


def test_the_steps_row_sets_the_seeds_loop_against_the_trainers_step(sentinel_flags, flags_seen):
    (name, seed, ours), = bench.alexnet_steps(torch.device("cpu"), steps=1, batch=4, repeats=1,
                                              overrides=["model.input_size=64", "trainer.threads=1"])
    assert name.startswith("AlexNet@64 train steps (batch 4): the seed's loop vs the Trainer's step "
                           "(deterministic=true, precision=fp32")
    assert flags_seen["seed"] == [bench.SEED_SWITCHES] * 2 and flags_seen["trainer"] == [bench.run_switches(True)] * 2
    assert seed.n == ours.n == 1


def test_the_sync_check_watches_the_steps_and_allows_the_once_a_phase_read(monkeypatch):
    modes, calls = [0], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: (modes.append(mode), calls.append(mode)))
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    original = trainer_module._summed_over_ranks
    read_under = []

    def summed(*args, **kwargs):
        read_under.append(modes[-1])
        return original(*args, **kwargs)
    monkeypatch.setattr(trainer_module, "_summed_over_ranks", summed)
    result = bench.sync_check(TINY, device="cpu")
    assert result["passed"] is True and result["error"] is None and result["syncs_under_warn"] == {}
    assert result["steps"] == 11  # 176 training images, batch 16
    # the warm-up pass unwatched; then a "warn" pass and an "error" pass, each switched on after its first
    # batch, off around the once-a-phase read of the sums and back on after it, off at the pass's end
    assert calls == [0, 0, "warn", 0, "warn", 0, "error", 0, "error", 0]
    assert read_under == [0, 0, 0]
    assert trainer_module._summed_over_ranks is summed  # put back


def test_the_sync_check_names_the_line_that_synchronises_in_every_step(monkeypatch):
    modes = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    cross_entropy = torch.nn.functional.cross_entropy

    def syncing(*args, **kwargs):  # what a .item() in the loss would do under the debug mode
        if modes[-1] == "warn":
            warnings.warn("called a synchronizing CUDA operation")
        elif modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        return cross_entropy(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", syncing)
    result = bench.sync_check(TINY, device="cpu")
    assert result["passed"] is False and "called a synchronizing CUDA operation" in result["error"]
    (where, count), = result["syncs_under_warn"].items()
    assert where.startswith("trainer.py:") and "F.cross_entropy(outputs, labels" in where
    assert count == result["steps"] == 11  # every step watched, the first included


def test_the_sync_check_is_skipped_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.sync_check() == {"passed": None, "skipped": "no CUDA GPU"}


def test_the_bench_command_line_refuses_an_unknown_section(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--only", "quickstart,nope"])
    assert e.value.code == 2 and "unknown section(s) ['nope']" in capsys.readouterr().err


def test_the_bench_writes_its_rows_and_figures_as_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICKSTART_TRAIN", TINY)
    monkeypatch.setattr(bench, "seed_workers", lambda: 0)
    assert bench.main(["--only", "quickstart", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    found = json.loads((tmp_path / "b.json").read_text())
    assert found["settings"]["sections"] == ["quickstart"] and found["settings"]["size"] == "small"
    assert found["settings"]["pil_workers"] == 0 and found["settings"]["pin_memory"] is False
    section = found["sections"]["quickstart"]
    assert section["flags"] == {"deterministic": True, "precision": "fp32", "channels_last": False, "compile": False,
                                "pipeline": "tensor"}
    assert set(section["pass_over_floor"]) == {"true", "false"} and section["baseline"].startswith("pil pipeline")
    assert found["rows"][0]["table"].startswith("quickstart (small_cnn @28px")
    assert found["table"] in capsys.readouterr().out


# ---- launch/gpu_check.py ------------------------------------------------------------------------

def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_dry_run_lists_its_five_steps_with_their_commands_and_limits(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "gpu_check.py"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    steps = [line.split(" ")[1] for line in out.splitlines() if line[:1].isdigit()]
    assert steps == ["gpu_tests", "torchrun", "sync", "bench", "sweep"]
    assert "-m pytest -m requires_gpu" in out
    assert "torch.distributed.run --standalone --nproc_per_node=2 launch/train.py experiment=quickstart" in out
    assert "only with >= 2 GPUs" in out
    assert "launch/bench.py --sync-check" in out and "launch/bench.py --size seed" in out
    assert "hydra/launcher=local hydra.launcher.runs_per_gpu=4" in out and "seed=0,1,2,3,4,5,6,7" in out
    limits = [int(line.split("(limit ")[1].split(" s")[0]) for line in out.splitlines() if line[:1].isdigit()]
    assert sum(limits) - 90 <= gpu_check().BUDGET_S  # one GPU: everything but torchrun fits the budget
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_gpu_check_step_past_its_limit_is_killed_with_its_children_and_reported(tmp_path):
    gc = gpu_check()
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
            "print('started', flush=True); time.sleep(60)"
    step = gc.Step("slow", "sleeps", [sys.executable, "-c", child], 60)
    result = gc.run_step(step, tmp_path / "slow", limit=3)
    assert result["status"] == "timeout" and result["seconds"] < 30 and "started" in result["log_tail"]
    done = gc.run_step(gc.Step("ok", "exits", [sys.executable, "-c", "print('fine')"], 60,
                               check=lambda step, out: (True, {"found": 1})), tmp_path / "ok", limit=30)
    assert (done["status"], done["rc"], done["details"]) == ("passed", 0, {"found": 1}) and "log_tail" not in done


def test_the_gpu_check_reads_what_a_packed_sweep_left(tmp_path):
    gc = gpu_check()
    for i in range(gc.PACKED_RUNS):
        run = tmp_path / "sweep" / f"seed={i}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"status": "done", "provenance": {"sharing": {"shared_by": 4}}}))
    ok, details = gc.check_sweep(None, tmp_path)
    assert ok and {r["shared_by"] for r in details["runs"].values()} == {4}
    (tmp_path / "sweep" / "seed=3" / "results.json").write_text(json.dumps({"status": "failed"}))
    assert gc.check_sweep(None, tmp_path)[0] is False
