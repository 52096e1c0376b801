"""ModelStore: the model store's one entry point, over the parts in this package.

API other modules use (names and signatures are kept stable; the Ollama routes call them too):

- ``ModelStore.get(name) -> ModelEntry`` / ``list()`` — from memory, no file is read.
- ``ModelStore.add(name, path, config=None) -> ModelEntry`` — register a local GGUF file or Hugging
  Face-format (safetensors) directory IN PLACE (it stays where it is, nothing is copied): what
  ``serve --model NAME=PATH`` and ``runnerd models add`` use, fast even for a 70 GB file. A directory
  needs a config.json that is a JSON object and ``*.safetensors`` weights whose headers can be trusted
  (importer.check_local_directory). Removing such a model never touches the file or the directory.
- ``async ModelStore.pull(source, name, sha256, progress, *, mmproj=None) -> ModelEntry`` — bring a model INTO the
  store from an absolute local path (hard-linked when on the same filesystem, else copied; the
  caller must allow local paths only over the unix socket), an ``http(s)://`` URL or
  ``hf://org/repo/file.gguf[@revision]`` / ``hf://org/repo[@revision]`` (a safetensors directory).
  ``mmproj`` optionally names a multimodal projector GGUF stored with it (``ModelEntry.mmproj``).
  ``progress`` gets ``PullProgress`` reports (always on the event loop). Raises ``StoreError``
  (``.status`` is the HTTP status, ``.code`` a short kind). Cancelling the call cancels the download
  (unless another pull shares it) and registers nothing. ``public_only=True`` (a caller over TCP)
  limits where it may connect (runnerd.store.targets). A local import runs on the store's own two
  threads (``LOCAL_THREADS``), never the loop's default pool; ``add_local`` runs ``add`` there too,
  and ``close()`` waits for them.
- ``ModelStore.tag(source_name, target_name, force=False) -> ModelEntry`` — another name for the same blobs;
  ``ModelExists`` (409) when the target name is taken, unless ``force`` replaces it.
- ``ModelStore.remove(name, force=False) -> ModelEntry`` — 409 (``ModelInUse``) when the injected
  ``in_use(name)`` says a runner holds it, unless ``force``; the last reference to a blob deletes it.
- ``ModelStore.disk_usage() -> int`` — bytes of blobs, part files and in-place models.

Layout under ``<data_dir>/store/``: ``blobs/sha256-<hex>`` (immutable content), ``manifests/<name>.json``
(the ModelEntry, name percent-encoded), ``links/<digest>/`` (for split GGUFs and model directories:
hard links to blobs under their original file names, which the engines need), ``partial/``
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
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from backends.base import BackendConfiguration, ModelFormat
from backends.formats.gguf import GGUFParseError, read_header
from runnerd.config import HuggingFaceSettings, StoreSettings
from runnerd.store import blobs, importer, manifests
from runnerd.store.errors import ModelExists, ModelInUse, ModelNotFound, StoreError, stop_if
from runnerd.store.manifests import BlobFile, ModelEntry, files_digest, model_summary
from runnerd.store.names import canonical_name
from runnerd.store.pull import (
    Downloaded,
    Downloads,
    PullError,
    PullProgress,
    PullProgressCallback,
    RemoteFile,
    Source,
    Throttle,
    disk_full,
    parse_source,
    remove_stale_parts,
    valid_sha256,
)

log = logging.getLogger("runnerd.store")
# Threads for local imports and in-place registrations (the rest wait for one, cancellable).
LOCAL_THREADS = 2


def _store_error(exc: PullError) -> StoreError:
    return StoreError(str(exc), status=exc.status, code=exc.code)


class ModelStore:
    def __init__(self, data_dir: Path, settings: StoreSettings | None = None,
                 huggingface: HuggingFaceSettings | None = None,
                 in_use: Callable[[str], bool] | None = None,
                 on_removed: Callable[[str], object] | None = None) -> None:
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
        self.on_removed = on_removed  # called with a removed model's name, in the thread that removed it
        self._lock = threading.RLock()  # manifests and blob reference counts change under it
        self._downloads = Downloads(self.partial, self.settings, self.huggingface)
        # Local imports and in-place registrations read files a caller names: their own bounded pool, so
        # that however many of them wait on a slow disk they never take the threads other routes use.
        self._local_pool = ThreadPoolExecutor(max_workers=LOCAL_THREADS, thread_name_prefix="runnerd-import")
        self._models: dict[str, ModelEntry] = self._load()

    # --- manifests -----------------------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        return manifests.manifest_path(self.manifests, name)

    def _load(self) -> dict[str, ModelEntry]:
        models = manifests.read_manifests(self.manifests)
        importer.remove_stale_imports(self.partial)
        remove_stale_parts(self.partial, set())
        manifests.remove_temporary_files(self.manifests)
        legacy = manifests.read_legacy(self.index_path)
        if legacy:
            for entry in legacy.values():
                if entry.name not in models:
                    self._write_manifest(entry)
                    models[entry.name] = entry
            os.replace(self.index_path, self.index_path.with_name("models.json.migrated"))
        blobs.sweep(self.blobs, self.links, self.manifests, models)
        return models

    def _write_manifest(self, entry: ModelEntry) -> None:
        manifests.write_manifest(self.manifests, entry)

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
        """Register a local GGUF file or model directory where it is (see the module docstring for why it
        is not copied)."""
        key = canonical_name(name)
        fmt = importer.check_local_model(path)
        info = model_summary(path, fmt)
        entry = ModelEntry(name=key, path=path, format=fmt, config=config or BackendConfiguration(),
                           source=str(path), **info)
        self._put(entry)
        return entry

    # --- tag and remove ------------------------------------------------------------------------

    def tag(self, source_name: str, target_name: str, force: bool = False) -> ModelEntry:
        """Another name for the model; ModelExists (409) when the name is taken, unless `force` replaces it."""
        with self._lock:
            source = self.get(source_name)
            target = canonical_name(target_name)
            if target == source.name:
                return source
            if not force and target in self._models:
                raise ModelExists(f"model {target} already exists; remove it first or tag with force to replace it")
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
        if self.on_removed is not None:
            self.on_removed(entry.name)
        return entry

    def _collect(self, gone: ModelEntry) -> None:
        """Delete the blobs and link directory of `gone` that no remaining manifest refers to."""
        blobs.collect(self.blobs, self.links, gone, self._models.values())

    # --- committing ----------------------------------------------------------------------------

    def _blob(self, digest: str) -> Path:
        return blobs.blob_path(self.blobs, digest)

    def _commit_blob(self, src: Path, digest: str, *, read_only: bool = True) -> Path:
        return blobs.commit_blob(self.blobs, src, digest, read_only=read_only)

    def _materialise(self, digest: str, files: builtins.list[BlobFile]) -> Path:
        return blobs.materialise(self.links, self.blobs, digest, files)

    def _register(self, name: str, files: builtins.list[BlobFile], source: str, directory_model: bool) -> ModelEntry:
        """Blobs are committed: build the model's path, read its metadata, write the manifest last."""
        with self._lock:
            digest = files_digest(files)
            projector = next((f for f in files if f.role == "mmproj"), None)
            model_files = [f for f in files if f.role == "model"]
            files, all_files = model_files, files
            try:
                self.links.mkdir(parents=True, exist_ok=True)
                mmproj = self._check_projector(projector) if projector is not None else None
                if directory_model:
                    path, fmt = self._materialise(digest, files), ModelFormat.SAFETENSORS
                elif len(files) == 1:
                    path, fmt = self._blob(files[0].digest), ModelFormat.GGUF
                else:
                    path, fmt = self._materialise(digest, files) / files[0].name, ModelFormat.GGUF
                info = model_summary(path, fmt, label=files[0].name if files else name)
                if fmt is ModelFormat.SAFETENSORS:
                    info["size"] = sum(f.size for f in files)  # every file of the directory, not only weights
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
            self._collect(ModelEntry(name="", path=Path("/"), size=0, stored=True, digest=files_digest(files),
                                     files=files))

    def _check_projector(self, projector: BlobFile) -> Path:
        path = self._blob(projector.digest)
        try:
            read_header(path)
        except GGUFParseError as exc:
            raise StoreError(f"the multimodal projector {projector.name} is not a usable GGUF: {exc.what}") from exc
        return path

    # --- pulling -------------------------------------------------------------------------------

    async def pull(self, source: str, name: str | None, sha256: str | None,
                   progress: PullProgressCallback, *, mmproj: str | None = None,
                   public_only: bool = False) -> ModelEntry:
        """Bring a model into the store and register it; see the module docstring. `mmproj` names a
        multimodal projector GGUF stored with it (same kind of source: both local or both remote).
        `public_only`: the caller is remote (TCP), so only public addresses, and the hosts
        `store.pull_allowed_hosts` names, may be fetched from (runnerd.store.targets)."""
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
                                             projector.path if projector is not None else None,
                                             pool=self._local_pool)
            extra = projector.files[0] if projector is not None else None
            return await self._pull_remote(key, source, parsed, expected, progress, extra, public_only)
        except PullError as exc:
            raise _store_error(exc) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _store_error(disk_full(exc)) from exc
            # The daemon's own paths stay in its log, not in the answer.
            log.error("pull of %s: %s", source[:200], exc)
            raise StoreError(f"the model store could not write a file: {exc.strerror or 'I/O error'}", 500,
                             "store_io") from exc

    async def _pull_remote(self, key: str, source: str, parsed: Source, expected: str | None,
                           progress: PullProgressCallback, projector: RemoteFile | None = None,
                           public_only: bool = False) -> ModelEntry:
        results = await self._downloads.fetch_model(parsed, expected, progress, projector, public_only=public_only)
        progress(PullProgress(phase="commit", total=sum(d.size for _, d, _ in results),
                              completed=sum(d.size for _, d, _ in results)))
        entry = await self._in_thread(self._commit_downloads, key, source, results, parsed.hf_repo is not None)
        progress(PullProgress(phase="success", total=entry.size, completed=entry.size))
        return entry

    async def _in_thread(self, work: Callable[..., ModelEntry], *args: Any,
                         pool: ThreadPoolExecutor | None = None) -> ModelEntry:
        """Run `work` in a thread (of `pool`, else the loop's default) that stops before registering
        anything once the pull is cancelled (a cancelled await does not stop a thread; it sees the flag
        between entries, between chunks and before committing)."""
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(work, *args, cancelled))
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def close(self) -> None:
        """Wait for local imports still running (a cancelled one stops at its next file or chunk)."""
        self._local_pool.shutdown(wait=True)

    async def add_local(self, name: str, path: Path, config: BackendConfiguration | None = None) -> ModelEntry:
        """`add`, run on the local-import threads (it reads the caller's files)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._local_pool, functools.partial(self.add, name, path, config))

    def _commit_downloads(self, key: str, source: str, results: builtins.list[tuple[RemoteFile, Downloaded, str]],
                          directory_model: bool, cancelled: threading.Event) -> ModelEntry:
        blob_files: builtins.list[BlobFile] = []
        with self._lock:
            stop_if(cancelled)
            try:
                for remote, got, role in results:
                    if remote.sha256 is not None and got.sha256 != remote.sha256:
                        raise StoreError(f"sha256 mismatch for {remote.name}: the content is not the expected "
                                         f"{remote.sha256}", 502, "digest_mismatch")
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

    # --- importing a local model ---------------------------------------------------------------

    def _import_local(self, key: str, path: Path, expected: str | None, progress: PullProgressCallback,
                      projector: Path | None, cancelled: threading.Event) -> ModelEntry:
        """Hash each file of a local model and hard-link (or copy) it into the blob store."""
        model = importer.local_sources(path, expected, projector, cancelled)
        total = importer.total_size(model)
        completed = 0
        throttle = Throttle()

        def on_bytes(n: int) -> None:
            nonlocal completed
            stop_if(cancelled)
            completed += n
            if throttle.ready():
                progress(PullProgress(phase="import", total=total, completed=completed))

        files: builtins.list[BlobFile] = []
        staged: builtins.list[Path] = []
        self.partial.mkdir(parents=True, exist_ok=True)
        try:
            for source in model.files:
                stop_if(cancelled)
                tmp, digest, size = self._stage_local(source, on_bytes)
                staged.append(tmp)
                if expected is not None and source.role == "model" and digest != expected:
                    raise StoreError(f"sha256 mismatch for {source.name}: expected {expected}, got {digest}", 400,
                                     "digest_mismatch")
                files.append(BlobFile(name=source.name, digest=digest, size=size,
                                      role="mmproj" if source.role == "mmproj" else "model"))
            progress(PullProgress(phase="commit", total=total, completed=total))
            with self._lock:  # blobs and manifest together: a concurrent removal cannot collect them between
                stop_if(cancelled)
                try:
                    for tmp, f in zip(staged, files, strict=True):
                        self._commit_blob(tmp, f.digest, read_only=False)
                    entry = self._register(key, files, str(path), model.directory_model)
                except BaseException:
                    self._collect_attempt(files)  # the blobs committed before the failure
                    raise
        finally:
            for tmp in staged:
                tmp.unlink(missing_ok=True)
        progress(PullProgress(phase="success", total=entry.size, completed=entry.size))
        return entry

    def _stage_local(self, source: importer.LocalFile, on_bytes: Callable[[int], None]) -> tuple[Path, str, int]:
        return importer.stage_local(self.partial, source, on_bytes)
