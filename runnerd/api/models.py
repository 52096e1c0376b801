"""The model store over HTTP: list, show, register in place, pull (create), tag and remove models.

POST /models/create streams NDJSON progress. The response is only started when the first progress
report arrives, so a failure before any byte came (bad source, upstream 404, disk full up front) is a
plain error response with its status; a failure after that is the stream's last line, {"error": ...}.
The pull belongs to the request: a client that hangs up cancels it (its part file stays, so the next
pull resumes; runnerd.api.pulling). Concurrent pulls of the same URL share one download.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from backends.base import BackendConfiguration
from runnerd.api import scopes
from runnerd.api.body import read_json_body
from runnerd.api.context import daemon, over_unix_socket
from runnerd.api.engines import find_model
from runnerd.api.errors import ApiError, parse_body
from runnerd.api.estimate import describe, model_estimate
from runnerd.api.pulling import RequestPull
from runnerd.durations import parse_keep_alive
from runnerd.store import ModelEntry, StoreError

NDJSON = "application/x-ndjson"


class AddModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=300)
    path: str = Field(min_length=1, max_length=4096)
    context_size: int | None = Field(default=None, gt=0)
    keep_alive: str | None = Field(default=None, max_length=64)


def model_json(model: ModelEntry) -> dict[str, Any]:
    return model.model_dump(mode="json")


async def list_models(request: web.Request) -> web.Response:
    return web.json_response([model_json(m) for m in scopes.visible(daemon(request).store.list(), lambda m: m.name)])


async def show_model(request: web.Request) -> web.Response:
    d = daemon(request)
    model = find_model(d, request.match_info["name"])
    return web.json_response({**model_json(model), **await describe(d, model)})


def _validated(payload: dict[str, Any]) -> AddModelRequest:
    spec = parse_body(AddModelRequest, payload, "model registration")
    if "\0" in spec.path:
        raise ApiError(400, "model path contains a NUL byte", param="path")
    if spec.keep_alive is not None:
        try:
            parse_keep_alive(spec.keep_alive)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="keep_alive") from exc
    return spec


async def add_model(request: web.Request) -> web.Response:
    """Register a local model file or directory in place under a name. Only over the unix socket: a
    remote caller must never make the daemon open an arbitrary host path."""
    if not over_unix_socket(request):
        raise ApiError(403, "registering a model from a local path is only allowed over the unix socket",
                       code="local_only")
    spec = _validated(await read_json_body(request))
    config = BackendConfiguration(context_size=spec.context_size, keep_alive=spec.keep_alive)
    store = daemon(request).store
    try:
        entry = await store.add_local(spec.name, Path(spec.path), config)
    except StoreError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code, param="path") from exc
    return web.json_response(model_json(entry), status=201)


def _api_error(exc: StoreError, param: str | None = None) -> ApiError:
    return ApiError(exc.status, str(exc), code=exc.code, param=param,
                    type="server_error" if exc.status >= 500 else None)




class CreateModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    source: str = Field(alias="from", min_length=1, max_length=4096)
    name: str | None = Field(default=None, min_length=1, max_length=300)
    sha256: str | None = Field(default=None, min_length=1, max_length=80)
    mmproj: str | None = Field(default=None, min_length=1, max_length=4096)


async def create_model(request: web.Request) -> web.StreamResponse:
    spec = parse_body(CreateModelRequest, await read_json_body(request), "pull request")
    if (spec.source.startswith("/") or (spec.mmproj or "").startswith("/")) and not over_unix_socket(request):
        raise ApiError(403, "pulling from a local path is only allowed over the unix socket", code="local_only",
                       param="from")
    if not spec.source.startswith(("/", "http://", "https://", "hf://")):
        raise ApiError(400, "'from' must be an absolute path, an http(s):// URL or hf://org/repo[/file][@revision]",
                       code="invalid_source", param="from")
    store = daemon(request).store
    response: web.StreamResponse | None = None
    public_only = not over_unix_socket(request)  # a remote caller must not reach the host's own network
    async with RequestPull(lambda progress: store.pull(spec.source, spec.name, spec.sha256, progress,
                                                       mmproj=spec.mmproj, public_only=public_only)) as pulling:
        while (report := await pulling.next_report()) is not None:
            if report.phase == "success":
                continue  # the final line carries the model instead
            if response is None:
                response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
                await response.prepare(request)
            await response.write(report.model_dump_json(exclude_none=True).encode() + b"\n")
        try:
            entry = pulling.task.result()
        except StoreError as exc:
            if response is None:
                raise _api_error(exc, "from") from exc
            await response.write(json.dumps({"error": str(exc), "status": exc.status, "code": exc.code}).encode()
                                 + b"\n")
            await response.write_eof()
            return response
        final = {"phase": "success", "total": entry.size, "completed": entry.size, "model": model_json(entry)}
        if response is None:
            return web.json_response(final, status=201)
        await response.write(json.dumps(final).encode() + b"\n")
        await response.write_eof()
        return response


async def delete_model(request: web.Request) -> web.Response:
    d = daemon(request)
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    try:
        scopes.check_model(request.match_info["name"])
        # The store's lock may be held by a commit thread, and removal syncs to disk: not on the event loop.
        entry = await asyncio.to_thread(d.store.remove, request.match_info["name"], force=force)
    except StoreError as exc:
        raise _api_error(exc, "name") from exc
    # Forced: stop the runners that still serve it (their open file stays valid until they exit).
    stopped = await d.scheduler.unload(models=[entry.name]) if force else []
    return web.json_response({"deleted": entry.name, "unloaded": len(stopped)})


class TagRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=300)
    force: bool = False  # replace a model the name already holds (409 otherwise)


async def estimate_or_show(request: web.Request) -> web.Response:
    """GET /models/NAME/estimate; a model whose own name ends in "/estimate" (org/estimate) is shown
    when NAME alone names no model, so no valid name is unreachable."""
    d = daemon(request)
    name = request.match_info["name"]
    try:
        scopes.check_model(name)
        d.store.get(name)
    except StoreError:
        whole = f"{name}/estimate"
        with contextlib.suppress(StoreError):
            scopes.check_model(whole)
            model = d.store.get(whole)
            return web.json_response({**model_json(model), **await describe(d, model)})
    return await model_estimate(request)


async def tag_model(request: web.Request) -> web.Response:
    spec = parse_body(TagRequest, await read_json_body(request), "tag request")
    try:
        scopes.check_model(request.match_info["name"])
        scopes.check_new_name(spec.name, "name")
        entry = await asyncio.to_thread(daemon(request).store.tag, request.match_info["name"], spec.name,
                                        force=spec.force)
    except StoreError as exc:
        raise _api_error(exc, "name") from exc
    return web.json_response(model_json(entry), status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/models", list_models)
    app.router.add_post("/models", add_model)
    app.router.add_post("/models/create", create_model)
    app.router.add_post("/models/{name:.+}/tag", tag_model)
    app.router.add_delete("/models/{name:.+}", delete_model)
    # Before the greedy show route, which would otherwise swallow ".../estimate".
    app.router.add_get("/models/{name:.+}/estimate", estimate_or_show)
    app.router.add_get("/models/{name:.+}", show_model)
