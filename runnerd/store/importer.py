"""Importing a local model file or directory: which files make the model, and staging each one
(hashed, hard-linked into `partial/` when on the same filesystem, else copied) for the blob store.

A source file is opened once, without following a symbolic link and without blocking (a FIFO would
hang the thread forever), and must be a regular file by its open descriptor; it is then checked,
hashed and linked or copied from that descriptor, never from its path again, so that swapping the
path between the checks and the copy changes nothing. A directory's marker files (config.json, the
top-level weights) are checked before its tree is walked; the walk is bounded (entries, depth) and
stops once the import is cancelled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from backends.base import ModelFormat
from backends.formats import model_files
from backends.formats.gguf import GGUFParseError
from backends.formats.safetensors import (
    MAX_CONFIG_BYTES,
    ModelConfigError,
    SafetensorsError,
    read_model_config,
    read_safetensors_header,
    weight_files,
)
from runnerd.store.errors import StoreError, stop_if
from runnerd.store.manifests import model_summary

_CHUNK = 1 << 20
# A local import's staged file older than this is left over from a crash: nothing resumes it. Younger
# ones may belong to another process importing into the same store (two daemons, a restart's overlap).
STALE_IMPORT_SECONDS = 24 * 3600
# A model directory's walk: entries looked at (files, folders, anything) and folder depth. A model
# repository holds tens of files; a tree beyond these is not a model and would cost minutes to walk.
MAX_DIRECTORY_ENTRIES = 4096
MAX_DIRECTORY_DEPTH = 8
_OPEN_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GGUF_MAGIC = b"GGUF"


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


@dataclass(frozen=True)
class LocalFile:
    """One file of a local model, not opened yet: `root` is the file itself (`relative` None) or the
    model directory it lies in (`relative` its path there, '/'-separated)."""

    root: Path
    relative: str | None
    name: str  # its name in the model
    role: str  # "model" or "mmproj"
    gguf: bool  # checked for the GGUF magic before anything is hashed

    @property
    def label(self) -> str:
        return str(self.root) if self.relative is None else f"{self.root}/{self.relative}"


@dataclass(frozen=True)
class LocalModel:
    files: list[LocalFile]
    directory_model: bool


def local_sources(path: Path, expected: str | None, projector: Path | None,
                  cancelled: threading.Event | None = None) -> LocalModel:
    """The files of a local model (nothing is opened for reading yet but a directory's marker files);
    StoreError for anything that is not a model we can serve."""
    cancelled = cancelled or threading.Event()
    if not path.is_absolute():
        raise StoreError(f"model path {str(path)!r} must be absolute")
    root = Path(os.path.realpath(path))  # the user's own symbolic links are followed, once, here
    if root.is_dir():
        files = [LocalFile(root, rel, rel, "model", False) for rel in _directory_files(root, cancelled)]
        directory_model = True
    else:
        try:
            shards = model_files(path, ModelFormat.GGUF)
        except GGUFParseError as exc:
            raise StoreError(f"{path} is not a usable GGUF model: {exc.what}") from exc
        files = [LocalFile(Path(os.path.realpath(p)), None, p.name, "model", True) for p in shards]
        directory_model = False
    if expected is not None and len(files) != 1:
        raise StoreError("sha256 can only be given for a single-file model", code="invalid_sha256")
    if projector is not None:
        if not projector.is_absolute():
            raise StoreError(f"mmproj path {str(projector)!r} must be absolute")
        files.append(LocalFile(Path(os.path.realpath(projector)), None, projector.name, "mmproj", True))
    return LocalModel(files, directory_model)


def total_size(model: LocalModel) -> int:
    """Bytes the import will read, for progress (a file that cannot be stat'ed counts 0: opening it fails)."""
    total = 0
    for f in model.files:
        with contextlib.suppress(OSError):
            total += os.stat(f.label).st_size
    return total


def _directory_files(root: Path, cancelled: threading.Event) -> list[str]:
    """A model directory's regular, non-hidden files ('/'-separated, relative), marker files first
    checked; StoreError when it is no model directory or its tree is beyond the walk's bounds."""
    what = f"{root} is not a Hugging Face-format model directory"
    _check_markers(root, what)
    found: list[str] = []
    seen = 0
    pending: list[tuple[str, int]] = [("", 0)]
    while pending:
        folder, depth = pending.pop()
        for entry in _listing(root, folder, what):
            stop_if(cancelled)
            seen += 1
            if seen > MAX_DIRECTORY_ENTRIES:
                raise StoreError(f"{what}: it holds more than {MAX_DIRECTORY_ENTRIES} files and folders",
                                 code="directory_too_large")
            if entry.name.startswith("."):
                continue
            relative = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 >= MAX_DIRECTORY_DEPTH:
                    raise StoreError(f"{what}: its folders nest deeper than {MAX_DIRECTORY_DEPTH} levels",
                                     code="directory_too_large")
                pending.append((relative, depth + 1))
            elif entry.is_file(follow_symlinks=False):
                found.append(relative)
    return sorted(found)


def _listing(root: Path, folder: str, what: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(root / folder) as it:
            yield from it
    except OSError as exc:
        raise StoreError(f"{what}: cannot list {folder or 'it'}: {exc.strerror}") from exc


def _check_markers(root: Path, what: str) -> None:
    """config.json (a JSON object) and top-level *.safetensors weights, before anything else is read."""
    try:
        fd = _open_in(root, "config.json", f"{root}/config.json")
    except StoreError as exc:
        missing = isinstance(exc.__cause__, FileNotFoundError)
        raise StoreError(f"{what}: it has no config.json" if missing else
                         f"{what}: its config.json is not a readable regular file") from exc
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise StoreError(f"{what}: config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # the decoder's message can quote the file: never passed on
        raise StoreError(f"{what}: config.json is not valid JSON") from exc
    if not isinstance(config, dict):
        raise StoreError(f"{what}: config.json is not a JSON object")
    if not any(p.name.endswith(".safetensors") and not p.name.startswith(".") for p in _top_level(root, what)):
        raise StoreError(f"{what}: it has no *.safetensors weights")


def _top_level(root: Path, what: str) -> list[os.DirEntry[str]]:
    return [e for e in _listing(root, "", what) if e.is_file(follow_symlinks=False)]


def _open_in(root: Path, relative: str | None, label: str) -> int:
    """Open a file (`root` itself, or `relative` under the directory `root`) once, for reading: no
    symbolic link is followed below `root`, no FIFO blocks, and anything but a regular file is refused."""
    try:
        if relative is None:
            fd = os.open(root, _OPEN_FILE)
        else:
            *folders, name = relative.split("/")
            directory = os.open(root, _OPEN_DIRECTORY)
            try:
                for folder in folders:
                    inner = os.open(folder, _OPEN_DIRECTORY, dir_fd=directory)
                    os.close(directory)
                    directory = inner
                fd = os.open(name, _OPEN_FILE, dir_fd=directory)
            finally:
                os.close(directory)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{label} is not a regular file (it is a symbolic link or changed while being "
                             "imported)") from exc
        raise StoreError(f"cannot read model file {label}: {exc.strerror}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StoreError(f"{label} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def stage_local(partial: Path, source: LocalFile, on_bytes: Callable[[int], None]) -> tuple[Path, str, int]:
    """Open `source` once; a hard link to what was opened in partial/ (same filesystem), else a copy of
    it; hashed either way, from the open file."""
    fd = _open_in(source.root, source.relative, source.label)
    try:
        if source.gguf and os.pread(fd, len(_GGUF_MAGIC), 0) != _GGUF_MAGIC:
            # Refused before gigabytes are hashed; nothing of the file is quoted back.
            raise StoreError(f"{source.label} is not a GGUF file")
        return _stage_open(partial, fd, source.label, on_bytes)
    finally:
        os.close(fd)


def _stage_open(partial: Path, fd: int, label: str, on_bytes: Callable[[int], None]) -> tuple[Path, str, int]:
    made, name = tempfile.mkstemp(prefix=".import-", dir=partial)
    os.close(made)
    tmp = Path(name)
    tmp.unlink()
    try:
        try:
            # The open file itself, through its /proc link: the path may name something else by now.
            os.link(f"/proc/self/fd/{fd}", tmp)
            copy = False
        except OSError:
            copy = True
        h = hashlib.sha256()
        size = 0
        with open(fd, "rb", closefd=False) as f, (tmp.open("xb") if copy else contextlib.nullcontext()) as out:
            f.seek(0)
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
            raise StoreError(f"disk full while importing {label}", 507, "disk_full") from exc
        raise StoreError(f"cannot import {label}: {exc.strerror}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size
