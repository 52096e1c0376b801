"""Where a runner listens: a unix socket, or a loopback TCP port the daemon allocated for it.

One value type for both, so the daemon proxies, polls readiness and scrapes metrics the same way
whatever the engine can listen on.
"""

from __future__ import annotations

import contextlib
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import aiohttp

LOOPBACK = "127.0.0.1"


class EndpointKind(StrEnum):
    UNIX = "unix"
    TCP = "tcp"


class Endpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: EndpointKind
    path: Path | None = None  # unix
    port: int | None = None  # tcp, always on the loopback address

    @classmethod
    def unix(cls, path: Path) -> Endpoint:
        return cls(kind=EndpointKind.UNIX, path=path)

    @classmethod
    def tcp(cls, port: int) -> Endpoint:
        return cls(kind=EndpointKind.TCP, port=port)

    @property
    def host(self) -> str:
        """The address an engine binds: the socket path, or the loopback address."""
        return str(self.path) if self.kind is EndpointKind.UNIX else LOOPBACK

    @property
    def base_url(self) -> str:
        return "http://runner" if self.kind is EndpointKind.UNIX else f"http://{LOOPBACK}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def connector(self, **options: Any) -> aiohttp.BaseConnector:
        """A new aiohttp connector to this endpoint (options: limit, keepalive_timeout, force_close...)."""
        import aiohttp  # lazily: importing backends must stay cheap for `runnerd inspect`

        if self.kind is EndpointKind.UNIX:
            assert self.path is not None
            return aiohttp.UnixConnector(path=str(self.path), **options)
        return aiohttp.TCPConnector(**options)

    def exists(self) -> bool:
        """Whether the engine can be listening yet (a socket file exists; a port always may)."""
        return self.kind is EndpointKind.TCP or (self.path is not None and self.path.exists())

    def remove(self) -> None:
        """Remove a socket file left at the path; never removes anything that is not a socket."""
        if self.kind is EndpointKind.UNIX and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_socket():
                    self.path.unlink()

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind is EndpointKind.UNIX else f"{LOOPBACK}:{self.port}"
