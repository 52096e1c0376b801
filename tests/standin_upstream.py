"""A stand-in upstream, not an engine: it misbehaves on purpose in ways a real engine cannot be made to
on demand, so the daemon's failover can be seen. It lists the models it is told to under /v1/models,
passes /health, records every request it gets, and answers inference as its mode says:

- "500": a 500 with a JSON error;
- "cut": a 200 text/event-stream status line, then it hangs up before any byte of the body;
- "half": one SSE chunk whose content is PARTIAL, then it hangs up;
- "slow": nothing for a minute (a timeout before the first byte), then a 500;
- "plain": a JSON chat answer whose content is its name (for capability checks, which must never reach it);
- "answer": a whole answer, streamed as asked: the JSON of "plain", or two SSE chunks `NAME-1 ` and
  `NAME-2` and `[DONE]`; to /v1/embeddings one vector per input, [1.0, 0.0, 0.5] (its first is 1.0 where
  the stand-in engine's is 0.0, so the two can be told apart).

Its model list can grow while it runs (`models.append`), and its first listing can be made to take
`first_listing_delay` seconds (a slow first discovery poll).

It runs in a thread of the test process on a loopback port of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

from aiohttp import web

PARTIAL = "STANDIN-PARTIAL"


class StandinUpstream:
    def __init__(self, name: str, mode: str, models: list[str], first_listing_delay: float = 0) -> None:
        self.name = name
        self.mode = mode
        self.models = models
        self._listing_delay = first_listing_delay
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, discovery included
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._thread = threading.Thread(target=self._serve, name=f"stand-in {name}", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the stand-in did not start"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inference_requests(self) -> list[str]:
        return [path for method, path in self.seen if method == "POST"]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/{route:.+}", self._inference)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        result: web.StreamResponse = await handler(request)
        return result

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        delay, self._listing_delay = self._listing_delay, 0
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if self.mode == "answer" and request.path == "/v1/embeddings":
            given = json.loads(raw)["input"]
            count = len(given) if isinstance(given, list) else 1
            return web.json_response({"object": "list", "data": [{"object": "embedding", "index": i,
                                                                  "embedding": [1.0, 0.0, 0.5]} for i in range(count)],
                                      "usage": {"prompt_tokens": count, "total_tokens": count}})
        if self.mode == "answer" and json.loads(raw).get("stream") is True:
            return await self._stream_answer(request)
        if self.mode == "slow":
            # Until the stand-in closes: aiohttp does not cancel a handler whose client hung up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), 60)
        if self.mode in ("500", "slow"):
            return web.json_response({"error": {"message": "stand-in failure", "type": "server_error"}}, status=500)
        if self.mode in ("plain", "answer"):
            return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": self.name},
                                                   "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "half":
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "shared",
                     "choices": [{"index": 0, "delta": {"content": PARTIAL}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        assert request.transport is not None
        request.transport.close()  # hang up mid-answer
        return response

    async def _stream_answer(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, text in enumerate((f"{self.name}-1 ", f"{self.name}-2")):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "standin",
                     "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop" if i else None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def close(self) -> None:
        async def stop() -> None:
            self._closing.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
