"""A stand-in for nvidia-ml-py's pynvml: the GPUs a test injects (FAKE_NVML_GPUS="0,1,2,3,4,5",
physical indices; FAKE_NVML_FREE_MB, each one's free memory). Put this folder first on PYTHONPATH
of a launch; the launcher then sees those GPUs, as on a machine with a driver."""

import os

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, free: int, total: int):
        self.free, self.total, self.used = free, total, total - free


class _Util:
    gpu = 0
    memory = 0


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
    return int(str(uuid).rsplit("-", 1)[1])


def nvmlDeviceGetUUID(handle: int) -> str:
    return f"GPU-fake-{handle}"


def nvmlDeviceGetName(handle: int) -> str:
    return "Fake GPU"


def nvmlDeviceGetMemoryInfo(handle: int) -> _Memory:
    free = int(os.environ.get("FAKE_NVML_FREE_MB", "80000")) * 2**20
    return _Memory(free, 2 * free)


def nvmlDeviceGetUtilizationRates(handle: int) -> _Util:
    return _Util()


def nvmlDeviceGetTemperature(handle: int, kind: int) -> int:
    return 40
