"""What a GGUF model is, in a few fields, from its header (no tensor data is read)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gguf.constants import LlamaFileType, PoolingType

from backends.formats.gguf import GGUFHeader, LazyArray
from backends.formats.summary import ModelSummary


def summarize(header: GGUFHeader) -> ModelSummary:
    return ModelSummary(
        architecture=header.architecture,
        parameter_count=sum(t.n_elements for t in header.tensors),
        quantization=quantization(header),
        context_length=_count(header.arch_get("context_length")),
        block_count=_count(header.arch_get("block_count")),
        head_count=_heads(header.arch_get("attention.head_count")),
        head_count_kv=_heads(header.arch_get("attention.head_count_kv")),
        embedding_length=_count(header.arch_get("embedding_length")),
        vocab_size=_vocab_size(header),
        pooling_type=_pooling(header.arch_get("pooling_type")),
        sliding_window=_count(header.arch_get("attention.sliding_window")) or None,
        size_bytes=header.file_size,
    )


def quantization(header: GGUFHeader) -> str | None:
    """general.file_type as llama.cpp names it (MOSTLY_Q4_K_M -> Q4_K_M); without it, the tensor type
    holding the most bytes (what `guessed` file types mean in llama.cpp too)."""
    raw = header.get("general.file_type")
    if isinstance(raw, int) and not isinstance(raw, bool):
        try:
            name = LlamaFileType(raw).name
        except ValueError:
            return f"unknown file type {raw}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    by_type: Counter[str] = Counter()
    for t in header.tensors:
        by_type[t.type_name] += t.n_bytes
    return by_type.most_common(1)[0][0] if by_type else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _heads(value: Any) -> int | list[int] | None:
    if isinstance(value, list):
        counts = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        if counts and len(set(counts)) == 1:
            return counts[0]
        return counts or None
    return _count(value)


def _vocab_size(header: GGUFHeader) -> int | None:
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list | LazyArray):
        return len(tokens)
    return _count(header.arch_get("vocab_size"))


def _pooling(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return PoolingType(value).name.lower()
    except ValueError:
        return f"unknown ({value})"
