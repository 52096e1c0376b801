"""sd_notify and socket-activation parsing, against real datagram sockets (no systemd needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid

import anyio
import pytest

from runnerd.systemd import Notifier, listen_fds


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def messages(sock: socket.socket, count: int) -> list[dict[str, str]]:
    out = []
    for _ in range(count):
        data = sock.recv(4096).decode()
        out.append(dict(line.split("=", 1) for line in data.split("\n")))
    return out


def test_ready_status_stopping_over_a_path_socket(receiver):
    path, sock = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"}
    notifier = Notifier.from_environment(env)
    assert env == {}, "the variables are not passed on to the engines runnerd starts"
    assert notifier.watchdog_interval == 2.0
    assert notifier.ready("listening on unix:/run/x.sock\nand more")
    assert notifier.tick("2 runners")
    assert notifier.tick("2 runners")  # unchanged status: the ping alone
    assert notifier.stopping("stopping")
    ready, tick, ping, stopping = messages(sock, 4)
    assert ready == {"READY": "1", "STATUS": "listening on unix:/run/x.sock and more"}
    assert tick == {"WATCHDOG": "1", "STATUS": "2 runners"}
    assert ping == {"WATCHDOG": "1"}
    assert stopping == {"STOPPING": "1", "STATUS": "stopping"}


def test_abstract_namespace_socket():
    name = f"runnerd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(100) == b"STATUS=hello"


def test_watchdog_belongs_to_the_named_pid_only(receiver):
    path, _ = receiver
    other = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    assert other.enabled and other.watchdog_interval is None
    mine = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000",
                                      "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == 0.05


@pytest.mark.anyio
async def test_nothing_happens_without_a_notify_socket():
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert not notifier.ready("x")
    with anyio.fail_after(1):
        await notifier.run()  # returns at once


def test_an_unreachable_manager_is_not_an_error(tmp_path):
    assert not Notifier(str(tmp_path / "gone")).ready("x")
    assert not Notifier("vsock:2:1234").enabled


@pytest.mark.anyio
async def test_watchdog_pings_at_half_the_timeout(receiver):
    path, sock = receiver
    notifier = Notifier(path, watchdog_usec=100_000)

    task = asyncio.create_task(notifier.run(lambda: "fine"))
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # stopped before the socket is read, as asyncio.run's end left it: no ping comes after
    sock.settimeout(0)
    received = []
    with contextlib.suppress(BlockingIOError):
        while True:
            received.append(sock.recv(4096).decode())
    # One ping every 0.05 s: about 10 in 0.5 s, however busy the machine is there are several.
    assert received[0] == "WATCHDOG=1\nSTATUS=fine"
    assert 4 <= len(received) <= 11 and set(received[1:]) == {"WATCHDOG=1"}


@pytest.mark.parametrize("env", [
    {"LISTEN_PID": "1", "LISTEN_FDS": "2"},          # meant for another process
    {"LISTEN_PID": "x", "LISTEN_FDS": "2"},          # malformed
    {"LISTEN_FDS": "2"},                              # incomplete
    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
])
def test_listen_fds_that_are_not_ours_are_ignored_and_cleared(env):
    env = dict(env, LISTEN_FDNAMES="a:b")
    assert listen_fds(env) == []
    assert env == {}
