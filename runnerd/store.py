"""The model store: content-addressed blobs, one manifest per model reference, pulls and tags.

API other modules use (names and signatures are kept stable; the Ollama routes call them too):

- ``ModelStore.get(name) -> ModelEntry`` / ``list()`` — from memory, no file is read.
- ``ModelStore.add(name, path, config=None) -> ModelEntry`` — register a local GGUF IN PLACE (the
  file stays where it is, nothing is copied): what ``serve --model NAME=PATH`` and
  ``runnerd models add`` use, fast even for a 70 GB file. Removing such a model never touches the file.
- ``async ModelStore.pull(source, name, sha256, progress, *, mmproj=None) -> ModelEntry`` — bring a model INTO the
  store from an absolute local path (hard-linked when on the same filesystem, else copied; the
  caller must allow local paths only over the unix socket), an ``http(s)://`` URL or
  ``hf://org/repo/file.gguf[@revision]`` / ``hf://org/repo[@revision]`` (a safetensors directory).
  ``mmproj`` optionally names a multimodal projector GGUF stored with it (``ModelEntry.mmproj``).
  ``progress`` gets ``PullProgress`` reports (always on the event loop). Raises ``StoreError``
  (``.status`` is the HTTP status, ``.code`` a short kind). Cancelling the call cancels the download
  (unless another pull shares it) and registers nothing.
- ``ModelStore.tag(source_name, target_name) -> ModelEntry`` — another name for the same blobs.
- ``ModelStore.remove(name, force=False) -> ModelEntry`` — 409 (``ModelInUse``) when the injected
  ``in_use(name)`` says a runner holds it, unless ``force``; the last reference to a blob deletes it.
- ``ModelStore.disk_usage() -> int`` — bytes of blobs, part files and in-place models.

Layout under ``<data_dir>/store/``: ``blobs/sha256-<hex>`` (immutable content), ``manifests/<name>.json``
(the ModelEntry, name percent-encoded), ``links/<digest>/`` (for split GGUFs and model directories:
hard links to blobs under their original file names, which llama-server / vLLM need), ``partial/``
(resumable downloads). A commit writes blobs first and the manifest last, each by temp file + fsync +
rename, so a crash never leaves a manifest that points at a missing blob.

Hard-linked imports share the inode with the user's file: editing that file in place would change the
blob. Blobs we write ourselves are made read-only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, Field, ValidationError

from backends.base import BackendConfiguration, ModelFormat, ModelRef
from backends.gguf import GGUFParseError, read_header, shard_paths
from backends.llamacpp.summary import summarize
from backends.vllm.memory import SafetensorsError, read_safetensors_header
from runnerd.atomic import write_atomically
from runnerd.config import HuggingFaceSettings, StoreSettings
from runnerd.pull import (
    Downloaded,
    FetchOptions,
    PullError,
    PullProgress,
    PullProgressCallback,
    RemoteFile,
    Source,
    Throttle,
    disk_full,
    download_session,
    fetch,
    list_hf_repo,
    parse_source,
    valid_sha256,
)

__all__ = ["DEFAULT_TAG", "ModelEntry", "ModelInUse", "ModelNotFound", "ModelStore", "PullProgress", "StoreError",
           "canonical_name"]

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT}){{0,3}}(?::(?P<tag>{_SEGMENT}))?$")
DEFAULT_TAG = "latest"
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"sha256-([0-9a-f]{64})")
_DIGEST = re.compile(rb"[0-9a-f]{64}")
# A local import's staged file older than this is left over from a crash: nothing resumes it. Younger
# ones may belong to another process importing into the same store (two daemons, a restart's overlap).
STALE_IMPORT_SECONDS = 24 * 3600
# Blobs and link directories changed this recently are never swept: another process sharing the
# store may be between committing a blob and writing the manifest that refers to it.
SWEEP_GRACE_SECONDS = 3600
log = logging.getLogger("runnerd.store")


class StoreError(Exception):
    """A store operation failed; ``status`` is the HTTP status that fits, ``code`` a short kind."""

    status = 400
    code = "invalid_model"

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class ModelNotFound(StoreError):
    status = 404
    code = "model_not_found"


class ModelInUse(StoreError):
    status = 409
    code = "model_in_use"


class _PullCancelled(Exception):
    """Raised in a pull's worker thread once its request was cancelled; nobody awaits it any more."""


def _stop_if(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise _PullCancelled


def canonical_name(name: str) -> str:
    """`gemma3` -> `gemma3:latest`; raises StoreError for a name that cannot be a model reference."""
    if not isinstance(name, str) or len(name) > 300 or not _NAME.match(name) or ".." in name:
        raise StoreError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', "
                         "optional '/' namespaces and an optional ':tag'", code="invalid_name")
    match = _NAME.match(name)
    assert match is not None
    return name if match.group("tag") else f"{name}:{DEFAULT_TAG}"


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


def _gguf_summary(path: Path) -> dict[str, Any]:
    """Size and summary fields of a GGUF (all shards); StoreError if it is not one we can serve."""
    try:
        header = read_header(path)
    except GGUFParseError as exc:
        raise StoreError(f"{path} is not a usable GGUF model: {exc}") from exc
    summary = summarize(header)
    return {"size": header.file_size, "architecture": summary.architecture,
            "parameter_count": summary.parameter_count, "quantization": summary.quantization,
            "context_length": summary.context_length}


def _directory_summary(path: Path) -> dict[str, Any]:
    """A Hugging Face-format directory: architecture, context and quantization from config.json, the
    parameter count from the safetensors headers."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not a Hugging Face-format model directory: config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise StoreError(f"{path}/config.json is not a JSON object")
    archs = config.get("architectures")
    ctx = config.get("max_position_embeddings")
    return {"architecture": archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else
            config.get("model_type") if isinstance(config.get("model_type"), str) else None,
            "context_length": ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
            "quantization": _hf_quantization(config), "parameter_count": _safetensors_parameters(path)}


def _hf_quantization(config: dict[str, Any]) -> str | None:
    """quantization_config.quant_method (gptq, awq, fp8, ...), else the dtype the weights are kept in
    (`torch_dtype`, or `dtype` as newer transformers write it)."""
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if isinstance(method, str) and method:
        return method
    dtype = config.get("torch_dtype", config.get("dtype"))
    return dtype if isinstance(dtype, str) and dtype else None


def _safetensors_parameters(path: Path) -> int | None:
    """Elements of every tensor in the directory's *.safetensors files (headers only). Packed
    quantized tensors (GPTQ/AWQ int32 words) count as stored, not unpacked. None without safetensors
    or with a header we cannot trust: the summary is informational, the engine judges the files."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    try:
        return sum(math.prod(t.shape) for f in files for t in read_safetensors_header(f).values())
    except SafetensorsError as exc:
        log.warning("no parameter count for %s: %s", path, exc)
        return None


def inspect_model_file(path: Path) -> tuple[int, str | None]:
    """Size and architecture of a GGUF file; StoreError if it is not one we can serve."""
    _check_local_file(path)
    info = _gguf_summary(path)
    return info["size"], info["architecture"]


def _check_local_file(path: Path) -> None:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_digest(files: list[BlobFile]) -> str:
    if len(files) == 1:
        return files[0].digest
    lines = "".join(f"{f.role}\0{f.name}\0{f.digest}\n" for f in sorted(files, key=lambda f: (f.role, f.name)))
    return hashlib.sha256(lines.encode()).hexdigest()


def _store_error(exc: PullError) -> StoreError:
    return StoreError(str(exc), status=exc.status, code=exc.code)


@dataclass
class _SharedFetch:
    """One download that several pulls of the same URL wait on."""

    task: asyncio.Task[Downloaded]
    listeners: list[Callable[[int, int | None], None]] = field(default_factory=list)
    waiters: int = 0


class ModelStore:
    def __init__(self, data_dir: Path, settings: StoreSettings | None = None,
                 huggingface: HuggingFaceSettings | None = None,
                 in_use: Callable[[str], bool] | None = None) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "store"
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.links = self.root / "links"
        self.partial = self.root / "partial"
        self.index_path = data_dir / "models.json"  # the pre-store registry, migrated on start
        self.settings = settings or StoreSettings()
        self.huggingface = huggingface or HuggingFaceSettings()
        self.in_use = in_use
        self._lock = threading.RLock()  # manifests and blob reference counts change under it
        self._fetches: dict[str, _SharedFetch] = {}
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._models: dict[str, ModelEntry] = self._load()

    # --- manifests -----------------------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        # Names are validated (no '..', no leading dot); quoting makes '/' and ':' one file name.
        return self.manifests / f"{quote(name, safe='')}.json"

    def _load(self) -> dict[str, ModelEntry]:
        models: dict[str, ModelEntry] = {}
        if self.manifests.is_dir():
            for path in sorted(self.manifests.glob("*.json")):
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
        self._remove_stale_imports()
        legacy = self._load_legacy()
        if legacy:
            for entry in legacy.values():
                if entry.name not in models:
                    self._write_manifest(entry)
                    models[entry.name] = entry
            os.replace(self.index_path, self.index_path.with_name("models.json.migrated"))
        self._sweep(models)
        return models

    def _remove_stale_imports(self) -> None:
        """Staged files of local imports cut short (a crash): never resumed, so only disk space."""
        if not self.partial.is_dir():
            return
        cutoff = time.time() - STALE_IMPORT_SECONDS
        for stale in self.partial.glob(".import-*"):
            with contextlib.suppress(OSError):
                if stale.lstat().st_mtime < cutoff:
                    stale.unlink()

    def _sweep(self, models: dict[str, ModelEntry]) -> None:
        """Delete blobs and link directories no manifest refers to: what a commit that failed half-way
        (or a crash between blob and manifest) left behind. It runs while the store is constructed,
        before the daemon serves, so no pull of this process is between blob and manifest; the grace
        period covers another process sharing the store. Only `sha256-<hex>` files and `<hex>`
        directories are candidates, and nothing an in-place model or a set-aside manifest names."""
        kept = self._digests_in_corrupt_manifests()
        blobs = kept | {f.digest for m in models.values() if m.stored for f in m.files}
        links = kept | {m.digest for m in models.values() if m.stored and m.digest is not None}
        in_place = [p.resolve() for m in models.values() if not m.stored for p in (m.path, m.mmproj) if p is not None]
        cutoff = time.time() - SWEEP_GRACE_SECONDS
        for path in self._entries(self.blobs):
            match = _BLOB_NAME.fullmatch(path.name)
            if match and match[1] not in blobs and path.is_file() and not path.is_symlink():
                self._sweep_one(path, cutoff, in_place, path.unlink)
        for path in self._entries(self.links):
            if _HEX64.fullmatch(path.name) and path.name not in links and not path.is_symlink():
                self._sweep_one(path, cutoff, in_place, functools.partial(shutil.rmtree, path))

    @staticmethod
    def _entries(directory: Path) -> builtins.list[Path]:
        return sorted(directory.iterdir()) if directory.is_dir() else []

    @staticmethod
    def _sweep_one(path: Path, cutoff: float, in_place: builtins.list[Path], delete: Callable[[], object]) -> None:
        try:
            # ctime, not mtime: a hard-linked import keeps the user's mtime, but linking and renaming
            # the blob into place update its ctime.
            if path.lstat().st_ctime >= cutoff:
                return
            resolved = path.resolve()
            if any(p.is_relative_to(resolved) for p in in_place):  # someone registered it in place
                return
            delete()
            log.info("removed %s: no model refers to it", path)
        except OSError as exc:
            log.warning("could not remove unreferenced %s: %s", path, exc)

    def _digests_in_corrupt_manifests(self) -> set[str]:
        """Digests a set-aside (.corrupt) manifest mentions: its blobs are kept, so that the model can
        still be recovered by repairing the manifest by hand."""
        found: set[str] = set()
        for path in self.manifests.glob("*.corrupt") if self.manifests.is_dir() else ():
            with contextlib.suppress(OSError):
                found.update(m.decode() for m in _DIGEST.findall(path.read_bytes()))
        return found

    def _load_legacy(self) -> dict[str, ModelEntry]:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return _Registry.model_validate_json(raw).models
        except ValidationError as exc:
            raise StoreError(f"model registry {self.index_path} is corrupt: {exc.errors()[0]['msg']}") from exc

    def _write_manifest(self, entry: ModelEntry) -> None:
        """Atomically: a crash leaves the old or the new manifest."""
        try:
            write_atomically(self._manifest_path(entry.name), entry.model_dump_json(indent=2).encode())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"disk full while writing the manifest of {entry.name}", 507, "disk_full") from exc
            raise

    def _put(self, entry: ModelEntry) -> None:
        """Register (or replace) an entry; blobs the replaced entry alone used are deleted."""
        with self._lock:
            old = self._models.get(entry.name)
            self._write_manifest(entry)
            # Copy on write: readers on the event loop iterate the old dict while a worker thread commits.
            self._models = {**self._models, entry.name: entry}
            if old is not None:
                self._collect(old)

    # --- reading -------------------------------------------------------------------------------

    def list(self) -> builtins.list[ModelEntry]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def get(self, name: str) -> ModelEntry:
        try:
            key = canonical_name(name)
        except StoreError as exc:
            raise ModelNotFound(f"model {name!r} not found") from exc
        entry = self._models.get(key)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found")
        return entry

    def disk_usage(self) -> int:
        total = 0
        for directory in (self.blobs, self.partial):
            if directory.is_dir():
                with os.scandir(directory) as it:
                    for e in it:
                        with contextlib.suppress(FileNotFoundError):  # removed or committed meanwhile
                            total += e.stat().st_size if e.is_file(follow_symlinks=False) else 0
        in_place = {str(m.path): m.size for m in self._models.values() if not m.stored}
        return total + sum(in_place.values())

    # --- registering in place ------------------------------------------------------------------

    def add(self, name: str, path: Path, config: BackendConfiguration | None = None) -> ModelEntry:
        """Register a local GGUF where it is (see the module docstring for why it is not copied)."""
        key = canonical_name(name)
        _check_local_file(path)
        info = _gguf_summary(path)
        entry = ModelEntry(name=key, path=path, config=config or BackendConfiguration(), source=str(path), **info)
        self._put(entry)
        return entry

    # --- tag and remove ------------------------------------------------------------------------

    def tag(self, source_name: str, target_name: str) -> ModelEntry:
        with self._lock:
            source = self.get(source_name)
            target = canonical_name(target_name)
            if target == source.name:
                return source
            entry = source.model_copy(update={"name": target, "added_at": time.time()})
            self._put(entry)
            return entry

    def remove(self, name: str, force: bool = False) -> ModelEntry:
        with self._lock:
            entry = self.get(name)
            if not force and self.in_use is not None and self.in_use(entry.name):
                raise ModelInUse(f"model {entry.name} is in use by a runner; unload it first or remove with force")
            self._manifest_path(entry.name).unlink(missing_ok=True)
            self._models = {k: v for k, v in self._models.items() if k != entry.name}
            self._collect(entry)
            return entry

    def _collect(self, gone: ModelEntry) -> None:
        """Delete the blobs and link directory of `gone` that no remaining manifest refers to."""
        if not gone.stored:
            return
        used = {f.digest for m in self._models.values() if m.stored for f in m.files}
        digests = {m.digest for m in self._models.values() if m.stored}
        for f in gone.files:
            if f.digest not in used:
                self._blob(f.digest).unlink(missing_ok=True)
        if gone.digest is not None and gone.digest not in digests:
            shutil.rmtree(self.links / gone.digest, ignore_errors=True)

    # --- committing ----------------------------------------------------------------------------

    def _blob(self, digest: str) -> Path:
        return self.blobs / f"sha256-{digest}"

    def _commit_blob(self, src: Path, digest: str, *, read_only: bool = True) -> Path:
        """Move a verified file into the blob store (or drop it when the blob is already there)."""
        blob = self._blob(digest)
        self.blobs.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            src.unlink(missing_ok=True)
            return blob
        if read_only:
            os.chmod(src, 0o444)
        os.replace(src, blob)
        _fsync_dir(self.blobs)
        return blob

    def _materialise(self, digest: str, files: builtins.list[BlobFile]) -> Path:
        """`links/<digest>/` with each file under its original name, hard-linked to its blob."""
        directory = self.links / digest
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=self.links))
        try:
            for f in files:
                target = (tmp / f.name).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise StoreError(f"unsafe file name {f.name!r} in the model", 400, "unsafe_path")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self._blob(f.digest), target)
                except OSError:
                    os.symlink(self._blob(f.digest), target)
            if directory.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def _register(self, name: str, files: builtins.list[BlobFile], source: str, directory_model: bool) -> ModelEntry:
        """Blobs are committed: build the model's path, read its metadata, write the manifest last."""
        with self._lock:
            digest = _files_digest(files)
            projector = next((f for f in files if f.role == "mmproj"), None)
            model_files = [f for f in files if f.role == "model"]
            files, all_files = model_files, files
            try:
                self.links.mkdir(parents=True, exist_ok=True)
                mmproj = self._check_projector(projector) if projector is not None else None
                if directory_model:
                    path = self._materialise(digest, files)
                    info = _directory_summary(path)
                    fmt = ModelFormat.SAFETENSORS
                    info["size"] = sum(f.size for f in files)
                elif len(files) == 1:
                    path = self._blob(files[0].digest)
                    info = _gguf_summary(path)
                    fmt = ModelFormat.GGUF
                else:
                    path = self._materialise(digest, files) / files[0].name
                    info = _gguf_summary(path)
                    fmt = ModelFormat.GGUF
                entry = ModelEntry(name=name, path=path, format=fmt, stored=True, digest=digest, files=all_files,
                                   source=source, mmproj=mmproj, **info)
                self._put(entry)
            except BaseException:
                self._collect_attempt(all_files)
                raise
            return entry

    def _collect_attempt(self, files: builtins.list[BlobFile]) -> None:
        """A commit failed (any exception: a refused model, an I/O error writing the manifest or the
        links): delete its blobs and link directory unless a registered model refers to them, so that
        no blob is left that nothing references. Safe if the manifest did get written: _collect keeps
        whatever a registered manifest names."""
        if files:
            self._collect(ModelEntry(name="", path=Path("/"), size=0, stored=True, digest=_files_digest(files),
                                     files=files))

    def _check_projector(self, projector: BlobFile) -> Path:
        path = self._blob(projector.digest)
        try:
            read_header(path)
        except GGUFParseError as exc:
            raise StoreError(f"the multimodal projector {projector.name} is not a usable GGUF: {exc}") from exc
        return path

    # --- pulling -------------------------------------------------------------------------------

    async def pull(self, source: str, name: str | None, sha256: str | None,
                   progress: PullProgressCallback, *, mmproj: str | None = None) -> ModelEntry:
        """Bring a model into the store and register it; see the module docstring. `mmproj` names a
        multimodal projector GGUF stored with it (same kind of source: both local or both remote)."""
        try:
            parsed = parse_source(source, self.huggingface.base_url)
            expected = valid_sha256(sha256) if sha256 else None
            projector = parse_source(mmproj, self.huggingface.base_url) if mmproj is not None else None
        except PullError as exc:
            raise _store_error(exc) from exc
        if projector is not None and (
                (projector.kind == "path") != (parsed.kind == "path") or parsed.hf_repo is not None
                or projector.hf_repo is not None or len(projector.files) > 1):
            raise StoreError("mmproj must be one GGUF file from the same kind of source as the model (both local "
                             "paths or both URLs / hf:// files)", code="invalid_source")
        key = canonical_name(name or parsed.default_name)
        loop = asyncio.get_running_loop()

        def on_loop(p: PullProgress) -> None:  # progress is always called on the event loop
            loop.call_soon_threadsafe(progress, p)

        try:
            if parsed.kind == "path":
                assert parsed.path is not None
                return await self._in_thread(self._import_local, key, parsed.path, expected, on_loop,
                                             projector.path if projector is not None else None)
            extra = projector.files[0] if projector is not None else None
            return await self._pull_remote(key, source, parsed, expected, progress, extra)
        except PullError as exc:
            raise _store_error(exc) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _store_error(disk_full(exc)) from exc
            raise StoreError(f"the model store could not write {exc.filename or 'a file'}: {exc.strerror or exc}",
                             500, "store_io") from exc

    def _token(self) -> str | None:
        path = self.huggingface.token_file
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise StoreError(f"cannot read the Hugging Face token file {path}: {exc.strerror}", 500,
                             "token_unreadable") from exc

    def _options(self) -> FetchOptions:
        return FetchOptions(read_timeout=self.settings.read_timeout, retries=self.settings.retries,
                            token=self._token(), token_host=urlsplit(self.huggingface.base_url).hostname)

    async def _pull_remote(self, key: str, source: str, parsed: Source, expected: str | None,
                           progress: PullProgressCallback, projector: RemoteFile | None = None) -> ModelEntry:
        opts = self._options()
        files = parsed.files
        if parsed.hf_repo is not None:
            headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
            async with download_session(opts) as session:
                files = await list_hf_repo(session, parsed, self.huggingface.base_url, headers)
        if expected is not None:
            if len(files) != 1:
                raise PullError("sha256 can only be given for a single-file model", 400, "invalid_sha256")
            files = (RemoteFile(url=files[0].url, name=files[0].name, sha256=expected, size=files[0].size),)
        roles = ["model"] * len(files)
        if projector is not None:
            files, roles = (*files, projector), [*roles, "mmproj"]
        done: dict[str, tuple[int, int | None]] = {}
        throttle = Throttle()

        def report(file_name: str, final: bool = False) -> None:
            if not throttle.ready(final):
                return
            totals = [t for _, t in done.values()]
            total = sum(t for t in totals if t is not None) if totals and None not in totals else None
            progress(PullProgress(phase="download", total=total, completed=sum(c for c, _ in done.values()),
                                  file=file_name))

        tasks = [asyncio.create_task(self._join_fetch(f, opts, done, report)) for f in files]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One file failed (or the pull was cancelled): stop the others; their part files stay.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        progress(PullProgress(phase="commit", total=sum(d.size for d in results),
                              completed=sum(d.size for d in results)))
        entry = await self._in_thread(self._commit_downloads, key, source,
                                      list(zip(files, results, roles, strict=True)), parsed.hf_repo is not None)
        progress(PullProgress(phase="success", total=entry.size, completed=entry.size))
        return entry

    async def _in_thread(self, work: Callable[..., ModelEntry], *args: Any) -> ModelEntry:
        """Run `work` in a thread that stops before registering anything once the pull is cancelled
        (a cancelled await does not stop a thread; it sees the flag between chunks and before committing)."""
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(work, *args, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _commit_downloads(self, key: str, source: str, results: builtins.list[tuple[RemoteFile, Downloaded, str]],
                          directory_model: bool, cancelled: threading.Event) -> ModelEntry:
        blob_files: builtins.list[BlobFile] = []
        with self._lock:
            _stop_if(cancelled)
            try:
                for remote, got, role in results:
                    if remote.sha256 is not None and got.sha256 != remote.sha256:
                        raise StoreError(f"sha256 mismatch for {remote.name}: expected {remote.sha256}, got "
                                         f"{got.sha256}", 502, "digest_mismatch")
                    # Listed before it is committed: a failure half-way through the commit collects it too.
                    blob_files.append(BlobFile(name=remote.name, digest=got.sha256, size=got.size,
                                               role="mmproj" if role == "mmproj" else "model"))
                    if got.part.exists() or not self._blob(got.sha256).exists():
                        self._commit_blob(got.part, got.sha256)
                    got.meta.unlink(missing_ok=True)
                return self._register(key, blob_files, source, directory_model)
            except BaseException:
                self._collect_attempt(blob_files)
                raise

    async def _join_fetch(self, file: RemoteFile, opts: FetchOptions, done: dict[str, tuple[int, int | None]],
                          report: Callable[[str, bool], None]) -> Downloaded:
        """Download `file`, or wait for the download of the same URL another pull started."""
        def on_bytes(completed: int, total: int | None) -> None:
            done[file.url] = (completed, total)
            report(file.name, False)

        shared = self._fetches.get(file.url)
        if shared is None or shared.task.done():
            shared = _SharedFetch(task=asyncio.create_task(self._fetch(file, opts, file.url)))
            self._fetches[file.url] = shared
        shared.listeners.append(on_bytes)
        shared.waiters += 1
        try:
            result = await asyncio.shield(shared.task)
        finally:
            shared.waiters -= 1
            shared.listeners.remove(on_bytes)
            # The last pull waiting for it went away (cancelled): stop the download, keep its part file.
            if shared.waiters == 0 and not shared.task.done():
                shared.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await shared.task
        report(file.name, True)
        return result

    async def _fetch(self, file: RemoteFile, opts: FetchOptions, key: str) -> Downloaded:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.settings.max_concurrent_downloads), loop

        def fan_out(completed: int, total: int | None) -> None:
            shared = self._fetches.get(key)
            for listener in list(shared.listeners if shared else []):
                listener(completed, total)

        try:
            async with self._slots, download_session(opts) as session:
                return await fetch(session, file, self.partial, opts, fan_out)
        finally:
            shared = self._fetches.get(key)
            if shared is not None and shared.task is asyncio.current_task():
                del self._fetches[key]

    def _import_local(self, key: str, path: Path, expected: str | None, progress: PullProgressCallback,
                      projector: Path | None, cancelled: threading.Event) -> ModelEntry:
        """Hash each file of a local model and hard-link (or copy) it into the blob store."""
        if path.is_dir():
            names = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                           if p.is_file() and not p.is_symlink() and not p.name.startswith("."))
            sources = [(path / n, n) for n in names]
            directory_model = True
            if not (path / "config.json").is_file():
                raise StoreError(f"{path} is not a Hugging Face-format model directory (no config.json)")
        else:
            _check_local_file(path)
            try:
                shards = shard_paths(path)
            except GGUFParseError as exc:
                raise StoreError(str(exc)) from exc
            for shard in shards:
                _check_local_file(shard)
            _gguf_summary(path)  # refuse a non-model before copying gigabytes
            sources = [(p, p.name) for p in shards]
            directory_model = False
        if expected is not None and len(sources) != 1:
            raise StoreError("sha256 can only be given for a single-file model", code="invalid_sha256")
        roles = ["model"] * len(sources)
        if projector is not None:
            _check_local_file(projector)
            sources, roles = [*sources, (projector, projector.name)], [*roles, "mmproj"]
        total = sum(p.stat().st_size for p, _ in sources)
        completed = 0
        throttle = Throttle()

        def on_bytes(n: int) -> None:
            nonlocal completed
            _stop_if(cancelled)
            completed += n
            if throttle.ready():
                progress(PullProgress(phase="import", total=total, completed=completed))

        files: builtins.list[BlobFile] = []
        staged: builtins.list[Path] = []
        self.partial.mkdir(parents=True, exist_ok=True)
        try:
            for (src, name), role in zip(sources, roles, strict=True):
                tmp, digest, size = self._stage_local(src, on_bytes)
                staged.append(tmp)
                if expected is not None and role == "model" and digest != expected:
                    raise StoreError(f"sha256 mismatch for {name}: expected {expected}, got {digest}", 400,
                                     "digest_mismatch")
                files.append(BlobFile(name=name, digest=digest, size=size,
                                      role="mmproj" if role == "mmproj" else "model"))
            progress(PullProgress(phase="commit", total=total, completed=total))
            with self._lock:  # blobs and manifest together: a concurrent removal cannot collect them between
                _stop_if(cancelled)
                try:
                    for tmp, f in zip(staged, files, strict=True):
                        self._commit_blob(tmp, f.digest, read_only=False)
                    entry = self._register(key, files, str(path), directory_model)
                except BaseException:
                    self._collect_attempt(files)  # the blobs committed before the failure
                    raise
        finally:
            for tmp in staged:
                tmp.unlink(missing_ok=True)
        progress(PullProgress(phase="success", total=entry.size, completed=entry.size))
        return entry

    def _stage_local(self, src: Path, on_bytes: Callable[[int], None]) -> tuple[Path, str, int]:
        """A hard link to `src` in partial/ (same filesystem), else a copy; hashed either way."""
        fd, name = tempfile.mkstemp(prefix=".import-", dir=self.partial)
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


def manifest_name(path: Path) -> str:
    """The model name a manifest file holds (for tools reading the store directly)."""
    return unquote(path.name.removesuffix(".json"))
