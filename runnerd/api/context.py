"""What every route handler can reach: the daemon's parts, stored on the application."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from backends.base import Backend
from runnerd.api.errors import ApiError
from runnerd.config import Settings
from runnerd.configs import ConfigStore
from runnerd.jobs import JobManager
from runnerd.metrics import Metrics
from runnerd.scheduler import Scheduler
from runnerd.sources import Sources
from runnerd.store import ModelStore


@dataclass
class Daemon:
    settings: Settings
    store: ModelStore
    scheduler: Scheduler
    backends: Mapping[str, Backend]
    configs: ConfigStore
    started_at: float = field(default_factory=time.time)
    jobs: JobManager = field(default_factory=JobManager)
    metrics: Metrics = field(default_factory=Metrics)
    sources: Sources = field(default_factory=Sources.none)

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(sorted(self.backends))
            raise ApiError(404, f"unknown backend {name!r}; known backends: {known}", code="backend_not_found",
                           param="backend") from None


DAEMON = web.AppKey("daemon", Daemon)


def daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


def over_unix_socket(request: web.Request) -> bool:
    """Whether the request came through the local unix socket (not TCP)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX
