"""Hugging Face-format model directories: safetensors headers and config.json, read without loading a tensor.

- A ``*.safetensors`` file starts with an 8-byte little-endian length, then that many bytes of JSON
  listing each tensor's dtype, shape and byte range. Only that header is read. Files are untrusted: the
  length is bounded (by the format's 100 MB header limit and the file's size), every tensor must have a
  known dtype, a shape of non-negative integers and a byte range that lies inside the file and matches
  its shape; anything else is one ``SafetensorsError``.
- ``config.json`` is read with a size bound and must be a JSON object (``ModelConfigError`` otherwise);
  the helpers below take what describes the model (architecture, context, quantization) from it.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.formats.summary import ModelSummary

MiB = 1 << 20
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
MAX_TENSORS = 1_000_000
MAX_CONFIG_BYTES = 4 * MiB

# Bits per element of each safetensors dtype (sub-byte types are packed).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "U16": 16, "I16": 16,
    "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

log = logging.getLogger(__name__)


class SafetensorsError(ValueError):
    """A safetensors file whose header cannot be trusted or read; the message names the file."""


class ModelConfigError(ValueError):
    """config.json is missing, unreadable or lacks what the caller needs."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors listed in one safetensors file's header (``__metadata__`` left out)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path.name}: shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise SafetensorsError(f"{path.name}: header length exceeds the file or the format's "
                                       f"{MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")
            raw = f.read(length)
    except OSError as exc:
        raise SafetensorsError(f"{path.name}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafetensorsError(f"{path.name}: header is not valid JSON{_where(exc)}") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: header is not a JSON object")
    if len(header) > MAX_TENSORS:
        raise SafetensorsError(f"{path.name}: more than {MAX_TENSORS} tensors")
    data_size = size - 8 - length
    return {name: _tensor(path, name, entry, data_size) for name, entry in header.items() if name != "__metadata__"}


def _where(exc: Exception) -> str:
    """Where a JSON text broke, without quoting it (a decode error would quote the file's bytes)."""
    return f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""


def _tensor(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    def fail(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path.name}: tensor {name[:100]!r}: {why}")

    if not isinstance(entry, dict):
        raise fail("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise fail(f"unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise fail("shape is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise fail("data_offsets is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise fail(f"data_offsets [{begin}, {end}] lie outside the file's {data_size} data bytes")
    expected = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
    if end - begin != expected:
        raise fail(f"holds {end - begin} bytes but {dtype}{shape} needs {expected}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), nbytes=expected)


def weight_files(model_dir: Path) -> list[Path]:
    """The directory's ``*.safetensors`` files, in name order (top level only, as vLLM loads them)."""
    return sorted(model_dir.glob("*.safetensors"))


def weights_bytes(model_dir: Path) -> int:
    """Bytes of all tensors in the directory's safetensors files (headers only)."""
    files = weight_files(model_dir)
    if not files:
        raise SafetensorsError(f"{model_dir.name}: no *.safetensors files")
    return sum(t.nbytes for f in files for t in read_safetensors_header(f).values())


def parameter_count(model_dir: Path) -> int | None:
    """Elements of every tensor in the directory's safetensors files (headers only); None without
    any. Packed quantized tensors (GPTQ/AWQ int32 words) count as stored, not unpacked.
    SafetensorsError for a header we cannot trust."""
    files = weight_files(model_dir)
    if not files:
        return None
    return sum(math.prod(t.shape) for f in files for t in read_safetensors_header(f).values())


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The directory's config.json as a JSON object (at most MAX_CONFIG_BYTES); ModelConfigError otherwise."""
    path = model_dir / "config.json"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ModelConfigError(f"config.json: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelConfigError(f"config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelConfigError(f"config.json is not valid JSON{_where(exc)}") from exc
    if not isinstance(config, dict):
        raise ModelConfigError("config.json is not a JSON object")
    return config


def config_architecture(config: dict[str, Any]) -> str | None:
    """The first of `architectures` (LlamaForCausalLM, ...), else `model_type`."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def config_quantization(config: dict[str, Any]) -> str | None:
    """quantization_config.quant_method (gptq, awq, fp8, ...), else the dtype the weights are kept in
    (`torch_dtype`, or `dtype` as newer transformers write it)."""
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if isinstance(method, str) and method:
        return method
    dtype = config.get("torch_dtype", config.get("dtype"))
    return dtype if isinstance(dtype, str) and dtype else None


def _config_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _directory_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def describe(model_dir: Path) -> ModelSummary:
    """A model directory's summary from config.json (top-level keys) and its safetensors headers.
    ModelConfigError without a usable config.json. The parameter count is None without safetensors or
    with a header we cannot trust: the summary is informational, the engine judges the files."""
    config = read_model_config(model_dir)
    try:
        parameters = parameter_count(model_dir)
    except SafetensorsError as exc:
        log.warning("no parameter count for %s: %s", model_dir, exc)
        parameters = None
    return ModelSummary(
        architecture=config_architecture(config),
        parameter_count=parameters,
        quantization=config_quantization(config),
        context_length=_config_int(config, "max_position_embeddings"),
        block_count=_config_int(config, "num_hidden_layers"),
        head_count=_config_int(config, "num_attention_heads"),
        head_count_kv=_config_int(config, "num_key_value_heads"),
        embedding_length=_config_int(config, "hidden_size"),
        vocab_size=_config_int(config, "vocab_size"),
        pooling_type=None,
        sliding_window=_config_int(config, "sliding_window"),
        size_bytes=_directory_size(model_dir),
    )
