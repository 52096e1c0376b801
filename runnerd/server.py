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
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from backends.base import Backend
from runnerd import __version__
from runnerd.api import configure, engines, models
from runnerd.api.context import DAEMON, Daemon
from runnerd.api.errors import error_middleware
from runnerd.config import Settings
from runnerd.configs import ConfigStore
from runnerd.durations import parse_keep_alive
from runnerd.engines import default_backends
from runnerd.scheduler import Scheduler
from runnerd.store import ModelStore

log = logging.getLogger("runnerd")


class ListenerError(Exception):
    pass


async def root(request: web.Request) -> web.Response:
    return web.Response(text="runnerd is running\n")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(settings: Settings, backends: Mapping[str, Backend] | None = None) -> web.Application:
    backends = dict(backends) if backends is not None else default_backends(settings)
    scheduler = Scheduler(backends, runtime_dir=settings.runtime_dir, log_dir=settings.runner_log_dir,
                          readiness_timeout=settings.readiness_timeout,
                          default_keep_alive=parse_keep_alive(settings.keep_alive))
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[DAEMON] = Daemon(settings=settings, store=ModelStore(settings.data_dir), scheduler=scheduler,
                         backends=backends, configs=ConfigStore(settings.data_dir))
    app.router.add_get("/", root)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    configure.add_routes(app)
    engines.add_routes(app)
    models.add_routes(app)

    async def stop_runners(app: web.Application) -> None:
        await app[DAEMON].scheduler.shutdown()

    # on_cleanup runs after in-flight requests have drained (or the drain timeout passed).
    app.on_cleanup.append(stop_runners)
    return app


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
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def serve(settings: Settings, app: web.Application | None = None,
                ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT, then stop accepting, stop every runner and clean up."""
    app = app or create_app(settings)
    sock = bind_unix_socket(settings.socket_path)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.drain_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        log.info("listening on unix:%s", settings.socket_path)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping: no new connections, stopping runners")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            settings.socket_path.unlink()
        log.info("stopped")
