"""An operator catalog fetched from a URL (`catalog_url`): at start, every `catalog_refresh` seconds, and
when an admin asks (`POST /engines/backends/catalog/refresh`).

A fetch is bounded (`catalog_fetch_timeout` for the whole request, the catalog size cap on the body) and
its text is checked by the same parser as the operator's file. Only a catalog that passes replaces the one
in force, and it is kept in the data directory, so a daemon that starts while the URL is down still
offers it. A failed fetch changes nothing but the error shown in `GET /engines/backends/catalog`.
Parsing and the disk writes run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from backends.atomic import write_atomically
from backends.catalog import MAX_CATALOG_BYTES, Catalog, CatalogError, parse_catalog
from runnerd.app_life import runs_with
from runnerd.config import Settings

log = logging.getLogger("runnerd.catalog_feed")

KEPT_NAME = "catalog-url.json"
_MAX_REDIRECTS = 3


class KeptCatalog(BaseModel):
    """The last catalog fetched that passed its checks, as it is kept on disk."""

    url: str
    fetched_at: float
    text: str = Field(max_length=MAX_CATALOG_BYTES)


class FeedStatus(BaseModel):
    url: str
    state: Literal["fetched", "kept", "none"] = Field(
        description="fetched: this run fetched the catalog in force; kept: the copy in the data directory "
                    "from an earlier run is in force; none: no catalog from the URL yet")
    fetched_at: float | None = Field(description="when the catalog in force was fetched")
    checked_at: float | None = Field(description="when the URL was last asked")
    error: str | None = Field(description="why the last fetch was not taken (the catalog in force stays)")


class FetchError(Exception):
    pass


async def fetch_text(url: str, timeout: float) -> str:
    """The body at `url`, as text: at most MAX_CATALOG_BYTES (checked against Content-Length and while
    reading, after decompression), within `timeout` seconds in all, from a 200 answer."""
    timeouts = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout, sock_read=timeout)
    async with aiohttp.ClientSession(timeout=timeouts) as session, \
            session.get(url, max_redirects=_MAX_REDIRECTS,
                        headers={"Accept": "application/yaml, text/yaml, text/plain"}) as resp:
        if resp.status != 200:
            raise FetchError(f"HTTP {resp.status} {resp.reason or ''}".rstrip())
        if resp.content_length is not None and resp.content_length > MAX_CATALOG_BYTES:
            raise FetchError(f"{resp.content_length} bytes announced: a catalog is at most {MAX_CATALOG_BYTES}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_CATALOG_BYTES:
                raise FetchError(f"larger than {MAX_CATALOG_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"not UTF-8 text (byte {exc.start})") from exc


class CatalogFeed:
    def __init__(self, url: str, data_dir: Path, *, timeout: float, interval: float) -> None:
        self.url = url
        self.kept_path = data_dir / KEPT_NAME
        self.timeout = timeout
        self.interval = interval
        self.catalog: Catalog | None = None
        self._state: Literal["fetched", "kept", "none"] = "none"
        self._fetched_at: float | None = None
        self._checked_at: float | None = None
        self._error: str | None = None
        self._task: asyncio.Task[None] | None = None
        # Fetches take turns: a refresh asked for while the timer's is under way fetches again after it,
        # so its answer reflects the URL as it is after the request came.
        self._turn = asyncio.Lock()

    def status(self) -> FeedStatus:
        return FeedStatus(url=self.url, state=self._state, fetched_at=self._fetched_at, checked_at=self._checked_at,
                          error=self._error)

    def _load_kept(self) -> None:
        """Blocking. A kept copy from another URL, or one that no longer passes the checks, is not used."""
        try:
            kept = KeptCatalog.model_validate_json(self.kept_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValidationError) as exc:
            self._error = f"the kept copy {self.kept_path} is unreadable: {exc}"
            return
        if kept.url != self.url:
            return
        try:
            self.catalog = parse_catalog(kept.text, f"{self.url} (kept copy)")
        except CatalogError as exc:
            self._error = f"the kept copy no longer passes: {exc}"
            return
        self._state, self._fetched_at = "kept", kept.fetched_at

    def _take(self, text: str, fetched_at: float) -> Catalog:
        """Blocking: check the text, then keep it on disk; the catalog in force changes only if both worked."""
        catalog = parse_catalog(text, self.url)
        kept = KeptCatalog(url=self.url, fetched_at=fetched_at, text=text)
        write_atomically(self.kept_path, kept.model_dump_json().encode())
        return catalog

    async def refresh(self) -> None:
        """One fetch; on any failure the catalog in force stays and the error is shown."""
        async with self._turn:
            await self._fetch()

    async def _fetch(self) -> None:
        now = time.time()
        self._checked_at = now
        try:
            text = await fetch_text(self.url, self.timeout)
            catalog = await asyncio.to_thread(self._take, text, now)
        except TimeoutError:
            self._fail(f"no complete answer within {self.timeout:g} s (catalog_fetch_timeout)")
        except (aiohttp.ClientError, FetchError, CatalogError, OSError) as exc:
            self._fail(str(exc) or type(exc).__name__)
        except Exception as exc:  # whatever a hostile server provokes, the refresh loop must live on
            log.exception("catalog_url %s: unexpected failure", self.url)
            self._fail(f"{type(exc).__name__}: {exc}")
        else:
            self.catalog, self._state, self._fetched_at, self._error = catalog, "fetched", now, None

    def _fail(self, why: str) -> None:
        in_force = {"fetched": "the catalog fetched earlier stays in force", "kept": "the kept copy stays in force",
                    "none": "no catalog from the URL is in force"}[self._state]
        self._error = why
        log.warning("catalog_url %s not taken: %s; %s", self.url, why, in_force)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        """Load the kept copy, then fetch in the background (a slow URL does not hold up the start)."""
        await asyncio.to_thread(self._load_kept)
        self._task = asyncio.create_task(self._run(), name="catalog feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


CATALOG_FEED = web.AppKey("catalog_feed", CatalogFeed)


def keep_catalog_feed(app: web.Application, settings: Settings) -> CatalogFeed | None:
    """With `catalog_url` set, fetch it for the app's life (its on_startup and on_cleanup handlers)."""
    if settings.catalog_url is None:
        return None
    feed = app[CATALOG_FEED] = CatalogFeed(str(settings.catalog_url), settings.data_dir,
                                           timeout=settings.catalog_fetch_timeout,
                                           interval=settings.catalog_refresh)
    runs_with(app, feed)
    return feed
