"""Relay one request to a runner's unix socket and its answer back, streaming without buffering.

Every answer, streamed or not, is relayed as it comes: the daemon never holds a whole answer, however
large the engine makes it. On the OpenAI routes (HTTP/1.1 clients) the engine's bytes go to the client as
they are, chunk framing included (runnerd.relay), over the runner's pool of kept-alive connections. Only routes
that translate an answer read it whole, up to a bound. A client that hangs up while the engine computes
a non-streamed answer does not stop the engine (an engine may finish it anyway), so the runner stays
busy, by a lease of its own, until the engine has answered.
"""

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
from multidict import CIMultiDict

from backends.base import RunnerError
from runnerd.api.errors import ApiError
from runnerd.loop_turns import TURNS
from runnerd.metrics import REQUEST_MODEL
from runnerd.relay import (
    HOLD_UNTIL_FIRST_CHUNK,
    EngineStream,
    UpstreamHead,
    drain_unread,
    first_bytes,
    read_body,
    relay_raw,
)
from runnerd.scheduler import Lease, Runner
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
# The most of an engine's answer a route that translates it (Ollama, Anthropic, Responses) reads into
# memory to parse; past it the route answers 502. Relayed answers (the OpenAI routes) have no such bound.
MAX_TRANSLATED_ANSWER_BYTES = 128 << 20
# The most of an engine's refusal read to quote it in the error.
_MAX_REFUSAL_BYTES = 64 << 10
_PARSE_INLINE_BYTES = 1 << 20


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
async def answer_watch(runner: Runner) -> AsyncIterator[_HealthWatch]:
    """Bound the wait for a non-streamed answer by the engine's health rather than by a deadline: an
    engine computes a long answer in silence. Raises EngineSilent when a health check fails."""
    waiting = asyncio.current_task()
    assert waiting is not None
    watch = _HealthWatch(runner, waiting)
    try:
        yield watch
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


class _Answer:
    """An engine's answer whose status and headers have arrived; `close` releases it."""

    def __init__(self, upstream: aiohttp.ClientResponse, one_off: aiohttp.ClientSession | None) -> None:
        self.upstream = upstream
        self._one_off = one_off

    async def close(self) -> None:
        self.upstream.release()
        if self._one_off is not None:
            await self._one_off.close()


async def _watched_answer(runner: Runner, path: str, body: bytes, headers: dict[str, str]) -> _Answer:
    async with answer_watch(runner):
        return _Answer(*await send_to_runner(runner, path, body, headers, stream=False))


async def _answer_arrived(runner: Runner, path: str, body: bytes, headers: dict[str, str]) -> _Answer:
    """Send a non-streamed request and wait (watched by `answer_watch`) for its answer's status line.

    The wait runs in a task of its own: if the caller is cancelled (its client hung up), the engine's
    work goes on, and the runner is held busy until the engine has answered or failed its watch."""
    waiting = asyncio.create_task(_watched_answer(runner, path, body, headers),
                                  name=f"answer from {runner.key.slug}")
    try:
        await asyncio.wait({waiting})
    except asyncio.CancelledError:
        runner.spawn(_outlive_client, waiting, runner.hold())
        raise
    return waiting.result()


async def _outlive_client(waiting: asyncio.Task[_Answer], hold: Lease) -> None:
    """Hold the runner until the engine has answered the request its client gave up on, then drop the answer."""
    runner = hold.runner
    log.info("client hung up on %s; the runner stays busy until its engine answers", runner.model.name)
    try:
        await asyncio.wait({waiting})
    finally:
        if not waiting.done():
            waiting.cancel()  # the scheduler shuts down
        else:
            await _drop(waiting, runner)
        hold.release()


async def _drop(waiting: asyncio.Task[_Answer], runner: Runner) -> None:
    if waiting.cancelled():
        return
    failure = waiting.exception()
    if failure is not None:
        log.info("the engine serving %s failed an abandoned request: %s", runner.model.name, failure)
        return
    await waiting.result().close()


async def _answer_or_failure(runner: Runner, path: str, body: bytes, headers: dict[str, str]) -> _Answer:
    try:
        return await _answer_arrived(runner, path, body, headers)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise await engine_failure(runner, exc) from exc


async def _read_bounded(answer: _Answer, limit: int, runner: Runner) -> bytes:
    """The answer's body if it is at most `limit` bytes (the engine's health watched meanwhile), else
    a 502 naming the limit."""
    upstream = answer.upstream
    too_big = ApiError(502, f"the engine serving {runner.model.name} answered more than {limit} bytes, the most "
                            f"this route reads to translate an answer; ask for less, or use the OpenAI route "
                            f"(/v1/...), which relays answers of any size", code="answer_too_large",
                       type="server_error")
    if upstream.content_length is not None and upstream.content_length > limit:
        raise too_big
    raw = bytearray()
    try:
        async with answer_watch(runner):
            async for chunk in upstream.content.iter_any():
                raw += chunk
                if len(raw) > limit:
                    raise too_big
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise await engine_failure(runner, exc) from exc
    return bytes(raw)


async def _refusal(upstream: aiohttp.ClientResponse) -> bytes:
    """The start of an engine's refusal, enough to quote it."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        return await upstream.content.read(_MAX_REFUSAL_BYTES)
    return b""


async def forward(request: web.Request, runner: Runner, path: str, body: bytes, *,
                  stream: bool) -> web.StreamResponse:
    """POST `body` to `path` on the runner and relay the answer chunk by chunk, SSE or not."""
    request[REQUEST_MODEL] = runner.model.name  # the label request metrics use
    headers = {h: request.headers[h] for h in _FORWARDED_REQUEST_HEADERS if h in request.headers}
    if stream:
        return await _relay_stream(request, runner, path, body, headers)
    if request.version >= aiohttp.HttpVersion11:
        return await _relay_answer(request, runner, path, body, headers)
    answer = await _answer_or_failure(runner, path, body, headers)
    try:
        return await _relay_body(request, runner, answer.upstream)
    finally:
        await answer.close()


async def _relay_body(request: web.Request, runner: Runner, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Relay a non-SSE answer: its status and headers first, then its body as it arrives, the engine's
    health watched meanwhile. A failure after the status line cuts the connection: the client sees an
    answer shorter than announced, never a truncated one that looks whole."""
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream))
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    try:
        async with answer_watch(runner):
            first = await _held_first(request, runner, upstream)
            await response.prepare(request)
            if first:
                await response.write(first)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = await engine_failure(runner, exc)
        if not response.prepared:
            raise error from exc
        log.warning("answer from %s broke: %s", runner.model.name, error.message.splitlines()[0])
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def _held_first(request: web.Request, runner: Runner, upstream: aiohttp.ClientResponse) -> bytes:
    """For a held request (HOLD_UNTIL_FIRST_CHUNK), the answer's first body bytes, its 5xx raised."""
    if not request.get(HOLD_UNTIL_FIRST_CHUNK):
        return b""
    if upstream.status >= 500:
        raise _engine_error(upstream.status, await _refusal(upstream),
                            f"the engine serving {runner.model.name} answered {upstream.status}: ")
    return await upstream.content.readany()


async def _open_raw(runner: Runner, path: str, body: bytes, headers: dict[str, str],
                    idle_timeout: float | None) -> EngineStream:
    if runner.session is None or runner.session.closed:
        raise await engine_failure(runner, RuntimeError("runner is not ready"))
    try:
        return await runner.engine_pool.open(path, body, headers, idle_timeout)
    except aiohttp.ClientError as exc:
        raise await engine_failure(runner, exc) from exc


def _raw_response(head: UpstreamHead, whole: bytes | None) -> web.StreamResponse:
    kept = CIMultiDict((k, v) for k, v in head.headers if k.lower() not in _DROPPED_RESPONSE_HEADERS)
    if whole is not None:
        # Headers and body leave in one write.
        return web.Response(status=head.status, headers=kept, body=whole)
    response = web.StreamResponse(status=head.status, headers=kept)
    if head.length is not None and not head.chunked:
        response.content_length = head.length
    else:
        response.enable_chunked_encoding()
    return response


async def _body_before_start(request: web.Request, runner: Runner, head: UpstreamHead,
                             engine: EngineStream) -> tuple[bytes | bytearray, bool]:
    """The body in hand before the response starts, and whether it is all of it: the whole of a sized
    answer that arrived with its head; for a held request (HOLD_UNTIL_FIRST_CHUNK) its first bytes, a
    5xx or a failure before them raised instead; otherwise nothing yet."""
    held = request.get(HOLD_UNTIL_FIRST_CHUNK)
    if held and head.status >= 500:
        refusal = await read_body(engine, _MAX_REFUSAL_BYTES)
        raise _engine_error(head.status, refusal, f"the engine serving {runner.model.name} answered {head.status}: ")
    whole = engine.whole_body()
    if whole is not None:
        return whole, True
    if not held:
        return b"", False
    first = await first_bytes(engine)
    if not head.chunked and head.length is not None and len(first) >= head.length:
        return bytes(first), True
    return first, False  # still filling: relay_raw sends what it holds by then


async def _relay_raw_body(request: web.Request, response: web.StreamResponse, head: UpstreamHead,
                          engine: EngineStream, first: bytes | bytearray, whole: bool) -> None:
    await response.prepare(request)
    if not whole:
        await relay_raw(request, engine, frame=not head.chunked and head.length is None, first=first)
        turns = request.app[TURNS]
        if turns.spent():  # streams that end on the same engine step end over several turns
            await turns.take()
    await response.write_eof()


async def _relay_broke(request: web.Request, runner: Runner, response: web.StreamResponse | None,
                       exc: BaseException) -> web.StreamResponse:
    """The relay's answer to a broken exchange. Before the response started: the engine's failure as the
    route's error (the client's hang-up as it is). After: a client that hung up is left; an SSE stream
    ends with the error as its last event; anything else is cut, so that the client sees an answer
    shorter than announced, never a truncated one that looks whole."""
    started = response is not None and response.prepared
    if isinstance(exc, ConnectionResetError) and not isinstance(exc, aiohttp.ClientError):
        if not started:
            raise exc
        assert response is not None
        return response  # the client hung up: closing the engine's connection stops its work
    error = await engine_failure(runner, exc)
    if not started:
        raise error from exc
    assert response is not None
    log.warning("answer from %s broke: %s", runner.model.name, error.message.splitlines()[0])
    if response.chunked and response.headers.get("Content-Type", "").startswith("text/event-stream"):
        await response.write(error.sse_event())
        await response.write_eof()
    elif request.transport is not None:
        request.transport.close()
    return response


async def _relay_stream(request: web.Request, runner: Runner, path: str, body: bytes,
                        headers: dict[str, str]) -> web.StreamResponse:
    """Relay a streamed answer as it comes (runnerd.relay), the engine's idle timeout between reads."""
    if request.version < aiohttp.HttpVersion11:
        return await _relay_stream_parsed(request, runner, path, body, headers)
    engine = await _open_raw(runner, path, body, headers, runner.idle_timeout)
    response: web.StreamResponse | None = None
    try:
        head = await engine.head
        first, whole = await _body_before_start(request, runner, head, engine)
        response = _raw_response(head, bytes(first) if whole else None)
        await _relay_raw_body(request, response, head, engine, first, whole)
        return response
    except (TimeoutError, aiohttp.ClientError, ConnectionResetError) as exc:
        return await _relay_broke(request, runner, response, exc)
    finally:
        runner.engine_pool.release(engine)


async def _relay_answer(request: web.Request, runner: Runner, path: str, body: bytes,
                        headers: dict[str, str]) -> web.StreamResponse:
    """Relay a non-streamed answer as it comes, the engine's health watched rather than a deadline. A client
    that hangs up before the answer starts leaves the runner busy until the engine has answered."""
    engine = await _open_raw(runner, path, body, headers, None)
    handed_off = False
    response: web.StreamResponse | None = None
    try:
        async with answer_watch(runner) as watch:
            try:
                head = await asyncio.shield(engine.head)
            except asyncio.CancelledError:
                if watch.failed is not None:
                    raise  # the engine failed its health check: answer_watch says so
                runner.spawn(_outlive_client_raw, engine, runner.hold())
                handed_off = True
                raise
            first, whole = await _body_before_start(request, runner, head, engine)
            response = _raw_response(head, bytes(first) if whole else None)
            await _relay_raw_body(request, response, head, engine, first, whole)
        return response
    except (TimeoutError, aiohttp.ClientError, ConnectionResetError) as exc:
        return await _relay_broke(request, runner, response, exc)
    finally:
        if not handed_off:
            runner.engine_pool.release(engine)


async def _outlive_client_raw(engine: EngineStream, hold: Lease) -> None:
    """Hold the runner until the engine has answered the request its client gave up on, then drop the answer."""
    runner = hold.runner
    log.info("client hung up on %s; the runner stays busy until its engine answers", runner.model.name)
    try:
        async with answer_watch(runner):
            await engine.head
            await drain_unread(engine)
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.info("the engine serving %s failed an abandoned request: %s", runner.model.name, exc)
    finally:
        runner.engine_pool.release(engine)
        hold.release()


async def _relay_stream_parsed(request: web.Request, runner: Runner, path: str, body: bytes,
                               headers: dict[str, str]) -> web.StreamResponse:
    """The relay for HTTP/1.0 clients, which cannot take chunks as they are."""
    response: web.StreamResponse | None = None
    try:
        async with exchange(runner, path, body, headers, stream=True) as upstream:
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await _relay_body(request, runner, upstream)  # the engine refused the request
            first = await _held_first(request, runner, upstream)
            response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream))
            await response.prepare(request)
            if first:
                await response.write(first)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = await engine_failure(runner, exc)
        if response is None:
            raise error from exc
        log.warning("stream from %s broke: %s", runner.model.name, error.message.splitlines()[0])
        await response.write(error.sse_event())
        await response.write_eof()
        return response


def _engine_error(status: int, raw: bytes, prefix: str = "") -> ApiError:
    try:
        message = error_text(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError):
        message = raw.decode(errors="replace")[:500]
    return ApiError(status, prefix + message)


async def call_engine(runner: Runner, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a JSON body to the runner and return its JSON answer, for routes that translate it; an engine's
    error keeps its status (ApiError). An answer over MAX_TRANSLATED_ANSWER_BYTES is a 502."""
    exchanged = await _answer_or_failure(runner, path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
    try:
        if exchanged.upstream.status >= 400:
            raise _engine_error(exchanged.upstream.status, await _refusal(exchanged.upstream))
        raw = await _read_bounded(exchanged, MAX_TRANSLATED_ANSWER_BYTES, runner)
    finally:
        await exchanged.close()
    try:
        # A big answer takes the CPU for a while to parse: not on the event loop.
        answer = await asyncio.to_thread(json.loads, raw) if len(raw) > _PARSE_INLINE_BYTES else json.loads(raw)
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
                raise _engine_error(upstream.status, await _refusal(upstream))
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
