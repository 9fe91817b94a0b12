"""CPU, RAM and per-GPU utilisation, memory and temperature (psutil + NVML). Without an NVIDIA GPU
or driver the GPU cells are empty; nothing here raises."""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)
GPU_FIELDS = ("util_percent", "mem_used_mb", "mem_total_mb", "temp_c")


def _visible_gpu_handles(pynvml) -> list:
    """NVML handles of the GPUs this process may use, in CUDA order (CUDA_VISIBLE_DEVICES honoured)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    handles = []
    for item in filter(None, (v.strip() for v in visible.split(","))):
        if item.isdigit():
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(item)))
        else:
            handles.append(pynvml.nvmlDeviceGetHandleByUUID(item))
    return handles


class SystemMonitor:
    def __init__(self):
        self.handles, self._nvml = [], None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = _visible_gpu_handles(pynvml)
        except Exception as e:  # noqa: BLE001 - no driver, no library, no GPU: all mean "no GPU cells"
            log.debug("NVML unavailable (%s); GPU columns stay empty", e)
        psutil.cpu_percent(interval=None)  # primes the counter: the next call covers the interval since

    @property
    def columns(self) -> list[str]:
        gpus = range(max(1, len(self.handles)))
        return ["cpu_percent", "ram_percent"] + [f"gpu{i}_{f}" for i in gpus for f in GPU_FIELDS]

    def sample(self) -> dict:
        row = {"cpu_percent": psutil.cpu_percent(interval=None), "ram_percent": psutil.virtual_memory().percent}
        row.update({c: "" for c in self.columns[2:]})
        for i, handle in enumerate(self.handles):
            try:
                nv = self._nvml
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                row[f"gpu{i}_util_percent"] = nv.nvmlDeviceGetUtilizationRates(handle).gpu
                row[f"gpu{i}_mem_used_mb"] = round(mem.used / 2**20, 1)
                row[f"gpu{i}_mem_total_mb"] = round(mem.total / 2**20, 1)
                row[f"gpu{i}_temp_c"] = nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
            except Exception as e:  # noqa: BLE001 - a GPU that stops answering leaves its cells empty
                log.debug("NVML query of GPU %d failed: %s", i, e)
        return row

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None
