"""What the host has: CPU and RAM (psutil), GPUs (NVML), and what runnerd's runners hold.

No NVML library, no driver or no GPU all mean "no GPUs" here, never an error: most hosts that run
runnerd have none. NVML is imported on each use (never at module load), which is also the seam
tests use to put a fake GPU in its place (`sys.modules["pynvml"]`).
"""

from __future__ import annotations

import logging
import platform
import socket
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import psutil
from pydantic import BaseModel, Field

from runnerd import __version__
from runnerd.admission import HostMemory, process_tree
from runnerd.scheduler import RunnerInfo

log = logging.getLogger("runnerd.node")


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


# --- the inventory's shape -----------------------------------------------------------------------

class CpuInfo(BaseModel):
    model: str
    logical_cores: int
    physical_cores: int | None


class MemoryInfo(BaseModel):
    total_bytes: int
    available_bytes: int


class GpuInfo(BaseModel):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    driver_version: str | None
    cuda_version: str | None


class RunnerUsage(RunnerInfo):
    """A runner as the scheduler sees it, plus what its process tree measurably holds."""

    rss_bytes: int | None = Field(description="resident memory of the engine and its children")
    gpu_memory_bytes: int | None = Field(description="GPU memory NVML attributes to those processes")


class Reserved(BaseModel):
    """What runnerd's runners hold: the estimates admission used, and what is measured now."""

    runners: int
    estimated_ram_bytes: int
    estimated_vram_bytes: int
    runners_without_estimate: int
    measured_rss_bytes: int
    measured_gpu_memory_bytes: int


class NodeInfo(BaseModel):
    hostname: str
    runnerd_version: str
    cpu: CpuInfo
    memory: MemoryInfo
    gpus: list[GpuInfo]
    reserved: Reserved
    backends: dict[str, str]
    runners: list[RunnerUsage]


# --- reading the host ----------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                # x86 says "model name"; arm64 kernels give "Model" or "Hardware", if anything.
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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


def read_gpus() -> tuple[list[GpuInfo], dict[int, int]]:
    """Every GPU NVML sees, and GPU memory per process id across them."""
    nvml = _nvml()
    if nvml is None:
        return [], {}
    gpus: list[GpuInfo] = []
    per_pid: dict[int, int] = {}
    try:
        driver, cuda = _driver_version(nvml), _cuda_version(nvml)
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GpuInfo(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                                    name=_text(nvml.nvmlDeviceGetName(handle)),
                                    memory_total_bytes=int(memory.total), memory_used_bytes=int(memory.used),
                                    memory_free_bytes=int(memory.free), driver_version=driver, cuda_version=cuda))
            except Exception as exc:  # one GPU that cannot be read (fallen off the bus) hides no other
                log.warning("cannot read GPU %d: %s", index, exc)
                continue
            for pid, used in _gpu_processes(nvml, handle).items():
                per_pid[pid] = per_pid.get(pid, 0) + used
    except Exception as exc:
        log.warning("cannot list GPUs: %s", exc)
    finally:
        _nvml_shutdown(nvml)
    return gpus, per_pid


def read_host_memory() -> HostMemory:
    """RAM from psutil and VRAM summed over the GPUs NVML sees: what admission compares against."""
    vm = psutil.virtual_memory()
    gpus, _ = read_gpus()
    return HostMemory(ram_total=vm.total, ram_available=vm.available,
                      vram_total=sum(g.memory_total_bytes for g in gpus),
                      vram_free=sum(g.memory_free_bytes for g in gpus), gpus=len(gpus))


def _usage(runner: RunnerInfo, gpu_per_pid: Mapping[int, int], have_gpus: bool) -> RunnerUsage:
    rss, pids = process_tree(runner.pid)
    gpu = sum(gpu_per_pid.get(p, 0) for p in pids) if have_gpus else None
    return RunnerUsage(**runner.model_dump(), rss_bytes=rss, gpu_memory_bytes=gpu)


def _reserved(runners: Iterable[RunnerUsage]) -> Reserved:
    runners = list(runners)
    known = [r for r in runners if r.memory.known]
    return Reserved(runners=len(runners),
                    estimated_ram_bytes=sum(r.memory.ram_bytes for r in known),
                    estimated_vram_bytes=sum(r.memory.vram_bytes for r in known),
                    runners_without_estimate=len(runners) - len(known),
                    measured_rss_bytes=sum(r.rss_bytes or 0 for r in runners),
                    measured_gpu_memory_bytes=sum(r.gpu_memory_bytes or 0 for r in runners))


def collect(runners: Iterable[RunnerInfo], backends: Mapping[str, str]) -> NodeInfo:
    """The whole inventory. Blocking (psutil, NVML): call it from a worker thread."""
    gpus, gpu_per_pid = read_gpus()
    usages = [_usage(r, gpu_per_pid, bool(gpus)) for r in runners]
    memory = psutil.virtual_memory()
    return NodeInfo(
        hostname=socket.gethostname(),
        runnerd_version=__version__,
        cpu=CpuInfo(model=cpu_model(), logical_cores=psutil.cpu_count(logical=True) or 1,
                    physical_cores=psutil.cpu_count(logical=False)),
        memory=MemoryInfo(total_bytes=memory.total, available_bytes=memory.available),
        gpus=gpus,
        reserved=_reserved(usages),
        backends=dict(backends),
        runners=usages,
    )
