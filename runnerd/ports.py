"""Loopback TCP ports for runners of engines that cannot listen on a unix socket."""

from __future__ import annotations

import socket

from backends.endpoint import LOOPBACK


def free_loopback_port() -> int:
    """A port nothing listens on now, for the engine to bind moments later (should another program take it
    in between, the engine fails to bind and exits, and the load fails with its words)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port
