"""OpenAI's Responses API: `POST /v1/responses` and `/v1/responses/input_tokens`, relayed to an engine that
serves it, otherwise translated through the engine's chat completions (or, for a model an upstream
hosts, the upstream's, with failover before the first event); the stored responses behind
`previous_response_id` and `GET`/`DELETE /v1/responses/{id}` and `/input_items` are the daemon's own
(store.py), whichever engine answered: engines keep no conversation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from backends.base import OPENAI_SAMPLING, Api, Capability
from runnerd import failover
from runnerd.api.body import read_json_body
from runnerd.api.chat_pieces import answer_from_completion
from runnerd.api.context import DAEMON
from runnerd.api.errors import ApiError, parse_body, validation_error
from runnerd.api.leased import (
    Leased,
    is_stream_error,
    lease_for,
    needed_capabilities,
    prepend,
    refuse_upstream_count,
    route_candidates,
    start_sse,
    stream_translated,
)
from runnerd.api.responses import translate as tr
from runnerd.api.responses.schema import InputItem, InputTokensRequest, ResponsesRequest, input_items
from runnerd.api.responses.store import RESPONSE_STORE, ResponseStore, StoredResponse, viewer
from runnerd.metrics import REQUEST_MODEL
from runnerd.proxy import call_engine, engine_events
from runnerd.sources import Candidate
from runnerd.sse import error_text

_ITEMS = TypeAdapter(list[InputItem])


class Conversation:
    """A request's input with the stored turns it continues: what the engine is sent, and what is stored."""

    def __init__(self, store: ResponseStore, req: InputTokensRequest) -> None:
        earlier: list[dict[str, Any]] = []
        if req.previous_response_id:
            for entry in store.chain(req.previous_response_id, viewer()):
                earlier += tr.clean_input(entry.input_items) + tr.output_as_input(entry.response.get("output") or [])
        self.own = tr.stored_input(input_items(req.input))
        self.engine_input = earlier + tr.clean_input(self.own)

    def items(self) -> list[InputItem]:
        try:
            return _ITEMS.validate_python(self.engine_input)
        except ValidationError as exc:
            raise validation_error(exc, "conversation", "input") from exc


def _native_body(payload: dict[str, Any], conversation: Conversation) -> dict[str, Any]:
    # The daemon keeps the conversation; the engine sees it whole and stores nothing.
    body = {k: v for k, v in payload.items() if k not in ("previous_response_id", "store")}
    body["input"] = conversation.engine_input
    return body


def _remember(request: web.Request, req: ResponsesRequest, response: dict[str, Any],
              conversation: Conversation) -> None:
    if req.store and response.get("status") in ("completed", "incomplete") and response.get("id"):
        request.app[RESPONSE_STORE].put(StoredResponse.of(response, conversation.own, req.previous_response_id,
                                                          viewer().owner))


async def create(request: web.Request) -> web.StreamResponse:
    payload = await read_json_body(request)
    req = parse_body(ResponsesRequest, payload, "Responses request")
    conversation = Conversation(request.app[RESPONSE_STORE], req)
    needed = needed_capabilities(stream=req.stream, tools=bool(req.tools))
    name = str(payload["model"])
    candidates = await route_candidates(request, name)
    if candidates is None:
        return await _serve_locally(request, req, payload, needed, conversation)
    request[REQUEST_MODEL] = name
    return await failover.serve_each(
        candidates, needed,
        lambda model: _serve_locally(request, req, {**payload, "model": model}, needed, conversation),
        lambda run, tried: _serve_upstream(request, req, name, run, tried, conversation))


async def _serve_locally(request: web.Request, req: ResponsesRequest, payload: dict[str, Any],
                         needed: list[Capability], conversation: Conversation) -> web.StreamResponse:
    leased = await lease_for(request, payload, needed, Api.RESPONSES)
    try:
        if leased.native:
            body = _native_body(payload, conversation)
            if req.stream:
                return await _relay_stream(request, leased, req, body, conversation)
            response = tr.completed_native(req, leased.model.name,
                                           await call_engine(leased.runner, "/v1/responses", body))
        else:
            body = tr.chat_body(req, conversation.items(), leased.model.name, leased.backend.sampling_dialect)
            if req.stream:
                chunks = engine_events(leased.runner, "/v1/chat/completions", body)
                return await _translate_stream(request, chunks, req, leased.model.name, conversation)
            completion = await call_engine(leased.runner, "/v1/chat/completions", body)
            response = tr.from_answer(req, leased.model.name, answer_from_completion(completion))
    finally:
        leased.lease.release()
    _remember(request, req, response, conversation)
    return web.json_response(response)


async def _serve_upstream(request: web.Request, req: ResponsesRequest, name: str, run: list[Candidate],
                          tried: failover.Tried, conversation: Conversation) -> web.StreamResponse:
    """Through the upstreams' chat completions; the conversation stays here, as for a local engine."""
    body = tr.chat_body(req, conversation.items(), name, OPENAI_SAMPLING)
    if req.stream:
        chunks = failover.upstream_events(run, "/v1/chat/completions", body, tried)
        return await _translate_stream(request, chunks, req, name, conversation, tried.headers)
    completion = await failover.call_upstreams(run, "/v1/chat/completions", body, tried)
    response = tr.from_answer(req, name, answer_from_completion(completion))
    _remember(request, req, response, conversation)
    return web.json_response(response, headers=tried.headers())


async def _relay_stream(request: web.Request, leased: Leased, req: ResponsesRequest, body: dict[str, Any],
                        conversation: Conversation) -> web.StreamResponse:
    stream = tr.NativeStream(req, leased.model.name)
    async with contextlib.aclosing(engine_events(leased.runner, "/v1/responses", body)) as events:
        first = await anext(events, None)  # an engine refusal still gets a real status line
        response = await start_sse(request)
        async for event in prepend(first, events):
            if is_stream_error(event):
                await response.write(stream.fail(error_text(event)))
                break
            await response.write(stream.relay(event))
    if stream.response is not None:
        _remember(request, req, stream.response, conversation)
    await response.write_eof()
    return response


async def _translate_stream(request: web.Request, chunks: AsyncGenerator[dict[str, Any], None],
                            req: ResponsesRequest, model: str, conversation: Conversation,
                            headers: Callable[[], Mapping[str, str]] = dict) -> web.StreamResponse:
    stream = tr.ResponseStream(req, model)
    response, completed = await stream_translated(request, chunks, stream, headers)
    if completed:
        _remember(request, req, stream.response, conversation)
    await response.write_eof()
    return response


async def input_tokens(request: web.Request) -> web.Response:
    payload = await read_json_body(request)
    req = parse_body(InputTokensRequest, payload, "input_tokens request")
    conversation = Conversation(request.app[RESPONSE_STORE], req)
    await refuse_upstream_count(request, str(payload["model"]), "count the input tokens of a Responses request")
    leased = await lease_for(request, payload, needed_capabilities(stream=False, tools=False), Api.RESPONSES)
    try:
        if not leased.native or Api.RESPONSES_INPUT_TOKENS not in leased.backend.native_apis:
            raise ApiError(501, f"backend {leased.backend.name} cannot count the input tokens of a Responses "
                                f"request for {leased.model.name}", code="capability_not_supported",
                           type="not_implemented_error")
        answer = await call_engine(leased.runner, "/v1/responses/input_tokens", _native_body(payload, conversation))
    finally:
        leased.lease.release()
    return web.json_response({"object": "response.input_tokens", "input_tokens": tr.input_tokens_of(answer)})


async def get_response(request: web.Request) -> web.Response:
    return web.json_response(request.app[RESPONSE_STORE].get(request.match_info["id"], viewer()).response)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    if not request.app[RESPONSE_STORE].delete(response_id, viewer()):
        raise ApiError(404, f"no stored response with id {response_id!r}", code="response_not_found")
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


class ItemsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=20, ge=1, le=100)
    order: str = Field(default="desc", pattern="^(asc|desc)$")
    after: str | None = None


async def list_input_items(request: web.Request) -> web.Response:
    query = parse_body(ItemsQuery, dict(request.query), "input_items query")
    items = list(request.app[RESPONSE_STORE].get(request.match_info["id"], viewer()).input_items)
    if query.order == "desc":
        items.reverse()
    if query.after is not None:
        ids = [item.get("id") for item in items]
        if query.after not in ids:
            raise ApiError(400, f"no input item {query.after!r} in this response", param="after")
        items = items[ids.index(query.after) + 1:]
    page = items[:query.limit]
    return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)})


def add_routes(app: web.Application) -> None:
    apis = app[DAEMON].settings.apis
    app[RESPONSE_STORE] = ResponseStore(apis.responses_store_entries, int(apis.responses_store_bytes))
    for prefix in ("", "/engines", "/engines/{backend}"):
        app.router.add_post(prefix + "/v1/responses", create)
        app.router.add_post(prefix + "/v1/responses/input_tokens", input_tokens)
    for prefix in ("", "/engines"):
        app.router.add_get(prefix + "/v1/responses/{id}", get_response)
        app.router.add_delete(prefix + "/v1/responses/{id}", delete_response)
        app.router.add_get(prefix + "/v1/responses/{id}/input_items", list_input_items)

