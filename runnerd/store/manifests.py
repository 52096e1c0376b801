"""ModelEntry (what the store knows of one model) and its manifest files.

`manifests/<name>.json` holds one ModelEntry, the name percent-encoded into one file name. A manifest
is written atomically (temp file + fsync + rename), last in a commit: a crash never leaves a manifest
that points at a missing blob. `models.json` is the registry of before the store, read once to migrate.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

from pydantic import BaseModel, Field, ValidationError

from backends.atomic import write_atomically
from backends.base import BackendConfiguration, ModelFormat, ModelRef
from backends.formats import describe
from backends.formats.gguf import GGUFParseError
from backends.formats.safetensors import ModelConfigError
from runnerd.store.errors import StoreError
from runnerd.store.names import canonical_name

log = logging.getLogger("runnerd.store")


class BlobFile(BaseModel):
    name: str  # the original file name (or path inside a model directory)
    digest: str  # sha256 hex of the content
    size: int
    role: Literal["model", "mmproj"] = "model"


class ModelEntry(BaseModel):
    name: str
    path: Path  # what the engine loads: a GGUF file (blob, shard link or in-place file) or a directory
    format: ModelFormat = ModelFormat.GGUF
    size: int
    architecture: str | None = None
    added_at: float = Field(default_factory=time.time)
    config: BackendConfiguration = Field(default_factory=BackendConfiguration)
    # Store fields (absent in registries written before the store: those are in-place models).
    stored: bool = False  # True: the files are blobs in the store; False: registered in place
    digest: str | None = None  # sha256 of the single file, or of the file list for several files
    files: list[BlobFile] = Field(default_factory=list)
    source: str | None = None
    mmproj: Path | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    context_length: int | None = None

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, path=self.path, format=self.format, mmproj=self.mmproj)


class _Registry(BaseModel):
    """The pre-store registry file (models.json), read once to migrate it."""

    models: dict[str, ModelEntry] = Field(default_factory=dict)


def model_summary(path: Path, fmt: ModelFormat, label: str | None = None) -> dict[str, Any]:
    """The manifest's summary fields of a model (a GGUF: all its shards; a directory: config.json and the
    safetensors headers); StoreError if it is not one we can serve, naming it `label` (default: its
    path; a store blob's path is the daemon's business, not the caller's)."""
    name = label or str(path)
    try:
        summary = describe(path, fmt)
    except ModelConfigError as exc:
        raise StoreError(f"{name} is not a Hugging Face-format model directory: {exc}") from exc
    except GGUFParseError as exc:
        raise StoreError(f"{name} is not a usable GGUF model: {exc.what}") from exc
    except OSError as exc:
        what = "a usable GGUF model" if fmt is ModelFormat.GGUF else "a readable model directory"
        raise StoreError(f"{name} is not {what}: {exc.strerror or 'cannot be read'}") from exc
    return {"size": summary.size_bytes, "architecture": summary.architecture,
            "parameter_count": summary.parameter_count, "quantization": summary.quantization,
            "context_length": summary.context_length}


# write_atomically's temporary files: "." + the manifest's name + "-" + tempfile's 8 random characters.
_TEMPORARY = re.compile(r"^\..+\.json-[a-z0-9_]{8}$")


def remove_temporary_files(manifests: Path) -> None:
    """Temporary manifests a crash left mid-write (never read: only renamed into place when complete)."""
    if not manifests.is_dir():
        return
    for path in manifests.iterdir():
        if _TEMPORARY.match(path.name):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
                    log.info("removed %s: a manifest write cut short", path.name)


def files_digest(files: list[BlobFile]) -> str:
    if len(files) == 1:
        return files[0].digest
    lines = "".join(f"{f.role}\0{f.name}\0{f.digest}\n" for f in sorted(files, key=lambda f: (f.role, f.name)))
    return hashlib.sha256(lines.encode()).hexdigest()


def manifest_path(manifests: Path, name: str) -> Path:
    # Names are validated (no '..', no leading dot); quoting makes '/' and ':' one file name.
    return manifests / f"{quote(name, safe='')}.json"


def manifest_name(path: Path) -> str:
    """The model name a manifest file holds (for tools reading the store directly)."""
    return unquote(path.name.removesuffix(".json"))


def read_manifests(manifests: Path) -> dict[str, ModelEntry]:
    """Every usable manifest; an unusable one is renamed to `.corrupt` (and its blobs kept)."""
    models: dict[str, ModelEntry] = {}
    if manifests.is_dir():
        for path in sorted(manifests.glob("*.json")):
            try:
                entry = ModelEntry.model_validate_json(path.read_bytes())
                if quote(entry.name, safe="") + ".json" != path.name:
                    raise ValueError(f"it names another model ({entry.name!r})")
                canonical_name(entry.name)
            except (OSError, ValueError, StoreError) as exc:
                # One bad manifest must not keep the daemon (and every other model) down.
                log.warning("model manifest %s is unusable, set aside as .corrupt: %s", path,
                            str(exc).splitlines()[0])
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                continue
            models[entry.name] = entry
    return models


def read_legacy(index_path: Path) -> dict[str, ModelEntry]:
    try:
        raw = index_path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        return _Registry.model_validate_json(raw).models
    except ValidationError as exc:
        raise StoreError(f"model registry {index_path} is corrupt: {exc.errors()[0]['msg']}") from exc


def write_manifest(manifests: Path, entry: ModelEntry) -> None:
    """Atomically: a crash leaves the old or the new manifest."""
    try:
        write_atomically(manifest_path(manifests, entry.name), entry.model_dump_json(indent=2).encode())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"disk full while writing the manifest of {entry.name}", 507, "disk_full") from exc
        raise
