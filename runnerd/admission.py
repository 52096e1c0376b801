"""How much memory runners hold and how much a new one may take.

A runner holds the larger of its estimate and its measured resident memory: engines touch their
pages lazily (weights are mmapped, the KV cache fills as contexts grow), so a measurement right after
loading says less than the runner will soon need, and an estimate can be exceeded in practice.

VRAM is counted per GPU: an engine that puts 5 GiB on GPU 1 needs 5 GiB free on GPU 1, whatever
the other GPUs have (pooling them would admit models no single device can hold). Each GPU offers
its free memory minus `memory.vram_reserve`, less what runners hold on it. `memory.vram_limit` caps
all GPUs together; it is shared out in proportion to each GPU's total memory (equal GPUs get equal
shares), so that the cap can be checked per device without knowing in advance where a model lands.
VRAM an estimate or a measurement cannot place on a GPU (a backend that names no device, a GPU
probe that only knows sums) is checked against the GPUs together, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import psutil

from backends.base import MemoryEstimate
from runnerd.config import MemorySettings
from runnerd.gpus import read_gpus

GiB = 1 << 30


def _merge(a: Mapping[int, int], b: Mapping[int, int], how: Callable[[int, int], int]) -> dict[int, int]:
    return {i: how(a.get(i, 0), b.get(i, 0)) for i in sorted(set(a) | set(b))}


def _gib(size: int) -> str:
    return f"{size / GiB:.1f} GiB"


@dataclass(frozen=True)
class Amount:
    """RAM and VRAM bytes. `vram` is all GPUs together; `gpus` says how much of it is on which GPU
    (by NVML index) where that is known. As a room, `gpus` is what each GPU of the host can still
    take; empty means the host has no GPU that admission can check one by one."""

    ram: int = 0
    vram: int = 0
    gpus: Mapping[int, int] = field(default_factory=dict)

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.ram + other.ram, self.vram + other.vram,
                      _merge(self.gpus, other.gpus, lambda a, b: a + b))

    @property
    def unplaced_vram(self) -> int:
        """VRAM not attributed to any GPU."""
        return max(0, self.vram - sum(self.gpus.values()))

    def shortfall(self, room: Amount, *, free: str = "free") -> str | None:
        """What does not fit in `room`, named by device ("needs 5.1 GiB on GPU 1, which has 3.2 GiB free"),
        or None when everything fits."""
        if self.ram > room.ram:
            return f"needs {_gib(self.ram)} of RAM, which has {_gib(max(0, room.ram))} {free}"
        if room.gpus:
            for index, size in sorted(self.gpus.items()):
                have = room.gpus.get(index)
                if have is None:
                    return f"needs {_gib(size)} on GPU {index}, which this host does not have"
                if size > have:
                    return f"needs {_gib(size)} on GPU {index}, which has {_gib(max(0, have))} {free}"
        if self.vram > room.vram:
            return f"needs {_gib(self.vram)} of VRAM, and the GPUs together have {_gib(max(0, room.vram))} {free}"
        return None

    def fits_in(self, room: Amount) -> bool:
        return self.shortfall(room) is None

    def describe(self) -> str:
        text = f"{self.ram / 2**20:.0f} MiB RAM"
        if not self.vram and not any(self.gpus.values()):
            return text
        text += f" + {self.vram / 2**20:.0f} MiB VRAM"
        if self.gpus:
            text += " (" + ", ".join(f"GPU {i}: {size / 2**20:.0f} MiB" for i, size in sorted(self.gpus.items())) + ")"
        return text


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as admission sees it: NVML index, total and free bytes."""

    index: int
    total: int
    free: int


@dataclass(frozen=True)
class HostMemory:
    """RAM, and VRAM as sums (vram_total, vram_free, gpus) and, where the probe reads them, per GPU."""

    ram_total: int
    ram_available: int
    vram_total: int = 0
    vram_free: int = 0
    gpus: int = 0
    gpu_memory: tuple[GpuMemory, ...] = ()

    @classmethod
    def with_gpus(cls, ram_total: int, ram_available: int, gpus: Iterable[GpuMemory]) -> HostMemory:
        found = tuple(gpus)
        return cls(ram_total, ram_available, vram_total=sum(g.total for g in found),
                   vram_free=sum(g.free for g in found), gpus=len(found), gpu_memory=found)

    @property
    def devices(self) -> tuple[GpuMemory, ...]:
        """The GPUs one by one. A probe that only gives sums is read
        as that many equal GPUs: the best guess it allows, and exact on the usual identical GPUs."""
        if self.gpu_memory or not self.gpus:
            return self.gpu_memory
        n = self.gpus
        return tuple(GpuMemory(i, self.vram_total // n, self.vram_free // n) for i in range(n))


def read_host_ram() -> HostMemory:
    """RAM only: the default probe (read_host_memory_per_gpu adds the GPUs NVML sees)."""
    vm = psutil.virtual_memory()
    return HostMemory(ram_total=vm.total, ram_available=vm.available)


def read_host_memory_per_gpu() -> HostMemory:
    """RAM from psutil and each GPU NVML sees, one by one, read now (blocking; NVML opened and shut down
    here). The daemon's admission probe is its host sampler's snapshot (runnerd.sampler) instead."""
    vm = psutil.virtual_memory()
    gpus, _ = read_gpus()
    return HostMemory.with_gpus(vm.total, vm.available,
                                (GpuMemory(g.index, g.memory_total_bytes, g.memory_free_bytes) for g in gpus))


_CUDA_DEVICE = re.compile(r"^cuda:(\d+)$")


def vram_per_gpu(estimate: MemoryEstimate) -> dict[int, int]:
    """An estimate's VRAM by GPU index, from its `cuda:N` device entries."""
    found: dict[int, int] = {}
    for device in estimate.devices:
        m = _CUDA_DEVICE.match(device.device)
        if m:
            found[int(m.group(1))] = found.get(int(m.group(1)), 0) + device.bytes
    return found


def needed(estimate: MemoryEstimate) -> Amount:
    """What a new runner needs; an unknown estimate is admitted as zero and measured once running."""
    if not estimate.known:
        return Amount()
    return Amount(estimate.ram_bytes, estimate.vram_bytes, vram_per_gpu(estimate))


@dataclass(frozen=True)
class Holding:
    """One runner's share: its estimate, what was measured, and whether it is still loading."""

    estimate: Amount
    measured: Amount
    loading: bool

    @property
    def held(self) -> Amount:
        gpus = _merge(self.estimate.gpus, self.measured.gpus, max)
        vram = max(self.estimate.vram, self.measured.vram, sum(gpus.values()))
        return Amount(max(self.estimate.ram, self.measured.ram), vram, gpus)

    @property
    def pending(self) -> Amount:
        """What a loading runner will soon take that the host does not yet show as used."""
        if not self.loading:
            return Amount()
        gpus = _merge(self.estimate.gpus, self.measured.gpus, lambda e, m: max(0, e - m))
        return Amount(max(0, self.estimate.ram - self.measured.ram), max(0, self.estimate.vram - self.measured.vram),
                      gpus)


class Budget:
    def __init__(self, settings: MemorySettings, probe: Callable[[], HostMemory] = read_host_ram) -> None:
        self.settings = settings
        self.probe = probe

    def _gpu_caps(self, host: HostMemory) -> dict[int, int]:
        """The most runners may hold on each GPU: its total less the reserve, and its share of vram_limit
        (in proportion to its total memory; see the module docstring)."""
        devices = host.devices
        reserve = int(self.settings.vram_reserve)
        limit = self.settings.vram_limit
        all_memory = sum(g.total for g in devices) or 1
        caps: dict[int, int] = {}
        for g in devices:
            cap = g.total - reserve
            if limit is not None:
                cap = min(cap, int(limit) * g.total // all_memory)
            caps[g.index] = max(0, cap)
        return caps

    def capacity(self, host: HostMemory | None = None) -> Amount:
        """The most runners could ever hold together: the configured limit or the host minus its reserve."""
        host = host or self.probe()
        ram = host.ram_total - self.settings.ram_reserve
        if self.settings.ram_limit is not None:
            ram = min(ram, int(self.settings.ram_limit))
        if not host.devices:
            # No GPU: only a configured vram_limit gives VRAM (how tests and CPU-only hosts use it).
            vram = int(self.settings.vram_limit) if self.settings.vram_limit is not None else 0
            return Amount(max(0, ram), vram)
        caps = self._gpu_caps(host)
        return Amount(max(0, ram), sum(caps.values()), caps)

    def explain_capacity(self, need: Amount) -> str:
        """Why `need` can never fit: the device it does not fit on, what it needs, what the host has in
        all, and what caps runnerd."""
        host = self.probe()
        cap = self.capacity(host)
        total = Amount(host.ram_total, host.vram_total)
        text = (f"needs {need.describe()}; this host has {total.describe()} total, runnerd may use at most "
                f"{cap.describe()} ({'; '.join(self._caps(host))})")
        short = need.shortfall(cap, free="usable at most")
        if short is None or need.ram > cap.ram:
            return text  # RAM is named by the totals already
        return f"{short}; {text}"

    def _caps(self, host: HostMemory) -> list[str]:
        """Which setting bounds each kind of memory, so the user knows what to change."""
        s = self.settings
        ram = host.ram_total - s.ram_reserve
        if s.ram_limit is not None and int(s.ram_limit) <= ram:
            caps = [f"memory.ram_limit = {_mib(s.ram_limit)}"]
        else:
            caps = [f"host RAM minus memory.ram_reserve = {_mib(s.ram_reserve)}"]
        vram = host.vram_total - s.vram_reserve * host.gpus
        if s.vram_limit is not None and (not host.gpus or int(s.vram_limit) <= vram):
            shared = " shared among the GPUs in proportion to their memory" if host.gpus > 1 else ""
            caps.append(f"memory.vram_limit = {_mib(s.vram_limit)}{shared}")
        elif host.gpus:
            caps.append(f"GPU memory minus memory.vram_reserve = {_mib(s.vram_reserve)} per GPU")
        return caps

    def room(self, holdings: Iterable[Holding]) -> Amount:
        """What a new runner may take now, given what the existing ones hold: on each GPU, the lesser of
        its cap less what runners hold there and what NVML calls free less the reserve and what loading
        runners will soon take there."""
        host = self.probe()
        items = list(holdings)
        held = sum((h.held for h in items), Amount())
        # Memory loading runners will soon take is not yet missing from what the host calls available.
        pending = sum((h.pending for h in items), Amount())
        cap = self.capacity(host)
        ram = min(cap.ram - held.ram, host.ram_available - self.settings.ram_reserve - pending.ram)
        if not host.devices:
            return Amount(ram, cap.vram - held.vram)
        reserve = int(self.settings.vram_reserve)
        gpus = {g.index: min(cap.gpus[g.index] - held.gpus.get(g.index, 0),
                             g.free - reserve - pending.gpus.get(g.index, 0)) for g in host.devices}
        # Held VRAM no GPU is named for still counts against the GPUs together.
        vram = min(sum(max(0, r) for r in gpus.values()) - held.unplaced_vram, cap.vram - held.vram)
        return Amount(ram, vram, gpus)
