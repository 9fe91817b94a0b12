"""Monitoring that describes the run (issue 20, item 7): system.csv's row of an epoch holds readings
of the whole epoch (a sampler thread), of the run's own GPU (found by UUID, whatever CUDA's order),
and torch's peak memory; provenance names driver, CUDA and cuDNN; one parser of
CUDA_VISIBLE_DEVICES. GPUs are the stand-in NVML of tests/helpers/fake_nvml and a faked torch.cuda;
the sampler is driven by hand (interval_s=0), so every expected value is computed here."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import threading
import time
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from coupled_net import machine
from coupled_net import monitor as monitor_module
from coupled_net.cudavisible import parse_cuda_visible
from coupled_net.monitor import COLUMNS, SystemMonitor
from coupled_net.slots import Gpu, visible_gpus
from helpers import REPO

MB = 2**20
GPU_CELLS = [c for c in COLUMNS if c.startswith("gpu_")]


# ---- CUDA_VISIBLE_DEVICES ----------------------------------------------------------------------

@pytest.mark.parametrize("value, entries", [
    (None, None),                      # unset: every GPU
    ("", []), ("   ", []),             # set and empty: none
    ("0,1", [0, 1]), (" 3 , 5 ", [3, 5]), ("5,3", [5, 3]),
    ("3,,5", [3]), ("0,-1,1", [0]), ("-1", []), ("nvidia0", []),  # CUDA stops at what it cannot read
    ("1gpu2,2", [1, 2]), ("+4", [4]), ("007", [7]),                # read like strtoul
    ("1,1", []), ("GPU-ab,GPU-ab", []),                            # an entry twice: no GPU at all
    ("GPU-8a1b-22, MIG-5c6d", ["GPU-8a1b-22", "MIG-5c6d"]),        # UUIDs (a MIG instance's too), or prefixes
    ("GPU-", []), ("2,GPU-u4", [2, "GPU-u4"]),
])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value, entries):
    assert parse_cuda_visible(value) == entries


def test_slots_reads_cuda_visible_devices_with_that_parser():
    gpus = [Gpu(0, "GPU-u1", "H200", 1), Gpu(1, "GPU-u10", "H200", 1), Gpu(2, "GPU-u2", "H200", 1)]
    assert visible_gpus(gpus, " 2 , GPU-u10") == [2, 1]
    assert visible_gpus(gpus, "GPU-u1") == []  # the first characters of two UUIDs: neither, as CUDA reads it
    assert visible_gpus(gpus, "2,2") == [] and visible_gpus(gpus, "   ") == []


# ---- a stand-in NVML and CUDA -------------------------------------------------------------------

@pytest.fixture
def nvml(monkeypatch):
    """The stand-in pynvml with three GPUs, as this process imports it."""
    spec = importlib.util.spec_from_file_location("pynvml", REPO / "tests" / "helpers" / "fake_nvml" / "pynvml.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("FAKE_NVML_GPUS", "0,1,2")
    monkeypatch.setenv("FAKE_NVML_FREE_MB", "40000")
    return fake


class FakeCuda:
    """torch.cuda of two GPUs in another order than NVML's (CUDA_DEVICE_ORDER=FASTEST_FIRST): CUDA's
    0 is NVML's 2, CUDA's 1 is NVML's 0; the peak memory torch reports is what `allocated` says."""

    def __init__(self, monkeypatch):
        self.props = {0: SimpleNamespace(name="Fake GPU", uuid="fake-2"), 1: SimpleNamespace(name="Fake GPU", uuid="fake-0")}
        self.allocated, self.reserved, self.resets = 0, 0, []
        for name, fn in {"is_available": lambda: True, "device_count": lambda: 2, "current_device": lambda: 0,
                         "get_device_properties": lambda i: self.props[i],
                         "get_device_name": lambda d=None: "Fake GPU",
                         "reset_peak_memory_stats": self.resets.append,
                         "max_memory_allocated": lambda d=None: self.allocated,
                         "max_memory_reserved": lambda d=None: self.reserved}.items():
            monkeypatch.setattr(torch.cuda, name, fn)


@pytest.fixture
def cuda(monkeypatch):
    return FakeCuda(monkeypatch)


# ---- the run's own GPU, by UUID ------------------------------------------------------------------

def test_the_monitor_reads_the_gpu_cuda_trains_on_found_by_uuid_not_by_index(nvml, cuda):
    util, used, temp = [10, 20, 30, 40, 100], [1000, 3000, 2000, 2000, 2000], [50, 61, 55, 40, 42]
    nvml.UTIL[2], nvml.USED_MB[2], nvml.TEMP_C[2] = list(util), list(used), list(temp)
    nvml.UTIL[0] = [99] * 5  # NVML's GPU 0: where CUDA's index 0 would wrongly point
    monitor = SystemMonitor(torch.device("cuda", 0), interval_s=0)
    assert (monitor.physical, monitor.handle) == (2, 2)
    monitor.begin_epoch()  # one reading now
    for _ in range(3):
        monitor.sample()  # the sampler's steps, by hand
    row = monitor.end_epoch()  # and one at the end
    assert row["samples"] == 5
    assert (row["gpu_util_percent_mean"], row["gpu_util_percent_max"]) == (statistics.mean(util), max(util))
    assert (row["gpu_mem_used_mb_mean"], row["gpu_mem_used_mb_max"]) == (statistics.mean(used), max(used))
    assert (row["gpu_mem_total_mb"], row["gpu_temp_c_max"]) == (2 * 40000, max(temp))
    assert nvml.UTIL[0] == [99] * 5  # never read
    assert cuda.resets == [torch.device("cuda", 0)]  # torch's peak counted from the epoch's start
    monitor.close()
    assert SystemMonitor(torch.device("cuda", 1), interval_s=0).physical == 0


def test_a_mig_instance_is_found_by_its_own_uuid(nvml, cuda):
    nvml.UUIDS[1], nvml.MIG_PARENT[1] = "MIG-inst-7", 0  # what NVML lists as handle 1 is a MIG instance on GPU 0
    cuda.props[0].uuid = "inst-7"
    nvml.USED_MB[1] = [100, 300]
    monitor = SystemMonitor(torch.device("cuda", 0), interval_s=0)
    assert (monitor.physical, monitor.handle) == (0, 1)
    monitor.begin_epoch()
    assert monitor.end_epoch()["gpu_mem_used_mb_max"] == 300
    assert machine.provenance(torch.device("cuda", 0))["gpu"]["uuid"] == "MIG-inst-7"


def test_each_epoch_has_its_own_readings(nvml, cuda):
    nvml.UTIL[2] = [10, 30, 80, 90, 70]
    monitor = SystemMonitor(torch.device("cuda", 0), interval_s=0)
    monitor.begin_epoch()
    first = monitor.end_epoch()
    monitor.begin_epoch()
    monitor.sample()
    second = monitor.end_epoch()
    assert (first["samples"], first["gpu_util_percent_mean"], first["gpu_util_percent_max"]) == (2, 20, 30)
    assert (second["samples"], second["gpu_util_percent_mean"], second["gpu_util_percent_max"]) == (3, 80, 90)


def test_a_gpu_that_stops_answering_leaves_its_cells_empty_and_nothing_raises(nvml, cuda, monkeypatch):
    def gone(handle):
        raise nvml.NVMLError("GPU is lost")
    monitor = SystemMonitor(torch.device("cuda", 0), interval_s=0)
    monkeypatch.setattr(nvml, "nvmlDeviceGetUtilizationRates", gone)
    monkeypatch.setattr(nvml, "nvmlDeviceGetTemperature", lambda handle, kind: gone(handle))
    nvml.USED_MB[2] = [500, 700]
    monitor.begin_epoch()
    row = monitor.end_epoch()
    assert (row["gpu_util_percent_mean"], row["gpu_temp_c_max"], row["gpu_mem_used_mb_max"]) == ("", "", 700)


@pytest.mark.parametrize("nvml_present", ["no library", "no driver"])
def test_without_nvml_the_gpu_cells_are_empty(nvml, cuda, monkeypatch, nvml_present):
    if nvml_present == "no library":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises
    else:
        monkeypatch.setenv("FAKE_NVML_GPUS", "")  # nvmlInit raises
    cuda.allocated = 64 * MB
    monitor = SystemMonitor(torch.device("cuda", 0), interval_s=0)
    monitor.begin_epoch()
    row = monitor.end_epoch()
    assert monitor.handle is None and [row[c] for c in GPU_CELLS] == [""] * len(GPU_CELLS)
    assert row["peak_memory_mb"] == 64.0  # torch still counts


def test_on_a_cpu_every_gpu_cell_and_peak_is_empty(nvml):
    monitor = SystemMonitor(torch.device("cpu"), interval_s=0)
    monitor.begin_epoch()
    row = monitor.end_epoch()
    assert list(row) == COLUMNS and row["samples"] == 2 and 0 < row["ram_percent_max"] <= 100
    assert [row[c] for c in GPU_CELLS + ["peak_memory_mb", "peak_reserved_mb"]] == [""] * (len(GPU_CELLS) + 2)
    assert monitor.run_peaks() == {"peak_memory_mb": None, "peak_reserved_mb": None}
    assert SystemMonitor().handle is None  # no device named: none


# ---- CPU, the thread ----------------------------------------------------------------------------

def test_cpu_percent_is_the_busy_share_of_this_process_s_cores_over_the_epoch(monkeypatch):
    Times = namedtuple("Times", "user nice system idle iowait guest")
    # core 0 is not this process's (fully busy: it must not count); core 1 is
    before = [Times(0, 0, 0, 0, 0, 0), Times(10, 0, 0, 90, 0, 0)]
    after = [Times(500, 0, 0, 0, 0, 0), Times(40, 2, 10, 140, 10, 5)]  # guest time is part of user time already
    states = iter([before, after])
    monkeypatch.setattr(monitor_module.psutil, "cpu_times", lambda percpu: next(states))
    monkeypatch.setattr(monitor_module, "_affinity", lambda: [1])
    monitor = SystemMonitor(interval_s=0)
    monitor.begin_epoch()
    row = monitor.end_epoch()
    total = lambda t: t.user + t.nice + t.system + t.idle + t.iowait  # noqa: E731
    idle = lambda t: t.idle + t.iowait  # noqa: E731
    busy = (total(after[1]) - idle(after[1])) - (total(before[1]) - idle(before[1]))
    assert row["cpu_percent_mean"] == round(100 * busy / (total(after[1]) - total(before[1])), 1) == 41.2


def test_the_sampler_thread_reads_while_the_epoch_runs_and_stops_with_it():
    monitor = SystemMonitor(interval_s=0.01)
    monitor.begin_epoch()
    assert any(t.name == "coupled_net.monitor" and t.daemon for t in threading.enumerate())
    time.sleep(0.3)
    row = monitor.end_epoch()
    assert row["samples"] >= 3 and row["duration_s"] >= 0.3
    assert not any(t.name == "coupled_net.monitor" for t in threading.enumerate())
    monitor.begin_epoch()  # an epoch a kill cut short: close() stops its thread
    monitor.close()
    assert not any(t.name == "coupled_net.monitor" for t in threading.enumerate())


# ---- peak memory --------------------------------------------------------------------------------

def test_peak_memory_per_epoch_and_for_the_run(nvml, cuda):
    monitor = SystemMonitor(torch.device("cuda", 0), interval_s=0)
    rows = []
    for allocated, reserved in ((300, 512), (200, 256)):
        monitor.begin_epoch()
        cuda.allocated, cuda.reserved = allocated * MB, reserved * MB
        rows.append(monitor.end_epoch())
    assert [(r["peak_memory_mb"], r["peak_reserved_mb"]) for r in rows] == [(300.0, 512.0), (200.0, 256.0)]
    assert len(cuda.resets) == 2
    cuda.allocated, cuda.reserved = 450 * MB, 256 * MB  # the final evaluation, after the last epoch
    assert monitor.run_peaks() == {"peak_memory_mb": 450.0, "peak_reserved_mb": 512.0}
    earlier = [{"epoch": "1", "peak_memory_mb": "700.0", "peak_reserved_mb": ""}, {"epoch": "2", "peak_memory_mb": ""}]
    assert monitor.run_peaks(earlier) == {"peak_memory_mb": 700.0, "peak_reserved_mb": 512.0}  # before a resume


# ---- provenance ---------------------------------------------------------------------------------

def test_provenance_of_a_gpu_run_names_its_physical_gpu_driver_cuda_and_cudnn(nvml, cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")  # NVML's order; CUDA's may differ: the UUID says which
    assert machine.provenance(torch.device("cuda", 0))["gpu"] == {
        "index": 0, "physical": 2, "uuid": "GPU-fake-2", "name": "Fake GPU", "driver": nvml.DRIVER,
        "cuda": "12.8", "cudnn": 91002}
    assert machine.provenance(torch.device("cuda", 1))["gpu"]["physical"] == 0


def test_provenance_without_nvml_takes_the_physical_gpu_from_the_slot_or_pci_order(nvml, cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 4, 7")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    record = machine._gpu_record(torch.device("cuda", 1), None)
    assert (record["physical"], record["uuid"], record["driver"]) == (None, "GPU-fake-0", None)  # CUDA's order: unknown
    assert machine._gpu_record(torch.device("cuda", 1), {"gpu": 5})["physical"] == 5
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert machine._gpu_record(torch.device("cuda", 1), None)["physical"] == 7
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert machine._gpu_record(torch.device("cuda", 1), None)["physical"] == 1


def test_provenance_of_a_cpu_run_has_no_gpu_record():
    record = machine.provenance(torch.device("cpu"))
    assert record["gpu"] is None and record["device"].startswith("cpu (")


# ---- a real GPU ---------------------------------------------------------------------------------

@pytest.mark.requires_gpu
def test_on_a_real_gpu_the_monitor_reads_its_gpu_and_torch_s_peak():
    device = torch.device("cuda", 0)
    monitor = SystemMonitor(device, interval_s=0.05)
    assert monitor.handle is not None and isinstance(monitor.physical, int)
    monitor.begin_epoch()
    block = torch.ones(64 * MB // 4, device=device)  # 64 MiB of float32
    for _ in range(50):
        block.mul_(1.0001)
    torch.cuda.synchronize(device)
    time.sleep(0.3)
    row = monitor.end_epoch()
    del block
    assert row["samples"] >= 3 and row["peak_memory_mb"] >= 64 and row["peak_reserved_mb"] >= row["peak_memory_mb"]
    assert 0 <= row["gpu_util_percent_mean"] <= row["gpu_util_percent_max"] <= 100
    assert 0 < row["gpu_mem_used_mb_mean"] <= row["gpu_mem_used_mb_max"] <= row["gpu_mem_total_mb"]
    assert monitor.run_peaks()["peak_memory_mb"] >= 64
    monitor.close()
    gpu = machine.provenance(device)["gpu"]
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    assert gpu["uuid"].endswith(uuid) and gpu["physical"] == monitor.physical
    assert gpu["driver"] and gpu["cuda"] == torch.version.cuda and gpu["cudnn"] == torch.backends.cudnn.version()
