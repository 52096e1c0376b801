"""How much memory runners hold and how much a new one may take.

A runner holds the larger of its estimate and its measured resident memory: engines touch their
pages lazily (weights are mmapped, the KV cache fills as contexts grow), so a measurement right after
loading says less than the runner will soon need, and an estimate can be exceeded in practice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from backends.base import MemoryEstimate
from runnerd.config import MemorySettings


@dataclass(frozen=True)
class Amount:
    ram: int = 0
    vram: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.ram + other.ram, self.vram + other.vram)

    def fits_in(self, room: Amount) -> bool:
        return self.ram <= room.ram and self.vram <= room.vram

    def describe(self) -> str:
        text = f"{self.ram / 2**20:.0f} MiB RAM"
        return text + (f" + {self.vram / 2**20:.0f} MiB VRAM" if self.vram else "")


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class HostMemory:
    ram_total: int
    ram_available: int
    vram_total: int = 0
    vram_free: int = 0
    gpus: int = 0


def read_host_ram() -> HostMemory:
    """RAM only: the default probe (runnerd.node.read_host_memory adds the GPUs NVML sees)."""
    vm = psutil.virtual_memory()
    return HostMemory(ram_total=vm.total, ram_available=vm.available)


def process_tree(pid: int | None) -> tuple[int | None, set[int]]:
    """Resident bytes of a process and its descendants, and their pids; (None, {}) if it is gone."""
    if pid is None:
        return None, set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None, set()
    rss, pids = 0, set()
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            pids.add(proc.pid)
        except psutil.Error:
            continue  # exited between listing and reading
    return rss, pids


def needed(estimate: MemoryEstimate) -> Amount:
    """What a new runner needs; an unknown estimate is admitted as zero and measured once running."""
    return Amount(estimate.ram_bytes, estimate.vram_bytes) if estimate.known else Amount()


@dataclass(frozen=True)
class Holding:
    """One runner's share: its estimate, what was measured, and whether it is still loading."""

    estimate: Amount
    measured: Amount
    loading: bool

    @property
    def held(self) -> Amount:
        return Amount(max(self.estimate.ram, self.measured.ram), max(self.estimate.vram, self.measured.vram))


class Budget:
    def __init__(self, settings: MemorySettings, probe: Callable[[], HostMemory] = read_host_ram) -> None:
        self.settings = settings
        self.probe = probe

    def capacity(self, host: HostMemory | None = None) -> Amount:
        """The most runners could ever hold together: the configured limit or the host minus its reserve."""
        host = host or self.probe()
        ram = host.ram_total - self.settings.ram_reserve
        if self.settings.ram_limit is not None:
            ram = min(ram, int(self.settings.ram_limit))
        vram = max(0, host.vram_total - self.settings.vram_reserve * host.gpus)
        if self.settings.vram_limit is not None:
            vram = min(vram, int(self.settings.vram_limit)) if host.gpus else int(self.settings.vram_limit)
        return Amount(max(0, ram), vram)

    def explain_capacity(self, need: Amount) -> str:
        """Why `need` can never fit: what it needs, what the host has in all, and what caps runnerd."""
        host = self.probe()
        total = Amount(host.ram_total, host.vram_total)
        return (f"needs {need.describe()}; this host has {total.describe()} total, runnerd may use at most "
                f"{self.capacity(host).describe()} ({'; '.join(self._caps(host))})")

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
            caps.append(f"memory.vram_limit = {_mib(s.vram_limit)}")
        elif host.gpus:
            caps.append(f"GPU memory minus memory.vram_reserve = {_mib(s.vram_reserve)} per GPU")
        return caps

    def room(self, holdings: Iterable[Holding]) -> Amount:
        """What a new runner may take now, given what the existing ones hold."""
        host = self.probe()
        items = list(holdings)
        held = sum((h.held for h in items), Amount())
        cap = self.capacity(host)
        room = Amount(cap.ram - held.ram, cap.vram - held.vram)
        # Memory loading runners will soon take is not yet missing from what the host calls available.
        pending = sum((Amount(max(0, h.estimate.ram - h.measured.ram), max(0, h.estimate.vram - h.measured.vram))
                       for h in items if h.loading), Amount())
        host_ram = host.ram_available - self.settings.ram_reserve - pending.ram
        host_vram = (host.vram_free - self.settings.vram_reserve * host.gpus - pending.vram) if host.gpus \
            else room.vram
        return Amount(min(room.ram, host_ram), min(room.vram, host_vram))
