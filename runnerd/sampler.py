"""One reading of the host for the whole daemon: RAM, the GPUs (NVML, initialised once) and what each
runner's process tree holds, taken every second in a worker thread of its own.

Everything that asks what the host or a runner holds (`Scheduler.ps()`, `/node`, `/metrics`,
`/api/ps`, the systemd status line, admission) reads `HostSampler.snapshot`: an immutable reading at
most about a second old, read without blocking. Nothing walks a process tree or calls NVML on the
event loop. A caller that must not act on an old view awaits `fresh()`: a reading begun after the call
(admission does, right before it starts an engine on what it believes is free).

No NVML library, driver or GPU means no GPUs, never an error. Tests put a FAKE NVML in place of
pynvml (`sys.modules["pynvml"]`, see tests/fake_nvml_gpu.py) before the sampler first reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

import psutil

from runnerd.admission import Amount, GpuMemory, HostMemory
from runnerd.gpus import GpuInfo, NvmlSession

log = logging.getLogger("runnerd.sampler")

INTERVAL = 1.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessTree:
    """A process and its descendants: their resident bytes together, and their pids."""

    rss: int
    pids: frozenset[int]


def _frozen(mapping: Mapping[int, Mapping[int, int]]) -> Mapping[int, Mapping[int, int]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in mapping.items()})


@dataclass(frozen=True)
class HostSnapshot:
    """One reading of the host. `taken_at` is `time.monotonic()` when the reading began (-inf for the
    placeholder a sampler holds before its first reading)."""

    taken_at: float
    ram_total: int = 0
    ram_available: int = 0
    gpus: tuple[GpuInfo, ...] = ()
    # GPU index -> pid -> GPU memory bytes (NVML's compute processes).
    gpu_usage: Mapping[int, Mapping[int, int]] = field(default_factory=lambda: MappingProxyType({}))
    # Watched root pid -> its process tree; None: the process was gone.
    trees: Mapping[int, ProcessTree | None] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def sampled(self) -> bool:
        return self.taken_at > -math.inf

    def host_memory(self) -> HostMemory:
        """RAM and each GPU, as admission's Budget reads the host."""
        return HostMemory.with_gpus(self.ram_total, self.ram_available,
                                    (GpuMemory(g.index, g.memory_total_bytes, g.memory_free_bytes) for g in self.gpus))

    def gpu_memory_per_pid(self) -> dict[int, int]:
        """pid -> GPU memory bytes across all GPUs."""
        per_pid: dict[int, int] = {}
        for used_by in self.gpu_usage.values():
            for pid, used in used_by.items():
                per_pid[pid] = per_pid.get(pid, 0) + used
        return per_pid

    def measured(self, pid: int | None) -> Amount | None:
        """What the tree rooted at `pid` held: RAM (RSS), and GPU memory on each GPU. Zero for a process
        that was gone; None when this reading did not watch `pid` (it began before the process was)."""
        if pid is None or pid not in self.trees:
            return None
        tree = self.trees[pid]
        if tree is None:
            return Amount()
        gpus = {index: sum(used.get(p, 0) for p in tree.pids) for index, used in self.gpu_usage.items()}
        return Amount(ram=tree.rss, vram=sum(gpus.values()), gpus={i: n for i, n in gpus.items() if n})


EMPTY = HostSnapshot(taken_at=-math.inf)


def _read_proc(path: str) -> bytes:
    """A small /proc file in three system calls (open() would add a stat, a seek and a terminal check, each
    one more hand-over of the GIL that the event loop wants back)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _has_children_files() -> bool:
    """Whether the kernel lists each thread's children (/proc/<pid>/task/<tid>/children, CONFIG_PROC_CHILDREN)."""
    try:
        _read_proc(f"/proc/self/task/{threading.get_native_id()}/children")
    except OSError:
        return False
    return True


def _children_of(pid: int) -> list[int]:
    """The child pids of `pid` (any of its threads may have started one); OSError if it is gone."""
    children: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):  # a thread that ended meanwhile
            children.extend(int(c) for c in _read_proc(f"/proc/{pid}/task/{tid}/children").split())
    return children


_HAS_CHILDREN_FILES = _has_children_files()


def _listed(listing: dict[int, list[int]], pid: int) -> list[int]:
    return listing.get(pid, [])


def _rss(pid: int) -> int:
    """Resident bytes of `pid` from /proc/<pid>/statm (psutil reads the same, after a stat of its own).
    ProcessLookupError for a zombie: it holds no memory, and is gone but for its exit status."""
    size, resident = _read_proc(f"/proc/{pid}/statm").split()[:2]
    if size == b"0":
        raise ProcessLookupError(pid)
    return int(resident) * _PAGE_SIZE


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process on the host, straight from /proc/<pid>/stat (a few times
    cheaper than building a psutil.Process for each). Only where the kernel does not list children itself:
    this reads a file per process on the host."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []  # no /proc: no tree can be measured (memory comes from /proc/<pid>/statm too)
    for name in names:
        if not name.isdigit():
            continue
        try:
            stat = _read_proc(f"/proc/{name}/stat")
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
            ppid = int(stat[stat.rindex(b")") + 2:].split(b" ", 2)[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(name))
    return children


def read_trees(roots: Iterable[int]) -> dict[int, ProcessTree | None]:
    """The process tree under each root pid. Where the kernel lists each thread's children, only the trees'
    own processes are read; elsewhere from one listing of every process on the host (psutil's `children()`
    reads every process's parent once per call: once per runner would multiply that)."""
    wanted = sorted(set(roots))
    if not wanted:
        return {}
    if _HAS_CHILDREN_FILES:
        children_of: Callable[[int], Iterable[int]] = _children_of
    else:
        listing = _children()
        children_of = partial(_listed, listing)
    trees: dict[int, ProcessTree | None] = {}
    for root in wanted:
        rss, pids, todo = 0, set(), [root]
        while todo:
            pid = todo.pop()
            if pid in pids:
                continue
            try:
                resident, children = _rss(pid), children_of(pid)
            except (OSError, ValueError, IndexError):
                if pid == root:
                    break  # gone, or exited between listing and reading
                continue
            rss += resident
            pids.add(pid)
            todo.extend(children)
        trees[root] = ProcessTree(rss, frozenset(pids)) if root in pids else None
    return trees


def read_host(roots: Iterable[int], gpus: NvmlSession, taken_at: float | None = None) -> HostSnapshot:
    """One reading (blocking: psutil and NVML). `gpus` is read by one thread at a time."""
    taken_at = time.monotonic() if taken_at is None else taken_at
    memory = psutil.virtual_memory()
    devices, usage = gpus.read()
    return HostSnapshot(taken_at=taken_at, ram_total=int(memory.total), ram_available=int(memory.available),
                        gpus=tuple(devices), gpu_usage=_frozen(usage),
                        trees=MappingProxyType(read_trees(roots)))


def read_host_once(roots: Iterable[int] = ()) -> HostSnapshot:
    """One reading with an NVML session of its own, opened and shut down here (blocking)."""
    session = NvmlSession()
    try:
        return read_host(roots, session)
    finally:
        session.close()


def _no_roots() -> Iterable[int]:
    return ()


class HostSampler:
    """Reads the host every `interval` seconds in a worker thread of its own, one reading at a time.

    `start()` takes the first reading and starts the ticker; `stop()` ends it and shuts NVML down. A
    sampler that was never started still answers `fresh()` (each call reads once), which is how a
    Scheduler built without a daemon (tests) measures its runners."""

    def __init__(self, interval: float = INTERVAL, gpus: NvmlSession | None = None) -> None:
        self.interval = interval
        self._gpus = gpus or NvmlSession()
        self._roots: Callable[[], Iterable[int]] = _no_roots
        self._snapshot = EMPTY
        self._reading: asyncio.Task[HostSnapshot] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._failing: str | None = None  # why the readings fail, while they do

    def watch(self, roots: Callable[[], Iterable[int]]) -> None:
        """Which process trees to measure: `roots` is called on the event loop before each reading and
        names their root pids (the scheduler's engine processes)."""
        self._roots = roots

    @property
    def snapshot(self) -> HostSnapshot:
        """The latest reading (EMPTY before the first)."""
        return self._snapshot

    def host_memory(self) -> HostMemory:
        """The latest reading's RAM and GPUs: the daemon's admission probe (Budget)."""
        return self._snapshot.host_memory()

    async def fresh(self, since: float | None = None) -> HostSnapshot:
        """A reading begun at or after `since` (time.monotonic(); default: now), waiting for one if the
        latest is older. Concurrent callers share a reading."""
        since = time.monotonic() if since is None else since
        while self._snapshot.taken_at < since:
            await self._read()
        return self._snapshot

    async def current(self) -> HostSnapshot:
        """The latest reading, or a first one if there is none yet."""
        if not self._snapshot.sampled:
            return await self.fresh()
        return self._snapshot

    async def _read(self) -> None:
        reading = self._reading
        if reading is None or reading.done():
            reading = self._reading = asyncio.create_task(self._take(), name="host sampler reading")
            reading.add_done_callback(self._done)
        await asyncio.shield(reading)

    def _done(self, task: asyncio.Task[HostSnapshot]) -> None:
        self._reading = None
        if task.cancelled():
            return
        error = task.exception()
        # A failure that lasts (the process out of files) is logged when it starts and when it ends, not
        # every second; the last good reading stays meanwhile.
        if error is not None and str(error) != self._failing:
            self._failing = str(error)
            log.warning("cannot read the host: %s", error)
        elif error is None and self._failing is not None:
            log.warning("host readings resumed (they failed with: %s)", self._failing)
            self._failing = None

    async def _take(self) -> HostSnapshot:
        roots = [pid for pid in self._roots() if pid is not None]
        taken_at = time.monotonic()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runnerd-sampler")
        snapshot = await asyncio.get_running_loop().run_in_executor(self._executor, read_host, roots, self._gpus,
                                                                    taken_at)
        if snapshot.taken_at >= self._snapshot.taken_at:
            self._snapshot = snapshot
        return snapshot

    async def start(self) -> None:
        await self.fresh()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="host sampler")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._snapshot.taken_at + self.interval - time.monotonic()))
            try:
                await self.fresh()
            except Exception:  # logged by _done; the next tick tries again
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """End the ticker, let a reading in progress finish, shut NVML down (a later reading opens it
        again)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._reading is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._reading)
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._gpus.close)
            executor.shutdown(wait=False)
        else:
            self._gpus.close()
