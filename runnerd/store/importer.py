"""Importing a local model file or directory: which files make the model, and staging each one
(hashed, hard-linked into `partial/` when on the same filesystem, else copied) for the blob store."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from backends.base import ModelFormat
from backends.formats import format_of, model_files
from backends.formats.gguf import GGUFParseError
from backends.formats.safetensors import (
    ModelConfigError,
    SafetensorsError,
    read_model_config,
    read_safetensors_header,
    weight_files,
)
from runnerd.store.errors import StoreError
from runnerd.store.manifests import model_summary

_CHUNK = 1 << 20
# A local import's staged file older than this is left over from a crash: nothing resumes it. Younger
# ones may belong to another process importing into the same store (two daemons, a restart's overlap).
STALE_IMPORT_SECONDS = 24 * 3600


def check_local_file(path: Path) -> None:
    if not path.is_absolute():
        raise StoreError(f"model path {str(path)!r} must be absolute")
    try:
        path.stat()
    except OSError as exc:
        raise StoreError(f"cannot read model file {path}: {exc.strerror}") from exc
    if not path.is_file():
        raise StoreError(f"model path {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise StoreError(f"model file {path} is not readable by the daemon")


def check_local_directory(path: Path) -> None:
    """A Hugging Face-format model directory to register in place: readable, with a config.json that is a
    JSON object and top-level ``*.safetensors`` weights whose headers can be trusted (only the headers are
    read). StoreError naming what is missing or wrong otherwise."""
    what = f"{path} is not a Hugging Face-format model directory"
    if not os.access(path, os.R_OK | os.X_OK):
        raise StoreError(f"model directory {path} is not readable by the daemon")
    if not (path / "config.json").is_file():
        raise StoreError(f"{what}: it has no config.json")
    weights = weight_files(path)
    if not weights:
        raise StoreError(f"{what}: it has no *.safetensors weights")
    try:
        read_model_config(path)
        for weight in weights:
            read_safetensors_header(weight)
    except (ModelConfigError, SafetensorsError) as exc:
        raise StoreError(f"{what}: {exc}") from exc


def check_local_model(path: Path) -> ModelFormat:
    """What registering `path` in place needs (an absolute path to a readable GGUF file or Hugging
    Face-format directory), and the format it is in; StoreError otherwise."""
    if path.is_absolute() and path.is_dir():
        check_local_directory(path)
        return ModelFormat.SAFETENSORS
    check_local_file(path)
    return ModelFormat.GGUF


def inspect_model_file(path: Path) -> tuple[int, str | None]:
    """Size and architecture of a GGUF file; StoreError if it is not one we can serve."""
    check_local_file(path)
    info = model_summary(path, ModelFormat.GGUF)
    return info["size"], info["architecture"]


def remove_stale_imports(partial: Path) -> None:
    """Staged files of local imports cut short (a crash): never resumed, so only disk space."""
    if not partial.is_dir():
        return
    cutoff = time.time() - STALE_IMPORT_SECONDS
    for stale in partial.glob(".import-*"):
        with contextlib.suppress(OSError):
            if stale.lstat().st_mtime < cutoff:
                stale.unlink()


def local_sources(path: Path, expected: str | None, projector: Path | None,
                  ) -> tuple[list[tuple[Path, str]], list[str], bool]:
    """The files of a local model as (file, its name in the model), their roles ("model", "mmproj") and
    whether it is a directory model; StoreError for anything that is not a model we can serve."""
    fmt = format_of(path)
    directory_model = fmt is ModelFormat.SAFETENSORS
    if directory_model:
        sources = [(p, str(p.relative_to(path))) for p in model_files(path, fmt)]
        if not (path / "config.json").is_file():
            raise StoreError(f"{path} is not a Hugging Face-format model directory (no config.json)")
    else:
        check_local_file(path)
        try:
            shards = model_files(path, fmt)
        except GGUFParseError as exc:
            raise StoreError(str(exc)) from exc
        for shard in shards:
            check_local_file(shard)
        model_summary(path, fmt)  # refuse a non-model before copying gigabytes
        sources = [(p, p.name) for p in shards]
    if expected is not None and len(sources) != 1:
        raise StoreError("sha256 can only be given for a single-file model", code="invalid_sha256")
    roles = ["model"] * len(sources)
    if projector is not None:
        check_local_file(projector)
        sources, roles = [*sources, (projector, projector.name)], [*roles, "mmproj"]
    return sources, roles, directory_model


def stage_local(partial: Path, src: Path, on_bytes: Callable[[int], None]) -> tuple[Path, str, int]:
    """A hard link to `src` in partial/ (same filesystem), else a copy; hashed either way."""
    fd, name = tempfile.mkstemp(prefix=".import-", dir=partial)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        try:
            os.link(src, tmp)
            copy = False
        except OSError:
            copy = True
        h = hashlib.sha256()
        size = 0
        with src.open("rb") as f, (tmp.open("wb") if copy else contextlib.nullcontext()) as out:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
                on_bytes(len(chunk))
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"disk full while importing {src}", 507, "disk_full") from exc
        raise StoreError(f"cannot import {src}: {exc.strerror}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size
