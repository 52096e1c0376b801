"""What the daemon's relay costs per streamed event and per short request, against a stand-in engine.

The engine here is a STAND-IN (it generates nothing; it is not llama-server): this file, run with
`engine` as its first argument, takes llama-server's command line, serves OpenAI chat completions on the
unix socket named by `--host`, and streams `max_tokens` SSE events per request at a fixed pace (one
ticker writes the next event to every open stream, so the engine itself costs little), ending with a
usage event and `[DONE]` as llama-server does. Non-streamed requests are answered at once. runnerd runs
it as its llama.cpp engine through the `RUNNERD_LLAMA_SERVER` setting, so what is measured is the daemon.

Streams: for each concurrency, every client opens one stream of `rate x seconds` events, first straight
to the engine's socket, then through runnerd; delivered events/s is the events received over the time
until the last stream ended. While the runnerd pass runs, `/metrics` and `/engines/ps` are polled every
100 ms, and the daemon's event-loop lag is read from its own `runnerd_event_loop_lag_seconds` histogram
(p50/p99 as bucket upper bounds). Requests: C clients send short non-streamed requests on kept-alive
connections for T seconds, direct then through runnerd. The clients are raw asyncio protocols, so the
load generator costs as little as possible on a small machine.

    .venv/bin/python bench/relay.py [--streams 1,16,64,256,1024] [--rate 100] [--seconds 5]
                                    [--clients 16] [--request-seconds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------- engine


class _EngineConnection(asyncio.Protocol):
    """One connection to the stand-in engine: minimal HTTP/1.1 with keep-alive."""

    def __init__(self, engine: _StandInEngine) -> None:
        self.engine = engine
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.streams.pop(self, None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            method, path, _ = head[0].split(" ", 2)
            self.answer(method, path, body)

    def answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "GET":
            payload = b'{"status":"ok"}' if path == "/health" else b"{}"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
            return
        request = json.loads(body or b"{}")
        events = int(request.get("max_tokens") or 16)
        if not request.get("stream"):
            answer = json.dumps({"object": "chat.completion", "model": "standin", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(answer), answer))
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        self.streaming = True
        self.engine.streams[self] = events

    def finish(self) -> None:
        assert self.transport is not None
        self.transport.write(self.engine.last_chunk)
        self.streaming = False
        if self.buffer:
            self.data_received(b"")


class _StandInEngine:
    def __init__(self, rate: float) -> None:
        self.period = 1 / rate
        self.streams: dict[_EngineConnection, int] = {}
        event = {"object": "chat.completion.chunk", "model": "standin",
                 "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
        self.chunk = self._framed(f"data: {json.dumps(event)}\n\n".encode())
        usage = {"object": "chat.completion.chunk", "model": "standin",
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}
        self.last_chunk = self._framed(f"data: {json.dumps(usage)}\n\n".encode()) + self._framed(
            b"data: [DONE]\n\n") + b"0\r\n\r\n"

    @staticmethod
    def _framed(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.period
            await asyncio.sleep(max(0.0, due - loop.time()))
            for conn, left in list(self.streams.items()):
                assert conn.transport is not None
                conn.transport.write(self.chunk)
                if left <= 1:
                    del self.streams[conn]
                    conn.finish()
                else:
                    self.streams[conn] = left - 1


def engine_main(argv: list[str]) -> None:
    if "--version" in argv:
        print("version: relay-standin")
        return
    sock = argv[argv.index("--host") + 1]
    rate = float(os.environ.get("RELAY_STANDIN_RATE") or 100)

    async def serve() -> None:
        engine = _StandInEngine(rate)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _EngineConnection(engine), sock, backlog=4096)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ticker = asyncio.create_task(engine.tick())
        await stop.wait()
        ticker.cancel()
        server.close()

    asyncio.run(serve())


# ---------------------------------------------------------------------------------------------- clients


class _Client(asyncio.Protocol):
    """A kept-alive client connection that reads chunked or sized answers and counts SSE events."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.buffer = bytearray()
        self.headers_done = False
        self.chunked = False
        self.length = 0
        self.events = 0
        self.status = 0
        self.last_newline = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-answer"))
        if not self.lost.done():
            self.lost.set_result(None)

    def request(self, path: str, body: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        return self.done

    def _count(self, payload: bytes) -> None:
        if not payload:
            return
        self.events += payload.count(b"\n\n") + (self.last_newline and payload[:1] == b"\n")
        self.last_newline = payload[-1:] == b"\n"

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.headers_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").lower()
            self.status = int(head[9:12])
            self.chunked = "transfer-encoding: chunked" in head
            for line in head.split("\r\n"):
                if line.startswith("content-length:"):
                    self.length = int(line[15:])
            del self.buffer[:end + 4]
            self.headers_done = True
        if not self.chunked:
            if len(self.buffer) >= self.length:
                self._finish()
            return
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            self._count(bytes(self.buffer[line_end + 2:line_end + 2 + size]))
            del self.buffer[:line_end + 2 + size + 2]
            if size == 0:
                self._finish()
                return

    def _finish(self) -> None:
        assert self.done is not None
        if self.status != 200:
            self.done.set_exception(RuntimeError(f"HTTP {self.status}: {bytes(self.buffer[:200])!r}"))
        elif not self.done.done():
            self.done.set_result(self.events)


async def _connect(sock: str) -> _Client:
    while True:
        transport, protocol = await asyncio.get_running_loop().create_unix_connection(_Client, sock)
        # A full listen queue is reported by asyncio as a connection made with no peer: try again.
        if transport.get_extra_info("peername"):
            return protocol
        transport.close()
        await asyncio.sleep(0.01)


async def streams_pass(sock: str, path: str, model: str, streams: int, events: int) -> tuple[int, float]:
    """`streams` concurrent streams of `events` events each: (events received, seconds until the last ended)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": events}).encode()
    clients = [await _connect(sock) for _ in range(streams)]
    start = time.perf_counter()
    # A stream that never ends is a failure to report, not a hang.
    pending = [c.request(path, body) for c in clients]
    # A stream that never ends is a failure to report, not a hang.
    _, late = await asyncio.wait(pending, timeout=events / 10 + 60)
    if late:
        stuck = [(c.events, len(c.buffer), c.headers_done) for c in clients if c.done in late]
        raise TimeoutError(f"{len(stuck)} of {streams} streams did not end (events, buffered, head): {stuck[:8]}")
    counts = [f.result() for f in pending]
    elapsed = time.perf_counter() - start
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    return sum(counts), elapsed


async def requests_pass(sock: str, path: str, model: str, clients: int, seconds: float) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    deadline = time.monotonic() + seconds
    done = 0

    async def one(client: _Client) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await client.request(path, body)
            done += 1

    conns = [await _connect(sock) for _ in range(clients)]
    await asyncio.gather(*(one(c) for c in conns))
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return done


# ---------------------------------------------------------------------------------------------- daemon


async def _get(sock: str, path: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.partition(b"\r\n\r\n")[2]


def _lag_buckets(metrics: bytes) -> dict[float, float]:
    buckets = {}
    for line in metrics.decode().splitlines():
        if line.startswith("runnerd_event_loop_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def _quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0)
    if total <= 0:
        return float("nan")
    for le in bounds:
        if after[le] - before.get(le, 0) >= q * total:
            return le
    return float("inf")


async def _poll(sock: str, stop: asyncio.Event) -> None:
    """What an operator's dashboard does: /metrics and /engines/ps every 100 ms."""
    while not stop.is_set():
        await _get(sock, "/metrics")
        await _get(sock, "/engines/ps")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_daemon(root: Path, model: Path, rate: float) -> tuple[subprocess.Popen[bytes], str]:
    engine = root / "standin-engine"
    engine.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} engine \"$@\"\n")
    engine.chmod(0o755)
    env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(root / "run"), "RUNNERD_DATA_DIR": str(root / "data"),
           "RUNNERD_LLAMA_SERVER": str(engine), "RUNNERD_LLAMACPP__THREADS": "1", "RELAY_STANDIN_RATE": str(rate),
           "RUNNERD_DEFAULT_CONTEXT_SIZE": "2048", "RUNNERD_LOG_LEVEL": "warning",
           "RUNNERD_MAX_QUEUED_REQUESTS": "4096"}
    proc = subprocess.Popen([sys.executable, "-m", "runnerd.cli", "serve", "--model", f"relay={model}"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return proc, str(root / "run" / "runnerd.sock")


async def ready(sock: str) -> str:
    for _ in range(1500):
        try:
            if b"ok" in await _get(sock, "/health"):
                break
        except OSError:
            await asyncio.sleep(0.02)
    client = await _connect(sock)
    await client.request("/v1/chat/completions", json.dumps(
        {"model": "relay", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
         "keep_alive": -1}).encode())
    assert client.transport is not None
    client.transport.close()
    (runner,) = json.loads(await _get(sock, "/engines/ps"))
    return str(runner["socket"])


async def measure(args: argparse.Namespace, daemon_pid: int, sock: str, engine_sock: str) -> dict[str, Any]:
    path = "/v1/chat/completions"
    events = max(1, round(args.rate * args.seconds))
    results: dict[str, Any] = {"rate": args.rate, "events_per_stream": events, "streams": [], "requests": {}}
    for n in args.streams:
        direct, direct_s = await streams_pass(engine_sock, path, "relay", n, events)
        lag_before = _lag_buckets(await _get(sock, "/metrics"))
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll(sock, stop))
        cpu = _cpu(daemon_pid)
        via, via_s = await streams_pass(sock, path, "relay", n, events)
        cpu = _cpu(daemon_pid) - cpu
        stop.set()
        await poller
        lag_after = _lag_buckets(await _get(sock, "/metrics"))
        row = {"streams": n, "direct_events_s": direct / direct_s, "runnerd_events_s": via / via_s,
               "ratio": (via / via_s) / (direct / direct_s), "cpu_s_per_1000_events": cpu / max(1, via) * 1000,
               "lag_p50_ms": _quantile(lag_before, lag_after, 0.5) * 1000,
               "lag_p99_ms": _quantile(lag_before, lag_after, 0.99) * 1000,
               "lost_events": n * events - via}
        results["streams"].append(row)
        if not args.json:
            print(f"{n:>8}{row['direct_events_s']:>12.0f}{row['runnerd_events_s']:>12.0f}{row['ratio']:>8.3f}"
                  f"{row['cpu_s_per_1000_events']:>12.4f}{row['lag_p50_ms']:>9.1f}{row['lag_p99_ms']:>9.1f}",
                  flush=True)
    if args.clients:
        direct = await requests_pass(engine_sock, path, "relay", args.clients, args.request_seconds)
        cpu = _cpu(daemon_pid)
        via = await requests_pass(sock, path, "relay", args.clients, args.request_seconds)
        cpu = _cpu(daemon_pid) - cpu
        results["requests"] = {"clients": args.clients, "direct_req_s": direct / args.request_seconds,
                               "runnerd_req_s": via / args.request_seconds,
                               "cpu_ms_per_request": cpu / max(1, via) * 1000}
    return results


def main() -> None:
    if sys.argv[1:2] == ["engine"]:
        engine_main(sys.argv[2:])
        return
    sys.path.insert(0, str(ROOT))
    from tests.tinymodels import write_tiny_llama

    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,16,64,256,1024",
                        help="comma-separated concurrencies")
    parser.add_argument("--rate", type=float, default=100, help="events per second per stream")
    parser.add_argument("--seconds", type=float, default=5, help="length of each stream")
    parser.add_argument("--clients", type=int, default=16, help="clients for short requests; 0 skips them")
    parser.add_argument("--request-seconds", type=float, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",") if s]
    root = Path(tempfile.mkdtemp(prefix="rdr-", dir="/tmp"))
    model = write_tiny_llama(root / "tiny.gguf")
    proc, sock = start_daemon(root, model, args.rate)
    try:
        async def run() -> dict[str, Any]:
            engine_sock = await ready(sock)
            if not args.json:
                print(f"stand-in engine, {args.rate:g} events/s per stream, {args.seconds:g} s streams")
                print(f"{'streams':>8}{'direct ev/s':>12}{'runnerd':>12}{'ratio':>8}{'CPU s/1k ev':>12}"
                      f"{'lag p50':>9}{'lag p99':>9}  (lag in ms)", flush=True)
            return await measure(args, proc.pid, sock, engine_sock)

        results = asyncio.run(run())
    except BaseException:
        for log in (root / "data" / "logs").glob("*.log"):
            print(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results["requests"]
    if r:
        print(f"short non-streamed requests, {r['clients']} clients: direct {r['direct_req_s']:.0f} req/s, runnerd "
              f"{r['runnerd_req_s']:.0f} req/s, daemon CPU {r['cpu_ms_per_request']:.3f} ms per request")
    print("targets at 256 streams: <= 0.010 CPU s per 1,000 events, ratio >= 0.97, loop lag p99 <= 5 ms; "
          "<= 0.12 ms CPU per short request")


if __name__ == "__main__":
    main()
