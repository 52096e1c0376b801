"""The host's NVIDIA GPUs through NVML: how many, their memory, and GPU memory per process.

No NVML library, no driver or no GPU all mean "no GPUs" here, never an error: most hosts that run
runnerd have none. NVML is imported when a session opens (never at module load), which is also the
seam tests use to put a fake GPU in its place (`sys.modules["pynvml"]`). The daemon keeps one
`NvmlSession` open for its life (runnerd.sampler reads it from a worker thread); the one-shot
functions below open and shut their own. Kept apart from runnerd.node so that choosing backends (CLI
commands included) does not import the scheduler.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from pydantic import BaseModel

log = logging.getLogger("runnerd.gpus")


def _nvml() -> ModuleType | None:
    """pynvml, initialised; None when there is no library, driver or device."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver, no device: all mean "no GPU" here
        log.debug("NVML unavailable: %s", exc)
        return None
    module: ModuleType = pynvml
    return module


def _nvml_shutdown(nvml: ModuleType) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:
        log.debug("NVML shutdown failed: %s", exc)


def gpu_count() -> int:
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        _nvml_shutdown(nvml)


class GpuInfo(BaseModel):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    driver_version: str | None
    cuda_version: str | None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda_version(nvml: ModuleType) -> str | None:
    try:
        version = int(nvml.nvmlSystemGetCudaDriverVersion())
    except Exception:
        return None
    return f"{version // 1000}.{version % 1000 // 10}"  # 12040 -> "12.4"


def _driver_version(nvml: ModuleType) -> str | None:
    try:
        return _text(nvml.nvmlSystemGetDriverVersion())
    except Exception:
        return None


def _gpu_processes(nvml: ModuleType, handle: Any) -> dict[int, int]:
    """pid -> GPU memory bytes for the compute processes on one device (empty when not known)."""
    try:
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return {}
    used: dict[int, int] = {}
    for proc in processes:
        memory = getattr(proc, "usedGpuMemory", None)
        if isinstance(memory, int):
            used[int(proc.pid)] = used.get(int(proc.pid), 0) + memory
    return used


class NvmlSession:
    """NVML initialised once (on the first read), read any number of times, shut down by `close`.

    Not thread-safe: one reader at a time (the sampler reads from one worker thread at a time). No
    library, driver or device reads as no GPUs; the attempt is not repeated until `close`. A failure
    that repeats every read is logged once, not every second."""

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._opened = False
        self._versions: tuple[str | None, str | None] = (None, None)
        self._warned: set[str] = set()

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _open(self) -> ModuleType | None:
        if not self._opened:
            self._opened = True
            self._nvml = _nvml()
            if self._nvml is not None:
                self._versions = (_driver_version(self._nvml), _cuda_version(self._nvml))
        return self._nvml

    def _warn(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            log.warning("%s", text)

    def read(self) -> tuple[list[GpuInfo], dict[int, dict[int, int]]]:
        """Every GPU NVML sees, and GPU memory per process id on each of them (by GPU index)."""
        nvml = self._open()
        if nvml is None:
            return [], {}
        driver, cuda = self._versions
        gpus: list[GpuInfo] = []
        per_device: dict[int, dict[int, int]] = {}
        try:
            for index in range(int(nvml.nvmlDeviceGetCount())):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    gpus.append(GpuInfo(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                                        name=_text(nvml.nvmlDeviceGetName(handle)),
                                        memory_total_bytes=int(memory.total), memory_used_bytes=int(memory.used),
                                        memory_free_bytes=int(memory.free), driver_version=driver,
                                        cuda_version=cuda))
                except Exception as exc:  # one GPU that cannot be read (fallen off the bus) hides no other
                    self._warn(f"cannot read GPU {index}: {exc}")
                    continue
                per_device[index] = _gpu_processes(nvml, handle)
        except Exception as exc:
            self._warn(f"cannot list GPUs: {exc}")
        return gpus, per_device

    def close(self) -> None:
        if self._nvml is not None:
            _nvml_shutdown(self._nvml)
        self._nvml = None
        self._opened = False


def _read_all() -> tuple[list[GpuInfo], dict[int, dict[int, int]]]:
    """One-shot: every GPU NVML sees, and GPU memory per process id on each of them (by GPU index)."""
    session = NvmlSession()
    try:
        return session.read()
    finally:
        session.close()


def read_gpus() -> tuple[list[GpuInfo], dict[int, int]]:
    """Every GPU NVML sees, and GPU memory per process id across them."""
    gpus, per_device = _read_all()
    per_pid: dict[int, int] = {}
    for used_by in per_device.values():
        for pid, used in used_by.items():
            per_pid[pid] = per_pid.get(pid, 0) + used
    return gpus, per_pid
