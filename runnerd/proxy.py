"""Relay one request to a runner's unix socket and its answer back, streaming without buffering."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from backends.base import RunnerError
from runnerd.api.errors import ApiError
from runnerd.metrics import REQUEST_MODEL
from runnerd.scheduler import Runner

log = logging.getLogger("runnerd.proxy")

_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept")
_DROPPED_RESPONSE_HEADERS = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date",
                        "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials"))
# How long to wait for a dead engine's exit to be noticed before answering without its last words.
_EXIT_NOTICE_SECONDS = 2.0


def _response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_RESPONSE_HEADERS}


async def engine_failure(runner: Runner, exc: BaseException) -> ApiError:
    error = await runner.exit_error(_EXIT_NOTICE_SECONDS)
    if error is None:
        return ApiError(502, f"the engine serving {runner.model.name} did not answer: {exc}",
                        code="runner_unreachable")
    return runner_error(runner.model.name, error)


def runner_error(model: str, error: RunnerError) -> ApiError:
    tail = "\n".join(error.tail[-8:])
    message = f"the engine serving {model} failed: {error.summary}"
    if tail:
        message += f"\nlast engine output:\n{tail}"
    status = 507 if error.reason == "out_of_memory" else 503 if error.reason == "shutting_down" else 500
    return ApiError(status, message, code=f"runner_{error.reason}", type="server_error")


async def send_to_runner(runner: Runner, session: aiohttp.ClientSession, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[aiohttp.ClientResponse, aiohttp.ClientSession | None]:
    """POST to the runner; returns the response and a one-off session to close after it.

    A pooled connection the engine closed while idle fails before the request was sent: that request
    is sent again once, on a connection of its own.
    """
    try:
        return await session.post(f"http://runner{path}", data=body, headers=headers), None
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        log.debug("stale connection to %s (%s); retrying on a new one", runner.model.name, exc)
    fresh = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(runner.socket_path), force_close=True),
                                  auto_decompress=False)
    try:
        return await fresh.post(f"http://runner{path}", data=body, headers=headers), fresh
    except BaseException:
        await fresh.close()
        raise


async def forward(request: web.Request, runner: Runner, path: str, body: bytes) -> web.StreamResponse:
    """POST `body` to `path` on the runner and relay the answer; SSE is relayed chunk by chunk."""
    request[REQUEST_MODEL] = runner.model.name  # the label request metrics use
    session = runner.session
    if session is None or session.closed:
        raise await engine_failure(runner, RuntimeError("runner is not ready"))
    headers = {h: request.headers[h] for h in _FORWARDED_REQUEST_HEADERS if h in request.headers}
    response: web.StreamResponse | None = None
    try:
        upstream, one_off = await send_to_runner(runner, session, path, body, headers)
        try:
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream))
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload, headers=_response_headers(upstream))
        finally:
            upstream.release()
            if one_off is not None:
                await one_off.close()
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = await engine_failure(runner, exc)
        if response is None:
            raise error from exc
        # The status line is gone already: end the stream with the error as its last event.
        log.warning("stream from %s broke: %s", runner.model.name, error.message.splitlines()[0])
        await response.write(error.sse_event())
        await response.write_eof()
        return response
