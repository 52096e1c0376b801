"""GET /node: the host inventory, with NVML absent, failing, or replaced by a FAKE GPU (CI has none)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

from backends.base import MemoryEstimate, Mode
from backends.endpoint import Endpoint
from backends.llamacpp import LlamaCppBackend
from runnerd import gpus, node
from runnerd.scheduler import RunnerInfo, RunnerState
from tests.conftest import app_on_socket
from tests.fake_nvml_gpu import FakeGpu, FakeGpuNvml, GiB

pytestmark = pytest.mark.engine


def runner_info(pid: int | None) -> RunnerInfo:
    return RunnerInfo(backend="llama.cpp", model="tiny:latest", mode=Mode.COMPLETION, state=RunnerState.READY,
                      pid=pid, socket="/run/x.sock", endpoint=Endpoint.unix(Path("/run/x.sock")), log_path=None,
                      started_at=None, last_used=0, active_requests=0, keep_alive=None, expires_at=None,
                      memory=MemoryEstimate(ram_bytes=100, vram_bytes=7),
                      measured_ram_bytes=0, measured_vram_bytes=0)


def test_without_pynvml_there_are_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    info = node.collect([runner_info(os.getpid())], {"llama.cpp": "Running: x"})
    assert info.gpus == []
    assert gpus.gpu_count() == 0
    assert info.cpu.logical_cores == psutil.cpu_count() and info.cpu.model
    assert 0 < info.memory.available_bytes <= info.memory.total_bytes
    me = info.runners[0]
    # Our own process stands in for the engine; its RSS moves a little between two readings.
    assert me.rss_bytes is not None and me.rss_bytes > psutil.Process().memory_info().rss // 2
    assert me.gpu_memory_bytes is None
    assert info.reserved.estimated_ram_bytes == 100 and info.reserved.measured_rss_bytes == me.rss_bytes
    assert info.backends == {"llama.cpp": "Running: x"}


def test_nvml_without_a_driver_means_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml([FakeGpu()], fail_init=True))
    assert node.collect([], {}).gpus == []


def test_a_runner_that_has_exited_is_reported_without_memory():
    gone = psutil.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    usage = node.collect([runner_info(gone.pid), runner_info(None)], {}).runners
    assert [u.rss_bytes for u in usage] == [None, None]


def test_fake_gpu_answer(monkeypatch):
    child = psutil.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # GPU memory is attributed to a runner through its process tree: here our child process.
        gpus = [FakeGpu(processes={child.pid: 3 * GiB, 999_999_999: GiB}),
                FakeGpu(name="FAKE NVIDIA GPU 2", uuid="GPU-fake-2", total=24 * GiB, used=GiB)]
        fake = FakeGpuNvml(gpus)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        info = node.collect([runner_info(os.getpid())], {})
    finally:
        child.kill()
        child.wait()
    assert fake.initialised == 0, "every nvmlInit is paired with nvmlShutdown"
    first, second = info.gpus
    assert first.model_dump() == {
        "index": 0, "uuid": "GPU-00000000-fake-0000-0000-000000000000", "name": "FAKE NVIDIA GPU (test double)",
        "memory_total_bytes": 80 * GiB, "memory_used_bytes": 10 * GiB, "memory_free_bytes": 70 * GiB,
        "driver_version": "550.54.15", "cuda_version": "12.4"}
    assert (second.index, second.uuid, second.memory_free_bytes) == (1, "GPU-fake-2", 23 * GiB)
    assert info.runners[0].gpu_memory_bytes == 3 * GiB
    assert info.reserved.measured_gpu_memory_bytes == 3 * GiB
    assert info.reserved.estimated_vram_bytes == 7


@pytest.mark.anyio
async def test_node_route_with_a_fake_gpu(monkeypatch, tmp_path, llama_server):
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml([FakeGpu()]))
    backends = {"llama.cpp": LlamaCppBackend(cache_dir=tmp_path, binary=llama_server)}
    async with app_on_socket(tmp_path, backends) as client:
        resp = await client.get("/node")

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [g["name"] for g in body["gpus"]] == ["FAKE NVIDIA GPU (test double)"]
    assert body["backends"]["llama.cpp"].startswith("Running: llama.cpp")
    assert body["runners"] == [] and body["reserved"]["runners"] == 0
    assert set(body) == {"hostname", "runnerd_version", "cpu", "memory", "gpus", "reserved", "backends", "runners",
                         "drain"}
    assert body["drain"] == {"draining": False, "since": None, "runners_left": 0, "active_requests": 0,
                             "drained": False}


def test_admission_sees_the_fake_gpus_memory(monkeypatch):
    """FAKE NVML (no GPU on CI): admission's host probe reads each GPU NVML reports, and their sums."""
    from runnerd.admission import read_host_memory_per_gpu

    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml([FakeGpu(total=80 * GiB, used=10 * GiB),
                                                             FakeGpu(total=24 * GiB, used=4 * GiB)]))
    host = read_host_memory_per_gpu()
    assert (host.gpus, host.vram_total, host.vram_free) == (2, 104 * GiB, 90 * GiB)
    assert [(g.index, g.total, g.free) for g in host.devices] == [(0, 80 * GiB, 70 * GiB), (1, 24 * GiB, 20 * GiB)]
    assert host.ram_total > 0
