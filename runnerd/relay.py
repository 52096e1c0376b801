"""Relay a streamed answer from an engine as raw bytes: no parsing of events, no Python object per event.

The request goes to the engine on a connection of its own; once the status line and headers have arrived,
the engine's chunked body is written to the client's connection as it came, chunk framing included (both
sides speak HTTP/1.1 chunked encoding), cut only at chunk boundaries so that a failure can still end the
stream with a well-formed error event. The engine is read only as fast as the client takes the bytes.
An answer that is not chunked goes on as bytes, sized as the engine sized it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import aiohttp
from aiohttp import web

from backends.endpoint import LOOPBACK, EndpointKind

# Past this much unsent to the client, the engine is not read until the client catches up.
_HIGH_WATER = 256 << 10


class UpstreamHead:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], chunked: bool, length: int | None):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.chunked = chunked
        self.length = length


class EngineStream(asyncio.Protocol):
    """The engine's side of one exchange: parses its head, then hands on whole chunks to `sink`."""

    def __init__(self, idle_timeout: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[UpstreamHead] = self.loop.create_future()
        self.signal: asyncio.Future[str] = self.loop.create_future()
        self.sink: Callable[[bytes], None] | None = None
        self.downstream: asyncio.BaseTransport | None = None
        self.body = bytearray()  # before the sink is set, or the whole of a sized answer
        self._pending = bytearray()  # an incomplete chunk, from its size line on
        self._pending_end = 0
        self._ended = False
        self._failure: BaseException | None = None
        self._last = self.loop.time()
        self._timer = self.loop.call_later(idle_timeout, self._check_idle) if idle_timeout is not None else None
        self._sized: int | None = None
        self._received = 0
        self._close_delimited = False

    # -- events from the loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._close_delimited:
            self._end()
        elif not self._ended:
            self._fail(aiohttp.ServerDisconnectedError("the engine closed the connection mid-answer"))

    def data_received(self, data: bytes) -> None:
        self._last = self.loop.time()
        if not self.head.done():
            self.body += data
            self._parse_head()
            return
        if self._sized is not None:
            self._sized_data(data)
            return
        self._chunks(data)

    def _sized_data(self, data: bytes) -> None:
        if self.sink is None:
            self.body += data
            return
        room = self._sized - self._received if self._sized is not None else len(data)
        if len(data) > room:
            data = data[:room]
        self._received += len(data)
        if data:
            self.sink(data)
        if self._sized is not None and self._received >= self._sized:
            self._end()
        else:
            self._backpressure()

    # -- parsing

    def _parse_head(self) -> None:
        end = self.body.find(b"\r\n\r\n")
        if end < 0:
            if len(self.body) > 64 << 10:
                self._fail(aiohttp.ClientResponseError(None, (), message="the engine's headers are too long"))  # type: ignore[arg-type]
            return
        lines = bytes(self.body[:end]).decode("latin-1").split("\r\n")
        rest = bytes(self.body[end + 4:])
        self.body.clear()
        try:
            _, status, *reason = lines[0].split(" ", 2)
            headers = [(name.strip(), value.strip()) for name, _, value in (ln.partition(":") for ln in lines[1:])]
            chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)
            length = next((int(v) for n, v in headers if n.lower() == "content-length"), None)
            head = UpstreamHead(int(status), reason[0] if reason else "", headers, chunked, length)
        except ValueError:
            self._fail(aiohttp.ClientPayloadError(f"the engine answered a malformed status line: {lines[0][:100]!r}"))
            return
        self.head.set_result(head)
        if not chunked:
            self._sized = length
            self._close_delimited = length is None
            if rest:
                self.body += rest
            if length == 0:
                self._end()
        elif rest:
            self.body += rest

    def start(self, sink: Callable[[bytes], None], downstream: asyncio.BaseTransport | None) -> None:
        """Begin handing on the body (what arrived with the head first): whole chunks of a chunked
        answer, frame and all, or the bytes of one that is not."""
        self.sink = sink
        self.downstream = downstream
        if self.body:
            early = bytes(self.body)
            self.body.clear()
            if self._sized is not None or self._close_delimited:
                self._sized_data(early)
            else:
                self._chunks(early)

    def _chunks(self, data: bytes) -> None:
        if self.sink is None:
            self.body += data
            return
        if self._pending:
            self._pending += data
            if len(self._pending) < self._pending_end:
                return
            data = bytes(self._pending)
            self._pending.clear()
        pos, size_of, need = 0, len(data), 0
        while True:
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                need = size_of - pos + 1
                break
            try:
                size = int(data[pos:line_end].split(b";", 1)[0], 16)
            except ValueError:
                self._fail(aiohttp.ClientPayloadError("the engine sent a malformed chunk"))
                return
            if size == 0:
                if pos:
                    self.sink(data[:pos])
                self._end()
                return
            end = line_end + 2 + size + 2
            if end > size_of:
                need = end - pos
                break
            pos = end
        if pos:
            self.sink(data[:pos] if pos < size_of else data)
        if pos < size_of:
            self._pending += data[pos:]
            self._pending_end = need
        self._backpressure()

    def _backpressure(self) -> None:
        if self.downstream is None:
            return
        if self.downstream.is_closing():
            self._fail(ConnectionResetError("the client hung up"))
        elif self.downstream.get_write_buffer_size() > _HIGH_WATER:  # type: ignore[attr-defined]
            assert self.transport is not None
            self.transport.pause_reading()
            self._wake("pause")

    # -- outcome

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        idle = self.loop.time() - self._last
        if idle >= self.idle_timeout:
            self._fail(TimeoutError(f"it sent nothing for {self.idle_timeout:g} s (engine_idle_timeout)"))
        else:
            self._timer = self.loop.call_later(self.idle_timeout - idle, self._check_idle)

    def _wake(self, what: str) -> None:
        if not self.signal.done():
            self.signal.set_result(what)

    def _end(self) -> None:
        self._ended = True
        self._cancel_timer()
        self._wake("end")

    def _fail(self, exc: BaseException) -> None:
        if self._ended:
            return
        self._ended = True
        self._failure = exc
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()
        if not self.head.done():
            self.head.set_exception(exc)
        elif not self.signal.done():
            self.signal.set_exception(exc)

    def rearm(self) -> None:
        """After a pause: listen for the next wake-up, and read the engine again."""
        self.signal = self.loop.create_future()
        if self._failure is not None:
            self.signal.set_exception(self._failure)
        elif self._ended:
            self.signal.set_result("end")
        elif self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self._cancel_timer()
        self._ended = True
        if self.transport is not None:
            self.transport.close()
        for future in (self.head, self.signal):
            if future.done() and not future.cancelled():
                future.exception()  # read, so an unawaited failure is not logged


async def open_exchange(endpoint: Any, path: str, body: bytes, headers: dict[str, str],
                        idle_timeout: float | None) -> EngineStream:
    """Connect to the engine and send the request; its answer arrives on the returned protocol."""
    loop = asyncio.get_running_loop()
    factory = lambda: EngineStream(idle_timeout)  # noqa: E731
    try:
        if endpoint.kind is EndpointKind.UNIX:
            _, proto = await loop.create_unix_connection(factory, str(endpoint.path))
        else:
            _, proto = await loop.create_connection(factory, LOOPBACK, endpoint.port)
    except OSError as exc:
        raise aiohttp.ClientConnectionError(f"cannot connect to the engine: {exc}") from exc
    head = [f"POST {path} HTTP/1.1", "Host: runner", "Connection: close", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    assert proto.transport is not None
    proto.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    return proto


async def relay_raw(request: web.Request, engine: EngineStream, *, frame: bool = False) -> None:
    """Write the engine's body straight to the client's connection until its end: a chunked answer's
    chunks as they are (the response prepared chunked; its terminating chunk is the caller's), a sized
    one's bytes (the response prepared with the same length), or, with `frame`, a close-delimited one
    framed in chunks."""
    transport = request.transport
    assert transport is not None
    write = transport.write
    sink = (lambda data: write(b"%x\r\n%s\r\n" % (len(data), data))) if frame else write
    engine.start(sink, transport)
    while await engine.signal == "pause":
        await request.writer.drain()
        engine.rearm()


async def drain_unread(engine: EngineStream) -> None:
    """Read the rest of an answer nobody will receive, so that the engine finishes it."""
    engine.start(lambda data: None, None)
    await engine.signal
