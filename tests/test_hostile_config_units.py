"""The backends' bounds on configuration, without a daemon: host limits from the EngineContext, the
prompt cache in the estimate, 32-bit options, vLLM's counts, and hf_overrides keys through configure."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from backends.base import BackendConfiguration, EngineContext, Mode, ModelRef, RunnerError, RunnerOutput
from backends.endpoint import Endpoint
from backends.flags import FlagError
from backends.llamacpp import LlamaCppBackend, LlamaCppSettings
from backends.llamacpp.host_limits import HostLimits
from backends.vllm import VllmBackend
from backends.vllm.host_limits import VllmHostLimits
from backends.vllm.options import VllmSettings
from tests.conftest import app_on_socket
from tests.test_vllm_unit import write_model_dir

MiB = 1 << 20


def test_host_bounds_come_from_the_engine_context(tmp_path):
    context = EngineContext(cache_dir=tmp_path, cpu_count=3)
    assert EngineContext(cache_dir=tmp_path).cpu_count == len(os.sched_getaffinity(0))
    backend = LlamaCppBackend.create(context, LlamaCppSettings())
    assert backend.validate_flags(["-t", "6", "-Cr", "0-2"]) == ["--threads", "6", "--cpu-range", "0-2"]
    with pytest.raises(FlagError, match=r"at most 6 threads on this host \(3 CPUs"):
        backend.validate_flags(["-t", "7"])
    # Ids are the host's: a daemon confined to CPUs 4-5 of an 8-CPU host may still name them.
    confined = LlamaCppBackend(cache_dir=tmp_path, host=HostLimits(cpus=2, cpu_ids=8))
    assert confined.validate_flags(["--cpu-range", "4-7"]) == ["--cpu-range", "4-7"]
    with pytest.raises(FlagError, match="this host has CPUs 0-7"):
        confined.validate_flags(["--cpu-range", "4-8"])
    with pytest.raises(FlagError, match="selects no CPU"):
        confined.validate_flags(["--cpu-mask", "0"])
    # The estimate's parameters pass the same bounds.
    with pytest.raises(FlagError, match="at most 256 slots"):
        backend.estimate_flags({"parallel": "512"})


def test_a_stored_configuration_the_host_cannot_carry_does_not_start(tmp_path, tiny_model):
    backend = LlamaCppBackend(cache_dir=tmp_path, binary=Path(shutil.which("true") or "/bin/true"),
                              host=HostLimits(cpus=1, cpu_ids=1))
    model = ModelRef(name="tiny", path=tiny_model)
    for config, fragment in [(BackendConfiguration(runtime_flags=["--threads", "64"]), "at most 2 threads"),
                             (BackendConfiguration(context_size=256, runtime_flags=["--parallel", "4"]),
                              "--parallel 2 at most")]:
        with pytest.raises(RunnerError, match=fragment):
            asyncio.run(backend.run(Endpoint.unix(tmp_path / "s.sock"), model, Mode.COMPLETION, config,
                                    RunnerOutput()))


def test_the_prompt_cache_budget_is_counted_in_the_estimate(tmp_path, tiny_model):
    backend = LlamaCppBackend(cache_dir=tmp_path)
    model = ModelRef(name="tiny", path=tiny_model)

    def ram(flags: list[str]) -> int:
        return backend.required_memory(model, Mode.COMPLETION, BackendConfiguration(runtime_flags=flags)).ram_bytes

    off = ram(["--cache-ram", "0"])
    assert ram(["--cache-ram", "2048"]) - off == 2048 * MiB
    assert ram(["--cache-ram", str(1 << 20)]) - off == (1 << 40)
    noted = backend.required_memory(model, Mode.COMPLETION, BackendConfiguration(runtime_flags=["--cache-ram", "64"]))
    assert "includes llama-server's prompt cache (--cache-ram) at its limit, 64 MiB of RAM" in noted.notes
    # The operator's prompt_cache_mib is counted the same way.
    operator = LlamaCppBackend.create(EngineContext(cache_dir=tmp_path), LlamaCppSettings(prompt_cache_mib=512))
    assert operator.required_memory(model, Mode.COMPLETION, BackendConfiguration()).ram_bytes - off == 512 * MiB


def test_reasoning_budget_stays_a_32_bit_int(tmp_path):
    backend = LlamaCppBackend(cache_dir=tmp_path)
    assert backend.validate_options({"reasoning_budget": 2**31 - 1}) == {"reasoning_budget": 2**31 - 1}
    with pytest.raises(ValidationError):
        backend.validate_options({"reasoning-budget": 2**31})


def test_vllm_counts_are_bounded_by_the_host(tmp_path):
    gpu = VllmBackend(cache_dir=tmp_path, host=VllmHostLimits(gpus=1, cpus=8))
    assert gpu.validate_flags(["-tp", "1", "--max-num-seqs", "1024"]) == ["--tensor-parallel-size=1",
                                                                          "--max-num-seqs=1024"]
    with pytest.raises(FlagError, match=r"tensor x pipeline parallel size 2 .* 1 GPU\(s\) vLLM can see"):
        gpu.validate_flags(["--tensor-parallel-size", "2"])
    with pytest.raises(FlagError, match="pipeline-parallel-size=4"):
        gpu.validate_flags(["-pp", "4"])
    with pytest.raises(FlagError, match="at most 1024 sequences"):
        gpu.validate_flags(["--max-num-seqs", "65536"])
    with pytest.raises(FlagError, match="at most 8"):
        gpu.validate_flags(["--max-parallel-loading-workers", "64"])
    # On a CPU host each rank is a process on the CPUs the daemon may use: the EngineContext's count.
    cpu = VllmBackend.create(EngineContext(cache_dir=tmp_path, cpu_count=2), VllmSettings(device="cpu"))
    assert cpu.validate_flags(["-tp", "2"]) == ["--tensor-parallel-size=2"]
    with pytest.raises(FlagError, match="2 CPUs"):
        cpu.validate_flags(["-tp", "2", "-pp", "2"])


@pytest.mark.anyio
async def test_hf_overrides_keys_starting_with_an_underscore_are_refused_by_configure(tmp_path):
    model_dir = write_model_dir(tmp_path / "st")
    backends = {"vllm": VllmBackend(cache_dir=tmp_path / "cache")}
    async with app_on_socket(tmp_path, backends, {"st": model_dir}) as client:
        for overrides, path in [({"__class__": {"__init__": {"__globals__": {}}}}, "__class__"),
                                ({"text_config": {"__dict__": {"x": 1}}}, "text_config.__dict__"),
                                ({"rope_scaling": {"factor": 2, "_x": [1]}}, "rope_scaling._x")]:
            body = {"model": "st", "vllm": {"hf_overrides": overrides}}
            resp = await client.post("/engines/vllm/_configure", json=body)
            assert resp.status_code == 400, resp.text
            assert f"hf_overrides '{path}' refused: keys starting with '_'" in resp.json()["error"]["message"]
        assert (await client.get("/engines/_configure")).json()["configurations"] == []

