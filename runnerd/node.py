"""What the host has: CPU and RAM (psutil), GPUs (NVML), and what runnerd's runners hold.

GPUs come from runnerd.gpus (NVML); no GPU is never an error here.
"""

from __future__ import annotations

import platform
import socket
from collections.abc import Iterable, Mapping

import psutil
from pydantic import BaseModel, Field

from runnerd import __version__
from runnerd.admission import process_tree
from runnerd.gpus import GpuInfo, read_gpus
from runnerd.scheduler import RunnerInfo

# --- the inventory's shape -----------------------------------------------------------------------

class CpuInfo(BaseModel):
    model: str
    logical_cores: int
    physical_cores: int | None


class MemoryInfo(BaseModel):
    total_bytes: int
    available_bytes: int


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
