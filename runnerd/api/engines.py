"""Inference routes (/engines[/{backend}]/v1/... and the /v1/... aliases) and runner management."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from backends.base import Backend, BackendConfiguration, BackendError, Capability, Mode, ModelRef, RunnerError
from runnerd import failover
from runnerd.api import scopes
from runnerd.api.body import read_json_body
from runnerd.api.context import Daemon, daemon
from runnerd.api.errors import ApiError, parse_body
from runnerd.configs import effective_configuration
from runnerd.durations import parse_keep_alive
from runnerd.proxy import forward, runner_error
from runnerd.scheduler import UNSET, Lease, RunnerKey, SchedulingError, Unset
from runnerd.sources import from_upstream
from runnerd.store import ModelEntry, StoreError


@dataclass(frozen=True)
class RequestKind:
    name: str
    capability: Capability
    mode: Mode
    upstream_path: str


CHAT = RequestKind("chat", Capability.CHAT, Mode.COMPLETION, "/v1/chat/completions")
COMPLETIONS = RequestKind("completions", Capability.COMPLETIONS, Mode.COMPLETION, "/v1/completions")
EMBEDDINGS = RequestKind("embeddings", Capability.EMBEDDINGS, Mode.EMBEDDING, "/v1/embeddings")
RERANK = RequestKind("rerank", Capability.RERANK, Mode.RERANKING, "/v1/rerank")

INFERENCE_ROUTES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/rerank": RERANK,
    "/rerank": RERANK,
}


def requested_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if model is None or model == "":
        raise ApiError(400, "missing required field 'model'", code="missing_model", param="model")
    if not isinstance(model, str):
        raise ApiError(400, "field 'model' must be a string", code="invalid_model", param="model")
    return model


def find_model(d: Daemon, name: str) -> ModelEntry:
    try:
        scopes.check_model(name)  # outside the caller's patterns: the same error as a missing model
        return d.store.get(name)
    except StoreError as exc:
        raise ApiError(exc.status, str(exc), code="model_not_found", param="model") from exc


def stored(d: Daemon, name: str) -> bool:
    try:
        d.store.get(name)
    except StoreError:
        return False
    return True


def choose_backend(d: Daemon, explicit: str | None, model: ModelEntry, mode: Mode = Mode.COMPLETION) -> Backend:
    """The backend named in the path; else the one the model's stored configuration for `mode` names (a
    manifest engine, say), while that engine is defined; else the first one that serves the model's
    format."""
    if explicit is None:
        stored = d.configs.get(model.name, mode)
        if stored is not None and stored.backend in d.backends:
            explicit = stored.backend
    if explicit is not None:
        backend = d.backend(explicit)
        if model.format not in backend.model_formats:
            raise ApiError(400, f"backend {backend.name} cannot serve {model.name}: it is a {model.format} "
                                f"model", code="unsupported_model_format", param="model")
        return backend
    for backend in d.backends.values():
        if model.format in backend.model_formats:
            return backend
    raise ApiError(400, f"no backend serves {model.format} models like {model.name}",
                   code="unsupported_model_format", param="model")


def configuration_for(d: Daemon, backend: Backend, model: ModelEntry, mode: Mode) -> BackendConfiguration:
    """What a runner of `model` on `backend` runs with: the model's defaults, overridden by its stored
    configuration for `mode` only when that names `backend`."""
    return effective_configuration(model.config, d.configs.for_backend(model.name, mode, backend.name))


def required_capabilities(kind: RequestKind, payload: dict[str, Any]) -> list[Capability]:
    needed = [kind.capability]
    if payload.get("stream") is True:
        needed.append(Capability.STREAMING)
    if payload.get("tools"):
        needed.append(Capability.TOOLS)
    return needed


def check_capabilities(backend: Backend, needed: list[Capability], model: ModelEntry | None = None,
                       ref: ModelRef | None = None) -> None:
    """`ref`: the model's, when the caller has it already (building one validates every field)."""
    # Some backends serve a capability only for some models (e.g. rerank only with a scorer model).
    available = backend.model_capabilities(ref or model.ref()) if model is not None else backend.capabilities
    for capability in needed:
        if capability not in available:
            which = f" for {model.name}" if model is not None and capability in backend.capabilities else ""
            raise ApiError(501, f"backend {backend.name} does not support {capability}{which}",
                           code="capability_not_supported", type="not_implemented_error")


def check_request(backend: Backend, model: ModelEntry, config: BackendConfiguration, payload: dict[str, Any],
                  ref: ModelRef | None = None) -> None:
    """400 for a request the backend, run with `config`, would accept but answer wrongly (the daemon
    knows nothing of engines' flags: the backend says)."""
    why = backend.request_problem(ref or model.ref(), config, payload)
    if why:
        raise ApiError(400, f"{model.name} on {backend.name}: {why}", code="engine_not_configured")


def take_keep_alive(payload: dict[str, Any]) -> float | Unset | None:
    """Remove and parse a request's `keep_alive` (engines reject fields they do not know)."""
    if "keep_alive" not in payload:
        return UNSET
    value = payload.pop("keep_alive")
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_keep_alive", param="keep_alive") from exc


async def lease_runner(d: Daemon, backend: Backend, model: ModelEntry, mode: Mode, config: BackendConfiguration,
                       keep_alive: float | Unset | None, *, preload: bool = False,
                       ref: ModelRef | None = None) -> Lease:
    """A lease on the model's runner; `preload`: the request only loads it (refused while draining)."""
    key = RunnerKey(backend.name, model.name, mode)
    try:
        return await d.scheduler.acquire(key, ref or model.ref(), config, keep_alive, preload=preload)
    except SchedulingError as exc:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
        raise ApiError(exc.status, str(exc), code=exc.code, type="server_error", headers=headers) from exc
    except RunnerError as exc:
        raise runner_error(model.name, exc) from exc
    except BackendError as exc:
        raise ApiError(503, f"cannot start {model.name} on {backend.name}: {exc}", code="backend_unavailable",
                       type="server_error") from exc


async def inference(kind: RequestKind, request: web.Request) -> web.StreamResponse:
    d = daemon(request)
    explicit = request.match_info.get("backend")
    if explicit is not None:
        d.backend(explicit)  # 404 for an unknown backend before anything else
    payload = await read_json_body(request)
    name = requested_model(payload)
    # A preload only loads a local model: runnerd never tells an upstream to load anything.
    preload = request.headers.get("X-Preload-Only", "").lower() == "true"
    # A model outside the caller's patterns takes the local way, which answers as for a missing model.
    if explicit is None and d.sources.active and not from_upstream(request) and not preload and scopes.may_use(name):
        candidates = await d.sources.candidates_when_known(name, local_has=stored(d, name))
        if candidates and (len(candidates) > 1 or candidates[0].endpoint is not None or candidates[0].model != name):
            needed = required_capabilities(kind, payload)
            return await failover.serve(request, candidates, kind.upstream_path, payload, needed,
                                        lambda model: _serve_locally(request, kind, {**payload, "model": model}, None))
    return await _serve_locally(request, kind, payload, explicit, await request.read())


async def _serve_locally(request: web.Request, kind: RequestKind, payload: dict[str, Any], explicit: str | None,
                         raw: bytes | None = None) -> web.StreamResponse:
    d = daemon(request)
    model = find_model(d, requested_model(payload))
    ref = model.ref()
    backend = choose_backend(d, explicit, model, kind.mode)
    check_capabilities(backend, required_capabilities(kind, payload), model, ref)
    keep_alive = take_keep_alive(payload)
    # Some engines answer 404 unless `model` is their served name: give them the store's canonical one
    # (`x` -> `x:latest`).
    renamed = backend.checks_model_name and payload.get("model") != model.name
    if renamed:
        payload["model"] = model.name
    body = json.dumps(payload).encode() if keep_alive is not UNSET or renamed or raw is None else raw
    config = configuration_for(d, backend, model, kind.mode)
    check_request(backend, model, config, payload, ref)
    preload = request.headers.get("X-Preload-Only", "").lower() == "true"
    lease = await lease_runner(d, backend, model, kind.mode, config, keep_alive, preload=preload, ref=ref)
    try:
        if preload:
            return web.Response(status=200)
        return await forward(request, lease.runner, kind.upstream_path, body, stream=payload.get("stream") is True)
    finally:
        lease.release()


def openai_model(model: ModelEntry) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.added_at), "owned_by": "runnerd"}


def _served_by(d: Daemon, request: web.Request) -> list[ModelEntry]:
    explicit = request.match_info.get("backend")
    models = scopes.visible(d.store.list(), lambda m: m.name)
    if explicit is None:
        return models
    backend = d.backend(explicit)
    return [m for m in models if m.format in backend.model_formats]


def other_models(d: Daemon) -> dict[str, str]:
    """The upstreams' models and the aliases that no stored model already names -> where each comes from
    (the first upstream by priority hosting it, or "alias")."""
    named = [*d.sources.external_models().items(), *((a, "alias") for a in d.sources.aliases)]
    listed: dict[str, str] = {}
    for name, source in named:
        if name not in listed and not stored(d, name) and scopes.may_use(name):
            listed[name] = source
    return listed


async def _other_sources(d: Daemon, request: web.Request) -> list[dict[str, Any]]:
    if request.match_info.get("backend") is not None or from_upstream(request):
        return []  # a backend's own listing, or one for another daemon: the local models only
    await d.sources.discovered()
    return [{"id": name, "object": "model", "created": 0, "owned_by": source}
            for name, source in other_models(d).items()]


async def list_models(request: web.Request) -> web.Response:
    d = daemon(request)
    models = _served_by(d, request)
    return web.json_response({"object": "list",
                              "data": [*(openai_model(m) for m in models), *await _other_sources(d, request)]})


async def get_model(request: web.Request) -> web.Response:
    d = daemon(request)
    name = request.match_info["name"]
    if not stored(d, name):
        for entry in await _other_sources(d, request):
            if entry["id"] == name:
                return web.json_response(entry)
    for model in _served_by(d, request):
        if model.name == find_model(d, name).name:
            return web.json_response(openai_model(model))
    raise ApiError(404, f"model {name!r} not found", code="model_not_found", param="model")


async def engines_status(request: web.Request) -> web.Response:
    d = daemon(request)
    # status() may run the engine's --version once; keep it off the event loop.
    statuses = await asyncio.gather(*(asyncio.to_thread(b.status) for b in d.backends.values()))
    engines: dict[str, Any] = {name: status.text for name, status in zip(d.backends, statuses, strict=True)}
    upstreams = d.sources.status()
    for upstream in upstreams.values():
        upstream["models"] = [m for m in upstream["models"] if scopes.may_use(m)]
    if request.query.get("upstreams") in ("1", "true"):
        return web.json_response({"engines": engines, "upstreams": upstreams})
    for name, upstream in upstreams.items():
        state = "Running" if upstream["healthy"] else f"Error: {upstream['error']}"
        engines[name] = f"{state} (upstream {upstream['kind']} at {upstream['base_url']}, " \
                        f"{len(upstream['models'])} models)"
    return web.json_response(engines)


async def engines_ps(request: web.Request) -> web.Response:
    runners = scopes.visible(daemon(request).scheduler.ps(), lambda r: r.model)
    return web.json_response([r.model_dump(mode="json") for r in runners])


async def engines_df(request: web.Request) -> web.Response:
    d = daemon(request)
    usages = await asyncio.gather(*(asyncio.to_thread(b.disk_usage) for b in d.backends.values()))
    backends = dict(zip(d.backends, usages, strict=True))
    models = await asyncio.to_thread(d.store.disk_usage)  # a directory walk: the disk may be slow
    return web.json_response({"models_disk_usage": models, "backends_disk_usage": backends,
                              "total": models + sum(backends.values())})


# How long an unload lets the requests in flight on its runners end before it cuts them.
UNLOAD_TIMEOUT_SECONDS = 60.0


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    all: bool = False
    backend: str | None = None
    models: list[str] | None = None
    # Seconds the requests in flight may take to end; 0 stops the runners at once, cutting them.
    timeout: float = Field(default=UNLOAD_TIMEOUT_SECONDS, ge=0, le=86400)


async def engines_unload(request: web.Request) -> web.Response:
    d = daemon(request)
    spec = parse_body(UnloadRequest, await read_json_body(request), "unload request")
    if not spec.all and spec.backend is None and spec.models is None:
        raise ApiError(400, "say what to unload: 'all': true, a 'backend' or a list of 'models'")
    if spec.backend is not None:
        d.backend(spec.backend)
    models = None if spec.models is None else [find_model(d, m).name for m in spec.models]
    if models is None and not scopes.sees_every_model():
        # `all` or a backend, for a token limited to some models: their runners, never another's.
        models = sorted({r.model for r in scopes.visible(d.scheduler.ps(), lambda r: r.model)})
    outcome = await d.scheduler.unload_draining(backend=spec.backend, models=models, timeout=spec.timeout)
    return web.json_response({"unloaded": len(outcome.runners), "drained": outcome.drained, "cut": outcome.cut,
                              "timeout": spec.timeout, "runners": [r.model_dump(mode="json") for r in outcome.runners]})


def add_routes(app: web.Application) -> None:
    for prefix in ("/engines", "/engines/{backend}", ""):
        for path, kind in INFERENCE_ROUTES.items():
            app.router.add_post(prefix + path, partial(inference, kind))
        app.router.add_get(prefix + "/v1/models", list_models)
        app.router.add_get(prefix + "/v1/models/{name:.+}", get_model)
    app.router.add_get("/engines/status", engines_status)
    app.router.add_get("/engines/ps", engines_ps)
    app.router.add_get("/engines/df", engines_df)
    app.router.add_post("/engines/unload", engines_unload)
