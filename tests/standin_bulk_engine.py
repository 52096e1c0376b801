"""A stand-in engine for tests of the relay's memory and lifetime (not a real engine: it generates nothing).

It serves an OpenAI-shaped chat route on a unix socket and behaves as the request's `standin` field asks:

- `{"bulk": n}` (not streamed): a JSON answer of about n bytes, sent in chunks with its Content-Length;
  with `"gated": true` only its first half is sent until the gate opens (`POST /open`); with
  `"break": true` the connection is closed after the first half;
- `{"gated": true}` alone (not streamed): a small answer, sent once the gate opens;
- `{"pace": seconds, "events": n}` (streamed): n chunks, one every `pace` seconds, then `[DONE]`.

A request without a `standin` field (as the daemon's translating routes send) follows the plan last
given to `POST /plan`. `GET /counts` answers how many chat requests arrived and how many were answered.

    python tests/standin_bulk_engine.py SOCKET_PATH
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

COUNTS = web.AppKey("counts", dict)
GATE = web.AppKey("gate", asyncio.Event)
PLAN = web.AppKey("plan", dict)
_CHUNK = 64 << 10


def _answer(content: str) -> bytes:
    return json.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()


def _event(i: int) -> bytes:
    event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
    return f"data: {json.dumps(event)}\n\n".encode()


async def _bulk(request: web.Request, plan: dict[str, Any]) -> web.StreamResponse:
    payload = _answer("x" * max(0, int(plan["bulk"]) - len(_answer(""))))
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    half = len(payload) // 2
    for start in range(0, half, _CHUNK):
        await response.write(payload[start:min(start + _CHUNK, half)])
    if plan.get("break"):
        assert request.transport is not None
        request.transport.close()
        return response
    if plan.get("gated"):
        await request.app[GATE].wait()
    for start in range(half, len(payload), _CHUNK):
        await response.write(payload[start:start + _CHUNK])
    await response.write_eof()
    return response


async def _stream(request: web.Request, plan: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(int(plan.get("events", 3))):
        if i:
            await asyncio.sleep(float(plan.get("pace", 0)))
        await response.write(_event(i))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await request.json()
    counts = request.app[COUNTS]
    counts["arrived"] += 1
    plan: dict[str, Any] = body.get("standin", request.app[PLAN])
    if body.get("stream"):
        response = await _stream(request, plan)
    elif "bulk" in plan:
        response = await _bulk(request, plan)
    else:
        if plan.get("gated"):
            await request.app[GATE].wait()
        response = web.Response(body=_answer("done"), content_type="application/json")
    counts["answered"] += 1
    return response


async def open_gate(request: web.Request) -> web.Response:
    request.app[GATE].set()
    return web.json_response({"open": True})


async def set_plan(request: web.Request) -> web.Response:
    request.app[PLAN].clear()
    request.app[PLAN].update(await request.json())
    return web.json_response(request.app[PLAN])


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def counts(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


def main() -> None:
    app = web.Application()
    app[COUNTS] = {"arrived": 0, "answered": 0}
    app[GATE] = asyncio.Event()
    app[PLAN] = {}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/open", open_gate)
    app.router.add_post("/plan", set_plan)
    app.router.add_get("/health", health)
    app.router.add_get("/counts", counts)
    web.run_app(app, path=sys.argv[1], print=None, handle_signals=True)


if __name__ == "__main__":
    main()
