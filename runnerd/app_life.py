"""A background service started and stopped with the aiohttp application."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # node_labels is imported by CLI commands that must not load aiohttp
    from aiohttp import web


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def runs_with(app: web.Application, service: Service) -> None:
    """Start `service` among the app's on_startup handlers, in the order added (a service may need one added
    before it), and stop it on cleanup."""

    async def start(app: web.Application) -> None:
        await service.start()

    async def stop(app: web.Application) -> None:
        await service.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
