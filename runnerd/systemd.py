"""systemd integration without libsystemd: readiness/status/watchdog notifications and socket activation.

Both protocols are a few lines each. Notifications are single datagrams of newline-separated
KEY=VALUE fields sent to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' means the
Linux abstract namespace). Socket activation hands listening sockets over as file descriptors
3, 4, ... counted by $LISTEN_FDS, meant only for the process whose pid is $LISTEN_PID, and named
by the colon-separated $LISTEN_FDNAMES.

Every variable is removed from our environment once read, so that processes we start (engines,
build tools) never believe these sockets or this watchdog are theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

log = logging.getLogger("runnerd.systemd")

SD_LISTEN_FDS_START = 3
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# How often STATUS is refreshed when there is no watchdog to piggyback on.
_STATUS_INTERVAL = 5.0


class SocketActivationError(Exception):
    """A descriptor systemd said it passed is not a usable socket."""


@dataclass(frozen=True)
class InheritedSocket:
    sock: socket.socket
    name: str


def _environ(environ: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    return os.environ if environ is None else environ


def listen_fds(environ: MutableMapping[str, str] | None = None, *, pid: int | None = None) -> list[InheritedSocket]:
    """The sockets systemd passed to this process, in order, with their names ("unknown" if unnamed).

    Empty when nothing was passed or the variables are meant for another process (LISTEN_PID).
    """
    env = _environ(environ)
    values = {name: env.pop(name, None) for name in _ACTIVATION_VARIABLES}
    if values["LISTEN_PID"] is None or values["LISTEN_FDS"] is None:
        return []
    try:
        owner, count = int(values["LISTEN_PID"]), int(values["LISTEN_FDS"])
    except ValueError:
        log.warning("ignoring malformed socket activation variables LISTEN_PID=%r LISTEN_FDS=%r",
                    values["LISTEN_PID"], values["LISTEN_FDS"])
        return []
    if owner != (os.getpid() if pid is None else pid) or count <= 0:
        return []
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    inherited = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family and type come from the descriptor itself
        except OSError as exc:
            raise SocketActivationError(f"descriptor {fd} passed by systemd is not a socket: {exc.strerror}") from exc
        inherited.append(InheritedSocket(sock, names[index] if index < len(names) and names[index] else "unknown"))
    return inherited


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock:CID:PORT and anything newer: not something a host daemon is handed.
    log.warning("ignoring unsupported NOTIFY_SOCKET %r", value)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Notifier:
    """Talks to the service manager; does nothing at all when not started as Type=notify."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = _address(address) if address else None
        self.watchdog_usec = watchdog_usec if self.address else None
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = _environ(environ)
        values = {name: env.pop(name, None) for name in _NOTIFY_VARIABLES}
        watchdog: int | None = None
        if values["WATCHDOG_USEC"]:
            try:
                watchdog = int(values["WATCHDOG_USEC"] or "")
                # The watchdog belongs to the main process only; WATCHDOG_PID says which one that is.
                if values["WATCHDOG_PID"] and int(values["WATCHDOG_PID"]) != os.getpid():
                    watchdog = None
            except ValueError:
                log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", values["WATCHDOG_USEC"],
                            values["WATCHDOG_PID"])
                watchdog = None
        return cls(values["NOTIFY_SOCKET"], watchdog if watchdog and watchdog > 0 else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send one datagram; never blocks and never raises (the manager may be gone or busy)."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        self._last_status = _one_line(status)
        return self.notify("READY=1", f"STATUS={self._last_status}")

    def stopping(self, status: str) -> bool:
        self._last_status = _one_line(status)
        return self.notify("STOPPING=1", f"STATUS={self._last_status}")

    def status(self, status: str) -> bool:
        self._last_status = _one_line(status)
        return self.notify(f"STATUS={self._last_status}")

    def tick(self, status: str | None = None) -> bool:
        """A watchdog ping (when there is a watchdog) plus the status line if it changed."""
        fields = ["WATCHDOG=1"] if self.watchdog_usec is not None else []
        if status is not None and _one_line(status) != self._last_status:
            self._last_status = _one_line(status)
            fields.append(f"STATUS={self._last_status}")
        return self.notify(*fields)

    async def run(self, status: Callable[[], str] | None = None) -> None:
        """Ping the watchdog and refresh STATUS until cancelled. It runs on the event loop on
        purpose: a loop that is stuck stops the pings, and systemd then restarts the daemon."""
        if not self.enabled:
            return
        interval = self.watchdog_interval or _STATUS_INTERVAL
        while True:
            self.tick(status() if status is not None else None)
            await asyncio.sleep(interval)
