"""Content-addressed blobs and link folders.

`blobs/sha256-<hex>` holds immutable content (blobs we write ourselves are made read-only; a
hard-linked import shares its inode with the user's file). `links/<digest>/` holds, for split GGUFs
and model directories, hard links to blobs under their original file names, which the engines need.
A blob goes when the last manifest that names it goes; at start, blobs and link folders no manifest
names (what a commit cut short left behind) are swept.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from runnerd.store.errors import StoreError
from runnerd.store.manifests import BlobFile, ModelEntry

# Blobs and link directories changed this recently are never swept: another process sharing the
# store may be between committing a blob and writing the manifest that refers to it.
SWEEP_GRACE_SECONDS = 3600
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"sha256-([0-9a-f]{64})")
_DIGEST = re.compile(rb"[0-9a-f]{64}")
log = logging.getLogger("runnerd.store")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blob_path(blobs: Path, digest: str) -> Path:
    return blobs / f"sha256-{digest}"


def commit_blob(blobs: Path, src: Path, digest: str, *, read_only: bool = True) -> Path:
    """Move a verified file into the blob store (or drop it when the blob is already there)."""
    blob = blob_path(blobs, digest)
    blobs.mkdir(parents=True, exist_ok=True)
    if blob.exists():
        src.unlink(missing_ok=True)
        return blob
    if read_only:
        os.chmod(src, 0o444)
    os.replace(src, blob)
    fsync_dir(blobs)
    return blob


def materialise(links: Path, blobs: Path, digest: str, files: list[BlobFile]) -> Path:
    """`links/<digest>/` with each file under its original name, hard-linked to its blob."""
    directory = links / digest
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=links))
    try:
        for f in files:
            target = (tmp / f.name).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise StoreError(f"unsafe file name {f.name!r} in the model", 400, "unsafe_path")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob_path(blobs, f.digest), target)
            except OSError:
                os.symlink(blob_path(blobs, f.digest), target)
        if directory.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def collect(blobs: Path, links: Path, gone: ModelEntry, models: Iterable[ModelEntry]) -> None:
    """Delete the blobs and link directory of `gone` that none of `models` (those that remain) refers to."""
    if not gone.stored:
        return
    remaining = list(models)
    used = {f.digest for m in remaining if m.stored for f in m.files}
    digests = {m.digest for m in remaining if m.stored}
    for f in gone.files:
        if f.digest not in used:
            blob_path(blobs, f.digest).unlink(missing_ok=True)
    if gone.digest is not None and gone.digest not in digests:
        shutil.rmtree(links / gone.digest, ignore_errors=True)


def sweep(blobs: Path, links: Path, manifests: Path, models: dict[str, ModelEntry]) -> None:
    """Delete blobs and link directories no manifest refers to: what a commit that failed half-way
    (or a crash between blob and manifest) left behind. It runs while the store is constructed,
    before the daemon serves, so no pull of this process is between blob and manifest; the grace
    period covers another process sharing the store. Only `sha256-<hex>` files and `<hex>`
    directories are candidates, and nothing an in-place model or a set-aside manifest names."""
    kept = _digests_in_corrupt_manifests(manifests)
    blob_digests = kept | {f.digest for m in models.values() if m.stored for f in m.files}
    link_digests = kept | {m.digest for m in models.values() if m.stored and m.digest is not None}
    in_place = [p.resolve() for m in models.values() if not m.stored for p in (m.path, m.mmproj) if p is not None]
    cutoff = time.time() - SWEEP_GRACE_SECONDS
    for path in _entries(blobs):
        match = _BLOB_NAME.fullmatch(path.name)
        if match and match[1] not in blob_digests and path.is_file() and not path.is_symlink():
            _sweep_one(path, cutoff, in_place, path.unlink)
    for path in _entries(links):
        if _HEX64.fullmatch(path.name) and path.name not in link_digests and not path.is_symlink():
            _sweep_one(path, cutoff, in_place, functools.partial(shutil.rmtree, path))


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _sweep_one(path: Path, cutoff: float, in_place: list[Path], delete: Callable[[], object]) -> None:
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


def _digests_in_corrupt_manifests(manifests: Path) -> set[str]:
    """Digests a set-aside (.corrupt) manifest mentions: its blobs are kept, so that the model can
    still be recovered by repairing the manifest by hand."""
    found: set[str] = set()
    for path in manifests.glob("*.corrupt") if manifests.is_dir() else ():
        with contextlib.suppress(OSError):
            found.update(m.decode() for m in _DIGEST.findall(path.read_bytes()))
    return found
