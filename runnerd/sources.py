"""Where a model can be served: the daemon's own engines ("local") and the upstreams.

Upstreams are polled in parallel, at start and on an interval, for their model lists and health; a
request's candidates are the sources hosting its model in priority order (local first unless the
routing settings say otherwise), or an alias's configured list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from backends.external import ExternalEndpoint
from runnerd.config import LOCAL_SOURCE, AliasTarget, RoutingSettings
from runnerd.engines import VIA_UPSTREAM_HEADER

log = logging.getLogger("runnerd.sources")


@dataclass(frozen=True)
class Candidate:
    source: str  # LOCAL_SOURCE or an upstream's name
    model: str  # the model's name at that source
    endpoint: ExternalEndpoint | None = None  # None for local


def from_upstream(request: web.Request) -> bool:
    """Whether another runnerd sent this request as its upstream: then only local models count."""
    return VIA_UPSTREAM_HEADER in request.headers


class Sources:
    def __init__(self, endpoints: Mapping[str, ExternalEndpoint], aliases: Mapping[str, list[AliasTarget]],
                 routing: RoutingSettings) -> None:
        self.endpoints = dict(endpoints)  # priority order
        self.aliases = dict(aliases)
        self.routing = routing
        self._poller: asyncio.Task[None] | None = None
        self._first_round = asyncio.Event()

    @classmethod
    def none(cls) -> Sources:
        return cls({}, {}, RoutingSettings())

    @property
    def active(self) -> bool:
        return bool(self.endpoints or self.aliases)

    async def poll(self) -> None:
        """Poll every upstream at once; each keeps its own result (a dead one only empties its own list)."""
        await asyncio.gather(*(e.poll() for e in self.endpoints.values()))
        for endpoint in self.endpoints.values():
            if endpoint.discovery.error:
                log.info("upstream %s: %s", endpoint.name, endpoint.discovery.error)

    async def _poll_forever(self) -> None:
        while True:
            await self.poll()
            self._first_round.set()
            await asyncio.sleep(self.routing.discovery_interval)

    def start(self) -> None:
        if self.endpoints and self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(), name="upstream discovery")

    async def discovered(self) -> None:
        """Return once the first poll of every upstream has ended, or when it cannot end any more within
        the discovery timeouts (a round is a health check then a list, each bounded by its timeout): until
        then the upstreams' models are unknown, and a listing or a request would miss them."""
        if self._first_round.is_set() or not self.endpoints:
            return
        # A second past the slowest possible round, so a poll that ends at its own bound still counts.
        bound = max(2 * e.spec.discovery_timeout for e in self.endpoints.values()) + 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await self._first_round.wait()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.gather(*(e.close() for e in self.endpoints.values()))

    def external_models(self) -> dict[str, str]:
        """Each model an upstream hosts -> the first upstream (by priority) hosting it."""
        hosted: dict[str, str] = {}
        for endpoint in self.endpoints.values():
            for model in endpoint.discovery.models:
                hosted.setdefault(model, endpoint.name)
        return hosted

    def is_alias(self, name: str) -> bool:
        return name in self.aliases

    async def candidates_when_known(self, name: str, local_has: bool) -> list[Candidate]:
        """`candidates`, after the first poll when it could change them: a local model routed local-first
        is served here whatever the upstreams host, and needs no wait."""
        if not (local_has and self.routing.local_first) and name not in self.aliases:
            await self.discovered()
        return self.candidates(name, local_has)

    def candidates(self, name: str, local_has: bool) -> list[Candidate]:
        """The sources to try for `name`, in order; an alias's candidates as configured (an upstream not
        hosting the model at its last poll is still tried: its list may be stale)."""
        if name in self.aliases:
            return [Candidate(t.source, t.model, self.endpoints.get(t.source)) for t in self.aliases[name]]
        upstream = [Candidate(e.name, hosted, e) for e in self.endpoints.values()
                    if (hosted := _hosted_as(name, e.discovery.models)) is not None]
        local = [Candidate(LOCAL_SOURCE, name)] if local_has else []
        return local + upstream if self.routing.local_first else upstream + local

    def status(self) -> dict[str, dict[str, Any]]:
        return {e.name: {"kind": e.spec.kind, "base_url": e.spec.base_url, "priority": e.spec.priority,
                         "healthy": e.discovery.healthy, "models": list(e.discovery.models),
                         "error": e.discovery.error, "checked_at": e.discovery.checked_at,
                         "capabilities": sorted(e.capabilities)}
                for e in self.endpoints.values()}


def _hosted_as(name: str, models: tuple[str, ...]) -> str | None:
    """The name a source hosts `name` under: itself, or with the default tag (`x` -> `x:latest`), as the
    store resolves names."""
    if name in models:
        return name
    if ":" not in name.rsplit("/", 1)[-1] and (tagged := f"{name}:latest") in models:
        return tagged
    return None
