"""Runner log files on disk: reading the end of one across its rotated files, and removing a model's.

A runner's log (`<log_dir>/<backend>-<mode>-<digest>.log`, rotated to `.1` ... `.N` by size) is kept
after its runner exits, so that a crash can be read afterwards; it goes when its model is removed from
the store, since nothing can ever run under that key's model again until it is registered anew.
Everything here touches the disk: call it from a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from backends.base import Mode
from backends.process import rotated_logs
from runnerd.scheduler import RunnerKey


def read_end(path: Path, cap: int) -> tuple[bytes, bool, int]:
    """The last `cap` bytes of a rotating log, its rotated files first (oldest first); whether the
    bytes start somewhere inside what was written (so their first line may be cut); and how far into
    the current file they reach (where a follower goes on from)."""
    parts: list[bytes] = []
    end = 0
    left = cap
    cut = False
    newest_first = list(reversed(rotated_logs(path)))
    for i, file in enumerate(newest_first):
        try:
            with file.open("rb") as f:
                size = f.seek(0, 2)
                start = max(0, size - left)
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            continue  # rotated or removed meanwhile
        if file == path:
            end = size
        parts.append(data)
        left -= len(data)
        if start > 0 or (left <= 0 and i + 1 < len(newest_first)):
            cut = True
            break
    return b"".join(reversed(parts)), cut, end


def model_logs(log_dir: Path, backends: Iterable[str], model: str) -> list[Path]:
    """Every log file of every runner key of `model`, rotated ones included."""
    return [file for backend in backends for mode in Mode
            for file in rotated_logs(RunnerKey(backend, model, mode).log_path(log_dir))]


def remove_model_logs(log_dir: Path, backends: Iterable[str], model: str) -> list[Path]:
    """Delete `model`'s runner logs; the files removed."""
    removed = []
    for file in model_logs(log_dir, backends, model):
        try:
            file.unlink()
        except FileNotFoundError:
            continue
        removed.append(file)
    return removed
