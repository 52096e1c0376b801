"""Send a request to the first source that answers, in order, failing over before the first byte.

A connection error, a 5xx or a timeout before the answer's first byte moves on to the next candidate; a
stream is held until its first chunk, so a client never sees a byte from a source that then fails. After
the first byte there is no failover: a broken stream ends with the API's error event. A capability the
endpoint's kind lacks takes it out of the list before any traffic reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from backends.base import Capability
from backends.external import ExternalEndpoint, read_at_most
from runnerd.api.errors import ApiError
from runnerd.metrics import REQUEST_MODEL
from runnerd.relay import HOLD_UNTIL_FIRST_CHUNK
from runnerd.sources import Candidate
from runnerd.sse import error_text, parse_sse_line

log = logging.getLogger("runnerd.failover")

_T = TypeVar("_T")
_DROPPED_RESPONSE_HEADERS = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date",
                        "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Set-Cookie",
                        "WWW-Authenticate"))
_MAX_REFUSAL_BYTES = 64 << 10
MAX_TRANSLATED_ANSWER_BYTES = 128 << 20


class _Failed(Exception):
    """This candidate failed before its first byte; try the next."""


@dataclass
class Opened:
    candidate: Candidate
    upstream: aiohttp.ClientResponse
    first: Any  # what the `first` reader returned; None for a refusal (status 4xx)


@dataclass
class Tried:
    """What trying the upstreams found: why each failed, and which one answered."""

    failures: list[str] = field(default_factory=list)
    source: str | None = None

    def headers(self) -> dict[str, str]:
        return {"X-Runnerd-Source": self.source} if self.source is not None else {}


def usable(candidates: list[Candidate], needed: list[Capability]) -> list[Candidate]:
    """The candidates whose endpoint serves every needed capability (local ones are checked by their
    backend later); 501 when none is left, before any request is sent."""
    kept = [c for c in candidates if c.endpoint is None or all(n in c.endpoint.capabilities for n in needed)]
    if not kept and candidates:
        lacking = {n for c in candidates if c.endpoint is not None for n in needed if n not in c.endpoint.capabilities}
        which = ", ".join(sorted(lacking))
        sources = ", ".join(f"{c.source} ({c.endpoint.spec.kind})" for c in candidates if c.endpoint is not None)
        raise ApiError(501, f"no source of {candidates[0].model} supports {which}: {sources}",
                       code="capability_not_supported", type="not_implemented_error")
    return kept


NO_SOURCE_LEFT = "upstream_unavailable"


def local_moves_on(exc: ApiError, *, last: bool) -> bool:
    """Whether a local candidate's failure before its answer started passes the request to the next source:
    a 5xx (its engine could not start, answered 5xx or dropped the connection) or an alias's local target
    that is not stored (passed over like a source that is down). A 4xx blames the request, which every
    other source would refuse too; with no source left the failure is the answer."""
    return not last and (exc.status >= 500 or exc.code == "model_not_found")


def local_failure(exc: ApiError) -> str:
    """A local failure as `Tried.failures` lists it."""
    return f"local: {exc.message.splitlines()[0]}"


def no_source_left(model: str, failures: list[str]) -> ApiError:
    return ApiError(502, f"no source could serve {model}: " + "; ".join(failures), code=NO_SOURCE_LEFT,
                    type="server_error")


async def _read_first_chunk(upstream: aiohttp.ClientResponse) -> bytes:
    chunk = await upstream.content.readany()
    if not chunk:
        raise _Failed("it closed the connection before the first byte")
    return chunk


async def _read_first_event(upstream: aiohttp.ClientResponse) -> Any:
    async for line in upstream.content:
        event = parse_sse_line(line)
        if event is not None:
            return event
    raise _Failed("it closed the stream before the first event")


async def _read_json(upstream: aiohttp.ClientResponse) -> Any:
    raw = await read_at_most(upstream.content, MAX_TRANSLATED_ANSWER_BYTES)
    if len(raw) > MAX_TRANSLATED_ANSWER_BYTES:
        raise ApiError(502, f"the answer is larger than {MAX_TRANSLATED_ANSWER_BYTES} bytes, the most this route "
                            f"translates", code="answer_too_large", type="server_error")
    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Failed("it answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise _Failed("it answered something that is not a JSON object")
    return answer


async def _try(endpoint: ExternalEndpoint, path: str, body: bytes, accept: str | None,
               first: Callable[[aiohttp.ClientResponse], Awaitable[_T]]) -> tuple[aiohttp.ClientResponse, _T | None]:
    headers = {"Content-Type": "application/json", **endpoint.headers()}
    if accept:
        headers["Accept"] = accept
    upstream: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(endpoint.spec.first_byte_timeout):
            upstream = await endpoint.session().post(endpoint.url(path), data=body, headers=headers)
            if upstream.status >= 500:
                raise _Failed(f"it answered {upstream.status}")
            if upstream.status >= 400:
                return upstream, None
            return upstream, await first(upstream)
    except TimeoutError:
        if upstream is not None:
            upstream.release()
        raise _Failed(f"no first byte within {endpoint.spec.first_byte_timeout:g} s") from None
    except aiohttp.ClientError as exc:
        if upstream is not None:
            upstream.release()
        raise _Failed(str(exc) or type(exc).__name__) from exc
    except BaseException:
        if upstream is not None:
            upstream.release()
        raise


@contextlib.asynccontextmanager
async def open_first(candidates: list[Candidate], path: str, payload: dict[str, Any], accept: str | None,
                     first: Callable[[aiohttp.ClientResponse], Awaitable[Any]],
                     failures: list[str]) -> AsyncIterator[Opened | None]:
    """The first upstream candidate whose answer's first part (`first`) arrived; None when every one
    failed (`failures` says why). A local candidate is skipped: the caller serves it."""
    for candidate in candidates:
        endpoint = candidate.endpoint
        if endpoint is None:
            continue
        body = json.dumps({**payload, "model": candidate.model}).encode()
        try:
            upstream, head = await _try(endpoint, path, body, accept, first)
        except _Failed as exc:
            log.warning("upstream %s failed %s for %s, trying the next source: %s", endpoint.name, path,
                        candidate.model, exc)
            failures.append(f"{endpoint.name}: {exc}")
            continue
        try:
            yield Opened(candidate, upstream, head)
        finally:
            upstream.release()
        return
    yield None


def _response_headers(upstream: aiohttp.ClientResponse, source: str) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_RESPONSE_HEADERS}
    headers["X-Runnerd-Source"] = source
    return headers


async def relay(request: web.Request, opened: Opened, *, stream: bool) -> web.StreamResponse:
    """Relay an opened answer whose first chunk (or refusal) is in hand."""
    upstream = opened.upstream
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream,
                                                                                  opened.candidate.source))
    if opened.first is None:  # a refusal: relay it whole, it is small
        raw = await read_at_most(upstream.content, _MAX_REFUSAL_BYTES)
        response.content_length = len(raw)
        await response.prepare(request)
        await response.write(raw)
        await response.write_eof()
        return response
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        await response.write(opened.first)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        source = opened.candidate.source
        log.warning("answer from upstream %s broke after its first byte: %s", source, exc)
        if not stream:
            if request.transport is not None:
                request.transport.close()  # a body shorter than announced, never one that looks whole
            return response
        error = ApiError(502, f"the upstream {source} serving {opened.candidate.model} broke off: "
                              f"{exc or type(exc).__name__}", code="upstream_broken", type="server_error")
        await response.write(error.sse_event())
    await response.write_eof()
    return response


async def _refusal(upstream: aiohttp.ClientResponse) -> ApiError:
    """An upstream's 4xx (the request is at fault, not the source: no failover), as an ApiError."""
    raw = await read_at_most(upstream.content, _MAX_REFUSAL_BYTES)
    try:
        message = error_text(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError):
        message = raw.decode(errors="replace")[:500]
    return ApiError(upstream.status, message)


async def call_upstreams(candidates: list[Candidate], path: str, body: dict[str, Any],
                         tried: Tried | None = None) -> dict[str, Any]:
    """A JSON answer from the first candidate that gives one, for routes that translate it."""
    tried = tried if tried is not None else Tried()
    async with open_first(candidates, path, {**body, "stream": False}, "application/json", _read_json,
                          tried.failures) as opened:
        if opened is None:
            raise no_source_left(candidates[0].model if candidates else "?", tried.failures)
        tried.source = opened.candidate.source
        if opened.first is None:
            raise await _refusal(opened.upstream)
        result: dict[str, Any] = opened.first
        return result


async def upstream_events(candidates: list[Candidate], path: str, body: dict[str, Any],
                          tried: Tried | None = None) -> AsyncGenerator[dict[str, Any], None]:
    """The first candidate's streamed answer, one SSE event at a time, held until its first event; a
    failure after it is yielded as {"error": ...} for the caller to end its own stream with."""
    tried = tried if tried is not None else Tried()
    async with open_first(candidates, path, body, "text/event-stream", _read_first_event, tried.failures) as opened:
        if opened is None:
            raise no_source_left(candidates[0].model if candidates else "?", tried.failures)
        tried.source = opened.candidate.source
        if opened.first is None:
            raise await _refusal(opened.upstream)
        if opened.first == "done":
            return
        yield opened.first
        try:
            async for line in opened.upstream.content:
                event = parse_sse_line(line)
                if event == "done":
                    return
                if event is not None:
                    yield event
        except (TimeoutError, aiohttp.ClientError) as exc:
            yield {"error": f"the upstream {opened.candidate.source} broke off: {exc or type(exc).__name__}"}


def _same_way(candidate: Candidate) -> Hashable:
    return None


def _run(candidates: list[Candidate], way: Callable[[Candidate], Hashable]) -> list[Candidate]:
    """The upstream candidates from the first on that are served the way the first is."""
    alike = way(candidates[0])
    return list(itertools.takewhile(lambda c: c.endpoint is not None and way(c) == alike, candidates))


async def serve_each(candidates: list[Candidate], needed: list[Capability], local: Callable[[str], Awaitable[_T]],
                     remote: Callable[[list[Candidate], Tried], Awaitable[_T]],
                     way: Callable[[Candidate], Hashable] = _same_way) -> _T:
    """For routes that translate: `local(model)` serves a local candidate the daemon's usual way, `remote`
    a run of upstream candidates (trying them in order with `Tried`) that `way` says are served alike (one
    relayed, another translated). A failure before the answer started (a 5xx, a local target that is not
    stored, no upstream of the run answering) moves on to the next."""
    candidates = usable(candidates, needed)
    tried = Tried()
    index = 0
    while index < len(candidates):
        candidate = candidates[index]
        if candidate.endpoint is None:
            index += 1
            try:
                return await local(candidate.model)
            except ApiError as exc:
                if not local_moves_on(exc, last=index == len(candidates)):
                    raise
                tried.failures.append(local_failure(exc))
                continue
        run = _run(candidates[index:], way)
        index += len(run)
        try:
            return await remote(run, tried)
        except ApiError as exc:
            if exc.code != NO_SOURCE_LEFT or index == len(candidates):
                raise
    raise no_source_left(candidates[0].model if candidates else "?", tried.failures)


async def serve(request: web.Request, candidates: list[Candidate], path: str, payload: dict[str, Any],
                needed: list[Capability], local: Callable[[str], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Answer an OpenAI-shaped request from the first candidate that answers. `local(model)` serves a local
    candidate the daemon's usual way; its failure before the answer started (a 5xx) moves on too."""
    candidates = usable(candidates, needed)
    request[REQUEST_MODEL] = str(payload.get("model"))  # the label request metrics use
    stream = payload.get("stream") is True
    failures: list[str] = []
    for index, candidate in enumerate(candidates):
        if candidate.endpoint is None:
            # With a source still to try, the local answer is held until the engine's first body bytes.
            request[HOLD_UNTIL_FIRST_CHUNK] = index < len(candidates) - 1
            try:
                return await local(candidate.model)
            except ApiError as exc:
                if not local_moves_on(exc, last=index == len(candidates) - 1):
                    raise
                failures.append(local_failure(exc))
                continue
        async with open_first([candidate], path, payload, request.headers.get("Accept"), _read_first_chunk,
                              failures) as opened:
            if opened is not None:
                return await relay(request, opened, stream=stream)
    raise no_source_left(candidates[0].model if candidates else str(payload.get("model")), failures)
