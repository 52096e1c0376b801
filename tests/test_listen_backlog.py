"""The daemon's unix socket keeps the listen backlog it was bound with (LISTEN_BACKLOG), not the 128
aiohttp's site would set: while the daemon is stopped (as a busy loop would be), a thousand clients
connecting at once all find room in the queue instead of failing with EAGAIN. Once its door closes
(the daemon stopping), new clients are refused instead of queued."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from runnerd.server import LISTEN_BACKLOG, bind_unix_socket
from runnerd.tcp_door import Door
from tests.conftest import Daemon

CLIENTS = 1000


def test_a_thousand_connections_queue_while_the_daemon_is_busy(llama_server: Path) -> None:
    assert LISTEN_BACKLOG > CLIENTS
    root = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    d = Daemon(Path(root), llama_server, {}, {}, [])
    conns: list[socket.socket] = []
    refused = 0
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)  # accepts nothing until SIGCONT: every connect waits in the queue
        try:
            for _ in range(CLIENTS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                conns.append(s)
                try:
                    s.connect(str(d.socket))
                except BlockingIOError as exc:
                    assert exc.errno == errno.EAGAIN
                    refused += 1
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert refused == 0
        assert d.http.get("/health").status_code == 200
    finally:
        for s in conns:
            s.close()
        d.stop()
        shutil.rmtree(root, ignore_errors=True)



@pytest.mark.anyio
async def test_a_closed_door_refuses_new_connections_at_once() -> None:
    """aiohttp closes a site's door first when the daemon stops, then drains the requests in flight:
    a client connecting meanwhile is refused, not left waiting in the queue until the drain ends."""
    path = Path(tempfile.mkdtemp(prefix="rdd-", dir="/tmp")) / "d.sock"
    door = Door(bind_unix_socket(path), asyncio.Protocol)
    door.start()
    try:
        _, writer = await asyncio.open_unix_connection(str(path))  # taken while the door is open
        writer.close()
        door.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_unix_connection(str(path))
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
