"""One external endpoint: its checked settings, its HTTP session, and discovery (model list + health).

An endpoint is reached at an http(s) base URL or over a unix socket (`unix:/path/to.sock`). Its OpenAI
routes sit under the base URL (`/v1/chat/completions`...): give the base URL without `/v1`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.base import Capability
from backends.external.profiles import KINDS, KindProfile, Listing, profile

if TYPE_CHECKING:
    import aiohttp

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# The most of a model list read: a list bigger than this is not one.
_MAX_LISTING_BYTES = 4 << 20
_MAX_MODELS = 10_000


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to its end, or its first `limit` + 1 bytes when it is longer (the caller can tell)."""
    raw = bytearray()
    while len(raw) <= limit:
        chunk = await content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return bytes(raw)


class ExternalError(Exception):
    """An endpoint could not be reached or answered something unusable."""


class UpstreamSpec(BaseModel):
    """One `[[upstreams]]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="lowercase, [a-z0-9._-], unique among upstreams and engines")
    kind: str = Field(description=f"one of: {', '.join(KINDS)}")
    base_url: str = Field(description="http(s)://host[:port][/prefix] or unix:/path/to.sock")
    token_file: Path | None = Field(default=None, description="file holding the token sent to the endpoint")
    priority: int = Field(default=100, ge=0, le=1000, description="lower is tried first")
    connect_timeout: float = Field(default=5.0, gt=0, le=600, description="seconds to connect")
    first_byte_timeout: float = Field(default=120.0, gt=0, le=3600,
                                      description="seconds to the answer's first byte; past it, fail over")
    read_timeout: float = Field(default=300.0, gt=0, le=3600, description="seconds between two bytes of an answer")
    discovery_timeout: float = Field(default=5.0, gt=0, le=600, description="seconds a model-list poll may take")
    capabilities: dict[Capability, bool] = Field(default_factory=dict,
                                                 description="per-endpoint overrides of the kind's capabilities")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a valid upstream name: lowercase letters, digits, '.', '_', '-'")
        return value

    @field_validator("kind")
    @classmethod
    def _valid_kind(cls, value: str) -> str:
        profile(value)
        return value

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if value.startswith("unix:"):
            path = value.removeprefix("unix:").removeprefix("//")
            if not path.startswith("/"):
                raise ValueError(f"a unix socket base URL needs an absolute path (unix:/path/to.sock), got {value!r}")
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http(s)://host[:port][/prefix] or unix:/path/to.sock, got {value!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{value!r}: no credentials, query or fragment in a base URL (use token_file)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value.rstrip("/")

    @property
    def profile(self) -> KindProfile:
        return profile(self.kind)

    @property
    def socket_path(self) -> str | None:
        if not self.base_url.startswith("unix:"):
            return None
        return self.base_url.removeprefix("unix:").removeprefix("//")

    @property
    def http_base(self) -> str:
        return "http://upstream" if self.socket_path is not None else self.base_url

    def effective_capabilities(self) -> frozenset[Capability]:
        caps = set(self.profile.capabilities)
        for capability, on in self.capabilities.items():
            (caps.add if on else caps.discard)(capability)
        return frozenset(caps)


@dataclass
class Discovery:
    """What the last poll of an endpoint found."""

    models: tuple[str, ...] = ()
    healthy: bool = False
    error: str | None = None
    checked_at: float | None = None
    polls: int = field(default=0)


def read_token(path: Path) -> str:
    """Blocking: the token in `path`, stripped; ExternalError when it is unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExternalError(f"cannot read token file {path}: {exc}") from exc
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ExternalError(f"token file {path} must hold one token without spaces")
    return token


class ExternalEndpoint:
    """An endpoint runnerd sends requests to but never starts, loads or unloads."""

    def __init__(self, spec: UpstreamSpec, token: str | None, extra_headers: dict[str, str] | None = None) -> None:
        self.spec = spec
        self._extra_headers = dict(extra_headers or {})
        self.name = spec.name
        self.profile = spec.profile
        self.capabilities = spec.effective_capabilities()
        self._token = token
        self._session: aiohttp.ClientSession | None = None
        self.discovery = Discovery()

    @classmethod
    def from_spec(cls, spec: UpstreamSpec, extra_headers: dict[str, str] | None = None) -> ExternalEndpoint:
        """Blocking (reads the token file). `extra_headers` go with every request."""
        return cls(spec, read_token(spec.token_file) if spec.token_file is not None else None, extra_headers)

    def url(self, path: str) -> str:
        return self.spec.http_base + path

    def headers(self) -> dict[str, str]:
        if self._token is None:
            return dict(self._extra_headers)
        return {**self._extra_headers, self.profile.auth_header: self.profile.auth_scheme + self._token}

    def session(self) -> aiohttp.ClientSession:
        """The endpoint's pooled session (made on first use, inside the event loop)."""
        import aiohttp

        if self._session is None or self._session.closed:
            socket_path = self.spec.socket_path
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=socket_path) if socket_path \
                else aiohttp.TCPConnector(limit=256)
            spec = self.spec
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=spec.connect_timeout + spec.first_byte_timeout,
                                              sock_connect=spec.connect_timeout, sock_read=spec.read_timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get_json(self, path: str) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.spec.discovery_timeout, sock_connect=self.spec.connect_timeout)
        try:
            async with self.session().get(self.url(path), headers=self.headers(), timeout=timeout) as resp:
                if resp.status != 200:
                    raise ExternalError(f"GET {path} answered {resp.status}")
                raw = await read_at_most(resp.content, _MAX_LISTING_BYTES)
                if len(raw) > _MAX_LISTING_BYTES:
                    raise ExternalError(f"GET {path} answered more than {_MAX_LISTING_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ExternalError(f"GET {path}: {exc or type(exc).__name__}") from exc
        import json

        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExternalError(f"GET {path} did not answer JSON") from exc

    async def list_models(self) -> tuple[str, ...]:
        answer = await self._get_json(self.profile.models_path)
        key, field_name = ("models", "name") if self.profile.listing is Listing.OLLAMA else ("data", "id")
        items = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(items, list):
            raise ExternalError(f"GET {self.profile.models_path} did not answer a model list ({key!r} missing)")
        names = [i.get(field_name) for i in items[:_MAX_MODELS] if isinstance(i, dict)]
        return tuple(dict.fromkeys(n for n in names if isinstance(n, str) and 0 < len(n) <= 300))

    async def healthy(self) -> bool:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.spec.discovery_timeout, sock_connect=self.spec.connect_timeout)
        try:
            async with self.session().get(self.url(self.profile.health_path), headers=self.headers(),
                                          timeout=timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def poll(self) -> Discovery:
        """Check health and list the models; the result replaces `discovery`. Never raises ExternalError."""
        polls = self.discovery.polls + 1
        healthy = await self.healthy()
        try:
            models = await self.list_models() if healthy else ()
            error = None if healthy else f"health check {self.profile.health_path} failed"
        except ExternalError as exc:
            models, healthy, error = (), False, str(exc)
        self.discovery = Discovery(models=models, healthy=healthy, error=error, checked_at=time.time(), polls=polls)
        return self.discovery
