"""Relay an engine's answer as raw bytes over pooled keep-alive connections: no parsing of events, no
Python object per event.

Each runner has an EnginePool: a bounded set of idle HTTP/1.1 connections to its engine, each dropped well
before the engine's own keep-alive timeout would close it (the engine servers seen close idle ones
after 5 s). A request takes an idle connection or opens one; once the engine's status line and headers have
arrived, its chunked body is written to the client's connection as it came, chunk framing included (both
sides speak HTTP/1.1 chunked encoding), cut only at chunk boundaries so that a failure can still end the
stream with a well-formed error event. The engine is read only as fast as the client takes the bytes. An
answer that is not chunked goes on as bytes, sized as the engine sized it. A connection goes back to the
pool only after a sized answer that ended exactly at its end (an engine may close its side after a
chunked one); anything else closes it.

A request reaches the engine at most once: it is sent again, once and on a new connection, only when the
connection failed before all of the request was handed to the kernel (an idle connection the engine had
just closed), since the engine cannot then have read all of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from aiohttp import web

from backends.endpoint import LOOPBACK, EndpointKind

# Past this much unsent to the client, the engine is not read until the client catches up.
_HIGH_WATER = 256 << 10
# Idle connections kept per runner; more than this many at once are closed when their answer ends.
POOL_MAX_IDLE = 32
# How long a connection may sit idle in the pool: below the 5 s after which engines close idle ones.
POOL_IDLE_SECONDS = 3.0
_CONNECT_SECONDS = 10.0
_MAX_HEAD_BYTES = 64 << 10

# Set on a request by a caller that can still send it elsewhere (failover): its answer is not started
# until the engine's first body bytes are in, and a failure before them raises instead.
HOLD_UNTIL_FIRST_CHUNK = web.RequestKey("hold_until_first_chunk", bool)


@dataclass(slots=True)
class UpstreamHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    chunked: bool
    length: int | None
    keep_alive: bool


class EngineStream(asyncio.Protocol):
    """One connection to an engine, carrying one exchange at a time: parses each answer's head, then
    hands on whole chunks (or the bytes of a sized answer) to `sink`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._unsent = False  # some of the request's bytes not handed to the kernel yet
        self._flushed: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset(None)
        self._active = False

    def _reset(self, idle_timeout: float | None) -> None:
        self.idle_timeout = idle_timeout
        self.head: asyncio.Future[UpstreamHead] = self.loop.create_future()
        self.signal: asyncio.Future[str] = self.loop.create_future()
        self.sink: Callable[[bytes], None] | None = None
        self.downstream: asyncio.BaseTransport | None = None
        self.chunked = False
        self.body = bytearray()  # before the sink is set
        self._pending = bytearray()  # an incomplete chunk, from its size line on
        self._pending_end = 0
        self._ended = False
        self._clean = False  # the answer ended exactly at its end: the connection may carry another
        self._keep_alive = False
        self._failure: BaseException | None = None
        self._sized: int | None = None
        self._received = 0
        self._close_delimited = False
        self._active = True

    def begin(self, request: bytes, idle_timeout: float | None) -> None:
        """Start an exchange: send the request; its answer's status line and headers arrive on `head`."""
        self._reset(idle_timeout)
        self._last = self.loop.time()
        if idle_timeout is not None:
            self._timer = self.loop.call_later(idle_timeout, self._check_idle)
        assert self.transport is not None
        self._unsent = False
        self.transport.write(request)
        if self.transport.is_closing():  # the write failed: the connection is being torn down
            self._unsent = True

    @property
    def unsent(self) -> bool:
        """Whether the connection failed before the whole request reached the kernel."""
        return self._unsent and self.lost

    @property
    def reusable(self) -> bool:
        return self._clean and self._keep_alive and not self.lost and self.transport is not None \
            and not self.transport.is_closing()

    async def flushed(self) -> None:
        """Wait until the request's last byte is handed to the kernel, or the connection is lost."""
        if self._unsent and not self.lost:
            self._flushed = self.loop.create_future()
            await self._flushed

    # -- events from the loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        # Told when every written byte has left the buffer: until then a lost connection left the request unsent.
        self.transport.set_write_buffer_limits(high=0, low=0)

    def pause_writing(self) -> None:
        self._unsent = True

    def resume_writing(self) -> None:
        self._unsent = False
        self._wake_flushed()

    def _wake_flushed(self) -> None:
        if self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        self._wake_flushed()
        if not self._active:
            return
        if self._close_delimited:
            self._end()
        elif not self._ended:
            self._fail(aiohttp.ServerDisconnectedError("the engine closed the connection mid-answer"))

    def data_received(self, data: bytes) -> None:
        if not self._active or self._ended:
            # Bytes outside an exchange (or past an answer's end): the connection cannot be trusted again.
            self._keep_alive = False
            assert self.transport is not None
            self.transport.close()
            return
        self._last = self.loop.time()
        if not self.head.done():
            self.body += data
            self._parse_head()
            return
        if self._sized is not None or self._close_delimited:
            self._sized_data(data)
            return
        self._chunks(data)

    def _sized_data(self, data: bytes) -> None:
        if self.sink is None:
            self.body += data
            return
        if self._sized is not None:
            room = self._sized - self._received
            if len(data) > room:
                self._keep_alive = False  # more than it announced
                data = data[:room]
        self._received += len(data)
        if data:
            self.sink(data)
        if self._sized is not None and self._received >= self._sized:
            self._end(clean=True)
        else:
            self._backpressure()

    # -- parsing

    def _parse_head(self) -> None:
        end = self.body.find(b"\r\n\r\n")
        if end < 0:
            if len(self.body) > _MAX_HEAD_BYTES:
                self._fail(aiohttp.ClientResponseError(None, (), message="the engine's headers are too long"))  # type: ignore[arg-type]
            return
        lines = bytes(self.body[:end]).decode("latin-1").split("\r\n")
        rest = bytes(self.body[end + 4:])
        self.body.clear()
        try:
            head = _head_from(lines)
        except ValueError as exc:
            self._fail(aiohttp.ClientPayloadError(f"the engine answered a malformed head: {exc}"))
            return
        # Some engines close their side right after a chunked answer, announcing keep-alive all the same:
        # a request sent on in the moment before its close arrives would be lost, so only a sized answer
        # leaves the connection to carry another.
        self._keep_alive = head.keep_alive and not head.chunked
        self.chunked = head.chunked
        self.head.set_result(head)
        if not head.chunked:
            self._sized = head.length
            self._close_delimited = head.length is None
            if head.length == 0:
                if rest:
                    self._keep_alive = False
                self._end(clean=True)
                return
        if rest:
            self.body += rest

    def whole_body(self) -> bytes | None:
        """A sized answer's whole body if all of it is in and none was handed on, taken (the exchange
        ends); else None."""
        if self.sink is not None or self._sized is None or len(self.body) < self._sized or self._failure:
            return None
        if len(self.body) > self._sized:
            self._keep_alive = False
        whole = bytes(self.body[:self._sized])
        self.body.clear()
        self._received = self._sized
        self.sink = _discard
        self._end(clean=True)
        return whole

    def start(self, sink: Callable[[bytes], None], downstream: asyncio.BaseTransport | None) -> None:
        """Hand on the body from here on (what arrived before first) to `sink`: whole chunks of a chunked
        answer, frame and all, or the bytes of one that is not. `downstream`, when given, is the transport
        whose backlog pauses the engine."""
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
        if not self._pending and self._one_whole_chunk(data):
            self.sink(data)
            self._backpressure()
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
            size = _chunk_size(data[pos:line_end])
            if size < 0:
                self._fail(aiohttp.ClientPayloadError("the engine sent a malformed chunk"))
                return
            end = line_end + 2 + size + 2
            if end > size_of:
                need = end - pos
                break
            if size == 0:
                if pos:
                    self.sink(data[:pos])
                # Trailers, or bytes past the end, leave the connection in a state not worth reading.
                if data[line_end + 2:end] != b"\r\n" or end != size_of:
                    self._keep_alive = False
                self._end(clean=True)
                return
            pos = end
        if pos:
            self.sink(data[:pos] if pos < size_of else data)
        if pos < size_of:
            self._pending += data[pos:]
            self._pending_end = need
        self._backpressure()

    @staticmethod
    def _one_whole_chunk(data: bytes) -> bool:
        """Whether `data` is exactly one whole chunk with a body: what an engine sends for each event."""
        line_end = data.find(b"\r\n", 0, 18)
        if line_end <= 0:
            return False
        size = _chunk_size(data[:line_end])
        return size > 0 and line_end + size + 4 == len(data)

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

    def _end(self, *, clean: bool = False) -> None:
        if self._failure is not None:
            return
        self._ended = True
        self._clean = clean
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
        """After a wake-up that was not the end: listen for the next one, and read the engine again."""
        self.signal = self.loop.create_future()
        if self._failure is not None:
            self.signal.set_exception(self._failure)
        elif self._ended:
            self.signal.set_result("end")
        elif self.transport is not None:
            self.transport.resume_reading()

    def finish(self) -> None:
        """End the exchange: its futures' outcomes are read, so that none is logged as unretrieved."""
        self._cancel_timer()
        self._active = False
        for future in (self.head, self.signal):
            if future.done() and not future.cancelled():
                future.exception()

    def close(self) -> None:
        self._ended = True
        self.finish()
        if self.transport is not None:
            self.transport.close()


def _digits(text: str, what: str) -> int:
    """A decimal number of plain ASCII digits (int() would also take signs, spaces and underscores)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} {text[:40]!r}")
    return int(text)


def _head_from(lines: list[str]) -> UpstreamHead:
    """An answer's status line and headers; ValueError names what is malformed."""
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or len(parts[1]) != 3:
        raise ValueError(f"status line {lines[0][:100]!r}")
    version, status, reason = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    headers = [(name.strip(), value.strip()) for name, _, value in (ln.partition(":") for ln in lines[1:])]
    chunked, length, keep_alive = False, None, version == "HTTP/1.1"
    for name, value in headers:
        lowered = name.lower()
        if lowered == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif lowered == "content-length":
            length = _digits(value, "Content-Length")
        elif lowered == "connection" and "close" in value.lower():
            keep_alive = False
    return UpstreamHead(_digits(status, "status"), reason, headers, chunked, length, keep_alive)


def _chunk_size(line: bytes) -> int:
    """A chunk's size from its size line (hex digits, then any extension), or -1 if the line is malformed.
    Signs, spaces and underscores, which int() would take, are malformed: the client's parser refuses them."""
    digits = line.split(b";", 1)[0]
    if not digits.isalnum():
        return -1
    try:
        return int(digits, 16)
    except ValueError:
        return -1


def _discard(data: bytes) -> None:
    pass


class EnginePool:
    """Idle keep-alive connections to one runner's engine, most recently used first."""

    def __init__(self, endpoint: Any, max_idle: int = POOL_MAX_IDLE, idle_seconds: float = POOL_IDLE_SECONDS) -> None:
        self.endpoint = endpoint
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self.closed = False
        self._idle: collections.deque[EngineStream] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._idle)

    async def open(self, path: str, body: bytes, headers: dict[str, str], idle_timeout: float | None) -> EngineStream:
        """Send the request on an idle connection or a new one; its answer arrives on the returned
        stream's `head`. Raises aiohttp.ClientConnectionError when the engine cannot be reached."""
        lines = [f"POST {path} HTTP/1.1", "Host: runner", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        engine = self._take() or await self._connect()
        try:
            engine.begin(request, idle_timeout)
            await engine.flushed()
            if engine.unsent:
                engine.close()
                engine = await self._connect()
                engine.begin(request, idle_timeout)
                await engine.flushed()
        except BaseException:
            engine.close()
            raise
        return engine

    def _take(self) -> EngineStream | None:
        idle = self._idle
        while idle:
            engine = idle.pop()
            if not engine.lost and engine.transport is not None and not engine.transport.is_closing():
                return engine
        return None

    async def _connect(self) -> EngineStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_CONNECT_SECONDS):
                if self.endpoint.kind is not EndpointKind.UNIX:
                    _, engine = await loop.create_connection(EngineStream, LOOPBACK, self.endpoint.port)
                    return engine
                pause = 0.002
                while True:
                    # A unix socket whose listen queue is full refuses with EAGAIN: uvloop raises it,
                    # asyncio takes it for a connection under way and reports one made, with no peer.
                    # Nothing was sent, so trying again is safe (an engine's listen queue may hold as few as 5).
                    with contextlib.suppress(BlockingIOError):
                        transport, engine = await loop.create_unix_connection(EngineStream, str(self.endpoint.path))
                        if transport.get_extra_info("peername"):
                            return engine
                        transport.close()
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.1)
        except (OSError, TimeoutError) as exc:
            raise aiohttp.ClientConnectionError(f"cannot connect to the engine: {exc or type(exc).__name__}") from exc

    def release(self, engine: EngineStream) -> None:
        """Keep the connection for the next request if its answer ended cleanly, else close it."""
        engine.finish()
        if self.closed or not engine.reusable or len(self._idle) >= self.max_idle:
            engine.close()
            return
        engine.idle_since = engine.loop.time()
        self._idle.append(engine)
        if self._sweep is None:
            self._sweep = engine.loop.call_later(self.idle_seconds, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        if not self._idle:
            return
        loop = self._idle[0].loop
        cutoff = loop.time() - self.idle_seconds
        while self._idle and self._idle[0].idle_since <= cutoff:
            self._idle.popleft().close()
        if self._idle:
            self._sweep = loop.call_at(self._idle[0].idle_since + self.idle_seconds, self._expire)

    def close(self) -> None:
        """Close every idle connection; connections released from now on are closed too."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            self._idle.pop().close()


async def relay_raw(request: web.Request, engine: EngineStream, *, frame: bool = False,
                    first: bytes | bytearray = b"") -> None:
    """Write the engine's body straight to the client's connection until its end: `first` (body bytes
    held back until the response started), then a chunked answer's chunks as they are (the response
    prepared chunked; its terminating chunk is the caller's), a sized one's bytes (the response prepared
    with the same length), or, with `frame`, a close-delimited one framed in chunks."""
    transport = request.transport
    assert transport is not None
    write = transport.write
    sink = (lambda data: write(b"%x\r\n%s\r\n" % (len(data), data))) if frame else write
    if first:
        sink(bytes(first))
    engine.start(sink, transport)
    while (what := await engine.signal) != "end":
        if what == "pause":
            await request.writer.drain()
        engine.rearm()


async def first_bytes(engine: EngineStream) -> bytearray:
    """Hold the body until its first bytes (whole chunks) have arrived, or it ended without any. What
    is held keeps growing (the engine is still read) until the caller passes it to `relay_raw`. Raises
    the engine's failure."""
    held = bytearray()

    def hold(data: bytes) -> None:
        held.extend(data)
        engine._wake("data")

    engine.start(hold, None)
    while not held and await engine.signal != "end":
        engine.rearm()
    return held


async def read_body(engine: EngineStream, limit: int) -> bytes:
    """The body, chunk framing removed, up to about `limit` bytes (past them the connection is closed)."""
    held = bytearray()

    def keep(data: bytes) -> None:
        held.extend(data)
        if len(held) > limit:
            engine._fail(aiohttp.ClientPayloadError(f"more than {limit} bytes"))

    engine.start(keep, None)
    with contextlib.suppress(aiohttp.ClientPayloadError):
        await engine.signal
    return _unframe(bytes(held)) if engine.chunked else bytes(held)


def _unframe(framed: bytes) -> bytes:
    """The payload of whole chunks, frame by frame (a cut last frame gives what it has)."""
    payload, pos = bytearray(), 0
    while (line_end := framed.find(b"\r\n", pos)) >= 0:
        size = _chunk_size(framed[pos:line_end])
        if size < 0:
            break
        payload += framed[line_end + 2:line_end + 2 + size]
        pos = line_end + 2 + size + 2
    return bytes(payload)


async def drain_unread(engine: EngineStream) -> None:
    """Read the rest of an answer nobody will receive, so that the engine finishes it."""
    engine.start(lambda data: None, None)
    await engine.signal
