"""Where llama.cpp puts a model on several GPUs, and admission checking each GPU on its own.

There is no GPU on CI: every GPU here is a FAKE one (tests/fake_nvml_gpu.py stands in for pynvml).
Estimates come from the real estimator as a CUDA build would be started; runners that actually run are
the CPU llama-server, so the GPU memory they hold is their estimate (the fake NVML reports no process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from backends.base import BackendConfiguration, MemoryEstimate, Mode, ModelRef
from backends.llamacpp import GpuDevice, LaunchOptions, LlamaCppBackend, offload_devices, visible_devices
from runnerd.admission import Amount, Budget, GpuMemory, Holding, HostMemory, needed, read_host_memory_per_gpu
from runnerd.config import MemorySettings
from runnerd.engines import host_gpus
from runnerd.sampler import HostSampler
from runnerd.scheduler import DoesNotFit, QueueTimeout, RunnerKey, Scheduler, SchedulerLimits
from tests.fake_nvml_gpu import FakeGpu, FakeGpuNvml, GiB
from tests.memory_models import TinySpec, write_model
from tests.tinymodels import write_tiny_llama

MiB = 1 << 20
RESERVE = 512 * MiB  # memory.vram_reserve's default
SINGLE_GPU = ["--split-mode", "none", "--main-gpu", "1"]


def llamacpp_gpus() -> list[GpuDevice]:
    """What the daemon hands llama.cpp: its view of the host's GPUs now."""
    return visible_devices(host_gpus())


def fake_gpus(monkeypatch: pytest.MonkeyPatch, *gpus: FakeGpu) -> FakeGpuNvml:
    """Install a FAKE NVML with these FAKE GPUs in place of pynvml."""
    fake = FakeGpuNvml(list(gpus))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def cuda_backend(tmp_path: Path, **kw: object) -> LlamaCppBackend:
    """The llama.cpp backend as a CUDA build would estimate (no binary is needed to estimate)."""
    return LlamaCppBackend(cache_dir=tmp_path, launch=LaunchOptions(use_gpu=True), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> ModelRef:
    """16 layers of a 4096-wide llama, about 6 GiB of F16 weights: header only (the data is a hole)."""
    spec = TinySpec(n_embd=4096, n_layer=16, n_head=32, n_head_kv=8, n_ff=11008, name="big")
    path = write_model(tmp_path_factory.mktemp("gpu") / "big.gguf", spec, header_only=True)
    return ModelRef(name="big:latest", path=path)


def by_device(est: MemoryEstimate) -> dict[str, int]:
    return {d.device: d.bytes for d in est.devices}


def layers_on(est: MemoryEstimate, device: str) -> int:
    """Layers on a device, counted by KV cache (every layer of this model has the same cache)."""
    kv = {d.device: d.breakdown.kv_cache for d in est.devices}
    per_layer = sum(kv.values()) // 16
    return kv.get(device, 0) // per_layer


# --- the estimate on several GPUs ---------------------------------------------------------------------


def test_layers_split_across_fake_gpus_in_proportion_to_free_memory(monkeypatch, tmp_path, big_model):
    # FAKE GPUs: 24 GiB free on GPU 0, 8 GiB free on GPU 1 -> shares 0.75 / 1.0 of the 17 offloaded units
    # (16 layers and the output layer): layers 0..12 on GPU 0, 13..15 and the output layer on GPU 1.
    fake_gpus(monkeypatch, FakeGpu(total=24 * GiB, used=0), FakeGpu(total=24 * GiB, used=16 * GiB))
    est = cuda_backend(tmp_path, gpus=llamacpp_gpus).required_memory(big_model, Mode.COMPLETION,
                                                                    BackendConfiguration())
    assert set(by_device(est)) == {"cpu", "cuda:0", "cuda:1"}
    assert (layers_on(est, "cuda:0"), layers_on(est, "cuda:1")) == (13, 3)
    assert by_device(est)["cuda:0"] > 3 * by_device(est)["cuda:1"] > 0
    assert est.vram_bytes == by_device(est)["cuda:0"] + by_device(est)["cuda:1"]
    # The free memory decides: swap it and the split follows.
    fake_gpus(monkeypatch, FakeGpu(total=24 * GiB, used=16 * GiB), FakeGpu(total=24 * GiB, used=0))
    swapped = cuda_backend(tmp_path, gpus=llamacpp_gpus).required_memory(big_model, Mode.COMPLETION,
                                                                        BackendConfiguration())
    assert (layers_on(swapped, "cuda:0"), layers_on(swapped, "cuda:1")) == (5, 11)


def test_only_the_gpus_the_engine_sees_get_layers(monkeypatch, tmp_path, big_model):
    fake_gpus(monkeypatch, FakeGpu(total=24 * GiB, used=0), FakeGpu(total=24 * GiB, used=0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the engine inherits it; CUDA0 is then NVML's GPU 1
    est = cuda_backend(tmp_path, gpus=llamacpp_gpus).required_memory(big_model, Mode.COMPLETION,
                                                                    BackendConfiguration())
    assert set(by_device(est)) == {"cpu", "cuda:1"} and layers_on(est, "cuda:1") == 16


def test_device_flags_choose_the_gpus():
    gpus = [GpuDevice(index=0, free_bytes=GiB), GpuDevice(index=1, free_bytes=2 * GiB)]
    assert offload_devices(gpus, []) == gpus
    assert offload_devices(gpus, ["-sm", "none"]) == gpus[:1]
    assert offload_devices(gpus, ["--split-mode=none", "-mg", "1"]) == gpus[1:]
    assert offload_devices(gpus, ["--split-mode", "row", "-mg", "1"]) == gpus
    assert offload_devices(gpus, ["--device", "CUDA1"]) == gpus[1:]
    assert offload_devices(gpus, ["--device", "CUDA1,CUDA0", "-sm", "none"]) == gpus[1:]
    assert offload_devices(gpus, ["-dev", "none"]) is None
    assert offload_devices([], ["-sm", "none", "-mg", "1"]) == [GpuDevice(index=1)]  # GPUs unknown


def test_split_mode_none_puts_the_whole_model_on_the_main_gpu(monkeypatch, tmp_path, big_model):
    fake_gpus(monkeypatch, FakeGpu(total=24 * GiB, used=0), FakeGpu(total=24 * GiB, used=0))
    backend = cuda_backend(tmp_path, gpus=llamacpp_gpus)
    single = backend.required_memory(big_model, Mode.COMPLETION, BackendConfiguration(runtime_flags=SINGLE_GPU))
    assert set(by_device(single)) == {"cpu", "cuda:1"} and layers_on(single, "cuda:1") == 16
    assert needed(single).gpus == {1: single.vram_bytes}


# --- admission per GPU ------------------------------------------------------------------------------


def scheduler_for(backend: LlamaCppBackend, tmp_path: Path, **limits: float) -> Scheduler:
    """Wired as the daemon wires it: admission reads the GPUs from the host sampler (the FAKE NVML)."""
    sampler = HostSampler()
    return Scheduler({backend.name: backend}, runtime_dir=Path("/tmp") / f"rd-gpu-{os.getpid()}-{id(tmp_path)}",
                     log_dir=None, default_keep_alive=60.0, budget=Budget(MemorySettings(), sampler.host_memory),
                     limits=SchedulerLimits(**limits), sampler=sampler)


@pytest.mark.anyio
async def test_a_model_that_fits_the_pooled_vram_but_no_single_gpu_is_refused(monkeypatch, tmp_path, big_model):
    # Sizes come from the estimates: each FAKE GPU holds the layer-split share, not the whole model.
    fake_gpus(monkeypatch, FakeGpu(total=80 * GiB, used=0), FakeGpu(total=80 * GiB, used=0))
    backend = cuda_backend(tmp_path, gpus=llamacpp_gpus)
    whole = needed(backend.required_memory(big_model, Mode.COMPLETION, BackendConfiguration(runtime_flags=SINGLE_GPU)))
    split = needed(backend.required_memory(big_model, Mode.COMPLETION, BackendConfiguration()))
    per_gpu = RESERVE + (whole.gpus[1] + max(split.gpus.values())) // 2
    assert max(split.gpus.values()) < per_gpu - RESERVE < whole.gpus[1] < 2 * (per_gpu - RESERVE)
    fake_gpus(monkeypatch, FakeGpu(total=per_gpu, used=0), FakeGpu(total=per_gpu, used=0))

    budget = Budget(MemorySettings(), read_host_memory_per_gpu)
    cap = budget.capacity()
    assert whole.vram <= cap.vram, "the GPUs together would have room: pooling would admit it"
    assert not whole.fits_in(cap) and split.fits_in(cap)

    scheduler = scheduler_for(backend, tmp_path)
    async with scheduler.running():
        with pytest.raises(DoesNotFit) as caught:
            await scheduler.acquire(RunnerKey(backend.name, big_model.name, Mode.COMPLETION), big_model,
                                    BackendConfiguration(runtime_flags=SINGLE_GPU))
        assert scheduler.ps() == []
        error = caught.value
    await scheduler.sampler.stop()

    assert error.status == 507
    assert f"needs {whole.gpus[1] / GiB:.1f} GiB on GPU 1, which has {(per_gpu - RESERVE) / GiB:.1f} GiB usable" \
        in str(error)


class CpuRunnerGpuEstimate(LlamaCppBackend):
    """Runs the CPU llama-server (this host has no GPU) but asks for memory as a CUDA build started with
    `--split-mode none` on the FAKE GPU 0 would."""

    def __init__(self, estimator: LlamaCppBackend, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.estimator = estimator

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        flags = [*config.runtime_flags, "--split-mode", "none", "--main-gpu", "0"]
        return self.estimator.required_memory(model, mode, config.model_copy(update={"runtime_flags": flags}))


@pytest.mark.engine
@pytest.mark.anyio
async def test_a_runner_holding_gpu_0_makes_the_next_model_wait_then_evict(monkeypatch, tmp_path, llama_server,
                                                                            models_dir):
    models = {name: ModelRef(name=f"{name}:latest",
                             path=write_tiny_llama(models_dir / f"gpu-{name}.gguf", seed=20 + i))
              for i, name in enumerate("ab")}
    fake_gpus(monkeypatch, FakeGpu(total=80 * GiB, used=0), FakeGpu(total=80 * GiB, used=0))
    estimator = cuda_backend(tmp_path, gpus=llamacpp_gpus)
    single = BackendConfiguration(runtime_flags=["-sm", "none"])
    need = {n: needed(estimator.required_memory(m, Mode.COMPLETION, single)) for n, m in models.items()}
    # GPU 0 holds one of them but not both; GPU 1 has room for many (pooled, both would fit).
    gpu0 = RESERVE + need["a"].gpus[0] + need["b"].gpus[0] // 2
    fake_gpus(monkeypatch, FakeGpu(total=gpu0, used=0), FakeGpu(total=80 * GiB, used=0))
    backend = CpuRunnerGpuEstimate(estimator, cache_dir=tmp_path, binary=llama_server,
                                   launch=LaunchOptions(threads=1))

    scheduler = scheduler_for(backend, tmp_path, queue_timeout=1.0)
    key = {n: RunnerKey(backend.name, m.name, Mode.COMPLETION) for n, m in models.items()}
    async with scheduler.running():
        lease = await scheduler.acquire(key["a"], models["a"], BackendConfiguration())  # busy: not evictable
        with pytest.raises(QueueTimeout) as caught:
            await scheduler.acquire(key["b"], models["b"], BackendConfiguration())
        lease.release()  # idle now: the next load evicts it
        (await scheduler.acquire(key["b"], models["b"], BackendConfiguration())).release()
        waited, running, evictions = caught.value, [r.model for r in scheduler.ps()], scheduler.evictions
    await scheduler.sampler.stop()

    assert waited.status == 503 and waited.retry_after
    free = gpu0 - RESERVE - need["a"].gpus[0]
    assert f"needs {need['b'].gpus[0] / GiB:.1f} GiB on GPU 0, which has {free / GiB:.1f} GiB free" in str(waited)
    assert "a:latest (1 in flight)" in str(waited)
    assert running == ["b:latest"] and evictions == 1


def test_room_is_counted_per_gpu_from_estimates_and_measurements(monkeypatch):
    fake_gpus(monkeypatch, FakeGpu(total=16 * GiB, used=GiB), FakeGpu(total=16 * GiB, used=0))
    budget = Budget(MemorySettings(), read_host_memory_per_gpu)
    # A ready runner estimated at 2 GiB on GPU 0 but measured (NVML) at 6 GiB there; a loading one on GPU 1.
    ready = Holding(estimate=Amount(0, 2 * GiB, {0: 2 * GiB}), measured=Amount(0, 6 * GiB, {0: 6 * GiB}),
                    loading=False)
    loading = Holding(estimate=Amount(0, 4 * GiB, {1: 4 * GiB}), measured=Amount(0, GiB, {1: GiB}), loading=True)
    room = budget.room([ready, loading])
    # GPU 0: cap 15.5 GiB less 6 held = 9.5; NVML free 15 less the reserve = 14.5 -> 9.5.
    # GPU 1: cap 15.5 less 4 held = 11.5; free 16 less the reserve and 3 GiB still to come = 12.5 -> 11.5.
    assert room.gpus == {0: 9 * GiB + RESERVE, 1: 11 * GiB + RESERVE}
    assert Amount(0, 10 * GiB, {1: 10 * GiB}).fits_in(room)
    assert Amount(0, 10 * GiB, {0: 10 * GiB}).shortfall(room) == "needs 10.0 GiB on GPU 0, which has 9.5 GiB free"
    assert Amount(0, GiB, {2: GiB}).shortfall(room) == "needs 1.0 GiB on GPU 2, which this host does not have"


def test_vram_limit_is_shared_among_the_gpus_by_size():
    host = HostMemory.with_gpus(64 * GiB, 32 * GiB, [GpuMemory(0, 24 * GiB, 24 * GiB), GpuMemory(1, 8 * GiB, 8 * GiB)])
    budget = Budget(MemorySettings(vram_limit=16 * GiB), probe=lambda: host)
    cap = budget.capacity()
    assert cap.gpus == {0: 12 * GiB, 1: 4 * GiB} and cap.vram == 16 * GiB
    text = budget.explain_capacity(Amount(0, 5 * GiB, {1: 5 * GiB}))
    assert text.startswith("needs 5.0 GiB on GPU 1, which has 4.0 GiB usable at most; needs")
    assert "memory.vram_limit = 16384 MiB shared among the GPUs" in text


def test_a_probe_that_only_sums_the_gpus_is_read_as_equal_gpus():
    host = HostMemory(ram_total=64 * GiB, ram_available=32 * GiB, vram_total=32 * GiB, vram_free=30 * GiB, gpus=2)
    assert host.devices == (GpuMemory(0, 16 * GiB, 15 * GiB), GpuMemory(1, 16 * GiB, 15 * GiB))


# --- no GPU: as before --------------------------------------------------------------------------------


def test_without_nvml_nothing_changes(monkeypatch, tmp_path, big_model):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert llamacpp_gpus() == []
    host = read_host_memory_per_gpu()
    assert (host.gpus, host.devices, host.vram_total) == (0, (), 0)
    # A CUDA build on a host NVML cannot read: one GPU, index 0, as the estimator always assumed.
    est = cuda_backend(tmp_path, gpus=llamacpp_gpus).required_memory(big_model, Mode.COMPLETION,
                                                                    BackendConfiguration())
    before = cuda_backend(tmp_path).required_memory(big_model, Mode.COMPLETION, BackendConfiguration())
    assert est == before and set(by_device(est)) == {"cpu", "cuda:0"}
    # A CPU build never asks for the GPUs.
    cpu = LlamaCppBackend(cache_dir=tmp_path, gpus=lambda: pytest.fail("asked for GPUs"))  # type: ignore[arg-type]
    assert cpu.required_memory(big_model, Mode.COMPLETION, BackendConfiguration()).vram_bytes == 0
    # Admission: RAM as before, VRAM only from a configured vram_limit, checked as one pool.
    budget = Budget(MemorySettings(ram_reserve=GiB), read_host_memory_per_gpu)
    assert budget.capacity().vram == 0 and budget.capacity().gpus == {}
    assert Amount(ram=GiB).fits_in(budget.room([]))
    limited = Budget(MemorySettings(vram_limit=GiB), read_host_memory_per_gpu)
    assert Amount(0, GiB // 2, {0: GiB // 2}).fits_in(limited.room([]))
    assert not Amount(0, 2 * GiB, {0: 2 * GiB}).fits_in(limited.capacity())
