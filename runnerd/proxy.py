"""Relay one request to a runner's unix socket and its answer back, streaming without buffering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from backends.base import RunnerError
from runnerd.api.errors import ApiError
from runnerd.metrics import REQUEST_MODEL
from runnerd.scheduler import Runner
from runnerd.sse import error_text, parse_sse_line

log = logging.getLogger("runnerd.proxy")

_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept")
_DROPPED_RESPONSE_HEADERS = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date",
                        "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials"))
# How long to wait for a dead engine's exit to be noticed before answering without its last words.
_EXIT_NOTICE_SECONDS = 2.0
# How long a busy engine may take to answer its health check while it computes an answer.
_HEALTH_PROBE_SECONDS = 30.0


def _response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_RESPONSE_HEADERS}


class EngineSilent(TimeoutError):
    """The engine stopped answering a request: no byte of a streamed answer for the idle timeout, or
    no health check passed while a non-streamed answer was awaited."""


async def engine_failure(runner: Runner, exc: BaseException) -> ApiError:
    error = await runner.exit_error(_EXIT_NOTICE_SECONDS)
    if error is not None:
        return runner_error(runner.model.name, error)
    if isinstance(exc, TimeoutError):
        why = str(exc) if isinstance(exc, EngineSilent) else (
            f"it sent nothing for {runner.idle_timeout:g} s (engine_idle_timeout)")
        return ApiError(504, f"the engine serving {runner.model.name} stopped answering: {why}",
                        code="runner_timeout", type="server_error")
    return ApiError(502, f"the engine serving {runner.model.name} did not answer: {exc}", code="runner_unreachable")


def runner_error(model: str, error: RunnerError) -> ApiError:
    tail = "\n".join(error.tail[-8:])
    message = f"the engine serving {model} failed: {error.summary}"
    if tail:
        message += f"\nlast engine output:\n{tail}"
    status = 507 if error.reason == "out_of_memory" else 503 if error.reason == "shutting_down" else 500
    return ApiError(status, message, code=f"runner_{error.reason}", type="server_error")


class _RequestBody(aiohttp.BytesPayload):
    """A request body that remembers whether all of it was handed to the connection: until then the
    engine cannot have read the whole request, so sending it again cannot make it run twice."""

    delivered = False

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await super().write_with_length(writer, content_length)
        self.delivered = True


async def send_to_runner(runner: Runner, path: str, body: bytes, headers: dict[str, str], *,
                         stream: bool) -> tuple[aiohttp.ClientResponse, aiohttp.ClientSession | None]:
    """POST to the runner; returns the response and a one-off session to close after it.

    A request reaches the engine at most once: it is sent again (once, on a connection of its own) only
    when the first attempt failed before the whole request was written, e.g. on a pooled connection the
    engine had closed. A streamed answer may be silent for the runner's idle timeout between any two
    reads (the wait for the first token included); a non-streamed one is watched by `answer_watch`.
    """
    session = runner.session
    if session is None or session.closed:
        raise await engine_failure(runner, RuntimeError("runner is not ready"))
    url = runner.endpoint.url(path)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=runner.idle_timeout if stream else None)
    first = _RequestBody(body)
    try:
        return await session.post(url, data=first, headers=headers, timeout=timeout), None
    except aiohttp.ClientError as exc:
        if first.delivered or isinstance(exc, TimeoutError):
            raise
        log.debug("request to %s was not written (%s); sending it on a new connection", runner.model.name, exc)
    fresh = aiohttp.ClientSession(connector=runner.endpoint.connector(force_close=True), auto_decompress=False,
                                  timeout=session.timeout)
    try:
        return await fresh.post(url, data=_RequestBody(body), headers=headers, timeout=timeout), fresh
    except BaseException:
        await fresh.close()
        raise


class _HealthWatch:
    """Every idle timeout, ask the engine whether it still lives; if not, cancel the waiting task."""

    def __init__(self, runner: Runner, waiting: asyncio.Task[Any]) -> None:
        self.runner = runner
        self.waiting = waiting
        self.failed: str | None = None
        self._loop = asyncio.get_running_loop()
        self._probe: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(runner.idle_timeout, self._start_probe)

    def _start_probe(self) -> None:
        self._probe = self._loop.create_task(self._check())

    async def _check(self) -> None:
        idle = self.runner.idle_timeout
        if await self.runner.responsive(min(_HEALTH_PROBE_SECONDS, idle)):
            self._timer = self._loop.call_later(idle, self._start_probe)
            return
        self.failed = f"it did not pass a health check after {idle:g} s without an answer (engine_idle_timeout)"
        self.waiting.cancel()

    def close(self) -> None:
        self._timer.cancel()
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()


@contextlib.asynccontextmanager
async def answer_watch(runner: Runner) -> AsyncIterator[None]:
    """Bound the wait for a non-streamed answer by the engine's health rather than by a deadline: an
    engine computes a long answer in silence. Raises EngineSilent when a health check fails."""
    waiting = asyncio.current_task()
    assert waiting is not None
    watch = _HealthWatch(runner, waiting)
    try:
        yield
    except asyncio.CancelledError:
        if watch.failed is not None and waiting.uncancel() == 0:
            raise EngineSilent(watch.failed) from None
        raise
    finally:
        watch.close()


@contextlib.asynccontextmanager
async def exchange(runner: Runner, path: str, body: bytes, headers: dict[str, str], *,
                   stream: bool) -> AsyncIterator[aiohttp.ClientResponse]:
    """One request to the runner (see send_to_runner), its answer released when the block ends."""
    upstream, one_off = await send_to_runner(runner, path, body, headers, stream=stream)
    try:
        yield upstream
    finally:
        upstream.release()
        if one_off is not None:
            await one_off.close()


async def _whole_answer(runner: Runner, path: str, body: bytes,
                        headers: dict[str, str]) -> tuple[aiohttp.ClientResponse, bytes]:
    """A non-streamed answer, read whole; engine failures become ApiError."""
    try:
        async with answer_watch(runner), exchange(runner, path, body, headers, stream=False) as upstream:
            return upstream, await upstream.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise await engine_failure(runner, exc) from exc


async def forward(request: web.Request, runner: Runner, path: str, body: bytes, *,
                  stream: bool) -> web.StreamResponse:
    """POST `body` to `path` on the runner and relay the answer; SSE is relayed chunk by chunk."""
    request[REQUEST_MODEL] = runner.model.name  # the label request metrics use
    headers = {h: request.headers[h] for h in _FORWARDED_REQUEST_HEADERS if h in request.headers}
    if stream:
        return await _relay_stream(request, runner, path, body, headers)
    upstream, payload = await _whole_answer(runner, path, body, headers)
    return web.Response(status=upstream.status, body=payload, headers=_response_headers(upstream))


async def _relay_stream(request: web.Request, runner: Runner, path: str, body: bytes,
                        headers: dict[str, str]) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    try:
        async with exchange(runner, path, body, headers, stream=True) as upstream:
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                payload = await upstream.read()  # the engine refused the request: relay its answer
                return web.Response(status=upstream.status, body=payload, headers=_response_headers(upstream))
            response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = await engine_failure(runner, exc)
        if response is None:
            raise error from exc
        # The status line is gone already: end the stream with the error as its last event.
        log.warning("stream from %s broke: %s", runner.model.name, error.message.splitlines()[0])
        await response.write(error.sse_event())
        await response.write_eof()
        return response


def _engine_error(status: int, raw: bytes) -> ApiError:
    try:
        message = error_text(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError):
        message = raw.decode(errors="replace")[:500]
    return ApiError(status, message)


async def call_engine(runner: Runner, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a JSON body to the runner and return its JSON answer, for routes that translate it; an engine's
    error keeps its status (ApiError)."""
    upstream, raw = await _whole_answer(runner, path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    if upstream.status >= 400:
        raise _engine_error(upstream.status, raw)
    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise ApiError(502, f"the engine serving {runner.model.name} answered something that is not a JSON object")
    return answer


async def engine_events(runner: Runner, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The runner's streamed answer, one parsed SSE event at a time, for routes that translate it. Errors
    before the first event raise ApiError; a failure mid-stream is yielded as {"error": ...} for the
    caller to end its own stream with."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    started = False
    try:
        async with exchange(runner, path, json.dumps(body).encode(), headers, stream=True) as upstream:
            if upstream.status >= 400:
                raise _engine_error(upstream.status, await upstream.read())
            async for line in upstream.content:
                event = parse_sse_line(line)
                if event == "done":
                    return
                if event is not None:
                    started = True
                    yield event
    except (TimeoutError, aiohttp.ClientError) as exc:
        failure = await engine_failure(runner, exc)
        if not started:
            raise failure from exc
        yield {"error": failure.message}
