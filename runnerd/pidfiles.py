"""Pid files for runners, so a daemon can stop the runners a previous instance left behind.

Runners already die with the daemon (parent-death signal); pid files cover what that cannot, such as
a daemon whose runners were re-parented by a PID-namespace boundary. A pid is only signalled when
the process's start time matches the one recorded: a recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, ValidationError

log = logging.getLogger("runnerd.pidfiles")

_START_TIME_TOLERANCE = 0.05


class PidRecord(BaseModel):
    pid: int
    create_time: float
    daemon_pid: int
    socket: str


def write_pid_file(path: Path, pid: int, socket: Path | None) -> None:
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return  # already gone: nothing to clean up later
    record = PidRecord(pid=pid, create_time=created, daemon_pid=os.getpid(), socket=str(socket or ""))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(record.model_dump_json())
    os.replace(tmp, path)


def remove_pid_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _same_process(record: PidRecord) -> psutil.Process | None:
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > _START_TIME_TOLERANCE:
            return None
        return proc
    except psutil.Error:
        return None


def _stop_group(proc: psutil.Process, grace: float) -> None:
    """SIGTERM the runner's process group (it leads its own session), SIGKILL after `grace`."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def clean_up_previous_runners(directory: Path, grace: float) -> list[int]:
    """Stop runners recorded in `directory` by an earlier daemon; returns the pids stopped."""
    stopped: list[int] = []
    if not directory.is_dir():
        return stopped
    for pid_file in sorted(directory.glob("*.pid")):
        try:
            record = PidRecord.model_validate_json(pid_file.read_text())
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable pid file %s: %s", pid_file, exc)
            remove_pid_file(pid_file)
            continue
        proc = _same_process(record)
        if proc is not None and record.daemon_pid != os.getpid():
            log.warning("stopping runner pid=%s left by a previous runnerd (pid %s)", record.pid, record.daemon_pid)
            _stop_group(proc, grace)
            stopped.append(record.pid)
        socket = Path(record.socket) if record.socket else None
        with contextlib.suppress(OSError):
            if socket is not None and socket.is_socket():
                socket.unlink()
        remove_pid_file(pid_file)
    _remove_leftovers(directory)
    return stopped


def _remove_leftovers(directory: Path) -> None:
    """Sockets and half-written pid files no pid file accounts for (a daemon killed between spawning a
    runner and recording it). Every runner instance has names of its own, so nothing reuses them."""
    for path in [*directory.glob("*.sock"), *directory.glob("*.tmp")]:
        with contextlib.suppress(OSError):
            if path.is_socket() or path.suffix == ".tmp":
                path.unlink()
