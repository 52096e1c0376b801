"""The model registry: which names map to which model files, and each model's default configuration.

This first version registers local files; the model-store issue adds pulling and content-addressed
blobs behind the same methods (get / list / add / remove).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from backends.gguf import GGUFParseError, read_header
from pydantic import BaseModel, Field, ValidationError

from backends.base import BackendConfiguration, ModelFormat, ModelRef

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT}){{0,3}}(?::(?P<tag>{_SEGMENT}))?$")
DEFAULT_TAG = "latest"


class StoreError(Exception):
    """A registry operation failed; ``status`` is the HTTP status that fits."""

    status = 400


class ModelNotFound(StoreError):
    status = 404


def canonical_name(name: str) -> str:
    """`gemma3` -> `gemma3:latest`; raises StoreError for a name that cannot be a model reference."""
    if not isinstance(name, str) or len(name) > 300 or not _NAME.match(name) or ".." in name:
        raise StoreError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', "
                         "optional '/' namespaces and an optional ':tag'")
    match = _NAME.match(name)
    assert match is not None
    return name if match.group("tag") else f"{name}:{DEFAULT_TAG}"


class ModelEntry(BaseModel):
    name: str
    path: Path
    format: ModelFormat = ModelFormat.GGUF
    size: int
    architecture: str | None = None
    added_at: float = Field(default_factory=time.time)
    config: BackendConfiguration = Field(default_factory=BackendConfiguration)

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, path=self.path, format=self.format)


class _Registry(BaseModel):
    models: dict[str, ModelEntry] = Field(default_factory=dict)


def inspect_model_file(path: Path) -> tuple[int, str | None]:
    """Size and architecture of a GGUF file; StoreError if it is not one we can serve."""
    if not path.is_absolute():
        raise StoreError(f"model path {str(path)!r} must be absolute")
    try:
        stat = path.stat()
    except OSError as exc:
        raise StoreError(f"cannot read model file {path}: {exc.strerror}") from exc
    if not path.is_file():
        raise StoreError(f"model path {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise StoreError(f"model file {path} is not readable by the daemon")
    try:
        header = read_header(path)
    except GGUFParseError as exc:
        raise StoreError(f"{path} is not a usable GGUF model: {exc}") from exc
    return stat.st_size, header.architecture


class ModelStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.index_path = data_dir / "models.json"
        self._registry = self._load()

    def _load(self) -> _Registry:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return _Registry()
        try:
            return _Registry.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(f"model registry {self.index_path} is corrupt: {exc.errors()[0]['msg']}") from exc

    def _save(self, registry: _Registry) -> None:
        """Write to a temporary file, fsync, rename: a crash leaves the old or the new index."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=self.data_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(registry.model_dump(mode="json"), indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._registry = registry

    def list(self) -> list[ModelEntry]:
        return sorted(self._registry.models.values(), key=lambda m: m.name)

    def get(self, name: str) -> ModelEntry:
        try:
            key = canonical_name(name)
        except StoreError as exc:
            raise ModelNotFound(f"model {name!r} not found") from exc
        entry = self._registry.models.get(key)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found")
        return entry

    def add(self, name: str, path: Path, config: BackendConfiguration | None = None) -> ModelEntry:
        key = canonical_name(name)
        size, architecture = inspect_model_file(path)
        entry = ModelEntry(name=key, path=path, size=size, architecture=architecture,
                           config=config or BackendConfiguration())
        models = dict(self._registry.models)
        models[key] = entry
        self._save(_Registry(models=models))
        return entry

    def remove(self, name: str) -> ModelEntry:
        entry = self.get(name)
        models = {k: v for k, v in self._registry.models.items() if k != entry.name}
        self._save(_Registry(models=models))
        return entry

    def disk_usage(self) -> int:
        return sum(m.size for m in self._registry.models.values())
