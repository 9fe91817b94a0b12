"""Where the runs of hydra/launcher=local and of a packed SLURM task go (coupled_net.slots): GPUs
dealt round-robin, cores split, each bad key refused in one line before anything starts."""

from __future__ import annotations

import json

import pytest
import torch

from coupled_net import machine, validation
from coupled_net import slots as slots_module

from coupled_net.errors import ConfigError
from coupled_net.slots import Gpu, plan_slots, slot_environment, visible_gpus
from hydra_plugins.coupled_net_launcher import launcher as launcher_module
from hydra_plugins.coupled_net_launcher.launcher import check_packing, local_slots
from helpers import compose_cfg

SIX = [Gpu(i, f"GPU-u{i}", "H200", 1000 * (i + 1)) for i in range(6)]


def plan(**kw):
    args = {"gpus": [], "present": [], "runs_per_gpu": 1, "max_parallel": None, "cpus_per_run": None,
            "cores": range(8)}
    return plan_slots(**{**args, **kw})


def refusal(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        plan(**kw)
    return str(e.value)


def test_two_runs_per_gpu_on_gpus_3_and_5_alternate_gpus_and_get_disjoint_cores():
    slots = plan(gpus=[3, 5], present=[0, 3, 5], runs_per_gpu=2, free_bytes={3: 8000, 5: 4001})
    assert [(s.gpu, s.cpus) for s in slots] == [(3, (0, 1)), (5, (2, 3)), (3, (4, 5)), (5, (6, 7))]
    assert [s.shared_by for s in slots] == [2, 2, 2, 2]
    assert [s.gpu_budget_bytes for s in slots] == [4000, 2000, 4000, 2000]  # free at launch ÷ runs on it
    assert {s.parallel for s in slots} == {4}


def test_max_parallel_below_the_slots_spreads_over_the_gpus_first_and_counts_who_shares():
    slots = plan(gpus=[0, 1], present=[0, 1], runs_per_gpu=2, max_parallel=3, cores=range(5))
    assert [s.gpu for s in slots] == [0, 1, 0]
    assert [s.shared_by for s in slots] == [2, 1, 2]
    assert [s.cpus for s in slots] == [(0,), (1,), (2,)]  # 5 cores ÷ 3 runs: one each, two left idle


def test_on_a_cpu_machine_cpus_per_run_sets_how_many_runs_go_at_once():
    assert [s.cpus for s in plan(cpus_per_run=1, cores=[4, 9, 2])] == [(2,), (4,), (9,)]
    assert [s.cpus for s in plan(cpus_per_run=2, cores=range(5))] == [(0, 1), (2, 3)]
    assert [s.cpus for s in plan(cores=range(3))] == [(0, 1, 2)]  # nothing said: one run on every core
    only = plan(max_parallel=2, cores=range(3))
    assert [s.cpus for s in only] == [(0,), (1,)] and [s.shared_by for s in only] == [2, 2]
    assert all(s.gpu is None for s in only)


def test_more_runs_than_cores_share_cores_round_robin():
    assert [s.cpus for s in plan(max_parallel=3, cores=[0, 1])] == [(0,), (1,), (0,)]


@pytest.mark.parametrize("kw, line", [
    ({"runs_per_gpu": 0, "gpus": [0], "present": [0]},
     "hydra.launcher.runs_per_gpu=0: runs sharing one GPU: an integer of at least 1"),
    ({"gpus": [7], "present": [0, 1]}, "hydra.launcher.gpus=[7]: GPU 7 is not on this machine (this process sees "
                                       "GPUs 0, 1): choose among those, or gpus=[] to run on CPUs"),
    ({"gpus": [7], "present": []}, "hydra.launcher.gpus=[7]: GPU 7 is not on this machine (this process sees no "
                                   "GPU): choose among those, or gpus=[] to run on CPUs"),
    ({"max_parallel": 0}, "hydra.launcher.max_parallel=0: runs alive at once: an integer of at least 1"),
    ({"cpus_per_run": 9}, "hydra.launcher.cpus_per_run=9: this process may use 8 core(s): at most 8"),
    ({"gpus": [0], "present": [0], "max_parallel": 2},
     "hydra.launcher.max_parallel=2: above the 1 slot(s) of 1 GPU(s) × runs_per_gpu=1: raise "
     "hydra.launcher.runs_per_gpu, or leave max_parallel out"),
    ({"gpus": [1, 1], "present": [0, 1]},
     "hydra.launcher.gpus=[1, 1]: physical GPU indices (as nvidia-smi lists them), each once"),
])
def test_what_cannot_be_placed_is_refused_in_one_line(kw, line):
    assert refusal(**kw) == line


def test_cuda_visible_devices_3_5_means_physical_gpus_3_and_5_in_that_order():
    assert visible_gpus(SIX, "3,5") == [3, 5]
    assert visible_gpus(SIX, "5,3") == [5, 3]
    assert visible_gpus(SIX, "GPU-u4,1") == [4, 1]  # UUIDs (a prefix is enough for CUDA, too)
    assert visible_gpus(SIX, None) == [0, 1, 2, 3, 4, 5]
    assert visible_gpus(SIX, "") == [] and visible_gpus(SIX, "-1") == []
    assert visible_gpus(SIX, "3,9,5") == [3]  # CUDA stops at the first entry it cannot match


def test_a_run_sees_only_its_slots_gpu():
    gpu_slot, cpu_slot = plan(gpus=[5], present=[5]) + plan()
    assert slot_environment(gpu_slot, SIX[5])["CUDA_VISIBLE_DEVICES"] == "5"
    assert slot_environment(gpu_slot, SIX[5])["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # "5" means NVML's GPU 5
    assert '"gpu_uuid": "GPU-u5"' in slot_environment(gpu_slot, SIX[5])["COUPLED_NET_SLOT"]
    assert slot_environment(cpu_slot)["CUDA_VISIBLE_DEVICES"] == ""  # a CPU run cannot wander onto a GPU


def test_local_launcher_defaults_to_the_gpus_visible_to_it(monkeypatch):
    monkeypatch.setattr(slots_module, "gpu_inventory", lambda: SIX)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(launcher_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    slots, gpus = local_slots({}, {})
    assert [(s.gpu, s.cpus) for s in slots] == [(3, (0, 1)), (5, (2, 3))]
    assert [s.gpu_budget_bytes for s in slots] == [4000, 6000]
    assert [s.gpu for s in local_slots({"gpus": [5], "runs_per_gpu": 2}, {})[0]] == [5, 5]
    assert [s.gpu for s in local_slots({}, {"gpus_per_node": 0})[0]] == [None]  # the old key still means CPU
    with pytest.raises(ConfigError) as e:
        local_slots({}, {"gpus_per_node": 2})
    assert str(e.value).startswith("hydra.launcher.gpus_per_node=2: hydra/launcher=local gives each run one GPU")
    with pytest.raises(ConfigError) as e:
        local_slots({"gpus": [0]}, {})  # GPU 0 is present, but not visible to this process
    assert "GPU 0 is not on this machine (this process sees GPUs 3, 5)" in str(e.value)


@pytest.mark.parametrize("k, tasks, line", [
    (0, 1, "hydra.launcher.runs_per_task=0: runs packed into one SLURM array task: an integer of at least 1"),
    (2, 2, "hydra.launcher.runs_per_task=2: packs runs of one process each, but hydra.launcher.tasks_per_node=2 "
           "makes every run a DistributedDataParallel job of 2 processes: set one of them to 1"),
])
def test_packing_is_refused_where_it_cannot_work(k, tasks, line):
    with pytest.raises(ConfigError) as e:
        check_packing(k, {"tasks_per_node": tasks})
    assert str(e.value) == line
    check_packing(3, {"tasks_per_node": 1})


def slot_env(monkeypatch, **slot):
    record = {"number": 0, "gpu": 5, "cpus": [0], "shared_by": 4, "parallel": 4, "packed_in": "local",
              "gpu_budget_bytes": 3 * 2**30, **slot}
    monkeypatch.setenv("COUPLED_NET_SLOT", json.dumps(record))


def test_a_run_sharing_its_gpu_may_use_its_share_of_what_was_free_at_launch(monkeypatch):
    monkeypatch.setattr(machine.torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    slot_env(monkeypatch)
    assert machine.available_bytes(torch.device("cuda", 0)) == 3 * 2**30
    slot_env(monkeypatch, gpu_budget_bytes=20 * 2**30)  # the others took some since: what is free now
    assert machine.available_bytes(torch.device("cuda", 0)) == 10 * 2**30
    monkeypatch.delenv("COUPLED_NET_SLOT")
    assert machine.available_bytes(torch.device("cuda", 0)) == 10 * 2**30


def test_runs_side_by_side_on_the_cpu_share_the_hosts_memory(monkeypatch):
    monkeypatch.setattr(machine.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 12 * 2**30}))
    assert machine.available_bytes(torch.device("cpu")) == 12 * 2**30
    slot_env(monkeypatch, gpu=None, parallel=3, gpu_budget_bytes=None)
    assert machine.available_bytes(torch.device("cpu")) == 4 * 2**30


def test_a_run_too_big_for_its_share_of_the_gpu_is_refused_naming_runs_per_gpu_and_the_batch(monkeypatch):
    c = validation.plain_config(compose_cfg("experiment=quickstart", "trainer.batch_size=64"))
    monkeypatch.setattr(validation, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(validation, "available_bytes", lambda device: 2**20)  # 1 MiB: nothing fits
    slot_env(monkeypatch)
    need = validation.batch_bytes(c, validation.model_shape(c))
    with pytest.raises(ConfigError) as e:
        validation.check_machine(c)
    assert str(e.value) == (
        f"trainer.batch_size=64: a training batch of small_cnn needs about {need / 2**20:.1f} MiB, more than this "
        "run's share of GPU 5 (1.0 MiB: its free memory at launch ÷ the 4 runs placed on it): lower "
        "hydra.launcher.runs_per_gpu (or hydra.launcher.runs_per_task), or trainer.batch_size")
    monkeypatch.delenv("COUPLED_NET_SLOT")  # alone on the GPU: the usual line, about the model's size
    with pytest.raises(ConfigError) as e:
        validation.check_machine(c)
    assert str(e.value).startswith("model.input_size=28: a training batch of 64 images of small_cnn needs about")
