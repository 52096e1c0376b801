"""FAKE NVML: stands in for pynvml so /node can be tested to answer for a GPU on CI hosts that have none.

Install it with `monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml(...))`. It answers the calls
runnerd.node makes, with the types nvidia-ml-py returns, for one made-up "FAKE" GPU per entry.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

GiB = 1024**3


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    name: str = "FAKE NVIDIA GPU (test double)"
    uuid: str = "GPU-00000000-fake-0000-0000-000000000000"
    total: int = 80 * GiB
    used: int = 10 * GiB
    processes: dict[int, int] = field(default_factory=dict)  # pid -> GPU memory bytes


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None  # NVML spells it so


class FakeGpuNvml(types.ModuleType):
    def __init__(self, gpus: list[FakeGpu], driver: str = "550.54.15", cuda: int = 12040,
                 fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.fail_init = fail_init
        self.initialised = 0
        self.NVMLError = NVMLError

    def nvmlInit(self) -> None:  # the names are NVML's
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> bytes:
        return gpu.uuid.encode()  # older nvidia-ml-py returns bytes: runnerd must cope with both

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> _Memory:
        return _Memory(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[_Process]:
        return [_Process(pid, used) for pid, used in gpu.processes.items()]
