"""A stand-in engine for tests of the daemon's relay (not a real engine: it generates nothing).

It serves an OpenAI-shaped chat route on a unix socket and behaves as the request's `standin` field
asks, so that tests can produce what real engines do only rarely:

- `{"pace": seconds, "events": n}`: stream n chunks, one every `pace` seconds, then `[DONE]`;
- `{"silent_after": n}`: stream n chunks, then keep the connection open and send nothing more;
- `{"delay": seconds}` (not streamed): answer after `delay` seconds, health checks passing meanwhile;
- `{"hang": true}`: never answer this or any later request, and stop answering health checks too;
- `{"drop": true}`: read the whole request, then close the connection without answering;
- `{"status": code}`: answer at once with that status and a JSON error, streamed or not;
- `{"cut": true}`: send the status line and headers of a 200 (SSE when streamed, a sized JSON answer when
  not), then close the connection before the first byte of the body.

Routes that build the engine's request themselves (Ollama's) carry no `standin` field: for them the plan
is the request's text when that starts with `standin:` followed by the plan's JSON (the last message's
content, or the embeddings `input`).

`POST /v1/embeddings` follows a plan's `drop`, `status` and `cut`, else answers one vector per input.

`GET /arrivals` answers how many chat and embeddings requests arrived.

    python tests/standin_engine.py SOCKET_PATH
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

ARRIVALS = web.AppKey("arrivals", list)
HUNG = web.AppKey("hung", asyncio.Event)


def _chunk(i: int) -> bytes:
    event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
    return f"data: {json.dumps(event)}\n\n".encode()


_PLAN_PREFIX = "standin:"


def _plan(body: dict[str, Any]) -> dict[str, Any]:
    if "standin" in body:
        plan: dict[str, Any] = body["standin"]
        return plan
    messages = body.get("messages") or [{}]
    text = body.get("input", messages[-1].get("content"))
    if isinstance(text, str) and text.startswith(_PLAN_PREFIX):
        found: dict[str, Any] = json.loads(text[len(_PLAN_PREFIX):])
        return found
    return {}


async def _failure(request: web.Request, body: dict[str, Any], plan: dict[str, Any]) -> web.StreamResponse | None:
    """The planned failure before the first body byte, if any."""
    if plan.get("drop"):
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(3600)
    if "status" in plan:
        return web.json_response({"error": {"message": "stand-in engine failure", "type": "server_error"}},
                                 status=int(plan["status"]))
    if plan.get("cut"):
        cut = web.StreamResponse(headers={"Content-Type": "text/event-stream" if body.get("stream") else
                                          "application/json"})
        if not body.get("stream"):
            cut.content_length = 100
        await cut.prepare(request)
        await cut.drain()
        assert request.transport is not None
        request.transport.close()
        return cut
    return None


async def chat(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await request.json()
    request.app[ARRIVALS].append(1)
    plan = _plan(body)
    failed = await _failure(request, body, plan)
    if failed is not None:
        return failed
    if plan.get("hang") or request.app[HUNG].is_set():
        request.app[HUNG].set()
        await asyncio.sleep(3600)
    if not body.get("stream"):
        await asyncio.sleep(float(plan.get("delay", 0)))
        return web.json_response({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    silent_after = plan.get("silent_after")
    events = int(plan.get("events", 3)) if silent_after is None else int(silent_after)
    for i in range(events):
        if i:
            await asyncio.sleep(float(plan.get("pace", 0)))
        await response.write(_chunk(i))
    if silent_after is not None:
        await asyncio.sleep(3600)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def embeddings(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await request.json()
    request.app[ARRIVALS].append(1)
    failed = await _failure(request, body, _plan(body))
    if failed is not None:
        return failed
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return web.json_response({"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [0.0, 1.0]}
                                                         for i in range(len(inputs))],
                              "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})


async def health(request: web.Request) -> web.Response:
    if request.app[HUNG].is_set():
        await asyncio.sleep(3600)
    return web.json_response({"status": "ok"})


async def arrivals(request: web.Request) -> web.Response:
    return web.json_response({"chat": len(request.app[ARRIVALS])})  # embeddings counted too


def main() -> None:
    app = web.Application()
    app[ARRIVALS] = []
    app[HUNG] = asyncio.Event()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/health", health)
    app.router.add_get("/arrivals", arrivals)
    web.run_app(app, path=sys.argv[1], print=None, handle_signals=True)


if __name__ == "__main__":
    main()
