"""The relay's pool of kept-alive connections to an engine (runnerd.relay.EnginePool), over real unix sockets.

Most tests here use a STAND-IN engine defined in this file (a minimal HTTP/1.1 server, not an engine): it
counts the connections it accepts and the requests it reads, answers each path in a fixed way, and can
tear a connection down or leave its listen queue unserved, which real engines do only by accident. The
last runs mixed traffic through a daemon to a real llama-server.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

from backends.endpoint import Endpoint
from runnerd.relay import EnginePool, EngineStream, read_body
from tests.conftest import Daemon

ANSWERS = {
    "/sized": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"ok\": true}",
    "/chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"7\r\ndata: 1\r\n7\r\ndata: 2\r\n0\r\n\r\n",
    "/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
}


class _Conn(asyncio.Protocol):
    def __init__(self, engine: StandInEngine) -> None:
        self.engine = engine
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.engine.conns.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.closed += 1
        self.engine.changed.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = next(int(v) for n, _, v in (h.partition(":") for h in head[1:]) if n.lower() == "content-length")
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[:end + 4 + length]
            path = head[0].split(" ")[1]
            self.engine.requests.append(path)
            assert self.transport is not None
            self.transport.write(ANSWERS[path])


class StandInEngine:
    def __init__(self) -> None:
        self.conns: list[_Conn] = []
        self.requests: list[str] = []
        self.closed = 0
        self.changed = asyncio.Event()

    async def wait_closed(self, count: int) -> None:
        with anyio.fail_after(10):
            while self.closed < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[StandInEngine, EnginePool]]:
    path = Path("/tmp") / f"rd-pool-{tmp_path.name[-20:]}.sock"
    engine = StandInEngine()
    server = await asyncio.get_running_loop().create_unix_server(lambda: _Conn(engine), str(path))
    pool = EnginePool(Endpoint.unix(path), max_idle=2, idle_seconds=0.3)
    try:
        yield engine, pool
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)


async def _ask(pool: EnginePool, path: str) -> bytes:
    stream = await pool.open(path, b"{}", {"Content-Type": "application/json"}, None)
    try:
        head = await stream.head
        assert head.status == 200
        return await read_body(stream, 1 << 20)
    finally:
        pool.release(stream)


@pytest.mark.anyio
async def test_sized_answers_share_one_connection_and_a_chunked_one_ends_it(
        engine: tuple[StandInEngine, EnginePool]) -> None:
    standin, pool = engine
    assert await _ask(pool, "/sized") == b'{"ok": true}'
    assert await _ask(pool, "/sized") == b'{"ok": true}'
    assert len(standin.conns) == 1 and len(pool) == 1
    # A stream takes the idle connection; after a chunked answer the connection is not kept.
    assert await _ask(pool, "/chunked") == b"data: 1data: 2"
    assert len(standin.conns) == 1 and len(pool) == 0
    await standin.wait_closed(1)
    assert await _ask(pool, "/sized") == b'{"ok": true}'
    assert len(standin.conns) == 2 and standin.requests == ["/sized", "/sized", "/chunked", "/sized"]


@pytest.mark.anyio
async def test_an_answer_that_says_close_is_not_reused(engine: tuple[StandInEngine, EnginePool]) -> None:
    standin, pool = engine
    assert await _ask(pool, "/close") == b"ok"
    assert len(pool) == 0
    assert await _ask(pool, "/sized") == b'{"ok": true}'
    assert len(standin.conns) == 2


@pytest.mark.anyio
async def test_idle_connections_are_bounded_expire_and_close_with_the_pool(
        engine: tuple[StandInEngine, EnginePool]) -> None:
    standin, pool = engine
    opened = [await pool.open("/sized", b"", {}, None) for _ in range(3)]
    for stream in opened:
        await stream.head
        assert stream.whole_body() == b'{"ok": true}'
        pool.release(stream)
    assert len(pool) == 2  # the third was over the bound: closed
    await standin.wait_closed(1)
    await standin.wait_closed(3)  # the two idle ones, past idle_seconds
    assert len(pool) == 0
    stream = await pool.open("/sized", b"", {}, None)
    await stream.head
    stream.whole_body()
    pool.close()
    pool.release(stream)  # released after the pool closed: closed, not kept
    await standin.wait_closed(4)
    assert len(pool) == 0


@pytest.mark.anyio
async def test_a_request_whose_connection_was_gone_before_it_was_written_goes_once_on_a_new_one(
        engine: tuple[StandInEngine, EnginePool]) -> None:
    standin, pool = engine
    assert await _ask(pool, "/sized") == b'{"ok": true}'
    # The engine drops the idle connection; the daemon has not yet noticed when the next request comes.
    (conn,) = standin.conns
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    assert await _ask(pool, "/sized") == b'{"ok": true}'
    assert len(standin.conns) == 2
    assert standin.requests == ["/sized", "/sized"]  # it arrived once


@pytest.mark.anyio
async def test_a_full_listen_queue_is_waited_out(tmp_path: Path) -> None:
    """An engine's queue of connections not yet accepted is short (llama-server's holds 5): a burst of
    new connections past it waits for room instead of failing or hanging."""
    path = Path("/tmp") / f"rd-queue-{tmp_path.name[-20:]}.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    pool = EnginePool(Endpoint.unix(path))
    accepted: list[socket.socket] = []
    opening: list[EngineStream] = []
    try:
        async with anyio.create_task_group() as group:
            async def connect() -> None:
                opening.append(await pool._connect())

            for _ in range(4):
                group.start_soon(connect)
            # Only now does the engine take connections from its queue.
            while len(accepted) < 4:
                accepted.append((await loop.sock_accept(listener))[0])
        assert all(s.transport is not None and s.transport.get_extra_info("peername") for s in opening)
    finally:
        for stream in opening:
            stream.close()
        for sock in [*accepted, listener]:
            sock.close()
        path.unlink(missing_ok=True)


def test_mixed_traffic_on_a_real_engine_is_answered_whole(daemon: Daemon) -> None:
    """llama-server keeps a connection after a sized answer and closes it after a chunked one: streamed
    and non-streamed requests, interleaved from several clients, all get their whole answer."""
    client = daemon.openai("/v1")

    def alternate(worker: int) -> list[str]:
        endings = []
        for i in range(10):
            if (worker + i) % 2:
                chunks = list(client.completions.create(model="tiny", prompt="the", max_tokens=4, stream=True,
                                                        extra_body={"ignore_eos": True}))
                endings.append(str(chunks[-1].choices[0].finish_reason))
            else:
                endings.append(str(client.completions.create(model="tiny", prompt="the", max_tokens=4,
                                                             extra_body={"ignore_eos": True}).choices[0].finish_reason))
        return endings

    with ThreadPoolExecutor(4) as pool:
        endings = [e for worker in pool.map(alternate, range(4)) for e in worker]
    assert endings == ["length"] * 40
