"""The listeners' doors: an accept loop of runnerd's own for every listening socket, and for TCP a connection
cap, global and per peer address, counted at accept (before a byte is read, before auth) and a deadline for a
new connection's first request headers.

Why not the event loop's own accept: asyncio's accepts a burst of connections before any protocol sees one,
and on EMFILE it logs once per connection it tried in that burst and schedules as many retries, so a flood of
idle connections fills the fd table, starves the unix socket and floods the log. uvloop's (libuv's) closes
connections it cannot take a descriptor for at once, logs nothing, and on an accept error it cannot get past
(ENOBUFS, ENOMEM, or EMFILE once its reserve descriptor is gone) closes the listening socket for good,
silently. Here both loops behave alike: on EMFILE/ENFILE/ENOBUFS/ENOMEM the door stops reading its socket
for a second (clients wait in the kernel's queue), with one log line per interval, and tries again. A TCP
connection over a cap is closed (RST) in the same call that accepted it, so the TCP listener holds at most
its cap of fds. The unix socket is never counted: its users are trusted, and the TCP cap, kept well under
the fd limit, leaves it the descriptors it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

log = logging.getLogger("runnerd.door")

# Connections taken from the kernel's queue per readiness event: the other listener and streams get their turn.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE the listener rests this long before it tries again (what asyncio does too).
ACCEPT_RETRY = 1.0
# At most one line per this many seconds for each kind of repeated event (accept errors, refusals).
LOG_INTERVAL = 10.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
OUT_OF_RESOURCES = "out of resources"  # in the line logged when accept fails for want of descriptors or memory


class Throttled:
    """A warning that may repeat thousands of times a second: the first is logged, later ones within
    `interval` are counted, and the count is logged once the interval is over."""

    def __init__(self, what: str, interval: float = LOG_INTERVAL) -> None:
        self.what = what
        self.interval = interval
        self.suppressed = 0
        self._last = float("-inf")
        self._flush: asyncio.TimerHandle | None = None

    def note(self, detail: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
            self.suppressed = 0
            log.warning("%s: %s%s", self.what, detail, more)
            return
        self.suppressed += 1
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._last + self.interval - now, self._report)

    def _report(self) -> None:
        self._flush = None
        if self.suppressed:
            self._last = time.monotonic()
            log.warning("%s: %d more in the last %g s", self.what, self.suppressed, self.interval)
            self.suppressed = 0

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


# What an unlimited RLIMIT_NOFILE amounts to: the kernel's nr_open, 2^20 by default.
UNLIMITED_FILES = 1 << 20


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, after), unlimited as UNLIMITED_FILES."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED_FILES, UNLIMITED_FILES
    target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_FILES)
    if soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft, soft
    return soft, target


def fd_room(fd_limit: int, reserve: int) -> int:
    """TCP connections the fd limit allows: each may hold two descriptors (its socket and, while it is
    proxied, one to an engine), after `reserve` for the unix socket, runners, logs and model files."""
    return max(0, (fd_limit - reserve) // 2)


@dataclass(frozen=True)
class DoorLimits:
    max_connections: int
    max_connections_per_peer: int
    header_timeout: float


def _reset(conn: socket.socket) -> None:
    """Close with an RST: the fd is free at once, and no TIME_WAIT is left behind."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode(errors='replace') if isinstance(name, bytes) else name}"
    return f"http://{name[0]}:{name[1]}"


def _peer(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted until it is lost, and closed if its first request's
    headers have not all arrived within the header timeout (later requests are bounded by aiohttp's
    keep-alive timeout, which starts when an answer ends and is not reset by incoming bytes)."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None], header_timeout: float) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release
        self._header_timeout = header_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._tail = b""

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._timer = asyncio.get_running_loop().call_later(self._header_timeout, self._headers_late)
        self._inner.connection_made(transport)

    def _headers_late(self) -> None:
        self._timer = None
        if self._transport is not None:
            log.debug("closing %s: no complete request headers within %.1f s",
                      self._transport.get_extra_info("peername"), self._header_timeout)
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            # The blank line that ends the headers; kept across reads, which may split it.
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self.release()
        self._inner.connection_lost(exc)


class Door:
    """Accepts on a listening socket for `protocol_factory`, backing off when the process is out of files."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._admitting: set[asyncio.Task[Any]] = set()
        where = _address(sock)
        self._accept_errors = Throttled(f"accept on {where} {OUT_OF_RESOURCES}, pausing {ACCEPT_RETRY:.0f} s")
        self._other_errors = Throttled(f"accept on {where} failed")
        self._throttled = [self._accept_errors, self._other_errors]

    @property
    def sockets(self) -> list[socket.socket]:
        return [self._sock]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket, so that a client connecting while requests
        drain is refused at once rather than left in the queue; connections already open are aiohttp's
        to close (AppRunner.cleanup)."""
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        self._sock.close()
        if self._retry is not None:
            self._retry.cancel()
        for task in self._admitting:
            task.cancel()
        for throttled in self._throttled:
            throttled.close()

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if self._loop is None:
                    return
                if exc.errno not in _OUT_OF_RESOURCES:
                    # Transient (a peer gone before accept, a firewall's refusal): logged, never fatal.
                    self._other_errors.note(exc.strerror or str(exc))
                    return
                self._accept_errors.note(exc.strerror or str(exc))
                self._loop.remove_reader(self._sock.fileno())
                self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume)
                return
            self._admit(conn, _peer(address))

    def _admit(self, conn: socket.socket, peer: str) -> None:
        self._serve(conn, self._factory(), None)

    def _serve(self, conn: socket.socket, protocol: asyncio.Protocol, release: Callable[[], None] | None) -> None:
        """Hand an accepted connection to `protocol`; `release` is called if that fails."""
        conn.setblocking(False)
        assert self._loop is not None
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: protocol, sock=conn))
        self._admitting.add(task)

        def admitted(task: asyncio.Task[Any]) -> None:
            self._admitting.discard(task)
            if task.cancelled() or task.exception() is not None:
                if release is not None:
                    release()
                conn.close()

        task.add_done_callback(admitted)


class TcpDoor(Door):
    """A Door with connection caps, global and per peer address, and a deadline for the first headers."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                 limits: DoorLimits) -> None:
        super().__init__(sock, protocol_factory)
        self.limits = limits
        self.open = 0
        self.refused = 0
        self._peers: dict[str, int] = {}
        self._refusals = Throttled("closed TCP connections over the cap")
        self._throttled.append(self._refusals)

    def _admit(self, conn: socket.socket, peer: str) -> None:
        limits = self.limits
        if self.open >= limits.max_connections or self._peers.get(peer, 0) >= limits.max_connections_per_peer:
            _reset(conn)
            self.refused += 1
            which = "per-peer" if self.open < limits.max_connections else "global"
            self._refusals.note(f"{peer} ({which} cap: {limits.max_connections} in all, "
                                f"{limits.max_connections_per_peer} per peer address)")
            return
        self.open += 1
        self._peers[peer] = self._peers.get(peer, 0) + 1

        def release() -> None:
            self.open -= 1
            left = self._peers[peer] - 1
            if left:
                self._peers[peer] = left
            else:
                del self._peers[peer]

        protocol = _Counted(self._factory(), release, limits.header_timeout)
        self._serve(conn, protocol, protocol.release)


class DoorSite(web.BaseSite):
    """An aiohttp site serving the runner's app on a listening socket through a Door: with `limits`, a
    counted TcpDoor; without, an uncounted one (the unix socket)."""

    __slots__ = ("_limits", "_sock")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, limits: DoorLimits | None = None) -> None:
        super().__init__(runner)
        self._sock = sock
        self._limits = limits

    @property
    def name(self) -> str:
        return _address(self._sock)

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        door = TcpDoor(self._sock, server, self._limits) if self._limits is not None else Door(self._sock, server)
        door.start()
        self._server = door  # type: ignore[assignment]  # BaseSite.stop() only calls close()
