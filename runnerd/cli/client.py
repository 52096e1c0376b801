"""A small client for the daemon's unix socket, used by the CLI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from runnerd.errors import ClientError

__all__ = ["ClientError", "DaemonClient"]




def _error_message(status: int, text: str) -> str:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return f"HTTP {status}: {text.strip()}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"HTTP {status}: {error.get('message')}"
    if isinstance(error, str):
        return f"HTTP {status}: {error}"
    return f"HTTP {status}: {text.strip()}"


class DaemonClient:
    def __init__(self, socket_path: Path, timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path)),
            # No total by default: a chat or a pull may run for hours. The daemon's socket accepts at once.
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10),
        )

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._session.close()

    def _unreachable(self, exc: Exception) -> ClientError:
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ClientError(f"cannot reach runnerd at {self.socket_path}: {exc.os_error.strerror} "
                               "(is `runnerd serve` running?)")
        return ClientError(f"lost the connection to runnerd at {self.socket_path}: {exc}")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._session.request(method, f"http://runnerd{path}", json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ClientError(_error_message(resp.status, text))
                return json.loads(text) if text and resp.content_type == "application/json" else text
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def stream_ndjson(self, path: str, body: Any = None, method: str = "GET",
                            error_lines: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Yield each line of a newline-delimited JSON stream (job or pull progress). With
        `error_lines`, a line {"error": "..."} (a failure after the stream started) raises ClientError."""
        try:
            async with self._session.request(method, f"http://runnerd{path}", json=body,
                                             headers={"Accept": "application/x-ndjson"}) as resp:
                if resp.status >= 400:
                    raise ClientError(_error_message(resp.status, await resp.text()))
                async for raw in resp.content:
                    if raw.strip():
                        line = json.loads(raw)
                        if error_lines and isinstance(line, dict) and isinstance(line.get("error"), str):
                            raise ClientError(_error_message(int(line.get("status") or 500), raw.decode()))
                        yield line
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def stream_sse(self, path: str, body: Any) -> AsyncIterator[dict[str, Any]]:
        """POST and yield each `data:` event of a server-sent event stream as JSON."""
        try:
            async with self._session.post(f"http://runnerd{path}", json=body) as resp:
                if resp.status >= 400:
                    raise ClientError(_error_message(resp.status, await resp.text()))
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if isinstance(event, dict) and "error" in event:
                        raise ClientError(_error_message(500, data))
                    yield event
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc
