from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import pytest

from runnerd.server import ListenerError, bind_unix_socket


@pytest.fixture
def sock_path():
    d = Path("/tmp") / f"rdl-{time.monotonic_ns()}"
    yield d / "runnerd.sock"
    for p in d.glob("*"):
        p.unlink()
    if d.exists():
        d.rmdir()


def test_socket_is_0660_in_a_private_directory(sock_path):
    s = bind_unix_socket(sock_path)
    try:
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    finally:
        s.close()


def test_stale_socket_is_replaced(sock_path):
    dead = bind_unix_socket(sock_path)
    dead.close()  # the file stays, nobody listens: a daemon that died
    live = bind_unix_socket(sock_path)
    live.close()


def test_live_socket_is_refused(sock_path):
    live = bind_unix_socket(sock_path)
    try:
        with pytest.raises(ListenerError, match="already listening"):
            bind_unix_socket(sock_path)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock_path))  # the first daemon's socket is untouched
        client.close()
    finally:
        live.close()


def test_regular_file_is_never_replaced(sock_path):
    sock_path.parent.mkdir()
    sock_path.write_text("precious")
    with pytest.raises(ListenerError, match="not a socket"):
        bind_unix_socket(sock_path)
    assert sock_path.read_text() == "precious"
