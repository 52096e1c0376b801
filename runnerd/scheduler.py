"""Which runners exist, admitting new ones by memory, evicting idle ones, and stopping them when idle.

A runner is keyed by (backend, model, mode). Concurrent requests for a model that is loading wait on
that one load. A new runner starts only when its memory estimate fits what runners may hold; if not,
idle runners are stopped least recently used first, and if that is not enough the load waits (in a
bounded queue) for busy runners to go idle, at most the queue timeout from when the request arrived;
a model that can never fit or is held back after crashing is answered at once. Every request holds
a lease on its runner; when the last lease is returned the keep-alive starts: 0 stops it at once,
None (negative) never, else a timer. Each runner instance has its own socket and pid file.

A drained node loads nothing new: a request for a model whose runner is not already loaded or loading
is refused (NodeDraining, 503 with Retry-After), requests to loaded runners are served, and each runner
is stopped as soon as it is idle. Resuming lifts that; the runners still left keep their keep-alive.

Unloading a runner may drain it the same way: it takes no new request at once (one for its model starts a
fresh runner beside it), is stopped as soon as its requests in flight have ended, and those still in
flight when the unload's timeout passes are cut by stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
from pydantic import BaseModel

from backends.base import (
    Backend,
    BackendConfiguration,
    BackendError,
    MemoryEstimate,
    Mode,
    ModelRef,
    RunnerError,
    RunnerOutput,
)
from backends.endpoint import Endpoint, EndpointKind
from backends.process import probe_health, wait_until_ready
from runnerd.admission import Amount, Budget, Holding, needed
from runnerd.durations import KeepAlive, parse_keep_alive
from runnerd.pidfiles import remove_pid_file, write_pid_file
from runnerd.ports import free_loopback_port
from runnerd.relay import EnginePool
from runnerd.sampler import HostSampler, HostSnapshot

log = logging.getLogger("runnerd.scheduler")

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
FAILURES_BEFORE_BACKOFF = 3
MAX_BACKOFF_SECONDS = 300.0
_CONNECT_TIMEOUT = 10.0  # a local socket that takes longer to accept is an engine in trouble

# Starts background work (a coroutine function and its arguments) in the scheduler's task group.
Spawner = Callable[..., None]


async def _logged_failures(work: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    """Background work that fails is a bug to log, never a reason to take the scheduler's task group down."""
    try:
        await work(*args)
    except Exception:
        log.exception("background task %r failed", work)


class SchedulingError(Exception):
    """A load that cannot happen now or ever; `status`, `code` and `retry_after` shape the HTTP answer."""

    status = 503
    code = "model_unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DoesNotFit(SchedulingError):
    status = 507
    code = "insufficient_memory"


class QueueTimeout(SchedulingError):
    status = 503


class HeldBack(SchedulingError):
    status = 503


class NodeDraining(SchedulingError):
    """The node is draining: it starts no runner (and takes no preload) until it is resumed."""

    status = 503
    code = "node_draining"


class StartRefused(SchedulingError):
    """What the runner would start on (an engine version, an environment) is being removed now."""

    status = 503
    code = "backend_removing"


# Whether a runner for this key, with this configuration, must not start now. Called on the event loop:
# it must not block.
StartGuard = Callable[["RunnerKey", BackendConfiguration], bool]

# What a refused load is told to wait before asking this node again (an orchestrator goes elsewhere).
DRAIN_RETRY_AFTER = 30.0


class DrainStatus(BaseModel):
    """Whether the node is draining, and what is left on it: an orchestrator polls until nothing is."""

    draining: bool = False
    since: float | None = None  # when the drain began (Unix time); None when not draining
    runners_left: int = 0  # engines still running or stopping
    active_requests: int = 0  # requests in flight on them
    drained: bool = False  # draining and nothing left


@dataclass(frozen=True)
class RunnerKey:
    backend: str
    model: str
    mode: Mode

    def log_path(self, log_dir: Path) -> Path:
        """Where this runner's engine output is kept (one file per backend, model and mode)."""
        return log_dir / f"{self.slug}.log"

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
    IDLE = "idle"  # shown for a ready runner with nothing in flight
    STOPPING = "stopping"
    EXITED = "exited"


class RunnerInfo(BaseModel):
    backend: str
    model: str
    mode: Mode
    state: RunnerState
    pid: int | None
    socket: str | None  # the unix socket, when the runner listens on one
    endpoint: Endpoint
    log_path: str | None
    started_at: float | None
    last_used: float
    active_requests: int
    keep_alive: float | None
    expires_at: float | None
    memory: MemoryEstimate
    measured_ram_bytes: int
    measured_vram_bytes: int


class UnloadOutcome(BaseModel):
    """What an unload did: the runners it stopped, as they were when it began, and their requests."""

    runners: list[RunnerInfo]
    drained: int = 0  # requests in flight that ended on their own before their runner stopped
    cut: int = 0  # requests still in flight when the timeout passed: their runner was stopped under them


class Runner:
    """One engine process and what the daemon knows about it."""

    def __init__(self, key: RunnerKey, backend: Backend, model: ModelRef, config: BackendConfiguration,
                 endpoint: Endpoint, log_path: Path | None, pid_path: Path, keep_alive: KeepAlive,
                 estimate: MemoryEstimate, spawn: Spawner, idle_timeout: float = 600.0,
                 release: Callable[[Runner], None] | None = None, readiness_path: str = "/health") -> None:
        self.key = key
        self.spawn = spawn  # background work belongs to the scheduler's task group
        # How a lease on it is returned: the scheduler's bookkeeping; without a scheduler, only the count.
        self._release_lease = release or _count_release
        self.backend = backend
        self.model = model
        self.config = config
        self.endpoint = endpoint
        self.readiness_path = readiness_path
        self.pid_path = pid_path
        self.output = RunnerOutput(log_path)
        self.output.on_spawn = lambda pid: write_pid_file(pid_path, pid, endpoint.path)
        self.keep_alive = keep_alive
        self.estimate = estimate
        self.idle_timeout = idle_timeout  # seconds of silence on a streamed answer before it fails
        self.measured = Amount()
        self.state = RunnerState.LOADING
        self.active = 0
        self.last_used = time.time()
        self.ready_at: float | None = None
        self.expires_at: float | None = None
        self.error: RunnerError | None = None
        self.stop_requested = False
        self.stop_reason: str | None = None  # why runnerd stopped it: idle, unload, memory, abandoned, ...
        self.unloading = False  # an unload waits for its requests in flight to end before it stops it
        self.session: aiohttp.ClientSession | None = None
        self.engine_pool = EnginePool(endpoint)  # the relay's kept-alive connections to the engine
        self._expiry: anyio.CancelScope | None = None  # the keep-alive timer's
        self._expiry_wake = 0.0  # when that timer next wakes (monotonic)
        self._expiry_due: float | None = None  # when the runner expires if still idle (monotonic)
        self._expire: Callable[[], Coroutine[Any, Any, Any]] | None = None
        self._process: asyncio.Task[None] | None = None
        self._loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._exited = asyncio.Event()
        self._went_idle = asyncio.Event()

    def start(self, readiness_timeout: float) -> None:
        self._process = asyncio.create_task(
            self.backend.run(self.endpoint, self.model, self.key.mode, self.config, self.output),
            name=f"runner {self.key.slug}")
        self.spawn(self._supervise, self._process)
        self.spawn(self._load, self._process, readiness_timeout)

    async def _load(self, process: asyncio.Task[None], timeout: float) -> None:
        started = time.monotonic()
        try:
            await wait_until_ready(self.endpoint, self.output, process, timeout, self.readiness_path)
        except TimeoutError as exc:
            self._fail_load(RunnerError(f"{self.model.name} did not become ready within {timeout:g} s "
                                        f"(readiness_timeout; raise it for big models): {exc}", reason="timeout",
                                        tail=list(self.output.tail)))
            process.cancel()
            return
        except RunnerError as exc:
            self._fail_load(exc)
            return
        except BackendError:
            return  # the engine could not start at all: its supervisor reports why
        except asyncio.CancelledError:
            self._fail_load(RunnerError("the load was cancelled", reason="cancelled"))
            raise
        # Idle connections are dropped before the engine's own keep-alive timeout (5 s is common) closes them.
        connector = self.endpoint.connector(limit=0, keepalive_timeout=3.0)
        # No total deadline: a healthy answer may take hours. Each request bounds the engine's silence.
        timeouts = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT, sock_read=None)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=timeouts)
        self.state = RunnerState.READY
        self.ready_at = time.monotonic()
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

    async def _supervise(self, process: asyncio.Task[None]) -> None:
        """Wait for the engine process to end, then record how and release what it held."""
        await asyncio.wait({process})
        self._on_process_done(process)
        self.engine_pool.close()
        if self.session is not None:
            await self.session.close()

    def _on_process_done(self, task: asyncio.Task[None]) -> None:
        failure = None if task.cancelled() else task.exception()
        if isinstance(failure, BackendError) and not isinstance(failure, RunnerError):
            # e.g. the engine is not installed: nothing was started.
            failure = RunnerError(str(failure), reason="backend_unavailable")
        if isinstance(failure, RunnerError):
            err = failure
            self.error = err
            if self.state is not RunnerState.STOPPING:
                log.warning("runner exited model=%s pid=%s reason=%s", self.model.name, self.output.pid,
                            err.reason)
        self.state = RunnerState.EXITED
        self.cancel_expiry()
        remove_pid_file(self.pid_path)
        if not self._loaded.done():
            if self.stop_requested:
                self._fail_load(RunnerError("the load was stopped: the model was unloaded or nobody waits for it",
                                            reason="cancelled"))
            else:
                self._fail_load(self.error or RunnerError("the engine exited before it was ready"))
        self._exited.set()

    @property
    def loaded_ok(self) -> bool:
        return self._loaded.done() and not self._loaded.cancelled() and self._loaded.exception() is None

    async def wait_loaded(self) -> None:
        if self._loaded.done():  # the common case, a loaded runner: no shield, no trip through the loop
            self._loaded.result()
            return
        await asyncio.shield(self._loaded)

    async def wait_exited(self) -> None:
        await self._exited.wait()

    async def exit_error(self, timeout: float) -> RunnerError | None:
        """The engine's error if it has died (waiting up to `timeout` s for it to be noticed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self.error if self._exited.is_set() else None

    async def responsive(self, timeout: float) -> bool:
        """Whether the engine process lives and answers its health check within `timeout` s (on a
        connection of its own: the pooled ones may all be busy with long answers)."""
        if self._exited.is_set():
            return False
        connector = self.endpoint.connector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as probe:
            return await probe_health(probe, self.endpoint.url(self.readiness_path), timeout) == 200

    async def stop(self, reason: str) -> None:
        if self._process is None or self._process.done():
            return
        if not self.stop_requested:
            self.stop_reason = reason
        self.stop_requested = True
        self.unloading = False
        self.state = RunnerState.STOPPING
        self.cancel_expiry()
        self._process.cancel()
        with contextlib.suppress(asyncio.CancelledError, RunnerError):
            await self._process
        await self._exited.wait()

    def hold(self) -> Lease:
        """A lease of its own on this runner, for engine work that outlives the request that began it
        (a client that hung up while the engine still computes its answer): the runner counts as busy,
        for ps, keep-alive, eviction and unload, until the lease is returned."""
        self.active += 1
        self.pause_expiry()
        return Lease(self._release_lease, self)

    def note_idle(self) -> None:
        """Wake whoever waits for this runner's requests to end (an unload draining it)."""
        event, self._went_idle = self._went_idle, asyncio.Event()
        event.set()

    async def wait_idle(self) -> None:
        """Until no request is in flight on this runner, or its engine has exited."""
        while self.active > 0 and not self._exited.is_set():
            idle = asyncio.create_task(self._went_idle.wait())
            exited = asyncio.create_task(self._exited.wait())
            try:
                await asyncio.wait({idle, exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()
                exited.cancel()

    def begin_unload(self, reason: str) -> None:
        """Take no new request (one for this model starts another runner) while those in flight end;
        `stop` follows."""
        if not self.stop_requested:
            self.stop_reason = reason
        self.stop_requested = True
        self.unloading = True
        self.state = RunnerState.STOPPING
        self.cancel_expiry()

    def cancel_expiry(self) -> None:
        """No expiry any more, and no timer: the runner stops or is taken out of service."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.pause_expiry()

    def pause_expiry(self) -> None:
        """No expiry while a request holds the runner. A timer already running sleeps on: when the runner
        goes idle again `set_expiry` moves its deadline, rather than each request that leaves the runner
        idle starting a task and the next one cancelling it."""
        self._expiry_due = None
        self.expires_at = None

    def set_expiry(self, delay: float, expire: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run `expire` after `delay` seconds unless the expiry is paused, cancelled or set again first."""
        due = time.monotonic() + delay
        self._expiry_due = due
        self._expire = expire
        self.expires_at = time.time() + delay
        if self._expiry is not None and self._expiry_wake <= due:
            return  # the timer wakes first and sleeps on to `due`
        if self._expiry is not None:
            self._expiry.cancel()  # it would wake too late: a shorter keep-alive was asked for
        self._expiry = anyio.CancelScope()
        self._expiry_wake = due
        self.spawn(self._expire_later, self._expiry)

    async def _expire_later(self, scope: anyio.CancelScope) -> None:
        with scope:
            while (due := self._expiry_due) is not None and (left := due - time.monotonic()) > 0:
                self._expiry_wake = due
                await anyio.sleep(left)
        if self._expiry is scope:
            self._expiry = None  # the next idle spell starts a timer of its own
        # Outside the scope: expiring stops the runner, which cancels any expiry.
        if not scope.cancel_called and self._expiry_due is not None and self._expire is not None:
            await self._expire()

    def measure(self, snapshot: HostSnapshot) -> None:
        """What the host sampler measured of the engine's process tree: resident memory, and the GPU
        memory NVML reports for it on each GPU (admission checks every GPU on its own). A reading begun
        before the engine was watched changes nothing."""
        measured = snapshot.measured(self.output.pid)
        if measured is not None:
            self.measured = measured

    def holding(self) -> Holding:
        return Holding(estimate=needed(self.estimate), measured=self.measured,
                       loading=self.state is RunnerState.LOADING)

    def evictable(self, min_residency: float) -> bool:
        return (self.state is RunnerState.READY and self.active == 0 and self.ready_at is not None
                and time.monotonic() - self.ready_at >= min_residency)

    def info(self) -> RunnerInfo:
        state = RunnerState.IDLE if self.state is RunnerState.READY and self.active == 0 else self.state
        return RunnerInfo(
            backend=self.key.backend, model=self.model.name, mode=self.key.mode, state=state,
            pid=self.output.pid, socket=str(self.endpoint.path) if self.endpoint.path else None,
            endpoint=self.endpoint,
            log_path=str(self.output.log_path) if self.output.log_path else None,
            started_at=self.output.started_at, last_used=self.last_used, active_requests=self.active,
            keep_alive=self.keep_alive, expires_at=self.expires_at, memory=self.estimate,
            measured_ram_bytes=self.measured.ram, measured_vram_bytes=self.measured.vram)


class Lease:
    """A request's hold on a ready runner; returned with `release`."""

    def __init__(self, release: Callable[[Runner], None], runner: Runner) -> None:
        self._release = release
        self.runner = runner
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self.runner)


def _count_release(runner: Runner) -> None:
    runner.active -= 1
    if runner.active == 0:
        runner.note_idle()


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0
    error: RunnerError | None = None


@dataclass
class SchedulerLimits:
    readiness_timeout: float = 600.0
    queue_timeout: float = 120.0
    queue_size: int = 256
    max_runners: int | None = None
    min_residency: float = 0.0
    crash_backoff: float = 5.0
    engine_idle_timeout: float = 600.0
    runner_log_max_bytes: int | None = 64 << 20
    runner_log_files: int = 3
    engine_batch_scheduling: bool = True


class Scheduler:
    def __init__(self, backends: Mapping[str, Backend], *, runtime_dir: Path, log_dir: Path | None,
                 default_keep_alive: KeepAlive, budget: Budget, limits: SchedulerLimits | None = None,
                 on_start: Sequence[Callable[[Runner], object]] = (), sampler: HostSampler | None = None) -> None:
        self.backends = backends
        self.runtime_dir = runtime_dir
        self.log_dir = log_dir
        self.default_keep_alive = default_keep_alive
        self.budget = budget
        self.limits = limits or SchedulerLimits()
        self.on_start = list(on_start)  # observers (metrics) told of every runner it starts
        # What runners hold is read from the host sampler's snapshot, never measured on the event loop.
        # One given is the daemon's (it starts and stops it); without one the scheduler has its own.
        self.sampler = sampler or HostSampler()
        self._own_sampler = sampler is None
        self.sampler.watch(self._engine_pids)
        self.evictions = 0
        self._runners: dict[RunnerKey, Runner] = {}
        # Runners replaced in `_runners` by a new one for the same key while they were still stopping:
        # they hold memory and a process until they exit.
        self._retiring: set[Runner] = set()
        self._failures: dict[RunnerKey, _Failures] = {}
        self._short_socket_dir: Path | None = None
        self._closing = False
        self._drain_since: float | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._admission = asyncio.Lock()
        self._start_guards: dict[object, tuple[StartGuard, str]] = {}
        self._waiting = 0
        self._change = asyncio.Event()

    @property
    def runner_dir(self) -> Path:
        return self.runtime_dir / "runners"

    def _instance_paths(self, key: RunnerKey, kind: EndpointKind) -> tuple[Endpoint, Path]:
        """Endpoint and pid file of a new runner. Each instance gets its own names: a model asked for again
        while its previous runner is still stopping starts a second one, and the old one removes its own
        socket and pid file when it exits, which must not be the new one's."""
        name = f"{key.slug}-{secrets.token_hex(3)}"
        endpoint = Endpoint.unix(self._socket_path(name)) if kind is EndpointKind.UNIX else \
            Endpoint.tcp(free_loopback_port())
        return endpoint, self.runner_dir / f"{name}.pid"

    def _socket_path(self, name: str) -> Path:
        path = self.runner_dir / f"{name}.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        # A deep runtime directory would overflow sun_path: fall back to a private short one.
        if self._short_socket_dir is None:
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="runnerd-"))
        return self._short_socket_dir / f"{name}.sock"

    def _all_runners(self) -> list[Runner]:
        return [*self._runners.values(), *self._retiring]

    def runner(self, key: RunnerKey) -> Runner | None:
        runner = self._runners.get(key)
        return runner if runner is not None and runner.state in (RunnerState.LOADING, RunnerState.READY) else None

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def _signal_change(self) -> None:
        """Wake loads waiting for memory: a runner went idle or exited."""
        event, self._change = self._change, asyncio.Event()
        event.set()

    async def acquire(self, key: RunnerKey, model: ModelRef, config: BackendConfiguration,
                      keep_alive: KeepAlive | Unset = UNSET, *, preload: bool = False) -> Lease:
        """Lease the runner for `key`, starting it if none is loaded or loading. A request's own
        keep-alive (Ollama semantics) replaces the runner's for when it next goes idle. A `preload`
        (load only, nothing to serve) is refused while the node drains, even for a loaded model."""
        if self._closing:
            raise RunnerError("runnerd is shutting down", reason="shutting_down")
        runner = self.runner(key)
        if self.draining and (runner is None or preload):
            self._refuse_draining(key, preload)
        started = runner is None
        if runner is None:
            runner = await self._admit(key, model, config)
        if not isinstance(keep_alive, Unset):
            runner.keep_alive = keep_alive
        runner.active += 1
        runner.pause_expiry()
        try:
            await runner.wait_loaded()
            if started:
                # The new engine's memory is read before its first answer: ps shows it from then on.
                await self.sampler.fresh()
        except BaseException:
            self._release(runner)
            raise
        return Lease(self._release, runner)

    @contextlib.contextmanager
    def refusing_starts(self, refuses: StartGuard, why: str) -> Iterator[None]:
        """While the block runs, no runner starts for which `refuses(key, config)` holds: the load gets
        StartRefused saying `why`. The check and a runner's registration happen with no await between
        them, so a runner either started before the block (`live` finds it) or does not start at all."""
        token = object()
        self._start_guards[token] = (refuses, why)
        try:
            yield
        finally:
            del self._start_guards[token]

    def _check_guards(self, key: RunnerKey, config: BackendConfiguration) -> None:
        for refuses, why in list(self._start_guards.values()):
            if refuses(key, config):
                raise StartRefused(f"{key.model} ({key.mode}) cannot start on {key.backend} now: {why}",
                                   retry_after=5)

    def live(self, matches: StartGuard) -> list[RunnerKey]:
        """The keys of runners not yet exited (loading, serving, stopping, or retiring) that match."""
        return sorted({r.key for r in self._all_runners()
                       if r.state is not RunnerState.EXITED and matches(r.key, r.config)},
                      key=lambda k: (k.backend, k.model, k.mode))

    @property
    def draining(self) -> bool:
        return self._drain_since is not None

    def _refuse_draining(self, key: RunnerKey, preload: bool = False) -> None:
        why = "takes no preload" if preload else f"loads no new model ({key.model} is not loaded here)"
        raise NodeDraining(f"this node is draining: it {why}; send the request to another node, or retry once "
                           "it is resumed", retry_after=DRAIN_RETRY_AFTER)

    def drain(self) -> DrainStatus:
        """Load nothing new from now on and stop every runner once it is idle (the idle ones now). Loads
        queued for memory are refused. Returns at once: `drain_status` tells what is left."""
        if self._drain_since is None:
            self._drain_since = time.time()
            log.info("draining: no new loads; stopping runners as they go idle")
        for runner in list(self._runners.values()):
            if runner.state is RunnerState.READY and runner.active == 0:
                self.spawn(self._stop_drained, runner)
        self._signal_change()  # queued loads wake and see the drain
        return self.drain_status()

    def resume(self) -> DrainStatus:
        """Lift a drain: loads are admitted again; runners still left go back to their keep-alive."""
        if self._drain_since is not None:
            self._drain_since = None
            log.info("resumed: loads admitted again")
            for runner in self._runners.values():
                if runner.state is RunnerState.READY and runner.active == 0:
                    self._start_keep_alive(runner)
        return self.drain_status()

    def drain_status(self) -> DrainStatus:
        live = [r for r in self._all_runners() if r.state is not RunnerState.EXITED]
        active = sum(r.active for r in live)
        return DrainStatus(draining=self.draining, since=self._drain_since, runners_left=len(live),
                           active_requests=active, drained=self.draining and not live)

    async def _stop_drained(self, runner: Runner) -> None:
        if self.draining and runner.active == 0 and runner.state is RunnerState.READY:
            log.info("draining: stopping idle model=%s mode=%s", runner.model.name, runner.key.mode)
            await runner.stop("drain")

    def _check_backoff(self, key: RunnerKey) -> None:
        failures = self._failures.get(key)
        if failures is None or failures.count < FAILURES_BEFORE_BACKOFF:
            return
        remaining = failures.until - time.monotonic()
        if remaining > 0:
            error = failures.error
            summary = error.summary if error else "it failed to start"
            tail = "\n".join(error.tail[-6:]) if error else ""
            raise HeldBack(f"{key.model} failed to start {failures.count} times in a row ({summary}); held back "
                           f"for {remaining:.0f} more s, or until it is unloaded"
                           + (f"\nlast engine output:\n{tail}" if tail else ""), retry_after=remaining)

    async def _admit(self, key: RunnerKey, model: ModelRef, config: BackendConfiguration) -> Runner:
        """Start a runner once its estimate fits, evicting idle runners or waiting as needed.

        The queue timeout runs from now, not from when this load gets its turn: loads queue behind one
        another for the admission lock, and no request may wait longer than the timeout in all."""
        deadline = time.monotonic() + self.limits.queue_timeout
        # Answers that waiting cannot change come first, without a queue slot or a turn.
        self._check_guards(key, config)
        self._check_backoff(key)
        backend = self.backends[key.backend]
        estimate = await asyncio.to_thread(backend.required_memory, model, key.mode, config)
        need = needed(estimate)
        await self.sampler.current()  # the host's totals, read once (the daemon's sampler has read them)
        self._check_capacity(key, need)
        existing = self.runner(key)  # another request may have started it while we estimated
        if existing is not None:
            return existing
        if self._waiting >= self.limits.queue_size:
            raise QueueTimeout(f"{self._waiting} loads are already waiting for memory; try again later",
                               retry_after=5)
        self._waiting += 1
        try:
            await self._take_turn(key, deadline)
            try:
                existing = self.runner(key)  # another request may have started it while we queued
                if existing is not None:
                    return existing
                self._check_backoff(key)  # its earlier loads may have failed while we queued
                await self._make_room(key, need, deadline)
                return self._start(key, backend, model, config, estimate)
            finally:
                self._admission.release()
        finally:
            self._waiting -= 1

    def _check_capacity(self, key: RunnerKey, need: Amount) -> None:
        if not need.fits_in(self.budget.capacity()):
            raise DoesNotFit(f"{key.model} {self.budget.explain_capacity(need)}")

    async def _take_turn(self, key: RunnerKey, deadline: float) -> None:
        """Take the admission lock (fair: first come, first served) or fail at the deadline."""
        try:
            # An uncontended lock is taken without suspending, so even a passed deadline does not fire.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._admission.acquire()
        except TimeoutError:
            raise QueueTimeout(f"{key.model} waited {self.limits.queue_timeout:g} s behind {self._waiting - 1} "
                               f"other loads waiting for memory", retry_after=self._retry_after()) from None

    def _retry_after(self) -> float:
        return max(1.0, self.limits.queue_timeout / 4)

    def _engine_pids(self) -> list[int]:
        """Roots of the process trees the sampler measures: every engine process still running."""
        return [r.output.pid for r in self._all_runners()
                if r.output.pid is not None and r.state is not RunnerState.EXITED]

    def _measure(self) -> None:
        """Each runner's measurement from the sampler's latest snapshot (cheap: no psutil, no NVML)."""
        snapshot = self.sampler.snapshot
        for runner in self._all_runners():
            runner.measure(snapshot)

    def _holdings(self) -> list[Holding]:
        self._measure()
        return [r.holding() for r in self._all_runners() if r.state is not RunnerState.EXITED]

    def _too_many(self) -> bool:
        cap = self.limits.max_runners
        return cap is not None and sum(r.state is not RunnerState.EXITED for r in self._all_runners()) >= cap

    async def _make_room(self, key: RunnerKey, need: Amount, deadline: float) -> None:
        self._check_capacity(key, need)  # the limits could have been lowered while this load queued
        while True:
            if self.draining:  # the drain began while this load queued
                self._refuse_draining(key)
            change = self._change
            # Never admit on an old view: a reading of the host (free GPU memory, what runners hold) begun now.
            await self.sampler.fresh()
            room = await asyncio.to_thread(self.budget.room, self._holdings())
            if need.fits_in(room) and not self._too_many():
                return
            victims = sorted((r for r in self._runners.values() if r.evictable(self.limits.min_residency)),
                             key=lambda r: r.last_used)
            if victims:
                victim = victims[0]
                log.info("evicting model=%s mode=%s to make room for %s (needs %s, room %s)", victim.model.name,
                         victim.key.mode, key.model, need.describe(), room.describe())
                self.evictions += 1
                await victim.stop("memory")
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                busy = ", ".join(f"{r.model.name} ({r.active} in flight)" for r in self._runners.values())
                short = need.shortfall(room) or "does not fit"
                raise QueueTimeout(f"{key.model} {short}, and no runner went idle within "
                                   f"{self.limits.queue_timeout:g} s (needs {need.describe()}, free "
                                   f"{room.describe()}); busy: {busy or '-'}", retry_after=self._retry_after())
            with contextlib.suppress(TimeoutError):
                # Runners also go idle by timers; re-check now and then even without a signal.
                await asyncio.wait_for(change.wait(), min(remaining, 1.0))

    def _start(self, key: RunnerKey, backend: Backend, model: ModelRef, config: BackendConfiguration,
               estimate: MemoryEstimate) -> Runner:
        self._check_guards(key, config)  # a removal may have begun while this load waited for its turn
        keep_alive = self.default_keep_alive if config.keep_alive is None else parse_keep_alive(config.keep_alive)
        log_path = key.log_path(self.log_dir) if self.log_dir else None
        self.runner_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        launch = backend.launch_for(config)  # the version the configuration pins decides how it listens
        endpoint, pid_path = self._instance_paths(key, launch.endpoint_kind)
        runner = Runner(key, backend, model, config, endpoint, log_path, pid_path, keep_alive, estimate,
                        self.spawn, self.limits.engine_idle_timeout, self._release, launch.readiness_path)
        runner.output.log_max_bytes = self.limits.runner_log_max_bytes
        runner.output.log_files = self.limits.runner_log_files
        runner.output.batch_scheduling = self.limits.engine_batch_scheduling
        previous = self._runners.get(key)
        if previous is not None and previous.state is not RunnerState.EXITED:
            log.info("previous runner of model=%s mode=%s still stopping (pid=%s); starting another beside it",
                     model.name, key.mode, previous.output.pid)
            self._retiring.add(previous)  # its memory and process are counted until it exits
        self._runners[key] = runner
        log.info("runner starting model=%s mode=%s backend=%s estimate=%s", model.name, key.mode, key.backend,
                 needed(estimate).describe() if estimate.known else "unknown")
        runner.start(launch.readiness_timeout or self.limits.readiness_timeout)
        self.spawn(self._follow, runner)
        for observer in self.on_start:
            observer(runner)
        return runner

    async def _follow(self, runner: Runner) -> None:
        """Count start failures for the back-off, measure a runner that loaded, then forget the runner
        once it exits."""
        with contextlib.suppress(RunnerError, asyncio.CancelledError):
            await runner.wait_loaded()
        self._record_start(runner)
        if runner.loaded_ok:
            # Read the new engine now rather than at the sampler's next tick: ps() after a load shows it.
            with contextlib.suppress(Exception):
                await self.sampler.fresh()
        await runner.wait_exited()
        if self._runners.get(runner.key) is runner:
            del self._runners[runner.key]
        self._retiring.discard(runner)
        self._signal_change()

    def _record_start(self, runner: Runner) -> None:
        if runner.loaded_ok:
            self._failures.pop(runner.key, None)
            return
        if runner.stop_requested:
            return  # stopped on purpose, not a crash
        failures = self._failures.setdefault(runner.key, _Failures())
        failures.count += 1
        failures.error = runner.error
        if failures.count >= FAILURES_BEFORE_BACKOFF:
            delay = min(self.limits.crash_backoff * 2 ** (failures.count - FAILURES_BEFORE_BACKOFF),
                        MAX_BACKOFF_SECONDS)
            failures.until = time.monotonic() + delay
            log.warning("holding back model=%s mode=%s for %.0f s after %d failed starts", runner.model.name,
                        runner.key.mode, delay, failures.count)

    def _release(self, runner: Runner) -> None:
        runner.active -= 1
        runner.last_used = time.time()
        if runner.active > 0:
            return
        runner.note_idle()
        if runner.unloading:
            # An unload is draining it: stop it now rather than at the unload's timeout.
            self.spawn(runner.stop, runner.stop_reason or "unload")
            return
        if runner.state is RunnerState.LOADING:
            # Every client waiting for this load hung up: nobody wants it any more.
            log.info("cancelling load of model=%s: no one is waiting", runner.model.name)
            self.spawn(runner.stop, "abandoned")
            return
        if runner.state is not RunnerState.READY:
            return
        self._signal_change()
        if self.draining:
            self.spawn(self._stop_drained, runner)
            return
        self._start_keep_alive(runner)

    def _start_keep_alive(self, runner: Runner) -> None:
        keep_alive = runner.keep_alive
        if keep_alive is None:
            return
        if keep_alive == 0:
            self.spawn(self._expire, runner)
        else:
            runner.set_expiry(keep_alive, lambda: self._expire(runner))

    async def _expire(self, runner: Runner) -> None:
        if runner.active == 0 and runner.state is RunnerState.READY:
            log.info("runner idle, stopping model=%s mode=%s", runner.model.name, runner.key.mode)
            await runner.stop("idle")

    async def unload(self, *, backend: str | None = None, models: list[str] | None = None,
                     keys: Collection[RunnerKey] | None = None, reason: str = "unload") -> list[RunnerInfo]:
        """Stop the runners that match (all when none is given) at once and lift their back-off."""
        return (await self.unload_draining(backend=backend, models=models, keys=keys, reason=reason,
                                           timeout=0)).runners

    async def unload_draining(self, *, backend: str | None = None, models: list[str] | None = None,
                              keys: Collection[RunnerKey] | None = None, reason: str = "unload",
                              timeout: float) -> UnloadOutcome:
        """Stop the runners that match (all when neither is given) and lift their back-off, letting the
        requests in flight on a loaded runner end first, for at most `timeout` s; those still in flight
        then are cut. A runner still loading is stopped at once (its waiting requests are cut). The
        drain goes on if the caller stops waiting for it."""

        def matches(key: RunnerKey) -> bool:
            return (backend is None or key.backend == backend) and (models is None or key.model in models) \
                and (keys is None or key in keys)

        for key in [k for k in self._failures if matches(k)]:
            del self._failures[key]
        chosen = [r for r in self._all_runners() if matches(r.key)]
        infos = [r.info() for r in chosen]
        in_flight = sum(r.active for r in chosen if r.state is not RunnerState.EXITED)
        # Loaded runners drain, and those an earlier unload drains go on draining; one still loading has
        # no answer under way to wait for.
        draining = [r for r in chosen if r.state is RunnerState.READY or r.unloading]
        if timeout <= 0 or not draining:
            cut = await self._cut(chosen, reason)
        else:
            for runner in draining:
                runner.begin_unload(reason)
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.spawn(self._drain_then_stop, chosen, draining, reason, timeout, done)
            cut = await asyncio.shield(done)
        return UnloadOutcome(runners=infos, drained=in_flight - cut, cut=cut)

    async def _drain_then_stop(self, chosen: list[Runner], draining: list[Runner], reason: str, timeout: float,
                               done: asyncio.Future[int]) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(r.wait_idle() for r in draining))
            cut = await self._cut(chosen, reason)
        except asyncio.CancelledError:
            done.cancel()  # the scheduler shuts down: its own stop ends these runners
            raise
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
                done.exception()  # mark retrieved: the caller may have stopped waiting
            raise
        if not done.done():
            done.set_result(cut)

    async def _cut(self, runners: list[Runner], reason: str) -> int:
        """Stop the runners now; how many requests were still in flight on them."""
        cut = sum(r.active for r in runners if r.state is not RunnerState.EXITED)
        if cut:
            log.info("unload: stopping %d runner(s) with %d request(s) still in flight", len(runners), cut)
        await asyncio.gather(*(r.stop(reason) for r in runners))
        return cut

    def models_in_use(self) -> set[str]:
        """Models some live runner loads: its own, and a speculative draft model it was started with."""
        used: set[str] = set()
        for runner in self._all_runners():
            if runner.state is RunnerState.EXITED:
                continue
            used.add(runner.key.model)
            if runner.config.speculative is not None:
                used.add(runner.config.speculative.draft_model)
        return used

    def ps(self) -> list[RunnerInfo]:
        self._measure()
        return [r.info() for r in self._all_runners()]

    def spawn(self, work: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run `work(*args)` in the background, owned by the scheduler: shutdown cancels and awaits what
        is left of it, so nothing outlives the scheduler or is dropped half-done."""
        if self._tasks is None:
            raise RuntimeError("the scheduler is not running: use `async with scheduler.running()`")
        self._tasks.start_soon(_logged_failures, work, *args)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Scheduler]:
        """The scheduler's lifetime: its background work runs in a task group that ends, after every runner
        is stopped, when the block does."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tasks.cancel_scope.cancel()
        self._tasks = None

    async def shutdown(self) -> None:
        self._closing = True
        await self.unload(reason="shutdown")
        if self._own_sampler:
            await self.sampler.stop()
