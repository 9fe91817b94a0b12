"""The GPU path's decisions, exercised on a CPU (issue 20): each DDP rank's GPU is current before the
process group exists; CPU shares under torchrun and under SLURM tasks; a checkpoint's generators are
the run's own device's and each rank's; ranks draw distinctly; checkpoint writes are timed and
`trainer.last_every` spaces last.pt."""

from __future__ import annotations

import logging
import math
import signal
import time

import pytest
import torch
import torch.distributed as dist

from coupled_net import build, checkpoint, distributed, machine
from coupled_net.build import rank_seed
from coupled_net.distributed import World
from coupled_net.epochlog import read_epochs
from coupled_net.errors import ConfigError
from coupled_net.lifecycle import execute_run
from coupled_net.signals import RunInterrupted
from coupled_net.trainer import Trainer
from coupled_net.validation import validate
from helpers import compose_cfg, read_results

FAST = ["experiment=quickstart", "dataset.train_per_class=20", "dataset.test_per_class=5"]


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with `n` CUDA GPUs as torch sees them; every call that would touch one is recorded."""
    calls = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
        return calls
    return install


@pytest.fixture
def fake_group(monkeypatch):
    """init_process_group recorded instead of run (rank and size from the environment)."""
    calls = []

    def init(backend, **kwargs):
        calls.append(("init", backend, kwargs.get("device_id")))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(machine, "submitit_tasks", lambda: 1)
    monkeypatch.setattr(distributed, "submitit_tasks", lambda: 1)
    return calls


@pytest.mark.parametrize("visible, local_rank, name, gpu", [
    (2, 1, "cuda", 1),      # torchrun, 2 GPUs: rank 1 takes GPU 1
    (2, 1, "auto", 1),
    (1, 3, "cuda", 0),      # a SLURM task bound to its one GPU: cuda:0 whatever its rank
    (4, 5, "cuda", 1),      # more ranks than GPUs on the node: wraps
])
def test_each_rank_makes_its_gpu_current_before_the_process_group_exists(monkeypatch, fake_gpus, fake_group,
                                                                          visible, local_rank, name, gpu):
    calls = fake_gpus(visible)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    world = distributed.init_world(name)
    want = torch.device("cuda", gpu)
    assert calls == [("set_device", want)] and fake_group == [("init", "nccl", want)]
    assert (world.rank, world.size, world.local_rank) == (1, 2, local_rank)


@pytest.mark.parametrize("name", ["cpu", "tpu", "cuda:7"])
def test_a_cpu_run_or_a_device_the_run_refuses_joins_with_gloo_and_touches_no_gpu(monkeypatch, fake_gpus, fake_group,
                                                                                   name):
    calls = fake_gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.init_world(name)  # tpu and cuda:7 (of 2) are refused in one line by the run's validation
    assert calls == [] and fake_group == [("init", "gloo", None)]


def test_a_named_gpu_outside_ddp_is_made_current(fake_gpus):
    calls = fake_gpus(4)
    assert machine.select_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert machine.select_device(torch.device("cpu")) == torch.device("cpu")
    assert calls == [("set_device", torch.device("cuda", 3))]


def test_one_named_gpu_for_the_ranks_of_one_node_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(build, "validate", lambda cfg: torch.device("cuda", 0))
    monkeypatch.setattr(build, "submitit_tasks", lambda: 1, raising=False)
    monkeypatch.setattr(machine, "submitit_tasks", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    quiet = logging.getLogger("coupled_net")
    level = quiet.level
    try:
        with pytest.raises(ConfigError) as e:
            build.resolve(compose_cfg(*FAST, "trainer.device=cuda:0"), World(rank=1, size=2, local_rank=1))
    finally:
        quiet.setLevel(level)  # resolve quiets rank 1's log: not this test process's for the tests after
    assert str(e.value) == ("trainer.device='cuda:0': names one GPU for the 2 processes of this run on this node; "
                            "use cuda (each process takes the GPU of its LOCAL_RANK)")


@pytest.mark.parametrize("tasks, local_world, threads", [(1, "4", 2), (4, "4", 8), (1, None, 8)],
                         ids=["torchrun: 4 ranks share 8 CPUs", "SLURM: 4 tasks with 8 CPUs each", "one process"])
def test_cpu_threads_are_divided_only_among_ranks_that_share_an_allocation(monkeypatch, tasks, local_world, threads):
    monkeypatch.setattr(machine, "submitit_tasks", lambda: tasks)
    monkeypatch.setattr(build, "usable_cpus", lambda: 8)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    cfg = compose_cfg(*FAST, "trainer.threads=auto", "trainer.num_workers=auto")
    got_threads, workers = build._threads_and_workers(cfg.trainer, torch.device("cuda", 0))
    assert (got_threads, workers) == (threads, threads - 1)  # on a GPU: a worker per CPU but one


# ---- generators ----------------------------------------------------------------------------------

def test_a_checkpoint_saved_on_a_cpu_holds_no_gpu_generator():
    assert checkpoint.rng_state(torch.device("cpu"))["cuda"] is None


@pytest.mark.parametrize("index, expected", [(0, "first"), (1, "second"), (3, None)])
def test_an_old_checkpoint_with_every_gpus_generator_restores_the_runs_own_or_none(monkeypatch, index, expected):
    # written before 2026-12 on a host with 2 GPUs; resumed as cuda:index (3: the host now shows more, or others)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    state = {**checkpoint.rng_state(None), "cuda": ["first", "second"]}
    checkpoint.set_rng_state(state, torch.device("cuda", index))  # no IndexError
    assert restored == ([] if expected is None else [(expected, torch.device("cuda", index))])


def test_each_rank_takes_its_own_saved_generators_and_a_new_rank_keeps_its_seed(caplog):
    saved = [{"name": "rank 0"}, {"name": "rank 1"}]
    assert [checkpoint.rank_rng(saved, r) for r in (0, 1, 2)] == [saved[0], saved[1], None]
    old = {"name": "rank 0 alone"}  # before 2026-12: rank 0's, which every rank used
    assert checkpoint.rank_rng(old, 3) is old


def test_ranks_draw_from_distinct_deterministic_seeds_and_rank_0_from_the_runs():
    seeds = [rank_seed(42, r) for r in range(8)]
    assert seeds[0] == 42 and len(set(seeds)) == 8
    assert seeds == [rank_seed(42, r) for r in range(8)]  # the same run, the same seeds
    assert rank_seed(43, 1) != seeds[1]


def test_a_second_rank_builds_the_same_model_then_draws_other_dropout_masks(monkeypatch):
    cfg = compose_cfg(*FAST, "seed=5")
    draws = {}
    for rank in (0, 1):
        spec = build.RunSpec(cfg, World(rank=rank, size=2), torch.device("cpu"), 1, 0)
        model, _ = build.build_coupled_model(spec)
        draws[rank] = ([p.detach().clone() for p in model.parameters()], torch.rand(4))
    assert all(torch.equal(a, b) for a, b in zip(draws[0][0], draws[1][0]))  # same initial weights
    assert not torch.equal(draws[0][1], draws[1][1])                         # not the same draws after


# ---- checkpoint writes: timed, spaced by last_every, the row kept ----------------------------------

def test_checkpoint_writes_are_timed_in_their_epochs_row_and_in_the_total(tmp_path, monkeypatch):
    real = checkpoint.save_torch
    written = []

    def slow_save(path, obj):
        written.append((path.name, obj["progress"]["epoch"] if "progress" in obj else None))
        if path.name == "last.pt":
            time.sleep(0.4)  # a slow shared filesystem
        real(path, obj)
    monkeypatch.setattr(checkpoint, "save_torch", slow_save)
    cfg = compose_cfg(*FAST, "trainer.epochs=3", "trainer.last_every=2", "trainer.checkpoint_every=null",
                      "trainer.patience=5", f"dataset.root={tmp_path}")
    res = execute_run(cfg, tmp_path / "run")
    assert [w for w in written if w[0] == "last.pt"] == [("last.pt", 2), ("last.pt", 3)]  # every 2nd, and the last
    rows = read_epochs(tmp_path / "run")[0]
    ckpt = [r["checkpoint_time_s"] for r in rows]
    assert ckpt[0] < 0.4 <= ckpt[1] and ckpt[2] >= 0.4
    spent = sum(r["epoch_time_s"] + r["ke_eval_time_s"] + r["checkpoint_time_s"] for r in rows)
    assert res["total_time_s"] >= spent >= 0.8


def test_a_kill_after_last_pt_before_the_row_restores_the_row_from_the_checkpoint(tmp_path, monkeypatch, caplog):
    cfg = compose_cfg(*FAST, "trainer.epochs=2", "trainer.patience=5", f"dataset.root={tmp_path}")
    whole = execute_run(cfg, tmp_path / "whole")
    real_save = Trainer._save_epoch

    def die_after_checkpoints(self, progress, improved, row):
        spent = real_save(self, progress, improved, row)
        if progress.epoch == 1:
            raise KeyboardInterrupt  # last.pt of epoch 1 is on disk, its epochs.csv row is not
        return spent
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_epoch", die_after_checkpoints)
        with pytest.raises(KeyboardInterrupt):
            execute_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "epochs.csv").exists()
    res = execute_run(cfg, tmp_path / "run")
    assert "epochs.csv lacks epoch 1 (a kill came after its checkpoint): its row restored" in caplog.text
    assert (res["status"], res["resumes"], res["metrics"]) == ("done", 1, whole["metrics"])
    rows, whole_rows = read_epochs(tmp_path / "run")[0], read_epochs(tmp_path / "whole")[0]
    assert [r["epoch"] for r in rows] == [1, 2]
    for column in ("train_loss", "val_loss", "val_acc", "ke_val_acc"):
        assert [r[column] for r in rows] == [r[column] for r in whole_rows]
    assert math.isnan(rows[0]["checkpoint_time_s"]) and rows[1]["checkpoint_time_s"] >= 0
    assert read_results(tmp_path / "run")["best_epoch"] == whole["best_epoch"]


def test_best_pt_holds_exactly_the_weights_last_pt_holds_for_the_same_epoch(tmp_path):
    cfg = compose_cfg(*FAST, "trainer.epochs=1", f"dataset.root={tmp_path}")
    execute_run(cfg, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best.keys() == last["model"].keys()
    assert all(torch.equal(best[k], last["model"][k]) for k in best)
    assert best._metadata["coupled_net"]["epoch"] == 1 and "coupled_net" not in last["model"]._metadata
    assert last["epoch_row"]["epoch"] == 1 and isinstance(last["rng"], list) and len(last["rng"]) == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, "often"])
def test_last_every_is_refused_in_one_line_unless_a_positive_integer(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*FAST, f"trainer.last_every={value}", f"dataset.root={tmp_path}"))
    assert str(e.value).startswith(f"trainer.last_every={value!r}: must be an integer >= 1")


def test_a_fused_optimizer_is_a_key_of_the_built_in_optimizers_and_takes_a_boolean(tmp_path):
    for optimizer in ("sgd", "adam", "adamw"):
        validate(compose_cfg(*FAST, f"optimizer={optimizer}", "+optimizer.fused=true", f"dataset.root={tmp_path}"))
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*FAST, "+optimizer.fused=sometimes", f"dataset.root={tmp_path}"))
    assert str(e.value).startswith("optimizer.fused='sometimes': ")



def test_a_stop_signal_between_spaced_checkpoints_still_saves_the_epoch_at_once(tmp_path, monkeypatch):
    cfg = compose_cfg(*FAST, "trainer.epochs=3", "trainer.last_every=3", "trainer.checkpoint_every=null",
                      "trainer.patience=5", f"dataset.root={tmp_path}")
    real_eval = Trainer.evaluate_split

    def signalled_in_validation(self, name, desc=""):
        if desc == "epoch 1 val after KE":
            signal.raise_signal(signal.SIGINT)  # after the epoch's last step check
        return real_eval(self, name, desc)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "evaluate_split", signalled_in_validation)
        with pytest.raises(RunInterrupted):
            execute_run(cfg, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert (last["progress"]["epoch"], last["progress"]["partial"]) == (1, None)  # not due until epoch 3
    res = execute_run(cfg, tmp_path / "run")
    assert (res["status"], res["resumes"], res["epochs_run"]) == ("done", 1, 3)
