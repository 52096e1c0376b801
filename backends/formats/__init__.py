"""Model formats: what runnerd knows about a model's files, from their headers alone.

One module per format, and this dispatch API by ``ModelFormat`` for callers that should not care which:

- ``describe(path, format) -> ModelSummary`` — architecture, parameter count, quantization, context, ...
- ``parameter_count(path, format)`` — elements of every tensor (None when a directory has no weights).
- ``format_of(path)`` — the format a local model path is in (a directory is Hugging Face format).
- ``model_files(path, format)`` — the files that make the model (a split GGUF's shards, a directory's files).

Modules: ``gguf`` (the header reader for untrusted files, and a header cache), ``gguf_summary``,
``safetensors`` (safetensors headers and config.json), ``names`` (split GGUF names, hub repository files).
All file I/O here is blocking: callers on an event loop run it in a thread.

Errors: ``GGUFParseError`` for a GGUF that cannot be read (``OSError`` too where the cached header
stats the file first), ``ModelConfigError`` for a directory without a usable config.json,
``SafetensorsError`` for an untrusted safetensors header; ``FORMAT_ERRORS`` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import assert_never

from backends.formats import safetensors
from backends.formats.gguf import GGUFParseError, cached_header, shard_paths
from backends.formats.gguf_summary import summarize
from backends.formats.kind import ModelFormat
from backends.formats.safetensors import ModelConfigError, SafetensorsError
from backends.formats.summary import ModelSummary

__all__ = ["FORMAT_ERRORS", "ModelSummary", "describe", "format_of", "model_files", "parameter_count"]

FORMAT_ERRORS: tuple[type[Exception], ...] = (GGUFParseError, ModelConfigError, SafetensorsError)


def format_of(path: Path) -> ModelFormat:
    """A directory holds a Hugging Face-format (safetensors) model; anything else is read as GGUF."""
    return ModelFormat.SAFETENSORS if path.is_dir() else ModelFormat.GGUF


def describe(path: Path, format: ModelFormat) -> ModelSummary:
    """The model's summary. GGUF headers come from the cache (read once per version of the file)."""
    if format is ModelFormat.GGUF:
        return summarize(cached_header(path))
    if format is ModelFormat.SAFETENSORS:
        return safetensors.describe(path)
    assert_never(format)


def parameter_count(path: Path, format: ModelFormat) -> int | None:
    """Elements of every tensor, from the headers; None for a directory without safetensors files."""
    if format is ModelFormat.GGUF:
        return sum(t.n_elements for t in cached_header(path).tensors)
    if format is ModelFormat.SAFETENSORS:
        return safetensors.parameter_count(path)
    assert_never(format)


def model_files(path: Path, format: ModelFormat) -> list[Path]:
    """The files that make the model, in order: a GGUF's shards (named after any of them; GGUFParseError
    for an impossible shard name), or a directory's regular files (recursively; no symbolic links, no
    hidden files)."""
    if format is ModelFormat.GGUF:
        return shard_paths(path)
    if format is ModelFormat.SAFETENSORS:
        return sorted((p for p in path.rglob("*") if p.is_file() and not p.is_symlink() and not p.name.startswith(".")),
                      key=lambda p: str(p.relative_to(path)))
    assert_never(format)
