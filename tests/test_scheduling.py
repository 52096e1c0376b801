"""Admission by memory, eviction, waiting, crash back-off and orphan clean-up, with the real engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest

from backends.llamacpp.argv import build_env
from tests.tinymodels import write_alien_model, write_tiny_llama

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def three_models(models_dir):
    # Different seeds: three distinct files of the same size, so the same estimate.
    return {name: write_tiny_llama(models_dir / f"{name}.gguf", seed=i) for i, name in enumerate("abc")}


@pytest.fixture(scope="module")
def estimate(llama_server, three_models, tmp_path_factory):
    """The scheduler's own estimate for one tiny model, read from a daemon with no limit."""
    from tests.conftest import Daemon

    root = Path(tmp_path_factory.mktemp("est", numbered=True))
    short = Path("/tmp") / f"rd-est-{os.getpid()}"
    short.mkdir(exist_ok=True)
    d = Daemon(short, llama_server, {"a": three_models["a"]}, {}, [])
    try:
        d.post("/engines/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 1}).raise_for_status()
        (runner,) = d.ps()
        assert runner["memory"]["known"], runner["memory"]
        return runner["memory"]["ram_bytes"]
    finally:
        d.stop()
        del root


def ask(d, model, **extra):
    return d.post("/engines/v1/completions", {"model": model, "prompt": "the", "max_tokens": 2,
                                              "ignore_eos": True, **extra})


def loaded(d):
    return sorted(r["model"].split(":")[0] for r in d.ps())


def limit_env(ram_limit: int, **extra: str) -> dict[str, str]:
    # The host reserve is irrelevant here: the limit is far below what the host has.
    return {"RUNNERD_MEMORY__RAM_LIMIT": str(ram_limit), "RUNNERD_MEMORY__RAM_RESERVE": "0", **extra}


def test_least_recently_used_idle_runner_is_evicted(make_daemon, three_models, estimate):
    d = make_daemon(three_models, env=limit_env(int(estimate * 2.5)))
    assert ask(d, "a").status_code == 200
    assert ask(d, "b").status_code == 200
    assert loaded(d) == ["a", "b"]
    assert ask(d, "a").status_code == 200  # b is now the least recently used
    assert ask(d, "c").status_code == 200
    assert loaded(d) == ["a", "c"]
    assert ask(d, "b").status_code == 200
    assert loaded(d) == ["b", "c"]
    assert "evicting model=a:latest" in d.output() and "evicting model=b:latest" in d.output()


def test_model_larger_than_the_limit_is_507_at_once(make_daemon, three_models, estimate):
    d = make_daemon(three_models, env=limit_env(estimate // 2))
    started = time.monotonic()
    resp = ask(d, "a")
    assert resp.status_code == 507, resp.text
    message = resp.json()["error"]["message"]
    assert "needs" in message and "at most" in message and "a:latest" in message
    assert time.monotonic() - started < 5 and d.ps() == [] and not d.engine_pids()


def test_many_clients_across_three_models_with_room_for_two(make_daemon, three_models, estimate):
    d = make_daemon(three_models, env=limit_env(int(estimate * 2.5), RUNNERD_QUEUE_TIMEOUT="120"))
    most = 0
    stop = threading.Event()

    def watch():
        nonlocal most
        while not stop.is_set():
            most = max(most, len(d.engine_pids()))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://runnerd", timeout=120)
    try:
        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(
                lambda i: client.post("/engines/v1/completions", json={
                    "model": "abc"[i % 3], "prompt": "the", "max_tokens": 8, "ignore_eos": True}).status_code,
                range(32)))
    finally:
        stop.set()
        watcher.join()
    assert statuses == [200] * 32
    assert 1 <= most <= 2
    assert len(d.ps()) <= 2


def test_waiting_for_busy_runners_ends_in_503_with_retry_after(make_daemon, three_models, estimate):
    d = make_daemon(three_models, env=limit_env(int(estimate * 1.5), RUNNERD_QUEUE_TIMEOUT="1",
                                                RUNNERD_DEFAULT_CONTEXT_SIZE="4096"))
    with d.busy("a"):
        t0 = time.monotonic()
        resp = ask(d, "b")
        waited = time.monotonic() - t0
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert "b:latest" in resp.json()["error"]["message"] and "MiB" in resp.json()["error"]["message"]
        assert 0.9 < waited < 10
        assert loaded(d) == ["a"]


def test_hang_up_during_a_load_cancels_it(make_daemon, gemma_model):
    d = make_daemon({"gemma3": gemma_model})
    with pytest.raises(httpx.ReadTimeout):
        httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://r", timeout=0.3).post(
            "/engines/v1/completions", json={"model": "gemma3", "prompt": "hi", "max_tokens": 1})
    d.wait_for(lambda: d.ps() == [] and not d.engine_pids(), timeout=5, what="abandoned load cancelled")
    assert "no one is waiting" in d.output()


def test_a_model_that_keeps_failing_to_start_is_held_back(make_daemon, tmp_path):
    alien = write_alien_model(tmp_path / "alien.gguf")
    d = make_daemon({"alien": alien}, env={"RUNNERD_CRASH_BACKOFF": "30"})
    for _ in range(3):
        assert ask(d, "alien").status_code == 500
    t0 = time.monotonic()
    resp = ask(d, "alien")
    assert resp.status_code == 503 and time.monotonic() - t0 < 1
    assert "held back" in resp.json()["error"]["message"] and "nosucharch" in resp.json()["error"]["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 30
    assert d.output().count("runner starting model=alien:latest") == 3
    # Unloading lifts the hold: the next request tries again.
    d.post("/engines/unload", {"models": ["alien"]}).raise_for_status()
    assert ask(d, "alien").status_code == 500
    assert d.output().count("runner starting model=alien:latest") == 4


def test_restarted_daemon_stops_the_runner_a_previous_one_left(make_daemon, llama_server, tiny_model):
    orphan: subprocess.Popen[bytes] | None = None
    innocent: subprocess.Popen[bytes] | None = None

    def leave_a_runner_behind(root: Path) -> None:
        nonlocal orphan, innocent
        runners = root / "run" / "runners"
        runners.mkdir(parents=True)
        sock = runners / "old.sock"
        orphan = subprocess.Popen([str(llama_server), "--model", str(tiny_model), "--host", str(sock)],
                                  env=build_env(llama_server), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        created = psutil.Process(orphan.pid).create_time()
        (runners / "old.pid").write_text(json.dumps({"pid": orphan.pid, "create_time": created,
                                                     "daemon_pid": 1, "socket": str(sock)}))
        # A pid file whose pid now belongs to an unrelated process (recycled pid): never killed.
        innocent = subprocess.Popen(["sleep", "60"], start_new_session=True)
        (runners / "recycled.pid").write_text(json.dumps({"pid": innocent.pid, "create_time": created - 1000,
                                                          "daemon_pid": 1, "socket": str(runners / "x.sock")}))
        # A socket no pid file names (the daemon died before recording its runner): removed too.
        stray = socket.socket(socket.AF_UNIX)
        stray.bind(str(runners / "stray.sock"))
        stray.close()

    d = make_daemon({"tiny": tiny_model}, prepare=leave_a_runner_behind)
    assert orphan is not None and innocent is not None
    try:
        assert orphan.wait(5) is not None
        assert innocent.poll() is None
        assert not list((d.root / "run" / "runners").glob("*.pid"))
        assert not (d.root / "run" / "runners" / "stray.sock").exists()
        assert "left by a previous runnerd" in d.output()
    finally:
        for proc in (orphan, innocent):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_runner_pid_file_lives_as_long_as_the_runner(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model})
    ask(d, "tiny").raise_for_status()
    (pid_file,) = (d.root / "run" / "runners").glob("*.pid")
    assert json.loads(pid_file.read_text())["pid"] == d.ps()[0]["pid"]
    d.post("/engines/unload", {"all": True}).raise_for_status()
    assert not pid_file.exists()


@pytest.mark.anyio
async def test_gpu_memory_of_a_runner_is_measured_and_held(monkeypatch, llama_server, tiny_model, tmp_path):
    """FAKE NVML: NVML cannot exist on a CPU host, so a stand-in GPU reports 1 GiB for every process.
    The runner's tree is a real llama-server; what is checked is that the scheduler counts it."""
    import sys

    import psutil as ps

    from backends.base import BackendConfiguration, Mode, ModelRef
    from backends.llamacpp import LaunchOptions, LlamaCppBackend
    from runnerd.admission import Budget
    from runnerd.config import MemorySettings
    from runnerd.scheduler import RunnerKey, Scheduler
    from tests.fake_nvml_gpu import FakeGpu, FakeGpuNvml

    gib = 1 << 30
    gpu = FakeGpu()
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml([gpu]))

    backend = LlamaCppBackend(cache_dir=tmp_path, binary=llama_server, launch=LaunchOptions(threads=1))
    scheduler = Scheduler({backend.name: backend}, runtime_dir=Path("/tmp") / f"rd-gpu-{os.getpid()}",
                          log_dir=None, default_keep_alive=60.0, budget=Budget(MemorySettings()))
    async with scheduler.running():
        lease = await scheduler.acquire(RunnerKey(backend.name, "tiny:latest", Mode.COMPLETION),
                                        ModelRef(name="tiny:latest", path=tiny_model), BackendConfiguration())
        lease.release()
        gpu.processes = {pid: gib for pid in ps.pids()}  # GPU 0 -> pid -> bytes, the engine's included
        await scheduler.sampler.fresh()  # what runners hold comes from the sampler's readings
        (info,) = scheduler.ps()
        holding = scheduler._holdings()[0]

    assert info.measured_vram_bytes == gib and info.measured_ram_bytes > 0
    assert holding.held.vram == gib
