"""GET /node: the host inventory a parent scheduler places models with; POST /node/drain and
/node/resume: stop taking new models (and unload each as it goes idle), and take them again.

A token limited to some models is shown only their runners. The host's memory, GPUs, what the runners
hold in all (`reserved`) and the drain's counts stay whole: they are the host's, what placing one more
model needs, and they name no model."""

from __future__ import annotations

import asyncio

from aiohttp import web

from runnerd import node
from runnerd.api import scopes
from runnerd.api.context import daemon


async def get_node(request: web.Request) -> web.Response:
    d = daemon(request)
    # status() may run an engine's --version: off the event loop. The host and the runners' memory come
    # from the sampler's latest snapshot (ps() measures from the same one).
    statuses = await asyncio.gather(*(asyncio.to_thread(b.status) for b in d.backends.values()))
    runners = d.scheduler.ps()
    drain = d.scheduler.drain_status()
    shown = {name: status.text for name, status in zip(d.backends, statuses, strict=True)}
    info = await asyncio.to_thread(node.collect, runners, shown,
                                   d.scheduler.sampler.snapshot, drain)
    info.runners = scopes.visible(info.runners, lambda r: r.model)
    return web.json_response(info.model_dump(mode="json"))


async def drain(request: web.Request) -> web.Response:
    """Start draining (idempotent: a second call keeps the first one's `since`); answers at once with
    what is left. Poll GET /node (`drain`) until `runners_left` is 0."""
    status = daemon(request).scheduler.drain()
    return web.json_response({"drain": status.model_dump(mode="json")})


async def resume(request: web.Request) -> web.Response:
    status = daemon(request).scheduler.resume()
    return web.json_response({"drain": status.model_dump(mode="json")})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/node", get_node)
    app.router.add_post("/node/drain", drain)
    app.router.add_post("/node/resume", resume)
