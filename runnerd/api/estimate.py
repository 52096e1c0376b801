"""GET /models/{name}/estimate: what a model would cost, from its header, with the engine and settings
runnerd would run it with (the model's stored configuration: its backend, its pinned version, its
flags), optionally changed by query parameters."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from backends.base import Backend, BackendConfiguration, MemoryEstimate, Mode, ModelFormat
from backends.flags import FlagError
from backends.formats.gguf import GGUFParseError, cached_header
from runnerd.api.context import Daemon, daemon
from runnerd.api.engines import choose_backend, configuration_for, find_model
from runnerd.api.errors import ApiError
from runnerd.estimate_params import ESTIMATE_PARAMS
from runnerd.store import ModelEntry

_KNOWN = frozenset({"ctx", "mode", *ESTIMATE_PARAMS})


def _mode(query: Any) -> Mode:
    raw = query.get("mode", Mode.COMPLETION.value)
    try:
        return Mode(raw)
    except ValueError:
        raise ApiError(400, f"unknown mode {raw!r}; use one of: {', '.join(m.value for m in Mode)}",
                       param="mode") from None


def _ctx(query: Any) -> int | None:
    raw = query.get("ctx")
    if raw is None:
        return None
    if not raw.isdigit() or not 0 < int(raw) <= 1 << 24:
        raise ApiError(400, f"ctx must be a whole number of tokens from 1 to {1 << 24}, got {raw!r}", param="ctx")
    return int(raw)


def _flags(backend: Backend, query: Any) -> list[str]:
    given = {param: query[param] for param in ESTIMATE_PARAMS if param in query}
    try:
        return backend.estimate_flags(given)
    except FlagError as exc:
        raise ApiError(400, f"{exc.element}: {exc.reason}", param=exc.element) from exc


def _check_known(query: Any) -> None:
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}",
                       param=unknown[0])


def requested_configuration(d: Daemon, backend: Backend, model: ModelEntry, query: Any) -> \
        tuple[Mode, BackendConfiguration]:
    _check_known(query)
    mode = _mode(query)
    base = configuration_for(d, backend, model, mode)
    ctx = _ctx(query)
    extra = _flags(backend, query)
    config = base.model_copy(update={"context_size": ctx or base.context_size,
                                     "runtime_flags": [*base.runtime_flags, *extra]})
    return mode, config


def estimate_json(backend: Backend, model: ModelEntry, mode: Mode, config: BackendConfiguration,
                  result: MemoryEstimate) -> dict[str, Any]:
    return {"model": model.name, "mode": mode.value, "backend": backend.name,
            "backend_version": config.engine_table(backend.options_table).get("backend_version"),
            "context_size": config.context_size,
            "runtime_flags": config.runtime_flags, **result.model_dump(mode="json")}


async def model_estimate(request: web.Request) -> web.Response:
    d = daemon(request)
    model = find_model(d, request.match_info["name"])
    _check_known(request.query)
    backend = choose_backend(d, None, model, _mode(request.query))
    mode, config = requested_configuration(d, backend, model, request.query)
    result = await asyncio.to_thread(backend.required_memory, model.ref(), mode, config)
    return web.json_response(estimate_json(backend, model, mode, config, result))


def chat_template_source(backend: Backend, model: ModelEntry) -> str | None:
    """Blocking: where a chat request's template comes from: "model" (the GGUF header's own
    tokenizer.chat_template), "engine" (none in the file: the engine's turn format for the architecture),
    or None (none in the file nor from the engine). Without one of its own the model is most likely a
    base model, which no turn format makes stop: `runnerd run` answers it as plain completion."""
    if isinstance(cached_header(model.path).get("tokenizer.chat_template"), str):
        return "model"
    return "engine" if backend.default_chat_template(model.ref()) is not None else None


async def describe(d: Daemon, model: ModelEntry) -> dict[str, Any]:
    """What GET /models/{name} adds to the registry entry: the header summary, where its chat template
    comes from (chat_template_source) and the estimate for the settings runnerd would use."""
    if model.format is not ModelFormat.GGUF:
        return {}
    backend = choose_backend(d, None, model, Mode.COMPLETION)
    config = configuration_for(d, backend, model, Mode.COMPLETION)
    try:
        summary = await asyncio.to_thread(backend.describe, model.ref())
        template = await asyncio.to_thread(chat_template_source, backend, model)
    except (GGUFParseError, OSError) as exc:
        return {"summary": None, "estimate": MemoryEstimate.unknown(str(exc)).model_dump(mode="json")}
    result = await asyncio.to_thread(backend.required_memory, model.ref(), Mode.COMPLETION, config)
    return {"summary": summary.model_dump(mode="json"), "chat_template": template,
            "estimate": estimate_json(backend, model, Mode.COMPLETION, config, result)}
