"""The relay's reading of an engine's chunked answer, fuzzed: however the engine's bytes are split across
reads, the client gets exactly the engine's whole chunks, frame and all, in order and each once, and the
exchange ends at the terminating chunk. A malformed size line fails the exchange instead."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runnerd.relay import EngineStream


class _Transport:
    """Stands in for the two sockets around the parser (the engine's and the client's)."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _framed(payload: bytes, extension: bytes) -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(payload), extension, payload)


async def _relay(pieces: list[bytes]) -> tuple[bytes, str | BaseException]:
    engine = EngineStream()
    engine.connection_made(_Transport())  # type: ignore[arg-type]
    engine.begin(b"POST / HTTP/1.1\r\n\r\n", None)
    received = bytearray()
    engine.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    engine.start(received.extend, _Transport())  # type: ignore[arg-type]
    for piece in pieces:
        if engine.signal.done():
            break
        engine.data_received(piece)
    try:
        outcome: str | BaseException = await asyncio.wait_for(engine.signal, 1) if engine.signal.done() else "open"
    except (aiohttp.ClientPayloadError, TimeoutError) as exc:
        outcome = exc
    engine.finish()
    return bytes(received), outcome


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


_PAYLOADS = st.lists(st.binary(min_size=1, max_size=40), max_size=12)
_EXTENSIONS = st.sampled_from([b"", b"", b"", b";name=value", b";x"])


@settings(max_examples=300, deadline=None)
@given(_PAYLOADS, st.lists(_EXTENSIONS, min_size=12, max_size=12), st.lists(st.integers(0, 10_000), max_size=20))
@example([b"data: {}\n\n"] * 3, [b""] * 12, [])
@example([b"data: {}\n\n"] * 3, [b""] * 12, [1, 2, 3, 17, 18, 19])
def test_whole_chunks_reach_the_client_however_the_bytes_are_split(
        payloads: list[bytes], extensions: list[bytes], cuts: list[int]) -> None:
    chunks = b"".join(_framed(p, e) for p, e in zip(payloads, extensions, strict=False))
    stream = chunks + b"0\r\n\r\n"
    received, outcome = asyncio.run(_relay(_split(stream, cuts)))
    assert received == chunks
    assert outcome == "end"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b"zz\r\nabc\r\n", b"-1\r\n\r\n", b"\r\n\r\n", b"1 2\r\nx\r\n", b"1_0\r\n" + b"x" * 16,
                        b" 10\r\n" + b"x" * 16, b"+10\r\n" + b"x" * 16, b"-0\r\n\r\n"]),
       st.lists(st.integers(0, 100), max_size=4))
@example(b"-1\r\n\r\n", [])
def test_a_malformed_size_line_fails_the_exchange(bad: bytes, cuts: list[int]) -> None:
    """Signs, spaces and underscores too, which int() would take but a client's parser refuses: nothing of
    the malformed chunk reaches the client."""
    good = _framed(b"data: 1\n\n", b"")
    received, outcome = asyncio.run(_relay(_split(good + bad, cuts)))
    assert received in (b"", good)
    assert isinstance(outcome, aiohttp.ClientPayloadError), outcome


async def _head(head: bytes) -> object:
    engine = EngineStream()
    engine.connection_made(_Transport())  # type: ignore[arg-type]
    engine.begin(b"POST / HTTP/1.1\r\n\r\n", None)
    engine.data_received(head)
    try:
        return await asyncio.wait_for(engine.head, 1)
    except aiohttp.ClientPayloadError as exc:
        return exc
    finally:
        engine.finish()


@pytest.mark.parametrize(("head", "named"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "Content-Length '-5'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", "Content-Length '+5'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n", "Content-Length '1_0'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa3\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 +20 OK\r\n\r\n", "status '+20'"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
    (b"SPDY 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1\r\n\r\n", "status line"),
])
def test_a_malformed_head_fails_the_exchange_naming_what(head: bytes, named: str) -> None:
    outcome = asyncio.run(_head(head))
    assert isinstance(outcome, aiohttp.ClientPayloadError)
    assert "malformed head" in str(outcome) and named in str(outcome)


def test_a_head_without_a_reason_is_read() -> None:
    outcome = asyncio.run(_head(b"HTTP/1.1 204\r\nContent-Length: 0\r\n\r\n"))
    assert not isinstance(outcome, BaseException)
    assert (outcome.status, outcome.reason, outcome.length) == (204, "", 0)  # type: ignore[attr-defined]
