"""A stand-in for nvidia-ml-py's pynvml: the GPUs a test injects (FAKE_NVML_GPUS="0,1,2,3,4,5",
physical indices; FAKE_NVML_FREE_MB, each one's free memory). Put this folder first on PYTHONPATH
of a launch; the launcher then sees those GPUs, as on a machine with a driver.

In a test's own process (sys.modules["pynvml"] = this module): handle i is the i-th fake GPU, its
UUID `GPU-fake-<i>` (or UUIDS[i]); UTIL, USED_MB and TEMP_C hold, per handle, the readings the next
queries return, one each, in order (then 0, half the memory, 40 °C)."""

import os

NVML_TEMPERATURE_GPU = 0
DRIVER = "555.42.06"
UUIDS: dict = {}  # handle -> its UUID, where a test wants other than GPU-fake-<handle>
UTIL: dict = {}  # handle -> [utilisation %, ...]
USED_MB: dict = {}  # handle -> [memory used (MiB), ...]
TEMP_C: dict = {}  # handle -> [temperature, ...]
MIG_PARENT: dict = {}  # handle of a MIG instance (UUIDS[handle] = "MIG-…") -> its GPU's handle


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, free: int, total: int):
        self.free, self.total, self.used = free, total, total - free


class _Util:
    def __init__(self, gpu: int):
        self.gpu, self.memory = gpu, 0


def _next(readings: dict, handle: int, default):
    queue = readings.get(handle)
    return queue.pop(0) if queue else default


def _indices() -> list[int]:
    return [int(i) for i in os.environ.get("FAKE_NVML_GPUS", "").split(",") if i.strip()]


def nvmlInit() -> None:
    if not _indices():
        raise NVMLError("no fake GPUs")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_indices())


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    if i not in range(len(_indices())):
        raise NVMLError(f"no GPU {i}")
    return i


def nvmlDeviceGetHandleByUUID(uuid) -> int:
    for handle in range(len(_indices())):
        if nvmlDeviceGetUUID(handle) == str(uuid):
            return handle
    raise NVMLError(f"no GPU {uuid}")


def nvmlDeviceGetUUID(handle: int) -> str:
    return UUIDS.get(handle, f"GPU-fake-{handle}")


def nvmlDeviceGetIndex(handle: int) -> int:
    return handle


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle: int) -> int:
    if handle not in MIG_PARENT:
        raise NVMLError(f"{handle} is not a MIG instance")
    return MIG_PARENT[handle]


def nvmlSystemGetDriverVersion() -> str:
    return DRIVER


def nvmlDeviceGetName(handle: int) -> str:
    return "Fake GPU"


def nvmlDeviceGetMemoryInfo(handle: int) -> _Memory:
    free = int(os.environ.get("FAKE_NVML_FREE_MB", "80000")) * 2**20
    used = _next(USED_MB, handle, None)
    return _Memory(free, 2 * free) if used is None else _Memory(2 * free - used * 2**20, 2 * free)


def nvmlDeviceGetUtilizationRates(handle: int) -> _Util:
    return _Util(_next(UTIL, handle, 0))


def nvmlDeviceGetTemperature(handle: int, kind: int) -> int:
    return _next(TEMP_C, handle, 40)
