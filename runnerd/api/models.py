"""The model registry over HTTP: list, show and register models."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import BackendConfiguration
from runnerd.api.context import daemon, over_unix_socket
from runnerd.api.engines import find_model, read_json_body
from runnerd.api.errors import ApiError
from runnerd.api.estimate import describe, model_estimate
from runnerd.durations import parse_keep_alive
from runnerd.store import ModelEntry, StoreError


class AddModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=300)
    path: str = Field(min_length=1, max_length=4096)
    context_size: int | None = Field(default=None, gt=0)
    keep_alive: str | None = Field(default=None, max_length=64)


def model_json(model: ModelEntry) -> dict[str, Any]:
    return model.model_dump(mode="json")


async def list_models(request: web.Request) -> web.Response:
    return web.json_response([model_json(m) for m in daemon(request).store.list()])


async def show_model(request: web.Request) -> web.Response:
    d = daemon(request)
    model = find_model(d, request.match_info["name"])
    return web.json_response({**model_json(model), **await describe(d, model)})


def _validated(payload: dict[str, Any]) -> AddModelRequest:
    try:
        spec = AddModelRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"invalid model registration: {field}: {err['msg']}", param=field) from exc
    if "\0" in spec.path:
        raise ApiError(400, "model path contains a NUL byte", param="path")
    if spec.keep_alive is not None:
        try:
            parse_keep_alive(spec.keep_alive)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="keep_alive") from exc
    return spec


async def add_model(request: web.Request) -> web.Response:
    """Register a local model file under a name. Only over the unix socket: a remote caller must
    never make the daemon open an arbitrary host path."""
    if not over_unix_socket(request):
        raise ApiError(403, "registering a model from a local path is only allowed over the unix socket",
                       code="local_only")
    spec = _validated(await read_json_body(request))
    config = BackendConfiguration(context_size=spec.context_size, keep_alive=spec.keep_alive)
    store = daemon(request).store
    try:
        entry = await asyncio.to_thread(store.add, spec.name, Path(spec.path), config)
    except StoreError as exc:
        raise ApiError(exc.status, str(exc), code="invalid_model", param="path") from exc
    return web.json_response(model_json(entry), status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/models", list_models)
    app.router.add_post("/models", add_model)
    # Before the greedy show route, which would otherwise swallow ".../estimate".
    app.router.add_get("/models/{name:.+}/estimate", model_estimate)
    app.router.add_get("/models/{name:.+}", show_model)
