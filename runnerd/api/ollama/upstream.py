"""Ollama routes answered for a model an upstream hosts: chat, generate and embed through the sources
with failover (the same translation as for a local engine), show and ps relayed from upstreams that serve
Ollama's API, and a load that sends nothing (runnerd never tells an upstream to load or unload)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from aiohttp import web

from backends.base import OPENAI_SAMPLING, Capability, SamplingDialect
from backends.external import ExternalEndpoint, read_at_most
from runnerd import failover
from runnerd.api import scopes
from runnerd.api.context import daemon
from runnerd.api.engines import stored
from runnerd.api.ollama import translate as tr
from runnerd.metrics import REQUEST_MODEL
from runnerd.sources import Candidate, from_upstream

log = logging.getLogger("runnerd.ollama")

# The most of an upstream's /api/show or /api/ps answer read: a model's details, not its weights.
_MAX_DETAILS_BYTES = 8 << 20


class UpstreamJob:
    """One inference sent to the upstreams that host the model, tried in order."""

    def __init__(self, name: str, candidates: list[Candidate], clock: tr.Clock,
                 failures: list[str] | None = None) -> None:
        self.name = name
        self.candidates = candidates
        self.clock = clock
        # Upstreams take OpenAI's names for the sampling options.
        self.dialect: SamplingDialect = OPENAI_SAMPLING
        self._failures = failures or []  # of sources tried before these, for the answer when none is left

    def _tried(self) -> failover.Tried:
        return failover.Tried(failures=list(self._failures))

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await failover.call_upstreams(self.candidates, path, body, self._tried())

    def events(self, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        return failover.upstream_events(self.candidates, path, body, self._tried())

    def release(self) -> None:
        pass  # nothing is held: runnerd does not load or unload an upstream's models


async def upstream_first(request: web.Request, name: str) -> list[Candidate] | None:
    """The upstream candidates for `name` when an upstream (not the local model of that name) comes first;
    None: the usual local way (for a model outside the caller's patterns it answers as for a missing one)."""
    d = daemon(request)
    if not d.sources.active or from_upstream(request) or not scopes.may_use(name):
        return None
    candidates = await d.sources.candidates_when_known(name, local_has=stored(d, name))
    if not candidates or (candidates[0].endpoint is None and candidates[0].model == name):
        return None
    remote = [c for c in candidates if c.endpoint is not None]
    return remote or None  # an alias to local models only: the usual way would need its target's name


async def upstream_job(request: web.Request, name: str, needed: list[Capability]) -> UpstreamJob | None:
    """The upstreams to try for `name`, when the model is not served by the local engines first (a model
    stored here and routed local-first goes the usual way); None: the usual way."""
    remote = await upstream_first(request, name)
    if remote is None:
        return None
    remote = failover.usable(remote, needed)  # 501 before any traffic when none serves what is needed
    clock = tr.Clock()
    clock.mark_loaded()
    request[REQUEST_MODEL] = name
    return UpstreamJob(name, remote, clock)


async def fallback_job(request: web.Request, name: str, needed: list[Capability],
                       failures: list[str]) -> UpstreamJob | None:
    """The upstreams hosting `name` (as the request named it) after the local model of that name, for when
    its engine failed before its answer started (`failures` says how); None when there are none, or none
    serves what is needed."""
    d = daemon(request)
    if not d.sources.active or from_upstream(request) or not scopes.may_use(name):
        return None
    remote = [c for c in d.sources.candidates(name, local_has=True)
              if c.endpoint is not None and all(n in c.endpoint.capabilities for n in needed)]
    if not remote:
        return None
    clock = tr.Clock()
    clock.mark_loaded()
    request[REQUEST_MODEL] = name
    return UpstreamJob(name, remote, clock, failures)


async def _ollama_api(endpoint: ExternalEndpoint, method: str, path: str, body: dict[str, Any] | None) -> Any:
    """One call to an upstream's Ollama API, bounded by its discovery timeout. A failure raises
    aiohttp.ClientError, TimeoutError or ValueError (not JSON, too large) for the caller to pass over."""
    timeout = aiohttp.ClientTimeout(total=endpoint.spec.discovery_timeout, sock_connect=endpoint.spec.connect_timeout)
    async with endpoint.session().request(method, endpoint.url(path), json=body, headers=endpoint.headers(),
                                          timeout=timeout) as resp:
        raw = await read_at_most(resp.content, _MAX_DETAILS_BYTES)
        if resp.status >= 400:
            raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                              message=raw[:200].decode(errors="replace"))
    if len(raw) > _MAX_DETAILS_BYTES:
        raise ValueError(f"more than {_MAX_DETAILS_BYTES} bytes")
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


def _minimal_show(candidate: Candidate) -> dict[str, Any]:
    """What is known of a model on an upstream without Ollama's API: its name and what its kind serves."""
    assert candidate.endpoint is not None
    caps = candidate.endpoint.capabilities
    capabilities = [name for name, needs in (("completion", Capability.CHAT), ("embedding", Capability.EMBEDDINGS),
                                             ("tools", Capability.TOOLS)) if needs in caps]
    return {"modelfile": f"# served by the upstream {candidate.source} ({candidate.endpoint.spec.kind})\n"
                         f"FROM {candidate.model}\n",
            "parameters": "", "template": "",
            "details": {"parent_model": "", "format": "", "family": "", "families": None, "parameter_size": "",
                        "quantization_level": ""},
            "model_info": {}, "capabilities": capabilities, "modified_at": None}


async def show(candidates: list[Candidate]) -> web.Response:
    """The first upstream's own /api/show answer for kinds that serve Ollama's API, else a minimal answer
    built from discovery; an upstream that fails is passed over."""
    failures: list[str] = []
    for candidate in candidates:
        endpoint = candidate.endpoint
        assert endpoint is not None
        if not endpoint.profile.ollama_api:
            return web.json_response(_minimal_show(candidate), headers={"X-Runnerd-Source": candidate.source})
        try:
            answer = await _ollama_api(endpoint, "POST", "/api/show", {"model": candidate.model})
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("upstream %s: /api/show for %s failed: %s", endpoint.name, candidate.model, exc)
            failures.append(f"{endpoint.name}: {exc or type(exc).__name__}")
            continue
        return web.json_response(answer, headers={"X-Runnerd-Source": candidate.source})
    raise failover.no_source_left(candidates[0].model, failures)


async def _running_on(endpoint: ExternalEndpoint) -> list[dict[str, Any]]:
    try:
        answer = await _ollama_api(endpoint, "GET", "/api/ps", None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.info("upstream %s: /api/ps failed: %s", endpoint.name, exc)
        return []
    models = answer.get("models")
    return [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)] \
        if isinstance(models, list) else []


async def running(request: web.Request, listed: set[str]) -> list[dict[str, Any]]:
    """The models loaded on upstreams that serve Ollama's ps list, asked in parallel, those the caller may
    use and not already `listed`, each once (the first upstream by priority)."""
    d = daemon(request)
    if from_upstream(request):
        return []
    endpoints = [e for e in d.sources.endpoints.values() if e.profile.ollama_api and e.discovery.healthy]
    found = await asyncio.gather(*(_running_on(e) for e in endpoints))
    out: list[dict[str, Any]] = []
    seen = set(listed)
    for models in found:
        for model in models:
            name = model["name"]
            if name not in seen and scopes.may_use(name):
                seen.add(name)
                out.append(model)
    return out
