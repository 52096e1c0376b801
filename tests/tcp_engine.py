"""A test engine: a small OpenAI-compatible chat server that listens on loopback TCP only.

It stands for an engine runnerd has no built-in support for (it computes nothing: it answers with
its configured greeting and the number of the request). It serves `/v1/chat/completions`, streamed
or not, `/health` and `/v1/models`; anything else is a 404, as from a real engine that lacks it.

    python tests/tcp_engine.py --host 127.0.0.1 --port PORT --greeting TEXT [--temperature X]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aiohttp import web

SERVED = web.AppKey("served", list)


def _answer(request: web.Request) -> str:
    args: argparse.Namespace = request.app["args"]
    return f"{args.greeting} #{len(request.app[SERVED])} (temperature {args.temperature})"


async def chat(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await request.json()
    request.app[SERVED].append(body)
    text = _answer(request)
    if not body.get("stream"):
        return web.json_response({
            "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 1}})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in text.split(" "):
        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": body.get("model"),
                 "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--greeting", default="hello")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    app = web.Application()
    app["args"] = args
    app[SERVED] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
