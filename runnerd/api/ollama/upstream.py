"""Ollama chat and generate answered by an upstream: the same translation, the OpenAI request sent
through the sources with failover instead of to a leased runner."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from backends.base import OPENAI_SAMPLING, Capability, SamplingDialect
from runnerd import failover
from runnerd.api import scopes
from runnerd.api.context import daemon
from runnerd.api.engines import stored
from runnerd.api.ollama import translate as tr
from runnerd.metrics import REQUEST_MODEL
from runnerd.sources import Candidate, from_upstream


class UpstreamJob:
    """One inference sent to the upstreams that host the model, tried in order."""

    def __init__(self, name: str, candidates: list[Candidate], clock: tr.Clock) -> None:
        self.name = name
        self.candidates = candidates
        self.clock = clock
        # Upstreams take OpenAI's names for the sampling options.
        self.dialect: SamplingDialect = OPENAI_SAMPLING

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await failover.call_upstreams(self.candidates, path, body)

    def events(self, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        return failover.upstream_events(self.candidates, path, body)

    def release(self) -> None:
        pass  # nothing is held: runnerd does not load or unload an upstream's models


def upstream_job(request: web.Request, name: str, needed: list[Capability]) -> UpstreamJob | None:
    """The upstreams to try for `name`, when the model is not served by the local engines first (a model
    stored here and routed local-first goes the usual way); None: the usual way."""
    d = daemon(request)
    if not d.sources.active or from_upstream(request) or not scopes.may_use(name):
        return None  # the usual way; for a model outside the caller's patterns it answers as for a missing one
    candidates = d.sources.candidates(name, local_has=stored(d, name))
    if not candidates or (candidates[0].endpoint is None and candidates[0].model == name):
        return None
    remote = failover.usable([c for c in candidates if c.endpoint is not None], needed)
    if not remote:
        return None  # an alias to local models only: the usual way would need its target's name
    clock = tr.Clock()
    clock.mark_loaded()
    request[REQUEST_MODEL] = name
    return UpstreamJob(name, remote, clock)
