"""What the run's machine does while it trains (SPEC §5, system.csv). Between an epoch's
begin_epoch() and end_epoch() a daemon thread reads, every `interval_s`, the host's RAM and the
run's own GPU: utilisation, memory used, temperature, through NVML's handle of the GPU with the
CUDA device's UUID (never its index: CUDA's order is not NVML's unless CUDA_DEVICE_ORDER=PCI_BUS_ID).
end_epoch() returns the epoch's row: the readings' means and maxima, the busy share of the cores
this process may use over the epoch, and the memory torch allocated (and reserved) at its peak on
the run's device. NVML's figures are the whole GPU's: another process on it counts too. Without an
NVIDIA GPU, a driver or NVML the GPU cells are empty; nothing here raises."""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil
import torch

log = logging.getLogger(__name__)
MB = 2**20
# system.csv's columns after `epoch` and `time` (coupled_net.trainer writes one row an epoch)
COLUMNS = ["samples", "duration_s", "cpu_percent_mean", "ram_percent_max", "gpu_util_percent_mean",
           "gpu_util_percent_max", "gpu_mem_used_mb_mean", "gpu_mem_used_mb_max", "gpu_mem_total_mb",
           "gpu_temp_c_max", "peak_memory_mb", "peak_reserved_mb"]
PEAKS = ("peak_memory_mb", "peak_reserved_mb")  # torch's, on the run's device: also results.json's


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml():
    """pynvml, initialised (close it with _nvml_close), or None: no library, no driver, no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as e:  # noqa: BLE001 - no driver, no library, no GPU: all mean "no GPU cells"
        log.debug("NVML unavailable (%s); GPU cells stay empty", e)
        return None


def _nvml_close(pynvml) -> None:
    if pynvml is not None:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def cuda_uuid(device: torch.device) -> str | None:
    """A CUDA device's UUID as torch reports it (without the `GPU-` prefix NVML writes), or None."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:  # noqa: BLE001 - no CUDA, no such device
        return None
    return None if uuid is None else str(uuid)


def nvml_device(pynvml, uuid: str | None) -> tuple[int | None, object] | None:
    """(physical index, NVML handle) of the GPU whose CUDA UUID is `uuid`; a MIG instance: its GPU's
    index and its own handle. None: no such GPU, or NVML cannot tell."""
    if not uuid:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - a driver that stops answering
        count = 0
    for i in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if _text(pynvml.nvmlDeviceGetUUID(handle)) == f"GPU-{uuid}":
                return i, handle
        except Exception:  # noqa: BLE001 - a GPU this process may not query is not its own
            continue
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")  # a MIG instance: CUDA gives its own UUID
    except Exception as e:  # noqa: BLE001 - no such MIG instance
        log.debug("no NVML device of UUID %s (%s)", uuid, e)
        return None
    try:
        return pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)), handle
    except Exception:  # noqa: BLE001
        return None, handle


def gpu_facts(device: torch.device) -> dict:
    """NVML's word on a CUDA device: `physical` (its index as nvidia-smi lists it), `uuid` (NVML's:
    `GPU-…`, a MIG instance's `MIG-…`) and `driver` (the NVIDIA driver's version); None for what NVML
    cannot say."""
    facts = {"physical": None, "uuid": None, "driver": None}
    pynvml = _nvml()
    if pynvml is None:
        return facts
    try:
        facts["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001
        pass
    found = nvml_device(pynvml, cuda_uuid(device))
    if found is not None:
        facts["physical"] = found[0]
        try:
            facts["uuid"] = _text(pynvml.nvmlDeviceGetUUID(found[1]))
        except Exception:  # noqa: BLE001
            pass
    _nvml_close(pynvml)
    return facts


def _busy_and_total(cores: list[int] | None) -> tuple[float, float] | None:
    """CPU seconds busy and in all, so far, summed over `cores` (None: every core), or None."""
    try:
        times = psutil.cpu_times(percpu=True)
        if cores is not None and all(c < len(times) for c in cores):
            times = [times[c] for c in cores]
        busy = total = 0.0
        for t in times:  # as psutil.cpu_percent counts: guest time is in user time already; iowait is idle
            spent = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
            total += spent
            busy += spent - t.idle - getattr(t, "iowait", 0.0)
        return busy, total
    except Exception:  # noqa: BLE001
        return None


def _affinity() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def _mean(values: list) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def _larger(a, b):
    return b if a is None else a if b is None else max(a, b)


class SystemMonitor:
    """The run's machine and GPU, epoch by epoch: begin_epoch() before an epoch's first step starts
    the sampler, end_epoch() after its last validation stops it and returns the epoch's row.
    `device`: the run's (None, a CPU: no GPU cells); `interval_s`: between two readings (0: no
    thread, sample() takes each one)."""

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 1.0):
        self.device = torch.device("cpu" if device is None else device)
        self.interval_s = float(interval_s)
        self.cuda = self.device.type == "cuda"
        self.handle, self.physical, self._nvml = None, None, _nvml() if self.cuda else None
        found = nvml_device(self._nvml, cuda_uuid(self.device)) if self._nvml is not None else None
        if found is None:
            _nvml_close(self._nvml)
            self._nvml = None
        else:
            self.physical, self.handle = found
        self._cores = _affinity()
        self._lock = threading.Lock()
        self._readings: list[dict] = []
        self._stop, self._thread = threading.Event(), None
        self._began: tuple[float, tuple | None] | None = None  # when begin_epoch ran, and the CPU times then
        self._peaks = dict.fromkeys(PEAKS)  # the largest over this process's epochs

    @property
    def columns(self) -> list[str]:
        return list(COLUMNS)

    def read(self) -> dict:
        """One reading now: RAM % and the run's GPU's utilisation, memory used/total (MiB) and
        temperature; None for what cannot be read."""
        reading = {"ram_percent": None, "gpu_util_percent": None, "gpu_mem_used_mb": None,
                   "gpu_mem_total_mb": None, "gpu_temp_c": None}
        try:
            reading["ram_percent"] = psutil.virtual_memory().percent
        except Exception:  # noqa: BLE001
            pass
        nv, handle = self._nvml, self.handle
        if nv is None or handle is None:
            return reading
        try:
            reading["gpu_util_percent"] = nv.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # noqa: BLE001 - a MIG instance has none; a GPU that stops answering
            pass
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            reading["gpu_mem_used_mb"], reading["gpu_mem_total_mb"] = round(mem.used / MB, 1), round(mem.total / MB, 1)
        except Exception:  # noqa: BLE001
            pass
        try:
            reading["gpu_temp_c"] = nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
        except Exception:  # noqa: BLE001
            pass
        return reading

    def sample(self) -> dict:
        """Take one reading into the epoch's (the sampler's step) and return it."""
        reading = self.read()
        with self._lock:
            self._readings.append(reading)
        return reading

    def _sampler(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - the sampler never takes the run down
                log.debug("system sample failed: %s", e)

    def _halt(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=max(5.0, 2 * self.interval_s))

    def begin_epoch(self) -> None:
        """Start an epoch's readings (one now, then one every interval_s) and torch's peak memory."""
        self._halt()
        with self._lock:
            self._readings = []
        if self.cuda:
            try:
                torch.cuda.reset_peak_memory_stats(self.device)
            except Exception:  # noqa: BLE001
                pass
        self._began = (time.perf_counter(), _busy_and_total(self._cores))
        self.sample()
        if self.interval_s > 0:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sampler, args=(self._stop,), name="coupled_net.monitor",
                                            daemon=True)
            self._thread.start()

    def end_epoch(self) -> dict:
        """Stop the epoch's readings (one more now) and return its row: COLUMNS, '' where not known."""
        self._halt()
        self.sample()
        with self._lock:
            readings, self._readings = self._readings, []
        began, cpu_then = self._began or (None, None)
        cpu_now, self._began = _busy_and_total(self._cores), None
        row = dict.fromkeys(COLUMNS)
        row["samples"] = len(readings)
        if began is not None:
            row["duration_s"] = round(time.perf_counter() - began, 3)
        if cpu_then is not None and cpu_now is not None and cpu_now[1] > cpu_then[1]:
            share = (cpu_now[0] - cpu_then[0]) / (cpu_now[1] - cpu_then[1])
            row["cpu_percent_mean"] = round(100 * min(1.0, max(0.0, share)), 1)

        def values(key: str) -> list:
            return [r[key] for r in readings if r[key] is not None]
        util, used = values("gpu_util_percent"), values("gpu_mem_used_mb")
        row.update(ram_percent_max=max(values("ram_percent"), default=None),
                   gpu_util_percent_mean=_mean(util), gpu_util_percent_max=max(util, default=None),
                   gpu_mem_used_mb_mean=_mean(used), gpu_mem_used_mb_max=max(used, default=None),
                   gpu_mem_total_mb=max(values("gpu_mem_total_mb"), default=None),
                   gpu_temp_c_max=max(values("gpu_temp_c"), default=None), **self._torch_peaks())
        for key in PEAKS:
            self._peaks[key] = _larger(self._peaks[key], row[key])
        return {k: "" if v is None else v for k, v in row.items()}

    def _torch_peaks(self) -> dict:
        """The memory torch allocated and reserved at most on the run's GPU since the epoch began (MiB)."""
        peaks = dict.fromkeys(PEAKS)
        if self.cuda:
            try:
                peaks["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
                peaks["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(self.device) / MB, 1)
            except Exception:  # noqa: BLE001
                pass
        return peaks

    def run_peaks(self, rows=()) -> dict:
        """The run's peak memory on its GPU (MiB; None on a CPU), results.json's `peak_memory_mb` and
        `peak_reserved_mb`: the largest of `rows` (system.csv's: the epochs before a resume too), of
        this process's epochs, and of what torch held since the last one began (the final evaluation)."""
        peaks = {key: _larger(self._peaks[key], value) for key, value in self._torch_peaks().items()}
        for row in rows:
            for key in PEAKS:
                try:
                    value = float(row.get(key) or "nan")
                except (TypeError, ValueError):
                    continue
                if value == value:
                    peaks[key] = _larger(peaks[key], value)
        return peaks

    def close(self) -> None:
        self._halt()
        _nvml_close(self._nvml)
        self._nvml, self.handle = None, None
