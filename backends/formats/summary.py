"""What runnerd shows about a model, whatever its format."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelSummary(BaseModel):
    """A model in a few fields, from its headers alone (no tensor data is read): what `runnerd inspect`,
    GET /models/{m}, the Ollama routes and the store's manifests show. A field the format does not
    record is None."""

    model_config = ConfigDict(frozen=True)

    architecture: str | None
    # GGUF: always known. Safetensors: None without *.safetensors files or with a header we cannot trust.
    parameter_count: int | None
    # GGUF: llama.cpp's file type name (Q4_K_M, F16, ...), the main tensor type if unset. Safetensors:
    # quantization_config.quant_method (gptq, awq, fp8, ...), else the dtype the weights are kept in.
    quantization: str | None
    context_length: int | None
    block_count: int | None
    head_count: int | list[int] | None
    head_count_kv: int | list[int] | None
    embedding_length: int | None
    vocab_size: int | None
    pooling_type: str | None
    sliding_window: int | None
    size_bytes: int
