"""POST/GET/DELETE /engines[/{backend}]/_configure: per-model engine configuration.

Everything is validated before anything is stored, the whole configuration too: one the engine
could not run, or that could never fit the host, is refused (runnerd/api/fit.py). A stored change
restarts the model's idle runner and preloads it in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import KEBAB_CASE_TOO, Backend, BackendConfiguration, Mode, SpeculativeOptions
from backends.flags import FlagError, split_raw_flags
from runnerd.api import scopes
from runnerd.api.body import read_json_body
from runnerd.api.context import Daemon, daemon
from runnerd.api.engines import choose_backend, find_model
from runnerd.api.errors import ApiError, validation_error
from runnerd.api.fit import refuse_unfit
from runnerd.configs import StoredConfiguration, effective_configuration
from runnerd.durations import parse_keep_alive
from runnerd.scheduler import RunnerKey
from runnerd.store import ModelEntry, ModelNotFound

log = logging.getLogger("runnerd.configure")


class SpeculativeRequest(BaseModel):
    """What a caller may say about speculative decoding: a draft by its name in the store, never a path."""

    model_config = KEBAB_CASE_TOO | ConfigDict(extra="forbid")

    draft_model: str = Field(min_length=1, max_length=300)
    num_tokens: int | None = Field(default=None, ge=1, le=256)


class ConfigureRequest(BaseModel):
    """Engine options come as `options` (for whichever backend serves the model) or under the engine's own
    options key (Backend.options_key): extra keys here, checked against the serving backend.

    Docker Model Runner's clients spell the fields in kebab case (`context-size`, `runtime-flags`,
    `raw-runtime-flags`; `keep_alive` as here): both spellings are accepted, here and in the engines'
    tables, and what is stored uses the field names."""

    model_config = KEBAB_CASE_TOO | ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=300)
    mode: Mode = Mode.COMPLETION
    context_size: int | None = Field(default=None, gt=0, le=1 << 24)
    runtime_flags: list[str] | None = Field(default=None, max_length=1024)
    raw_runtime_flags: str | None = None
    keep_alive: str | int | float | None = None
    options: dict[str, Any] | None = None
    speculative: SpeculativeRequest | None = None


async def _flags(backend: Backend, model: ModelEntry, spec: ConfigureRequest,
                 partial: BackendConfiguration) -> list[str] | None:
    """The request's flags, checked against the option list of the version the configuration will run
    (`partial`: the request's other parts; its pin decides), as the runner's start checks them."""
    if spec.runtime_flags is not None and spec.raw_runtime_flags is not None:
        raise ApiError(400, "send either runtime_flags or raw_runtime_flags, not both", param="runtime_flags")
    param = "raw_runtime_flags" if spec.raw_runtime_flags is not None else "runtime_flags"
    try:
        flags = split_raw_flags(spec.raw_runtime_flags) if spec.raw_runtime_flags is not None else spec.runtime_flags
        if flags is None:
            return None
        runs = effective_configuration(model.config, StoredConfiguration(
            model=model.name, mode=spec.mode, backend=backend.name, config=partial, updated_at=0.0))
        # Reading a version's option list runs its build once: off the event loop.
        return await asyncio.to_thread(backend.validate_flags_for, flags, runs)
    except FlagError as exc:
        raise ApiError(400, str(exc), code="flag_refused", param=param) from exc


def _engine_options(d: Daemon, backend: Backend, spec: ConfigureRequest) -> dict[str, Any]:
    """The serving backend's options table, validated by the backend; a table meant for another engine,
    or a key that is nobody's, is refused by name."""
    tables: dict[str, Any] = dict(spec.model_extra or {})
    if spec.options is not None:
        own = tables.get(backend.options_table, {})
        tables[backend.options_table] = {**own, **spec.options} if isinstance(own, dict) else own
    others = {b.options_table: b.name for b in d.backends.values() if b is not backend}
    validated: dict[str, Any] = {}
    for key, table in tables.items():
        if key in others:
            raise ApiError(400, f"{key} options do not apply to the {backend.name} backend", param=key)
        if key != backend.options_table:
            raise ApiError(400, f"invalid configure request: {key}: Extra inputs are not permitted (it is no "
                                f"option table of the {backend.name} backend)", param=key)
        if not isinstance(table, dict):
            raise ApiError(400, f"{key} must be an object of {backend.name} options", param=key)
        try:
            validated[key] = backend.validate_options(table)
        except ValidationError as exc:
            raise validation_error(exc, "configuration", prefix=key) from exc
    return validated


def _speculative(d: Daemon, backend: Backend, spec: SpeculativeRequest) -> SpeculativeOptions:
    """The draft must be in the store and in a format this backend loads; it is kept by its canonical
    name (the path is resolved again whenever a runner starts, see ConfigStore.get)."""
    param = "speculative.draft_model"
    try:
        scopes.check_model(spec.draft_model)
        draft = d.store.get(spec.draft_model)
    except ModelNotFound:
        raise ApiError(400, f"draft model {spec.draft_model!r} is not in the store; pull or add it first",
                       code="draft_model_not_found", param=param) from None
    if draft.format not in backend.model_formats:
        formats = ", ".join(sorted(f.value for f in backend.model_formats))
        raise ApiError(400, f"draft model {draft.name} is a {draft.format} model; {backend.name} loads drafts "
                            f"in {formats} format only", code="unsupported_model_format", param=param)
    return SpeculativeOptions.model_validate(spec.model_dump(exclude_unset=True) | {"draft_model": draft.name})


async def build_configuration(d: Daemon, backend: Backend, model: ModelEntry,
                              spec: ConfigureRequest) -> BackendConfiguration:
    """Validate every part of the request into a configuration holding only what was sent."""
    fields: dict[str, Any] = _engine_options(d, backend, spec)
    if spec.context_size is not None:
        fields["context_size"] = spec.context_size
    flags = await _flags(backend, model, spec, _configuration(fields))
    if flags is not None:
        fields["runtime_flags"] = flags
    if spec.keep_alive is not None:
        try:
            parse_keep_alive(spec.keep_alive)
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_keep_alive", param="keep_alive") from exc
        fields["keep_alive"] = str(spec.keep_alive)
    if spec.speculative is not None:
        fields["speculative"] = _speculative(d, backend, spec.speculative)
    return _configuration(fields)


def _configuration(fields: dict[str, Any]) -> BackendConfiguration:
    try:
        return BackendConfiguration(**fields)
    except ValidationError as exc:
        raise validation_error(exc, "configuration") from exc


async def _preload(d: Daemon, key: RunnerKey, model: ModelEntry, config: BackendConfiguration) -> None:
    try:
        lease = await d.scheduler.acquire(key, model.ref(), config, preload=True)
    except Exception as exc:  # the next request reports it with the engine's words
        log.warning("preload of %s failed: %s", model.name, str(exc).splitlines()[0])
        return
    lease.release()


async def configure(request: web.Request) -> web.Response:
    d = daemon(request)
    explicit = request.match_info.get("backend")
    if explicit is not None:
        d.backend(explicit)
    try:
        spec = ConfigureRequest.model_validate(await read_json_body(request))
    except ValidationError as exc:
        raise validation_error(exc, "configure request") from exc
    model = find_model(d, spec.model)
    backend = choose_backend(d, explicit, model, spec.mode)
    configured = await build_configuration(d, backend, model, spec)
    item = StoredConfiguration(model=model.name, mode=spec.mode, backend=backend.name, config=configured,
                               updated_at=time.time())
    # Compared with the running configuration, which was built with the draft resolved.
    new = effective_configuration(model.config, d.configs.resolved(item))
    await refuse_unfit(d, backend, model, spec.mode, new, param=_sizing_param(spec))
    key = RunnerKey(backend.name, model.name, spec.mode)
    runner = d.scheduler.runner(key)
    restart = runner is not None and runner.config != new
    if restart and runner is not None and runner.active > 0:
        raise ApiError(409, f"{model.name} ({spec.mode}) is serving {runner.active} request(s); configure it "
                            "again once it is idle, or unload it first", code="runner_busy")
    await asyncio.to_thread(d.configs.put, item)  # it syncs the file to disk
    if restart and runner is not None:
        await runner.stop("reconfigure")
    if not d.scheduler.draining:  # a draining node loads nothing new: the configuration applies at the next load
        d.scheduler.spawn(_preload, d, key, model, new)
    return web.json_response(_shown(item, restarted=restart), status=202)


def _sizing_param(spec: ConfigureRequest) -> str:
    """The part of the request a configuration that cannot run or fit is blamed on."""
    if spec.context_size is not None:
        return "context_size"
    return "raw_runtime_flags" if spec.raw_runtime_flags is not None else "runtime_flags"


def _shown(item: StoredConfiguration, **extra: Any) -> dict[str, Any]:
    return {**item.model_dump(mode="json", exclude_unset=True), **extra}


def _mode(request: web.Request) -> Mode:
    raw = request.query.get("mode", Mode.COMPLETION.value)
    try:
        return Mode(raw)
    except ValueError:
        raise ApiError(400, f"unknown mode {raw!r}; use one of: {', '.join(m.value for m in Mode)}",
                       param="mode") from None


async def list_configurations(request: web.Request) -> web.Response:
    d = daemon(request)
    name = request.query.get("model")
    model = find_model(d, name).name if name else None
    # A token limited to some models sees their configurations only. One naming an engine that is no longer
    # defined (a manifest engine deleted with force) is kept, applies to no engine, and is shown as orphaned.
    items = [_shown(c, orphaned=c.backend not in d.backends)
             for c in scopes.visible(d.configs.list(model), lambda c: c.model)]
    return web.json_response({"configurations": items, "problems": d.configs.problems})


async def delete_configuration(request: web.Request) -> web.Response:
    d = daemon(request)
    name = request.query.get("model")
    if not name:
        raise ApiError(400, "say which model: DELETE /engines/_configure?model=NAME[&mode=MODE]", param="model")
    model = find_model(d, name)
    removed = await asyncio.to_thread(d.configs.delete, model.name, _mode(request))
    if removed is None:
        raise ApiError(404, f"no stored configuration for {model.name} in {_mode(request)} mode",
                       code="configuration_not_found")
    return web.json_response(_shown(removed))


def add_routes(app: web.Application) -> None:
    for prefix in ("/engines", "/engines/{backend}"):
        app.router.add_post(prefix + "/_configure", configure)
    app.router.add_get("/engines/_configure", list_configurations)
    app.router.add_delete("/engines/_configure", delete_configuration)
