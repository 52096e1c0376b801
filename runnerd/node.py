"""What the host has: CPU and RAM (psutil), GPUs (NVML), and what runnerd's runners hold.

RAM, GPUs and the runners' process trees come from a host sampler's snapshot (runnerd.sampler); the
daemon passes its latest one. No GPU is never an error here.
"""

from __future__ import annotations

import platform
import socket
from collections.abc import Iterable, Mapping
from functools import cache

import psutil
from pydantic import BaseModel, Field

from runnerd import __version__
from runnerd.gpus import GpuInfo
from runnerd.sampler import HostSnapshot, read_host_once
from runnerd.scheduler import DrainStatus, RunnerInfo, RunnerState

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
    drain: DrainStatus = Field(default_factory=DrainStatus,
                               description="whether the node is draining (loads nothing new) and what is left")


# --- reading the host ----------------------------------------------------------------------------

@cache
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


@cache
def _cpu() -> CpuInfo:
    return CpuInfo(model=cpu_model(), logical_cores=psutil.cpu_count(logical=True) or 1,
                   physical_cores=psutil.cpu_count(logical=False))


def _usage(runner: RunnerInfo, snapshot: HostSnapshot, gpu_per_pid: Mapping[int, int]) -> RunnerUsage:
    """A runner and what its process tree held in the snapshot (None: gone, or not read yet)."""
    tree = snapshot.trees.get(runner.pid) if runner.pid is not None else None
    rss = tree.rss if tree is not None else None
    gpu = sum(gpu_per_pid.get(p, 0) for p in tree.pids) if tree is not None else 0
    return RunnerUsage(**runner.model_dump(), rss_bytes=rss, gpu_memory_bytes=gpu if snapshot.gpus else None)


def _reserved(runners: Iterable[RunnerUsage]) -> Reserved:
    runners = list(runners)
    known = [r for r in runners if r.memory.known]
    return Reserved(runners=len(runners),
                    estimated_ram_bytes=sum(r.memory.ram_bytes for r in known),
                    estimated_vram_bytes=sum(r.memory.vram_bytes for r in known),
                    runners_without_estimate=len(runners) - len(known),
                    measured_rss_bytes=sum(r.rss_bytes or 0 for r in runners),
                    measured_gpu_memory_bytes=sum(r.gpu_memory_bytes or 0 for r in runners))


def _not_draining(runners: Iterable[RunnerInfo]) -> DrainStatus:
    live = [r for r in runners if r.state is not RunnerState.EXITED]
    return DrainStatus(runners_left=len(live), active_requests=sum(r.active_requests for r in live))


def collect(runners: Iterable[RunnerInfo], backends: Mapping[str, str],
            snapshot: HostSnapshot | None = None, drain: DrainStatus | None = None) -> NodeInfo:
    """The whole inventory from a host snapshot; without one, from a reading taken here (blocking:
    psutil and NVML, so from a worker thread). The first call reads the CPU's model from /proc.
    `drain`: the scheduler's drain status (without it: not draining)."""
    runners = list(runners)
    if snapshot is None:
        snapshot = read_host_once(r.pid for r in runners if r.pid is not None)
    gpu_per_pid = snapshot.gpu_memory_per_pid()
    usages = [_usage(r, snapshot, gpu_per_pid) for r in runners]
    return NodeInfo(
        hostname=socket.gethostname(),
        runnerd_version=__version__,
        cpu=_cpu(),
        memory=MemoryInfo(total_bytes=snapshot.ram_total, available_bytes=snapshot.ram_available),
        gpus=list(snapshot.gpus),
        reserved=_reserved(usages),
        backends=dict(backends),
        runners=usages,
        drain=drain if drain is not None else _not_draining(runners),
    )
