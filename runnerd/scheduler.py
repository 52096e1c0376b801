"""Which runners exist, starting them on demand, sharing loads, and stopping them when idle.

A runner is keyed by (backend, model, mode). Concurrent requests for a model that is loading wait on
that one load. Every request holds a lease on its runner; when the last lease is returned the
runner's keep-alive starts: 0 stops it at once, None (negative) never, otherwise a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel

from backends.base import Backend, BackendConfiguration, MemoryEstimate, Mode, ModelRef, RunnerError, RunnerOutput
from backends.process import wait_until_ready
from runnerd.durations import KeepAlive, parse_keep_alive

log = logging.getLogger("runnerd.scheduler")

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

# The event loop keeps only weak references to tasks: hold fire-and-forget ones until they finish.
_background: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
    task = asyncio.create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


@dataclass(frozen=True)
class RunnerKey:
    backend: str
    model: str
    mode: Mode

    @property
    def slug(self) -> str:
        digest = hashlib.sha256(f"{self.backend}\0{self.model}\0{self.mode}".encode()).hexdigest()[:12]
        return f"{self.backend}-{self.mode}-{digest}"


class Unset(Enum):
    """No keep-alive given with the request (None already means "forever")."""

    UNSET = "unset"


UNSET = Unset.UNSET


class RunnerState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


class RunnerInfo(BaseModel):
    backend: str
    model: str
    mode: Mode
    state: RunnerState
    pid: int | None
    socket: str
    log_path: str | None
    started_at: float | None
    last_used: float
    active_requests: int
    keep_alive: float | None
    expires_at: float | None
    memory: MemoryEstimate


class Runner:
    """One engine process and what the daemon knows about it."""

    def __init__(self, key: RunnerKey, backend: Backend, model: ModelRef, config: BackendConfiguration,
                 socket_path: Path, log_path: Path | None, keep_alive: KeepAlive,
                 estimate: MemoryEstimate) -> None:
        self.key = key
        self.backend = backend
        self.model = model
        self.config = config
        self.socket_path = socket_path
        self.output = RunnerOutput(log_path)
        self.keep_alive = keep_alive
        self.estimate = estimate
        self.state = RunnerState.LOADING
        self.active = 0
        self.last_used = time.time()
        self.expires_at: float | None = None
        self.error: RunnerError | None = None
        self.session: aiohttp.ClientSession | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._process: asyncio.Task[None] | None = None
        self._loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._exited = asyncio.Event()

    def start(self, readiness_timeout: float) -> None:
        self._process = asyncio.create_task(
            self.backend.run(self.socket_path, self.model, self.key.mode, self.config, self.output),
            name=f"runner {self.key.slug}")
        self._process.add_done_callback(self._on_process_done)
        spawn(self._load(self._process, readiness_timeout), name=f"load {self.key.slug}")

    async def _load(self, process: asyncio.Task[None], timeout: float) -> None:
        started = time.monotonic()
        try:
            await wait_until_ready(self.socket_path, self.output, process, timeout)
        except TimeoutError as exc:
            self._fail_load(RunnerError(f"{self.model.name} did not become ready: {exc}", reason="timeout",
                                        tail=list(self.output.tail)))
            process.cancel()
            return
        except RunnerError as exc:
            self._fail_load(exc)
            return
        except asyncio.CancelledError:
            self._fail_load(RunnerError("the load was cancelled", reason="cancelled"))
            raise
        connector = aiohttp.UnixConnector(path=str(self.socket_path), limit=0)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.state = RunnerState.READY
        log.info("runner ready model=%s mode=%s pid=%s load_ms=%.1f", self.model.name, self.key.mode,
                 self.output.pid, (time.monotonic() - started) * 1000)
        if not self._loaded.done():
            self._loaded.set_result(None)

    def _fail_load(self, error: RunnerError) -> None:
        self.error = error
        log.warning("runner failed to load model=%s reason=%s: %s", self.model.name, error.reason, error.summary)
        if not self._loaded.done():
            self._loaded.set_exception(error)
            self._loaded.exception()  # mark retrieved: nobody may be waiting any more

    def _on_process_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and isinstance(task.exception(), RunnerError):
            err = task.exception()
            assert isinstance(err, RunnerError)
            self.error = err
            if self.state is not RunnerState.STOPPING:
                log.warning("runner exited model=%s pid=%s reason=%s", self.model.name, self.output.pid,
                            err.reason)
        self.state = RunnerState.EXITED
        self.cancel_expiry()
        if not self._loaded.done():
            self._fail_load(self.error or RunnerError("the engine exited before it was ready"))
        if self.session is not None:
            spawn(self.session.close())
        self._exited.set()

    async def wait_loaded(self) -> None:
        await asyncio.shield(self._loaded)

    async def wait_exited(self) -> None:
        await self._exited.wait()

    async def exit_error(self, timeout: float) -> RunnerError | None:
        """The engine's error if it has died (waiting up to `timeout` s for it to be noticed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self.error if self._exited.is_set() else None

    async def stop(self) -> None:
        if self._process is None or self._process.done():
            return
        self.state = RunnerState.STOPPING
        self.cancel_expiry()
        self._process.cancel()
        with contextlib.suppress(asyncio.CancelledError, RunnerError):
            await self._process
        await self._exited.wait()

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.expires_at = None

    def set_expiry(self, delay: float, callback: Callable[[], object]) -> None:
        self.cancel_expiry()
        self._expiry = asyncio.get_running_loop().call_later(delay, callback)
        self.expires_at = time.time() + delay

    def info(self) -> RunnerInfo:
        return RunnerInfo(
            backend=self.key.backend, model=self.model.name, mode=self.key.mode, state=self.state,
            pid=self.output.pid, socket=str(self.socket_path),
            log_path=str(self.output.log_path) if self.output.log_path else None,
            started_at=self.output.started_at, last_used=self.last_used, active_requests=self.active,
            keep_alive=self.keep_alive, expires_at=self.expires_at, memory=self.estimate)


class Lease:
    """A request's hold on a ready runner; returned with `release`."""

    def __init__(self, scheduler: Scheduler, runner: Runner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.scheduler._release(self.runner)


class Scheduler:
    def __init__(self, backends: Mapping[str, Backend], *, runtime_dir: Path, log_dir: Path | None,
                 readiness_timeout: float, default_keep_alive: KeepAlive) -> None:
        self.backends = backends
        self.runtime_dir = runtime_dir
        self.log_dir = log_dir
        self.readiness_timeout = readiness_timeout
        self.default_keep_alive = default_keep_alive
        self._runners: dict[RunnerKey, Runner] = {}
        self._short_socket_dir: Path | None = None
        self._closing = False

    def _socket_path(self, key: RunnerKey) -> Path:
        path = self.runtime_dir / "runners" / f"{key.slug}.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return path
        # A deep runtime directory would overflow sun_path: fall back to a private short one.
        if self._short_socket_dir is None:
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="runnerd-"))
        return self._short_socket_dir / f"{key.slug}.sock"

    def runner(self, key: RunnerKey) -> Runner | None:
        runner = self._runners.get(key)
        return runner if runner is not None and runner.state in (RunnerState.LOADING, RunnerState.READY) else None

    async def acquire(self, key: RunnerKey, model: ModelRef, config: BackendConfiguration,
                      keep_alive: KeepAlive | Unset = UNSET) -> Lease:
        """Lease the runner for `key`, starting it if none is loaded or loading. A request's own
        keep-alive (Ollama semantics) replaces the runner's for when it next goes idle."""
        if self._closing:
            raise RunnerError("runnerd is shutting down", reason="shutting_down")
        runner = self.runner(key) or self._start(key, model, config)
        if not isinstance(keep_alive, Unset):
            runner.keep_alive = keep_alive
        runner.active += 1
        runner.cancel_expiry()
        try:
            await runner.wait_loaded()
        except BaseException:
            self._release(runner)
            raise
        return Lease(self, runner)

    def _start(self, key: RunnerKey, model: ModelRef, config: BackendConfiguration) -> Runner:
        backend = self.backends[key.backend]
        keep_alive = self.default_keep_alive
        if config.keep_alive is not None:
            keep_alive = parse_keep_alive(config.keep_alive)
        log_path = self.log_dir / f"{key.slug}.log" if self.log_dir else None
        runner = Runner(key, backend, model, config, self._socket_path(key), log_path, keep_alive,
                        backend.required_memory(model, key.mode, config))
        self._runners[key] = runner
        log.info("runner starting model=%s mode=%s backend=%s", model.name, key.mode, key.backend)
        runner.start(self.readiness_timeout)
        spawn(self._forget_when_exited(runner))
        return runner

    async def _forget_when_exited(self, runner: Runner) -> None:
        await runner.wait_exited()
        self._forget(runner)

    def _forget(self, runner: Runner) -> None:
        if self._runners.get(runner.key) is runner:
            del self._runners[runner.key]

    def _release(self, runner: Runner) -> None:
        runner.active -= 1
        runner.last_used = time.time()
        keep_alive = runner.keep_alive
        if runner.active > 0 or runner.state is not RunnerState.READY:
            return
        if keep_alive is None:
            return
        if keep_alive == 0:
            spawn(self._expire(runner))
        else:
            runner.set_expiry(keep_alive, lambda: spawn(self._expire(runner)))

    async def _expire(self, runner: Runner) -> None:
        if runner.active == 0 and runner.state is RunnerState.READY:
            log.info("runner idle, stopping model=%s mode=%s", runner.model.name, runner.key.mode)
            await runner.stop()

    async def unload(self, *, backend: str | None = None, models: list[str] | None = None) -> list[RunnerInfo]:
        """Stop the runners that match (all when neither is given); returns what was stopped."""
        chosen = [r for r in list(self._runners.values())
                  if (backend is None or r.key.backend == backend) and (models is None or r.model.name in models)]
        infos = [r.info() for r in chosen]
        await asyncio.gather(*(r.stop() for r in chosen))
        return infos

    def ps(self) -> list[RunnerInfo]:
        return [r.info() for r in self._runners.values()]

    async def shutdown(self) -> None:
        self._closing = True
        await self.unload()
