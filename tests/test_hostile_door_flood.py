"""Floods of idle connections against real daemons under a lowered open-file limit: the TCP listener's caps
hold its descriptors well under the limit, the unix socket keeps answering (health and chat), the log stays
a few lines long, and connections that send nothing, dribble their headers or sit idle are closed."""

from __future__ import annotations

import contextlib
import re
import resource
import select
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from runnerd.tcp_door import OUT_OF_RESOURCES

TOKEN = "flood-token-31d7"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ACCEPT_ERROR = OUT_OF_RESOURCES
# The doors accept on their own on either event loop; each flood runs on both.
LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])


def fd_limit(soft: int, hard: int) -> list[str]:
    """A launcher that starts the daemon with RLIMIT_NOFILE set to (soft, hard)."""
    code = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), "
            "int(sys.argv[2]))); os.execv(sys.argv[3], sys.argv[3:])")
    return [sys.executable, "-c", code, str(soft), str(hard)]


def tcp_env(root: Path, **http: Any) -> dict[str, str]:
    (root / "token").write_text(TOKEN)
    env = {"RUNNERD_HTTP__LISTEN": "127.0.0.1:0", "RUNNERD_HTTP__TOKEN_FILE": str(root / "token")}
    env.update({f"RUNNERD_HTTP__{key.upper()}": str(value) for key, value in http.items()})
    return env


def tcp_port(daemon: Any) -> int:
    found = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", daemon.output())
    assert found, daemon.output()
    return int(found.group(1))


@pytest.fixture
def token_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rdf-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def enough_fds_here() -> None:
    """This process opens more connections than the daemon may hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes (EOF or RST) `s` within `within` seconds; nothing is sent."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def served_eventually(port: int, source: str, within: float = 10) -> bool:
    """Whether a new connection from `source` is served /v1/models before `within` seconds pass: a slot
    freed by a client's close is free once the daemon has seen that close, which may come after the
    next connection is accepted."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), connect(port, source) as s:
            if request(s, "/v1/models") == b"HTTP/1.1 200 OK":
                return True
        time.sleep(0.05)
    return False


def request(s: socket.socket, path: str, token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: runnerd\r\n{auth}\r\n".encode())
    s.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        rest += s.recv(4096)
    return head.split(b"\r\n")[0]


class Flood(threading.Thread):
    """Keeps `size` idle TCP connections open to a port, opening a new one for each the server closes."""

    def __init__(self, port: int, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.size = port, size
        self.opened = self.closed_by_server = 0
        self.stop = threading.Event()
        self.filled = threading.Event()
        self.socks: list[socket.socket] = []

    def run(self) -> None:
        while not self.stop.is_set():
            while len(self.socks) < self.size and not self.stop.is_set():
                try:
                    s = connect(self.port, timeout=2)
                except OSError:
                    continue
                s.setblocking(False)
                self.socks.append(s)
                self.opened += 1
                if self.opened >= self.size:
                    self.filled.set()
            poller = select.poll()
            for s in self.socks:
                poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
            gone = {fd for fd, _ in poller.poll(200)}
            for s in [s for s in self.socks if s.fileno() in gone]:
                self.socks.remove(s)
                s.close()
                self.closed_by_server += 1

    def __enter__(self) -> Flood:
        self.start()
        assert self.filled.wait(60), f"opened only {self.opened} connections"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(30)
        for s in self.socks:
            s.close()


@LOOPS
def test_unix_socket_answers_while_tcp_is_flooded_past_the_fd_limit(make_daemon, tiny_model, token_dir, event_loop):
    """300 idle TCP connections against a daemon allowed 256 open files: asyncio's accept loop used to hit
    EMFILE, log it hundreds of thousands of times, and starve the unix socket of descriptors."""
    d = make_daemon(models={"tiny": tiny_model}, launcher=fd_limit(256, 256),
                    env={**tcp_env(token_dir, max_connections=48, max_connections_per_peer=48, header_timeout=2,
                                   fd_reserve=64), "RUNNERD_EVENT_LOOP": event_loop})
    assert psutil.Process(d.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (256, 256)
    assert f"event loop: {event_loop}" in d.output()
    port = tcp_port(d)
    lines_before = len(d.output().splitlines())
    with Flood(port, size=300) as flood:
        # More connections than the daemon may hold files: the unix socket still serves health and chat.
        assert d.http.get("/health", timeout=10).status_code == 200
        chat = d.post("/v1/chat/completions", CHAT, timeout=60)
        assert chat.status_code == 200, chat.text
        assert d.http.get("/engines/ps", timeout=10).status_code == 200
        assert psutil.Process(d.proc.pid).num_fds() < 256
    # The daemon closed the connections over its cap at once, and the ones it held once they sent nothing.
    assert flood.closed_by_server >= 300 - 48
    output = d.output()
    assert ACCEPT_ERROR not in output
    # A line per interval for the refusals, not one per connection.
    flood_lines = output.splitlines()[lines_before:]
    assert len([line for line in flood_lines if "over the cap" in line]) <= 3, flood_lines
    assert len(flood_lines) < 40, flood_lines
    # Over TCP, with its token, a client is served again once the flood is over.
    assert served_eventually(port, "127.0.0.1")


def test_idle_and_dribbling_connections_are_closed(make_daemon, token_dir):
    d = make_daemon(env=tcp_env(token_dir, header_timeout=1, keepalive_timeout=2))
    port = tcp_port(d)
    silent, dribbler = connect(port), connect(port)
    started = time.monotonic()
    # A connection that never sends a byte.
    assert closed_by_server(silent, within=15)
    assert time.monotonic() - started >= 0.8  # closed by the header timeout, not refused on arrival
    # One that sends its request line, then a header byte every 200 ms.
    dribbler.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
    deadline = time.monotonic() + 15
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            dribbler.sendall(b"x")
        except OSError:
            closed = True
            break
        closed = closed_by_server(dribbler, within=0.2)
    assert closed
    # One that made a request and then sits idle on keep-alive.
    kept_alive = connect(port)
    assert request(kept_alive, "/v1/models") == b"HTTP/1.1 200 OK"
    answered = time.monotonic()
    assert closed_by_server(kept_alive, within=15)
    assert time.monotonic() - answered >= 1.5
    for s in (silent, dribbler, kept_alive):
        s.close()


def test_connection_caps_per_peer_and_in_all(make_daemon, token_dir):
    """Counted before auth: a peer over its cap, or anyone over the global cap, is reset at once, while
    connections already held, and other peers under the caps, are served."""
    d = make_daemon(env=tcp_env(token_dir, max_connections=12, max_connections_per_peer=8, header_timeout=30))
    port = tcp_port(d)
    first = [connect(port, "127.0.0.1") for _ in range(8)]
    # The ninth from the same address is reset; another address gets in and is served.
    assert closed_by_server(connect(port, "127.0.0.1"), within=10)
    second = [connect(port, "127.0.0.2") for _ in range(4)]
    assert request(second[0], "/v1/models") == b"HTTP/1.1 200 OK"
    # 8 + 4 = the global cap: a third address is reset too, whatever it would have sent.
    assert closed_by_server(connect(port, "127.0.0.3"), within=10)
    # Those held all along are served (the cap is counted, not a ban).
    assert request(first[7], "/health", token=None) == b"HTTP/1.1 200 OK"
    assert d.http.get("/health").status_code == 200  # the unix socket is not counted
    # A slot freed is a slot for the next peer.
    first[0].close()
    assert served_eventually(port, "127.0.0.3")
    for s in (*first, *second):
        s.close()


def test_the_soft_fd_limit_is_raised_to_the_hard_one(make_daemon, token_dir):
    d = make_daemon(launcher=fd_limit(256, 4096), env=tcp_env(token_dir, fd_reserve=64))
    assert psutil.Process(d.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)
    assert "open-file limit raised from 256 to 4096" in d.output()


def test_a_fd_limit_too_low_for_the_reserve_caps_tcp_and_says_so(make_daemon, token_dir):
    d = make_daemon(launcher=fd_limit(256, 256), env=tcp_env(token_dir, max_connections=1024, fd_reserve=64))
    assert "TCP connections capped at 96, not 1024" in d.output()


@LOOPS
def test_accept_errors_on_the_unix_socket_are_one_line_per_interval(make_daemon, event_loop):
    """The unix socket is never capped (its users are trusted), so flooding it can still exhaust the
    daemon's files: its door then rests a second at a time, with a line per interval (not one per failed
    accept, as asyncio's own accept logs; nor silence and a listener closed for good, as uvloop's may),
    and once the flood ends the socket serves again."""
    d = make_daemon(launcher=fd_limit(128, 128), env={"RUNNERD_EVENT_LOOP": event_loop})
    assert f"event loop: {event_loop}" in d.output()
    flood: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while ACCEPT_ERROR not in d.output() and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.2)
        try:
            s.connect(str(d.socket))
            flood.append(s)
        except OSError:
            s.close()
    assert ACCEPT_ERROR in d.output(), "the flood never exhausted the daemon's files"
    # Keep the daemon starved a while: every readiness of the socket fails its accept again.
    time.sleep(2)
    for s in flood:
        s.close()
    assert d.http.get("/health", timeout=30).status_code == 200
    lines = d.output().splitlines()
    assert len([line for line in lines if ACCEPT_ERROR in line]) <= 2, lines[-20:]


@pytest.mark.anyio
async def test_a_repeated_warning_is_one_line_and_then_a_count(caplog):
    import asyncio
    import logging

    from runnerd.tcp_door import Throttled

    throttled = Throttled("accept failed", interval=0.3)
    with caplog.at_level(logging.WARNING, logger="runnerd.door"):
        for _ in range(1000):
            throttled.note("Too many open files")
        assert [r.getMessage() for r in caplog.records] == ["accept failed: Too many open files"]
        for _ in range(100):  # the count comes when the interval is over, with no new event
            if len(caplog.records) == 2:
                break
            await asyncio.sleep(0.05)
    assert caplog.records[1].getMessage() == "accept failed: 999 more in the last 0.3 s"
    throttled.close()
