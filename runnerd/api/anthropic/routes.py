"""Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, relayed to an engine that
serves it, otherwise translated through the engine's chat completions (translate.py). A model an upstream
hosts is relayed to the upstream's own /v1/messages when its kind serves it (its profile says so), otherwise
translated through its chat completions, with failover before the first event either way
(runnerd/failover.py). Errors, before and during a stream, are in Anthropic's shape (runnerd/api/errors.py
picks it by path)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from aiohttp import web

from backends.base import OPENAI_SAMPLING, Api, Capability
from runnerd import failover
from runnerd.api.anthropic import translate as tr
from runnerd.api.anthropic.schema import CountTokensRequest, MessagesRequest
from runnerd.api.body import read_json_body
from runnerd.api.chat_pieces import answer_from_completion
from runnerd.api.context import daemon
from runnerd.api.errors import ApiError, parse_body
from runnerd.api.leased import (
    is_stream_error,
    lease_for,
    needed_capabilities,
    prepend,
    refuse_upstream_count,
    route_candidates,
    sse_event,
    start_sse,
    stream_translated,
)
from runnerd.metrics import REQUEST_MODEL
from runnerd.proxy import call_engine, engine_events
from runnerd.sources import Candidate
from runnerd.sse import error_text


async def messages(request: web.Request) -> web.StreamResponse:
    payload = await read_json_body(request)
    req = parse_body(MessagesRequest, payload, "Messages request")
    needed = needed_capabilities(stream=req.stream, tools=bool(req.tools))
    name = str(payload["model"])
    candidates = await route_candidates(request, name)
    if candidates is None:
        return await _serve_locally(request, req, payload, needed)
    request[REQUEST_MODEL] = name
    return await failover.serve_each(
        candidates, needed, lambda model: _serve_locally(request, req, {**payload, "model": model}, needed),
        lambda run, tried: _serve_upstream(request, req, payload, name, run, tried),
        lambda candidate: _relayed_to(request, candidate))


def _relayed_to(request: web.Request, candidate: Candidate) -> bool:
    """Whether the upstream serves Messages itself (and the daemon is not set to translate it)."""
    return candidate.endpoint is not None and Api.MESSAGES in candidate.endpoint.profile.native_apis \
        and Api.MESSAGES.value not in daemon(request).settings.apis.translate


async def _serve_locally(request: web.Request, req: MessagesRequest, payload: dict[str, Any],
                         needed: list[Capability]) -> web.StreamResponse:
    leased = await lease_for(request, payload, needed, Api.MESSAGES)
    try:
        if leased.native:
            if req.stream:
                return await _relay_stream(request, engine_events(leased.runner, "/v1/messages", payload),
                                           leased.model.name)
            answer = await call_engine(leased.runner, "/v1/messages", payload)
            answer["model"] = leased.model.name
            return web.json_response(answer)
        body = tr.chat_body(req, leased.model.name, leased.backend.sampling_dialect)
        if req.stream:
            chunks = engine_events(leased.runner, "/v1/chat/completions", body)
            return await _translate_stream(request, chunks, leased.model.name)
        completion = await call_engine(leased.runner, "/v1/chat/completions", body)
        return web.json_response(tr.message(answer_from_completion(completion), leased.model.name, tr.message_id()))
    finally:
        leased.lease.release()


async def _serve_upstream(request: web.Request, req: MessagesRequest, payload: dict[str, Any], name: str,
                          run: list[Candidate], tried: failover.Tried) -> web.StreamResponse:
    """Through a run of upstreams that serve Messages themselves (the request as it came, each naming the
    model its own way), or else through their chat completions."""
    if _relayed_to(request, run[0]):
        body = {k: v for k, v in payload.items() if k != "keep_alive"}  # runnerd's own field
        if req.stream:
            events = failover.upstream_events(run, "/v1/messages", body, tried)
            return await _relay_stream(request, events, name, tried.headers)
        answer = await failover.call_upstreams(run, "/v1/messages", body, tried)
        answer["model"] = name
        return web.json_response(answer, headers=tried.headers())
    body = tr.chat_body(req, name, OPENAI_SAMPLING)
    if req.stream:
        chunks = failover.upstream_events(run, "/v1/chat/completions", body, tried)
        return await _translate_stream(request, chunks, name, tried.headers)
    completion = await failover.call_upstreams(run, "/v1/chat/completions", body, tried)
    return web.json_response(tr.message(answer_from_completion(completion), name, tr.message_id()),
                             headers=tried.headers())


async def _relay_stream(request: web.Request, engine: AsyncGenerator[dict[str, Any], None], model: str,
                        headers: Callable[[], Mapping[str, str]] = dict) -> web.StreamResponse:
    """An engine's (or an upstream's) own event sequence, with the name the client asked for and a ping
    after message_start. An engine may leave message_start out (one does when the whole prompt came from
    its cache); the SDKs refuse a stream without it, so one is put first. `headers` are read once the first
    event is in (which source answered)."""
    started = False
    async with contextlib.aclosing(engine) as events:
        first = await anext(events, None)  # a refusal still gets a real status line
        response = await start_sse(request, headers())
        async for event in prepend(first, events):
            if is_stream_error(event):
                await response.write(tr.error_event("api_error", error_text(event)))
                break
            kind = str(event.get("type") or "")
            if kind == "message_start" and isinstance(event.get("message"), dict):
                event["message"]["model"] = model
                await response.write(sse_event(kind, event) + sse_event("ping", {"type": "ping"}))
            elif not started:
                await response.write(tr.MessageStream(model).start() + sse_event(kind, event))
            else:
                await response.write(sse_event(kind, event))
            started = True
    await response.write_eof()
    return response


async def _translate_stream(request: web.Request, chunks: AsyncGenerator[dict[str, Any], None], model: str,
                            headers: Callable[[], Mapping[str, str]] = dict) -> web.StreamResponse:
    response, _ = await stream_translated(request, chunks, tr.MessageStream(model), headers)
    await response.write_eof()
    return response


async def count_tokens(request: web.Request) -> web.Response:
    payload = await read_json_body(request)
    parse_body(CountTokensRequest, payload, "count_tokens request")
    await refuse_upstream_count(request, str(payload["model"]), "count the tokens of a Messages request")
    leased = await lease_for(request, payload, needed_capabilities(stream=False, tools=False), Api.MESSAGES)
    try:
        if not leased.native or Api.MESSAGES_COUNT_TOKENS not in leased.backend.native_apis:
            raise ApiError(501, f"backend {leased.backend.name} cannot count the tokens of a Messages request "
                                f"for {leased.model.name}", code="capability_not_supported")
        answer = await call_engine(leased.runner, "/v1/messages/count_tokens", payload)
    finally:
        leased.lease.release()
    tokens = answer.get("input_tokens")
    if not isinstance(tokens, int):
        raise ApiError(502, f"the engine serving {leased.model.name} did not say how many tokens the request has")
    return web.json_response({"input_tokens": tokens})


PREFIXES = ("", "/engines", "/engines/{backend}", "/anthropic")


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        app.router.add_post(prefix + "/v1/messages", messages)
        app.router.add_post(prefix + "/v1/messages/count_tokens", count_tokens)
