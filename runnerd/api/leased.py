"""What the Messages and Responses routes share: the sources a request may go to, a runner leased for a
JSON request (the same model resolution, admission and keep-alive as chat completions), the choice between
relaying to the engine's own implementation of an API and translating through chat completions (a local
engine's or an upstream's), and writing SSE events."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from pydantic import BaseModel

from backends.base import Api, Backend, Capability, Mode, SamplingDialect
from runnerd.api import scopes
from runnerd.api.chat_pieces import Change, ChatAnswer, PieceReader
from runnerd.api.context import daemon
from runnerd.api.engines import (
    check_capabilities,
    check_request,
    choose_backend,
    configuration_for,
    find_model,
    lease_runner,
    stored,
    take_keep_alive,
)
from runnerd.api.errors import ApiError
from runnerd.metrics import REQUEST_MODEL
from runnerd.scheduler import Lease, Runner
from runnerd.sources import Candidate, from_upstream
from runnerd.sse import error_text
from runnerd.store import ModelEntry


@dataclass
class Leased:
    """A leased runner for one request, and how to talk to its engine."""

    model: ModelEntry
    backend: Backend
    lease: Lease
    native: bool  # the engine serves the route's API itself

    @property
    def runner(self) -> Runner:
        return self.lease.runner


def sampling(dialect: SamplingDialect, generic: Mapping[str, Any]) -> dict[str, Any]:
    """Generic sampling options (temperature, top_p, top_k ...) under an engine's own names (upstreams take
    OpenAI's); unset ones are left out."""
    return {dialect.get(name, name): value for name, value in generic.items() if value is not None}


def extra_fields(req: BaseModel) -> dict[str, Any]:
    """A request's fields the API does not define (engine options such as `min_p` or `ignore_eos`): a
    translated request carries them to the engine as a relayed one does."""
    return {k: v for k, v in (req.model_extra or {}).items() if k != "keep_alive"}


async def route_candidates(request: web.Request, name: str) -> list[Candidate] | None:
    """The sources to try for `name` when they are more than the local model of that name (an upstream, an
    alias, a local model with upstream fallbacks); None: the usual local way. A model outside the caller's
    patterns, or a request another runnerd sent, takes the local way too (it answers as for a missing one)."""
    d = daemon(request)
    if request.match_info.get("backend") is not None or not d.sources.active or from_upstream(request) \
            or not scopes.may_use(name):
        return None
    candidates = await d.sources.candidates_when_known(name, local_has=stored(d, name))
    if not candidates or (len(candidates) == 1 and candidates[0].endpoint is None and candidates[0].model == name):
        return None
    return candidates


def serves_natively(request: web.Request, backend: Backend, api: Api) -> bool:
    """Whether `api` is relayed to the engine: it must declare the API and the daemon must not be set to
    translate it (`[apis] translate`)."""
    return api in backend.native_apis and api.value not in daemon(request).settings.apis.translate


async def lease_for(request: web.Request, payload: dict[str, Any], needed: list[Capability],
                    api: Api) -> Leased:
    """Resolve the request's model, check what it needs, and lease its runner. `keep_alive` is taken out
    of the payload (engines refuse fields they do not know); `model` becomes the store's canonical name."""
    d = daemon(request)
    explicit = request.match_info.get("backend")
    if explicit is not None:
        d.backend(explicit)  # 404 for an unknown backend before anything else
    model = find_model(d, str(payload["model"]))
    backend = choose_backend(d, explicit, model)
    check_capabilities(backend, needed, model)
    keep_alive = take_keep_alive(payload)
    payload["model"] = model.name
    config = configuration_for(d, backend, model, Mode.COMPLETION)
    check_request(backend, model, config, payload)
    lease = await lease_runner(d, backend, model, Mode.COMPLETION, config, keep_alive)
    request[REQUEST_MODEL] = model.name
    return Leased(model, backend, lease, serves_natively(request, backend, api))


async def refuse_upstream_count(request: web.Request, name: str, what: str) -> None:
    """501 for a token count of a model an upstream serves first: only a local engine counts tokens."""
    candidates = await route_candidates(request, name)
    if candidates and candidates[0].endpoint is not None:
        raise ApiError(501, f"runnerd cannot {what} for {name}: it is served by the upstream "
                            f"{candidates[0].source}", code="capability_not_supported", type="not_implemented_error")


def needed_capabilities(*, stream: bool, tools: bool) -> list[Capability]:
    return [Capability.CHAT] + ([Capability.STREAMING] if stream else []) + ([Capability.TOOLS] if tools else [])


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def start_sse(request: web.Request, headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **(headers or {})})
    await response.prepare(request)
    return response


async def prepend(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def is_stream_error(event: dict[str, Any]) -> bool:
    """An engine's failure inside a stream, as proxy.engine_events reports it."""
    return "error" in event and "type" not in event and "choices" not in event


class TranslatedStream(Protocol):
    """An API's own event sequence, made from an engine's chat-completion chunks."""

    def start(self) -> bytes: ...

    def changes(self, changes: list[Change]) -> bytes: ...

    def finish(self, answer: ChatAnswer) -> bytes: ...

    def fail(self, message: str) -> bytes: ...


async def stream_translated(request: web.Request, chat_chunks: AsyncGenerator[dict[str, Any], None],
                            stream: TranslatedStream,
                            headers: Callable[[], Mapping[str, str]] = dict) -> tuple[web.StreamResponse, bool]:
    """Relay a chat-completion stream (a runner's engine_events, an upstream's failover.upstream_events) as
    `stream`'s events. Nothing is sent before its first chunk: a failure until then is the caller's to
    answer (or fail over). `headers` are read then (which source answered). False when the stream broke
    (its failure event is written). The caller ends the response."""
    reader = PieceReader()
    async with contextlib.aclosing(chat_chunks) as chunks:
        first = await anext(chunks, None)
        response = await start_sse(request, headers())
        await response.write(stream.start())
        async for chunk in prepend(first, chunks):
            if is_stream_error(chunk):
                await response.write(stream.fail(error_text(chunk)))
                return response, False
            await response.write(stream.changes(reader.feed(chunk)))
    await response.write(stream.finish(reader.answer))
    return response, True
