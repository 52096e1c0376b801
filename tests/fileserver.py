"""A local HTTP file server for pull tests: Range requests, Hugging Face-style paths, and faults
(404/500, slow bodies, connections dropped midway, lying Content-Length, redirects).

It runs its own event loop in a thread, so both in-process tests and a daemon subprocess can use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Served:
    data: bytes
    lfs: bool = False  # send X-Linked-Etag with the sha256, as the hub does for LFS files
    linked_etag: str | None = None  # override (a wrong one, for mismatch tests)


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # path -> status to answer instead
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes sent before each drop
    short_by: dict[str, int] = field(default_factory=dict)  # path -> announce this many more bytes than sent
    redirects: dict[str, str] = field(default_factory=dict)
    trees: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "org/repo@rev" -> tree listing
    delay: float = 0.0  # seconds between 64 KiB chunks
    chunk: int = 64 * 1024
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    authorization: list[tuple[str, str | None, str]] = field(default_factory=list)  # (path, header, Host)
    port: int = 0
    active: int = 0  # file bodies being sent now
    max_active: int = 0

    # --- content -------------------------------------------------------------------------------

    def add(self, path: str, data: bytes, lfs: bool = False) -> str:
        self.files[path] = Served(data, lfs)
        return self.url(path)

    def add_hf(self, org: str, repo: str, name: str, data: bytes, rev: str = "main", lfs: bool = True) -> str:
        """Serve a file at /{org}/{repo}/resolve/{rev}/{name} and list it in the repo's tree."""
        self.add(f"/{org}/{repo}/resolve/{rev}/{name}", data, lfs)
        entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data)}
        if lfs:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
        self.trees.setdefault(f"{org}/{repo}@{rev}", []).append(entry)
        return f"hf://{org}/{repo}/{name}" + ("" if rev == "main" else f"@{rev}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, path: str) -> list[str | None]:
        """Range headers of the GETs for `path` (None = a whole-file request)."""
        return [r for p, r in self.requests if p == path]

    # --- serving -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((path, request.headers.get("Range")))
        self.authorization.append((path, request.headers.get("Authorization"), request.host))
        tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$", path)
        if tree is not None:
            key = f"{tree.group(1)}@{tree.group(2)}"
            if key not in self.trees:
                return web.Response(status=404)
            return web.json_response(self.trees[key])
        if path in self.status:
            return web.Response(status=self.status[path], text="nope")
        if path in self.redirects:
            raise web.HTTPFound(self.redirects[path])
        served = self.files.get(path)
        if served is None:
            return web.Response(status=404, text="not found")
        data = served.data
        digest = hashlib.sha256(data).hexdigest()
        etag = f'"{digest[:16]}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if served.lfs or served.linked_etag:
            headers["X-Linked-Etag"] = f'"{served.linked_etag or digest}"'
        start, status = 0, 200
        rng = re.match(r"^bytes=(\d+)-$", request.headers.get("Range", ""))
        if rng is not None and request.headers.get("If-Range", etag) == etag:
            start = int(rng.group(1))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body) + self.short_by.get(path, 0))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._send(request, resp, path, body)
        finally:
            self.active -= 1

    async def _send(self, request: web.Request, resp: web.StreamResponse, path: str, body: bytes) -> web.StreamResponse:
        drops = self.drop_after.get(path)
        limit = drops.pop(0) if drops else None
        sent = 0
        for i in range(0, len(body), self.chunk):
            piece = body[i:i + self.chunk]
            if limit is not None and sent + len(piece) > limit:
                await resp.write(piece[: max(0, limit - sent)])
                await self._hang_up(request)  # the connection breaks midway
                return resp
            if i and self.delay:
                await asyncio.sleep(self.delay)
            await resp.write(piece)
            sent += len(piece)
        if self.short_by.get(path):
            await self._hang_up(request)
            return resp
        await resp.write_eof()
        return resp

    @staticmethod
    async def _hang_up(request: web.Request) -> None:
        # A client reading a body whose connection is gone raises before it hands over bytes already
        # buffered; the pause lets it consume what was sent, so the tests see a fixed part size.
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.close()

    def start(self) -> FileServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def boot() -> None:
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(boot())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="test file server")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        async def down() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def tree_json(server: FileServer, key: str) -> str:
    return json.dumps(server.trees[key])
