"""The host sampler: one reading of RAM, GPUs and the runners' process trees, taken off the event loop.

There is no GPU on CI: GPUs here are FAKE ones (tests/fake_nvml_gpu.py stands in for pynvml).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from backends.base import BackendConfiguration, Mode, ModelRef
from backends.llamacpp import LaunchOptions, LlamaCppBackend
from runnerd import sampler as sampler_module
from runnerd.admission import Budget
from runnerd.config import MemorySettings
from runnerd.gpus import NvmlSession
from runnerd.sampler import HostSampler, read_trees
from runnerd.scheduler import QueueTimeout, RunnerKey, Scheduler, SchedulerLimits
from tests.conftest import app_on_socket
from tests.fake_nvml_gpu import FakeGpu, FakeGpuNvml, GiB
from tests.memory_models import TinySpec, write_model


@pytest.mark.anyio
async def test_without_nvml_the_sampler_reads_ram_and_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError

    sampler = HostSampler(interval=0.01)
    await sampler.start()
    first = sampler.snapshot
    await asyncio.sleep(0.1)
    assert sampler.snapshot.taken_at > first.taken_at, "the ticker keeps reading"
    await sampler.stop()
    assert first.gpus == () and first.host_memory().devices == ()
    assert 0 < first.ram_available <= first.ram_total


@pytest.mark.anyio
async def test_a_driver_that_fails_to_load_means_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml([FakeGpu()], fail_init=True))

    sampler = HostSampler()
    assert (await sampler.fresh()).gpus == ()
    await sampler.stop()


@pytest.mark.anyio
async def test_nvml_is_initialised_once_and_shut_down_at_stop(monkeypatch):
    fake = FakeGpuNvml([FakeGpu(total=80 * GiB, used=10 * GiB, processes={4242: 3 * GiB}),
                        FakeGpu(uuid="GPU-fake-2", total=24 * GiB, used=GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    sampler = HostSampler(interval=0.01)
    await sampler.start()
    for _ in range(5):
        await sampler.fresh()
    assert fake.initialised == 1, "one NVML session for the sampler's life"
    snapshot = sampler.snapshot
    await sampler.stop()
    assert fake.initialised == 0
    assert [(g.index, g.uuid, g.memory_free_bytes) for g in snapshot.gpus] == [
        (0, "GPU-00000000-fake-0000-0000-000000000000", 70 * GiB), (1, "GPU-fake-2", 23 * GiB)]
    assert dict(snapshot.gpu_usage[0]) == {4242: 3 * GiB} and dict(snapshot.gpu_usage[1]) == {}
    assert [(g.index, g.total, g.free) for g in snapshot.host_memory().devices] == [
        (0, 80 * GiB, 70 * GiB), (1, 24 * GiB, 23 * GiB)]


@pytest.mark.parametrize("children_files", [True, False], ids=["children files", "whole-host listing"])
def test_process_trees_are_measured_by_root_pid(children_files, monkeypatch):
    """A child that starts one grandchild from its main thread and one from another thread: the tree under
    the child holds all three (the kernel lists children per thread). A process that exited and was not
    yet reaped (a zombie) holds nothing: no tree, as for one that is gone."""
    if children_files:
        assert sampler_module._HAS_CHILDREN_FILES, "this kernel lists children per thread"
    monkeypatch.setattr(sampler_module, "_HAS_CHILDREN_FILES", children_files)
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(30)']"
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, threading, time; "
                              f"subprocess.Popen({sleeper}); "
                              f"t = threading.Thread(target=lambda: subprocess.Popen({sleeper})); t.start(); t.join(); "
                              "print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        grandchildren = {p.pid for p in psutil.Process(child.pid).children()}
        assert len(grandchildren) == 2
        _until_zombie(zombie.pid)
        trees = read_trees([child.pid, gone.pid, zombie.pid])
        tree = trees[child.pid]
        assert tree is not None and tree.pids == {child.pid, *grandchildren}
        assert tree.rss >= psutil.Process(child.pid).memory_info().rss // 2
        assert trees[gone.pid] is None and trees[zombie.pid] is None
        assert read_trees([]) == {}
    finally:
        for proc in psutil.Process(child.pid).children(recursive=True):
            proc.kill()
        child.kill()
        child.wait()
        zombie.wait()


def _until_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the process did not exit"
        time.sleep(0.01)


@pytest.mark.anyio
async def test_fresh_waits_for_a_reading_begun_after_the_call_and_shares_it():
    reads = []

    class Counting(NvmlSession):
        def read(self):  # type: ignore[no-untyped-def]
            reads.append(time.monotonic())
            time.sleep(0.05)  # a slow driver: concurrent callers must share this reading
            return [], {}

    sampler = HostSampler(gpus=Counting())
    sampler.watch(lambda: [os.getpid()])
    assert not sampler.snapshot.sampled and sampler.snapshot.measured(os.getpid()) is None
    since = time.monotonic()
    snapshots = await asyncio.gather(*(sampler.fresh() for _ in range(5)))
    assert len(reads) == 1 and all(s is snapshots[0] for s in snapshots)
    assert snapshots[0].taken_at >= since
    measured = snapshots[0].measured(os.getpid())
    assert measured is not None and measured.ram > 0
    assert snapshots[0].measured(None) is None
    assert await sampler.current() is snapshots[0], "current() does not read again"
    later = await sampler.fresh()
    assert len(reads) == 2 and later.taken_at > snapshots[0].taken_at
    await sampler.stop()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> ModelRef:
    """About 6 GiB of F16 weights as a CUDA build would put them on GPU 0 (header only)."""
    spec = TinySpec(n_embd=4096, n_layer=16, n_head=32, n_head_kv=8, n_ff=11008, name="big")
    path = write_model(tmp_path_factory.mktemp("sampler") / "big.gguf", spec, header_only=True)
    return ModelRef(name="big:latest", path=path)


@pytest.mark.anyio
async def test_admission_reads_the_gpus_afresh_not_the_last_snapshot(monkeypatch, tmp_path, big_model):
    """FAKE GPU: free when the sampler last read it, nearly full by the time a load is admitted (another
    program took it). Admission must refuse on what is free now, not start an engine on the old view."""
    gpu = FakeGpu(total=24 * GiB, used=0)
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    backend = LlamaCppBackend(cache_dir=tmp_path, launch=LaunchOptions(use_gpu=True))

    sampler = HostSampler(interval=3600)  # no reading but the first and the ones admission asks for
    await sampler.start()
    scheduler = Scheduler({backend.name: backend}, runtime_dir=Path("/tmp") / f"rd-smp-{os.getpid()}",
                          log_dir=None, default_keep_alive=60.0, sampler=sampler,
                          budget=Budget(MemorySettings(), sampler.host_memory),
                          limits=SchedulerLimits(queue_timeout=0.3))
    assert sampler.snapshot.gpus[0].memory_free_bytes == 24 * GiB
    gpu.used = 23 * GiB
    async with scheduler.running():
        with pytest.raises(QueueTimeout) as caught:
            await scheduler.acquire(RunnerKey(backend.name, big_model.name, Mode.COMPLETION), big_model,
                                    BackendConfiguration())
        assert scheduler.ps() == []
        error = caught.value
    await sampler.stop()

    assert "on GPU 0, which has 0.5 GiB free" in str(error)


@pytest.mark.engine
@pytest.mark.anyio
async def test_ps_reports_a_real_runners_rss_from_the_snapshot_without_psutil(monkeypatch, llama_server,
                                                                             tiny_model, tmp_path):
    backend = LlamaCppBackend(cache_dir=tmp_path, binary=llama_server, launch=LaunchOptions(threads=1))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("psutil called on the event loop")

    scheduler = Scheduler({backend.name: backend}, runtime_dir=Path("/tmp") / f"rd-smp-{os.getpid()}",
                          log_dir=None, default_keep_alive=60.0, budget=Budget(MemorySettings()))
    async with scheduler.running():
        lease = await scheduler.acquire(RunnerKey(backend.name, "tiny:latest", Mode.COMPLETION),
                                        ModelRef(name="tiny:latest", path=tiny_model), BackendConfiguration())
        lease.release()
        snapshot = await scheduler.sampler.fresh()
        with monkeypatch.context() as m:
            for name in ("Process", "process_iter", "pid_exists", "virtual_memory"):
                m.setattr(psutil, name, forbidden)
            (info,) = scheduler.ps()
        tree = snapshot.trees[info.pid]
        assert tree is not None and info.pid in tree.pids
        assert info.measured_ram_bytes == tree.rss > 1 << 20
        assert info.measured_vram_bytes == 0


@pytest.mark.anyio
async def test_metrics_export_the_event_loop_lag(tmp_path):
    async with app_on_socket(tmp_path, {"llama.cpp": LlamaCppBackend(cache_dir=tmp_path)}) as client:
        await asyncio.sleep(0.2)
        time.sleep(0.3)  # noqa: ASYNC251 -- this shares the daemon's loop: stall it as a blocking handler would
        await asyncio.sleep(0.1)
        text = (await client.get("/metrics")).text

    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
             if line.startswith("runnerd_event_loop_lag")}
    assert lines["runnerd_event_loop_lag_seconds_count"] >= 3
    assert lines['runnerd_event_loop_lag_seconds_bucket{le="0.1"}'] < lines["runnerd_event_loop_lag_seconds_count"]
    assert 0.2 <= lines["runnerd_event_loop_lag_max_seconds"] < 5


@pytest.mark.anyio
async def test_a_lasting_read_failure_is_logged_when_it_starts_and_ends(monkeypatch, caplog):
    """psutil is made to fail as it does when the daemon is out of files (a stand-in: lowering this
    process's own limit would break the test runner); one line when it starts, one when it ends."""
    sampler = HostSampler(gpus=NvmlSession())
    good = await sampler.fresh()
    real = psutil.virtual_memory

    def out_of_files() -> None:
        raise OSError(24, "Too many open files")

    with caplog.at_level("WARNING", logger="runnerd.sampler"):
        monkeypatch.setattr(psutil, "virtual_memory", out_of_files)
        for _ in range(5):
            with pytest.raises(OSError):
                await sampler.fresh()
        assert sampler.snapshot is good  # the last good reading stays
        monkeypatch.setattr(psutil, "virtual_memory", real)
        assert (await sampler.fresh()).taken_at > good.taken_at
        await sampler.fresh()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read the host: [Errno 24] Too many open files",
        "host readings resumed (they failed with: [Errno 24] Too many open files)"]
    await sampler.stop()
