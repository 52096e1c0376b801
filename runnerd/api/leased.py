"""What the Messages and Responses routes share: a runner leased for a JSON request (the same model
resolution, admission and keep-alive as chat completions), the choice between relaying to the engine's
own implementation of an API and translating through its chat completions, and writing SSE events."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from pydantic import BaseModel

from backends.base import Api, Backend, Capability, Mode
from runnerd.api.chat_pieces import Change, ChatAnswer, PieceReader
from runnerd.api.context import daemon
from runnerd.api.engines import (
    check_capabilities,
    check_request,
    choose_backend,
    find_model,
    lease_runner,
    take_keep_alive,
)
from runnerd.configs import effective_configuration
from runnerd.metrics import REQUEST_MODEL
from runnerd.proxy import engine_events
from runnerd.scheduler import Lease, Runner
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

    def sampling(self, generic: Mapping[str, Any]) -> dict[str, Any]:
        """Generic sampling options (temperature, top_p, top_k ...) under the engine's own names; unset ones
        are left out."""
        dialect = self.backend.sampling_dialect
        return {dialect.get(name, name): value for name, value in generic.items() if value is not None}


    @staticmethod
    def extra_fields(req: BaseModel) -> dict[str, Any]:
        """A request's fields the API does not define (engine options such as `min_p` or `ignore_eos`): a
        translated request carries them to the engine as a relayed one does."""
        return {k: v for k, v in (req.model_extra or {}).items() if k != "keep_alive"}


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
    config = effective_configuration(model.config, d.configs.get(model.name, Mode.COMPLETION))
    check_request(backend, model, config, payload)
    lease = await lease_runner(d, backend, model, Mode.COMPLETION, config, keep_alive)
    request[REQUEST_MODEL] = model.name
    return Leased(model, backend, lease, serves_natively(request, backend, api))


def needed_capabilities(*, stream: bool, tools: bool) -> list[Capability]:
    return [Capability.CHAT] + ([Capability.STREAMING] if stream else []) + ([Capability.TOOLS] if tools else [])


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
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


async def stream_translated(request: web.Request, leased: Leased, body: dict[str, Any],
                            stream: TranslatedStream) -> tuple[web.StreamResponse, bool]:
    """Relay the engine's chat-completion stream as `stream`'s events. False when the engine's stream broke
    (its failure event is written). The caller ends the response."""
    reader = PieceReader()
    async with contextlib.aclosing(engine_events(leased.runner, "/v1/chat/completions", body)) as chunks:
        first = await anext(chunks, None)
        response = await start_sse(request)
        await response.write(stream.start())
        async for chunk in prepend(first, chunks):
            if is_stream_error(chunk):
                await response.write(stream.fail(error_text(chunk)))
                return response, False
            await response.write(stream.changes(reader.feed(chunk)))
    await response.write(stream.finish(reader.answer))
    return response, True
