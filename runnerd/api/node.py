"""GET /node: the host inventory a parent scheduler places models with."""

from __future__ import annotations

import asyncio

from aiohttp import web

from runnerd import node
from runnerd.api.context import daemon


async def get_node(request: web.Request) -> web.Response:
    d = daemon(request)
    # status() may run an engine's --version; psutil and NVML block: all of it off the event loop.
    statuses = await asyncio.gather(*(asyncio.to_thread(b.status) for b in d.backends.values()))
    info = await asyncio.to_thread(node.collect, d.scheduler.ps(), dict(zip(d.backends, statuses, strict=True)))
    return web.json_response(info.model_dump(mode="json"))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/node", get_node)
