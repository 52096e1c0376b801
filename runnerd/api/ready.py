"""GET /ready: whether this node can take work now (readiness), where GET /health says only that the
daemon answers (liveness).

Ready means: not draining, at least one engine installed, and the model store readable. Asking an
engine for its status may run its `--version`, so that check and the store's run off the event loop and
their answer is kept for a few seconds: probes every second cost one check per period. The drain is
read live: a drain shows at the next probe. Both probes are open over TCP without a token (auth.py); the
reasons name no path, only what is wrong.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from backends.base import Backend
from runnerd.api.context import Daemon, daemon

CHECK_TTL = 5.0  # seconds a check of the engines and the store is reused


def _readable(path: Path) -> bool:
    """Whether the directory can be listed (a read, not a permission guess: a dead mount fails here).
    One that does not exist yet is an empty store (the daemon creates it at the first registration)."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _host_reasons(backends: Mapping[str, Backend], data_dir: Path, store_root: Path) -> list[str]:
    """What keeps the node from taking work besides a drain (blocking: engines' status, the disk)."""
    reasons: list[str] = []
    statuses = {name: backend.status() for name, backend in backends.items()}
    if not any(status.installed for status in statuses.values()):
        states = ", ".join(f"{name}: {status.state.value}" for name, status in statuses.items())
        reasons.append(f"no engine installed ({states or 'no engine registered'})")
    if not _readable(data_dir) or not _readable(store_root):
        reasons.append("model store not readable")
    return reasons


@dataclass
class _Checked:
    reasons: list[str]
    at: float


class ReadinessCheck:
    """The engines-and-store check, run once per `ttl` however many probes ask (concurrent probes share
    one run)."""

    def __init__(self, ttl: float = CHECK_TTL) -> None:
        self.ttl = ttl
        self._last: _Checked | None = None
        self._lock = asyncio.Lock()

    async def reasons(self, d: Daemon) -> list[str]:
        async with self._lock:
            if self._last is None or time.monotonic() - self._last.at >= self.ttl:
                found = await asyncio.to_thread(_host_reasons, d.backends, d.settings.data_dir, d.store.root)
                self._last = _Checked(found, time.monotonic())
            return list(self._last.reasons)


READINESS = web.AppKey("readiness", ReadinessCheck)


async def ready(request: web.Request) -> web.Response:
    d = daemon(request)
    reasons = []
    if d.scheduler.draining:
        reasons.append("draining: the node loads no new model (POST /node/resume lifts it)")
    reasons += await request.app[READINESS].reasons(d)
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    return web.json_response({"ready": True})


def add_routes(app: web.Application) -> None:
    app[READINESS] = ReadinessCheck()
    app.router.add_get("/ready", ready)
