"""The aiohttp application, its listeners, and the daemon's life from start to graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from backends.base import Backend, ModelRef
from runnerd import __version__, catalog_feed, node_labels
from runnerd.admission import Budget
from runnerd.api import anthropic, configure, engines, models, ollama, responses
from runnerd.api import backends as backend_routes
from runnerd.api import jobs as job_routes
from runnerd.api import metrics as metrics_routes
from runnerd.api import node as node_routes
from runnerd.api import ready as ready_routes
from runnerd.api.auth import KEYRING, LIMITER
from runnerd.api.context import DAEMON, Daemon
from runnerd.api.middleware import on_response_prepare, request_middleware
from runnerd.audit import AUDIT, AuditLog
from runnerd.config import ConfigError, Settings, parse_listen
from runnerd.configs import ConfigStore
from runnerd.durations import parse_keep_alive
from runnerd.engines import EngineRegistryError, as_host_gpus, default_backends, upstream_endpoints
from runnerd.limits import Limiter
from runnerd.loop_turns import TURNS, Turns
from runnerd.metrics import LoopLagMonitor, Metrics, RunnerWatcher
from runnerd.pidfiles import clean_up_previous_runners
from runnerd.runner_logs import remove_model_logs
from runnerd.sampler import HostSampler
from runnerd.scheduler import RunnerState, Scheduler, SchedulerLimits
from runnerd.sources import Sources
from runnerd.store import ModelNotFound, ModelStore
from runnerd.systemd import Notifier, SocketActivationError, listen_fds
from runnerd.tcp_door import DoorLimits, DoorSite, fd_room, raise_fd_limit
from runnerd.tokens import Keyring, TokenError, load_token

log = logging.getLogger("runnerd")


class ListenerError(Exception):
    pass


async def root(request: web.Request) -> web.Response:
    return web.Response(text="runnerd is running\n")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _model_ref(store: ModelStore, name: str) -> ModelRef | None:
    try:
        return store.get(name).ref()
    except ModelNotFound:
        return None


class HeldOpen:
    """An async context held open in a task of its own from `start` to `stop`: aiohttp runs startup and
    cleanup in different tasks, and a task group must be entered and left by one task."""

    def __init__(self, context: Callable[[], AbstractAsyncContextManager[object]]) -> None:
        self._context = context
        self._entered = asyncio.Event()
        self._leave = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _hold(self) -> None:
        async with self._context():
            self._entered.set()
            await self._leave.wait()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._hold(), name="held open")
        entered = asyncio.create_task(self._entered.wait())
        await asyncio.wait({self._task, entered}, return_when=asyncio.FIRST_COMPLETED)
        entered.cancel()
        if self._task.done():
            self._task.result()  # it failed to enter: raise why

    async def stop(self) -> None:
        self._leave.set()
        if self._task is not None:
            await self._task


def create_app(settings: Settings, backends: Mapping[str, Backend] | None = None) -> web.Application:
    # One reading of the host (RAM, GPUs, the runners' process trees) every second, off the event loop:
    # admission, ps, /node, /metrics, the service status and the engines' estimates read its snapshot.
    sampler = HostSampler()
    if backends is None:
        backends = default_backends(settings, gpus=lambda: as_host_gpus(sampler.snapshot.gpus))
    metrics = Metrics()
    limits = SchedulerLimits(readiness_timeout=settings.readiness_timeout, queue_timeout=settings.queue_timeout,
                             queue_size=settings.queue_size, max_runners=settings.max_runners,
                             min_residency=settings.min_residency, crash_backoff=settings.crash_backoff,
                             engine_idle_timeout=settings.engine_idle_timeout,
                             runner_log_max_bytes=settings.runner_log_max_bytes,
                             runner_log_files=settings.runner_log_files,
                             engine_batch_scheduling=settings.engine_cpu_policy == "batch")
    scheduler = Scheduler(backends, runtime_dir=settings.runtime_dir, log_dir=settings.runner_log_dir,
                          default_keep_alive=parse_keep_alive(settings.keep_alive),
                          budget=Budget(settings.memory, sampler.host_memory), limits=limits,
                          on_start=[RunnerWatcher(metrics)], sampler=sampler)
    loop_lag = LoopLagMonitor(metrics)
    metrics.observe_scheduler(scheduler)
    # One middleware: metrics, CORS, authentication and error answers, in that order (see its module).
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[request_middleware])
    # "In use" for the store = some runner (loading, ready or idle) holds the model, or drafts with it.
    # A removed model's runner logs go with it (they are kept after a runner exits, for reading a crash).
    store = ModelStore(settings.data_dir, settings.store, settings.huggingface,
                       in_use=lambda name: name in scheduler.models_in_use(),
                       on_removed=lambda name: remove_model_logs(settings.runner_log_dir, backends, name))
    # Stored configurations name a speculative draft model; only the store knows where it lives today.
    configs = ConfigStore(settings.data_dir, resolve_model=lambda name: _model_ref(store, name))
    app[LIMITER] = Limiter()
    audit = app[AUDIT] = AuditLog(settings.audit_path, settings.audit.max_bytes, settings.audit.backups)
    try:
        sources = Sources(upstream_endpoints(settings), settings.aliases, settings.routing)
    except EngineRegistryError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
    app[TURNS] = Turns()
    app[DAEMON] = Daemon(settings=settings, store=store, scheduler=scheduler,
                         backends=backends, configs=configs, metrics=metrics, sources=sources)
    app.router.add_get("/", root)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    ready_routes.add_routes(app)
    configure.add_routes(app)
    engines.add_routes(app)
    models.add_routes(app)
    backend_routes.add_routes(app)
    job_routes.add_routes(app)
    node_routes.add_routes(app)
    metrics_routes.add_routes(app)
    ollama.add_routes(app)
    anthropic.add_routes(app)
    responses.add_routes(app)
    app.on_response_prepare.append(on_response_prepare)

    scheduling = HeldOpen(scheduler.running)

    async def start_sampling(app: web.Application) -> None:
        await asyncio.to_thread(audit.start)
        loop_lag.start()
        await sampler.start()  # the first reading is taken before any request is served
        await scheduling.start()
        sources.start()  # upstreams: discovery only; runnerd never starts, loads or unloads them

    async def stop_runners(app: web.Application) -> None:
        await scheduling.stop()  # every runner stopped, every background task of the scheduler done

    async def stop_sampling(app: web.Application) -> None:
        await sampler.stop()
        await loop_lag.stop()

    async def stop_upstreams(app: web.Application) -> None:
        await sources.close()

    async def stop_imports(app: web.Application) -> None:
        await asyncio.to_thread(store.close)  # a cancelled import stops at its next file or chunk

    async def stop_audit(app: web.Application) -> None:
        await asyncio.to_thread(audit.stop)  # the lines still queued are written first

    app.on_startup.append(start_sampling)
    # on_cleanup runs after in-flight requests have drained (or the drain timeout passed).
    app.on_cleanup.append(stop_runners)
    app.on_cleanup.append(stop_sampling)
    app.on_cleanup.append(stop_imports)
    app.on_cleanup.append(stop_audit)
    app.on_cleanup.append(stop_upstreams)
    # [node] labels_file: the node's labels for Kubernetes (NFD), from the sampler's readings.
    node_labels.keep_labels_file(app, settings.node, backends, sampler)
    catalog_feed.keep_catalog_feed(app, settings)  # catalog_url: fetched at start and on an interval
    return app


# Connections waiting to be accepted: a thousand clients that connect at once must not find the queue
# full (a unix socket's connect then fails with EAGAIN). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The daemon's event loop, from RUNNERD_EVENT_LOOP: uvloop's (the default) where it is installed, or
    asyncio's. Raises ConfigError for any other value."""
    choice = os.environ.get("RUNNERD_EVENT_LOOP", "uvloop").strip().lower() or "uvloop"
    if choice not in EVENT_LOOPS:
        raise ConfigError(f"RUNNERD_EVENT_LOOP={os.environ['RUNNERD_EVENT_LOOP']!r}: expected one of "
                          f"{', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; the daemon runs on asyncio's event loop")
        return None
    return uvloop.new_event_loop


def _socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def bind_unix_socket(path: Path, mode: int = 0o660) -> socket.socket:
    """Bind the daemon's socket: replace a stale one, refuse a live one or a non-socket file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if not stat.S_ISSOCK(info.st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_in_use(path):
            raise ListenerError(f"another daemon is already listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask keeps the socket closed to others between bind() and chmod().
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


@dataclass
class Listener:
    sock: socket.socket
    address: str  # for logs and the service status: unix:/path or tcp:host:port
    tcp: bool
    owned_path: Path | None = None  # a socket file we created, so ours to remove at exit
    fd_name: str | None = None  # the name systemd passed it under (FileDescriptorName=)

    def describe(self) -> str:
        passed = f" (passed by systemd as {self.fd_name!r})" if self.fd_name is not None else ""
        return self.address + passed + (" (bearer token required)" if self.tcp else "")


def bind_tcp_socket(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ListenerError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock.listen(256)
    sock.setblocking(False)
    return sock


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode(errors='replace') if isinstance(name, bytes) else name}"
    host, port = name[0], name[1]
    return f"tcp:[{host}]:{port}" if sock.family == socket.AF_INET6 else f"tcp:{host}:{port}"


def _adopt(sock: socket.socket, name: str) -> Listener:
    """A socket systemd passed: a listening stream socket, unix (trusted) or TCP (token required)."""
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ListenerError(f"the socket systemd passed as {name!r} is not a listening stream socket")
    if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        raise ListenerError(f"the socket systemd passed as {name!r} is of an unsupported family {sock.family!r}")
    sock.setblocking(False)
    return Listener(sock, _address(sock), tcp=sock.family != socket.AF_UNIX, fd_name=name)


def open_listeners(settings: Settings) -> list[Listener]:
    """Sockets passed by systemd when there are any, else our own: the unix socket always, TCP when
    `[http] listen` is set. A kind of socket systemd passed replaces the one we would bind."""
    try:
        listeners = [_adopt(s.sock, s.name) for s in listen_fds()]
    except SocketActivationError as exc:
        raise ListenerError(str(exc)) from exc
    try:
        if not any(not lst.tcp for lst in listeners):
            sock = bind_unix_socket(settings.socket_path)
            listeners.append(Listener(sock, f"unix:{settings.socket_path}", tcp=False,
                                      owned_path=settings.socket_path))
        if settings.http.listen and any(lst.tcp for lst in listeners):
            log.info("not binding %s: systemd passed the TCP socket to use", settings.http.listen)
        elif settings.http.listen:
            sock = bind_tcp_socket(settings.http.listen)
            listeners.append(Listener(sock, _address(sock), tcp=True))
    except BaseException:
        close_listeners(listeners)
        raise
    return listeners


def close_listeners(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.sock.close()
        if listener.owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                listener.owned_path.unlink()


def tcp_keyring(settings: Settings, listeners: list[Listener]) -> Keyring | None:
    """The tokens TCP callers may present, when anything listens on TCP; refusing to start without any."""
    tcp = [lst.address for lst in listeners if lst.tcp]
    if not tcp:
        return None
    http = settings.http
    if http.token_file is None and http.tokens_file is None:
        raise ListenerError(f"refusing to listen on {', '.join(tcp)} without a bearer token: set token_file or "
                            "tokens_file in the [http] table of the config file (or RUNNERD_HTTP__TOKEN_FILE, or "
                            "--token-file)")
    try:
        legacy = load_token(http.token_file) if http.token_file is not None else None
        return Keyring(legacy, http.tokens_file)
    except TokenError as exc:
        raise ListenerError(f"refusing to listen on {', '.join(tcp)}: {exc}") from exc


async def watch_tokens(keyring: Keyring, interval: float, wake: asyncio.Event) -> None:
    """Reload the tokens file when it changes (checked every `interval` s) or when `wake` is set (SIGHUP).
    The stat and the read run in a thread: the file may sit on a slow or remote disk."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        if wake.is_set():
            wake.clear()
            await asyncio.to_thread(keyring.reload)
        elif await asyncio.to_thread(keyring.changed):
            await asyncio.to_thread(keyring.reload)


def door_limits(settings: Settings, fd_limit: int) -> DoorLimits:
    """The TCP listener's caps, the global one lowered to what the open-file limit leaves."""
    http = settings.http
    room = fd_room(fd_limit, http.fd_reserve)
    if room < 1:
        raise ListenerError(f"the open-file limit ({fd_limit}) leaves no room for TCP connections after fd_reserve "
                            f"({http.fd_reserve}): raise LimitNOFILE (ulimit -n) or lower [http] fd_reserve")
    if http.max_connections > room:
        log.warning("TCP connections capped at %d, not %d: the open-file limit is %d and %d are kept back "
                    "([http] fd_reserve)", room, http.max_connections, fd_limit, http.fd_reserve)
    return DoorLimits(max_connections=min(http.max_connections, room),
                      max_connections_per_peer=http.max_connections_per_peer, header_timeout=http.header_timeout)


def status_line(app: web.Application) -> str:
    """One line for `systemctl status`."""
    d = app[DAEMON]
    runners = d.scheduler.ps()
    ready = sum(1 for r in runners if r.state in (RunnerState.READY, RunnerState.IDLE))
    loading = sum(1 for r in runners if r.state is RunnerState.LOADING)
    jobs = sum(1 for j in d.jobs.list() if not j.done)
    draining = "draining: " if d.scheduler.draining else ""
    return f"{draining}{ready} runner(s) ready, {loading} loading, {jobs} job(s) running"


async def serve(settings: Settings, app: web.Application | None = None,
                ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT, then stop accepting, stop every runner and clean up."""
    app = app or create_app(settings)
    notifier = Notifier.from_environment()
    before, fd_limit = raise_fd_limit()
    if fd_limit != before:
        log.info("open-file limit raised from %d to %d", before, fd_limit)
    listeners = open_listeners(settings)
    try:
        if (keyring := tcp_keyring(settings, listeners)) is not None:
            app[KEYRING] = keyring
            audit = app[AUDIT]
            keyring.on_reload.append(lambda error: audit.record(
                token=None, remote=None, action="reload tokens", target=str(keyring.tokens_file),
                result="ok" if error is None else f"refused: {error}"))
        limits = door_limits(settings, fd_limit) if any(lst.tcp for lst in listeners) else None
        # Only now, holding the socket: a second daemon refused above must not touch the first one's runners.
        clean_up_previous_runners(app[DAEMON].scheduler.runner_dir, settings.stop_grace)
    except BaseException:
        close_listeners(listeners)
        raise
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.drain_timeout,
                           keepalive_timeout=settings.http.keepalive_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log.info("event loop: %s", "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reload_tokens = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_tokens.set)
    token_watcher: asyncio.Task[None] | None = None
    if keyring is not None and keyring.tokens_file is not None:
        token_watcher = asyncio.create_task(watch_tokens(keyring, settings.http.tokens_poll_interval, reload_tokens),
                                            name="tokens file watcher")
    watchdog: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        for listener in listeners:
            # Both through a door of runnerd's own (the same accept on either event loop); TCP's is counted
            # and has a header deadline, the unix socket is trusted and uncounted.
            await DoorSite(runner, listener.sock, limits if listener.tcp else None).start()
            log.info("listening on %s", listener.describe())
        notifier.ready(f"listening on {', '.join(lst.address for lst in listeners)}")
        watchdog = asyncio.create_task(notifier.run(lambda: status_line(app)), name="systemd watchdog")
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping: no new connections, stopping runners")
        notifier.stopping("stopping: draining requests, stopping runners")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if token_watcher is not None:
            token_watcher.cancel()
        # The watchdog keeps pinging while requests drain and runners stop: that is still progress.
        await runner.cleanup()
        if watchdog is not None:
            watchdog.cancel()
        close_listeners(listeners)
        log.info("stopped")
