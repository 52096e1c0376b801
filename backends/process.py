"""One-shot supervision of an engine process that serves HTTP on a unix socket.

The process gets its own process group (so workers it forks die with it) and a parent-death
signal (so it never outlives the daemon, even after SIGKILL of the daemon). Its output goes to a
bounded in-memory tail and a log file. Stopping is SIGTERM to the group, then SIGKILL after a
grace period; the socket file is removed on every path out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from backends.base import InstallError, RunnerError, RunnerOutput
from backends.endpoint import Endpoint

if TYPE_CHECKING:
    import aiohttp

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: dlopen in a forked child of a threaded parent can deadlock.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_MAX_LINE = 8192
# Output waiting for a slow log disk, per runner; past this it is dropped (and the drop noted in the log).
_LOG_BACKLOG_BYTES = 8 << 20
# An engine that logs every request prints thousands of lines a second under load. Its log is written at
# most this often, and its output read at most this often while it keeps coming, rather than a thread
# wake-up and a loop wake-up for every line, each taking a core from the engines.
_LOG_WRITE_PERIOD = 0.1
_BUSY_OUTPUT_PERIOD = 0.02
# The output pipe's size: an engine writing faster than this per gulp period waits for the next read.
_PIPE_BYTES = 1 << 20


def _child_setup(parent_pid: int, batch: bool) -> None:
    """Runs in the child between fork and exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl: then nobody would ever signal us.
    if os.getppid() != parent_pid:
        os._exit(1)
    if batch:
        _batch_policy()


def _batch_policy() -> None:
    """Run under SCHED_BATCH, and so every thread and process started from here on; where a sandbox's policy
    refuses it, under the default one."""
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def rotated_logs(path: Path) -> list[Path]:
    """A rotating log's files that exist, oldest first: `<name>.N` ... `<name>.1`, then `<name>` itself."""
    prefix = path.name + "."
    numbered: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            suffix = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
            if suffix.isascii() and suffix.isdigit():
                numbered.append((int(suffix), entry))
    files = [p for _, p in sorted(numbered, reverse=True)]
    return [*files, path] if path.is_file() else files


class RotatingLog:
    """An engine's output file that is renamed to `<name>.1` (older ones shifted up to `<name>.<keep>`,
    the oldest dropped) once it would grow past `max_bytes`: an engine that runs for months, or one
    that prints a line per request, fills no disk. A follower reading by path sees the file shrink
    and starts over on the new one."""

    def __init__(self, path: Path, max_bytes: int | None, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = max(0, keep)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("ab")
        self._size = self._file.tell()

    def write(self, chunk: bytes) -> None:
        cap = self.max_bytes
        while cap is not None and self._size + len(chunk) > cap:
            if self._size:
                self._rotate()
                continue
            self._file.write(chunk[:cap])  # one read larger than the whole cap
            self._size = cap
            chunk = chunk[cap:]
        self._file.write(chunk)
        self._file.flush()
        self._size += len(chunk)

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if n == self.keep:
                older.unlink(missing_ok=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    older.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.keep:
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("wb")
        self._size = 0

    def close(self) -> None:
        self._file.close()


class LogWriter:
    """A runner's log written by a thread of its own: a slow or stalled disk delays the file, never the
    event loop that relays every request. Output the disk has not taken past `_LOG_BACKLOG_BYTES` is dropped,
    and the log says how much when the disk catches up."""

    def __init__(self, path: Path, max_bytes: int | None, keep: int, backlog: int = _LOG_BACKLOG_BYTES,
                 period: float = _LOG_WRITE_PERIOD) -> None:
        self._open = partial(RotatingLog, path, max_bytes, keep)
        self._backlog = backlog
        self._period = period
        self._chunks: list[bytes] = []
        self._queued = 0
        self._dropped = 0
        self._waiting = False  # the writer sleeps until it is told of output
        self._wake = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"log {path.name}", daemon=True)
        self._thread.start()

    def write(self, chunk: bytes) -> None:
        """Never blocks for the disk (only for the moment the writer thread takes the queue)."""
        with self._wake:
            if self._queued + len(chunk) > self._backlog:
                self._dropped += len(chunk)
                return
            self._chunks.append(chunk)
            self._queued += len(chunk)
            if self._waiting:
                self._waiting = False
                self._wake.notify()

    def _take(self) -> tuple[list[bytes], int, bool]:
        with self._wake:
            while not self._chunks and not self._dropped and not self._closed.is_set():
                self._waiting = True
                self._wake.wait()
            self._waiting = False
            chunks, self._chunks, self._queued = self._chunks, [], 0
            dropped, self._dropped = self._dropped, 0
            return chunks, dropped, self._closed.is_set()

    def _run(self) -> None:
        try:
            log = self._open()
        except OSError:
            return  # the tail in memory still has the output; nothing to write it to
        try:
            while True:
                chunks, dropped, closing = self._take()
                if chunks:
                    log.write(b"".join(chunks))
                if dropped:  # what came after the queued chunks: noted after them
                    log.write(b"\n[runnerd: %d bytes of output dropped: the log disk did not keep up]\n" % dropped)
                if closing and not chunks and not dropped:
                    return
                self._closed.wait(self._period)  # output gathers meanwhile; a close cuts the wait short
        except OSError:
            return
        finally:
            log.close()

    def close(self) -> None:
        """Write what is queued and close the file: blocking, call it from a thread."""
        self._closed.set()
        with self._wake:
            self._wake.notify()
        self._thread.join()


class OutputPipe(asyncio.Protocol):
    """Reads the process's output pipe: to the log file, and split into lines for the tail. Output that keeps
    coming is read in gulps, `_BUSY_OUTPUT_PERIOD` apart (the pipe holds it meanwhile); the first after a
    quiet spell is read at once (an engine's "listening" line wakes the readiness poll). `ended` is done
    once every writer has closed the pipe."""

    def __init__(self, output: RunnerOutput, log: LogWriter | None) -> None:
        self.output = output
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.ReadTransport | None = None
        self._pending = b""
        self._last = float("-inf")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.ReadTransport, transport)  # uvloop's do not subclass asyncio's

    def data_received(self, chunk: bytes) -> None:
        if self.log is not None:
            self.log.write(chunk)
        pending = self._pending + chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > _MAX_LINE:
            lines.append(pending)
            pending = b""
        self._pending = pending
        tail = self.output.tail
        for line in lines:
            tail.append(line[:_MAX_LINE].decode("utf-8", "replace").rstrip("\r"))
        self.output.activity.set()
        now = self.loop.time()
        if now - self._last < _BUSY_OUTPUT_PERIOD and self.transport is not None:
            self.transport.pause_reading()
            self.loop.call_later(_BUSY_OUTPUT_PERIOD, self._resume)
        self._last = now

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending:
            self.output.tail.append(self._pending[:_MAX_LINE].decode("utf-8", "replace"))
            self._pending = b""
            self.output.activity.set()
        if not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _output_pipe() -> tuple[int, int]:
    """A pipe for the engine's output (read end, write end), with room for the output of a gulp's pause."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # past the host's pipe-max-size: the default size serves
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    return read_end, write_end


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def stop_process_group(proc: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM the process group, wait `grace` seconds, then SIGKILL it. Returns the exit code."""
    pgid = proc.pid
    if proc.returncode is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            _signal_group(pgid, signal.SIGKILL)
            await proc.wait()
    # Workers the leader forked may still be alive after the leader is gone.
    _signal_group(pgid, signal.SIGKILL)
    assert proc.returncode is not None
    return proc.returncode


ExitPatterns = Sequence[tuple[str, "re.Pattern[str]", str]]
"""(reason, pattern, message): the first pattern found in the tail names why the engine exited."""

GENERIC_EXIT_PATTERNS: ExitPatterns = (
    ("out_of_memory", re.compile(r"out of memory|failed to allocate|bad_alloc|cudaMalloc failed|OOM", re.I),
     "the engine ran out of memory"),
    ("bad_flag", re.compile(r"invalid argument|unknown argument|unrecognized argument|error while handling "
                            r"argument|unrecognized arguments", re.I),
     "the engine refused a command-line flag"),
    ("model_load_failed", re.compile(r"failed to load model|error loading model|unable to load model|"
                                     r"failed to read|invalid magic|not a gguf", re.I),
     "the engine failed to load the model"),
)


def translate_exit(exit_code: int | None, tail: Sequence[str], patterns: ExitPatterns = ()) -> RunnerError:
    """Turn an engine's exit into one clear error, naming the likely cause and its last output."""
    lines = list(tail)[-20:]
    text = "\n".join(lines)
    for reason, pattern, message in (*patterns, *GENERIC_EXIT_PATTERNS):
        if pattern.search(text):
            return RunnerError(f"{message} (exit code {exit_code})", reason=reason, tail=lines,
                               exit_code=exit_code)
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.Signals._value2member_map_ else str(
            -exit_code)
        reason = "killed" if exit_code == -signal.SIGKILL else "crashed"
        return RunnerError(f"the engine was terminated by signal {name}", reason=reason, tail=lines,
                           exit_code=exit_code)
    return RunnerError(f"the engine exited unexpectedly (exit code {exit_code})", reason="exited",
                       tail=lines, exit_code=exit_code)


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    endpoint: Endpoint,
    output: RunnerOutput,
    grace: float = 5.0,
    cwd: Path | None = None,
    exit_patterns: ExitPatterns = (),
) -> None:
    """Run one engine process until it exits (raises RunnerError) or the caller cancels us
    (stops the process group, then re-raises CancelledError). A socket is removed either way."""
    endpoint.remove()
    log = LogWriter(output.log_path, output.log_max_bytes, output.log_files) if output.log_path else None
    read_end, write_end = _output_pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_end,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=partial(_child_setup, os.getpid(), output.batch_scheduling),
        )
    except OSError as exc:
        os.close(read_end)
        if log is not None:
            await asyncio.to_thread(log.close)
        raise RunnerError(f"cannot start {argv[0]}: {exc.strerror or exc}", reason="spawn_failed") from exc
    except BaseException:  # cancelled while spawning: the read end is nobody's yet
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the engine holds its own copy: the pipe ends when the engine's copies close
    output.pid = proc.pid
    output.started_at = time.time()
    if output.on_spawn is not None:
        output.on_spawn(proc.pid)
    pump: OutputPipe | None = None
    try:
        # The transport owns the pipe's file from here on, and closes it.
        _, pump = await asyncio.get_running_loop().connect_read_pipe(
            lambda: OutputPipe(output, log), os.fdopen(read_end, "rb", buffering=0))
        await proc.wait()
        # Collect what the process printed last before judging why it exited.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump.ended), 1.0)
        output.exit_code = await stop_process_group(proc, 0)
        raise translate_exit(output.exit_code, output.tail, exit_patterns)
    finally:
        # Reached on cancellation too: the shield keeps the stop itself from being cancelled.
        if proc.returncode is None:
            await asyncio.shield(stop_process_group(proc, grace))
            output.exit_code = proc.returncode
        if pump is not None:
            pump.close()
        if log is not None:
            await asyncio.shield(asyncio.to_thread(log.close))
        endpoint.remove()


async def probe_health(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> int | None:
    """GET the engine's readiness `url`: the HTTP status, or None if nothing answers yet."""
    import aiohttp  # lazily: importing this module (as `runnerd inspect` does) must stay cheap

    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def wait_until_ready(
    endpoint: Endpoint,
    output: RunnerOutput,
    process_task: asyncio.Task[None],
    timeout: float,
    readiness_path: str = "/health",
) -> None:
    """Poll GET `readiness_path` on the endpoint until it answers 200.

    Polls start 5 ms apart and back off to 50 ms; any new engine output wakes the poller at once,
    since engines log the moment they start listening. Raises the engine's RunnerError if it exits
    first and TimeoutError after `timeout` seconds.
    """
    import aiohttp  # lazily, as in probe_health

    deadline = time.monotonic() + timeout
    interval = 0.005
    connector = endpoint.connector(force_close=True)
    url = endpoint.url(readiness_path)
    # Each probe carries its own short timeout; the polling itself is bounded by `timeout`.
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        while True:
            if process_task.done():
                if process_task.cancelled():
                    # Stopped (unloaded, reconfigured) while loading: this load failed. Its CancelledError
                    # would instead cancel whoever waits here, and the task group that runs the wait.
                    raise RunnerError("the engine was stopped before it was ready", reason="stopped",
                                      tail=list(output.tail))
                process_task.result()  # raises the engine's error
                raise RunnerError("the engine exited before it was ready", reason="exited",
                                  tail=list(output.tail))
            if endpoint.exists() and await probe_health(session, url) == 200:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the engine was not ready after {timeout:g} s")
            output.activity.clear()
            activity = asyncio.create_task(output.activity.wait())
            await asyncio.wait({activity, process_task}, timeout=min(interval, remaining))
            activity.cancel()
            interval = min(interval * 1.5, 0.05)


async def run_step(argv: Sequence[str], *, on_line: Callable[[str], None] | None = None,
                   env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run one install or build step in its own process group, under SCHED_BATCH (a build beside served
    requests waits for the daemon's turn rather than cutting it), feeding each output line to `on_line`;
    kill the group if we are cancelled. Failure raises InstallError with the last 30 lines."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=None if env is None else dict(env), cwd=cwd,
        preexec_fn=_batch_policy,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    try:
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail = [*tail[-29:], line]
            if on_line is not None:
                on_line(line)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
    if code != 0:
        raise InstallError(f"{' '.join(argv[:4])} ... failed with exit code {code}:\n" + "\n".join(tail))
