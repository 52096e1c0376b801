"""Ollama's model routes: list (/api/tags), running (/api/ps), show, version, and the store
operations delete, copy and pull. Listings hold the upstreams' models too (upstream.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from backends.base import BackendConfiguration, Capability, Mode
from backends.formats.gguf import GGUFParseError, cached_header
from backends.formats.gguf_summary import summarize
from runnerd import __version__
from runnerd.api import scopes
from runnerd.api.context import Daemon, daemon, over_unix_socket
from runnerd.api.engines import choose_backend, configuration_for, other_models
from runnerd.api.errors import ApiError
from runnerd.api.ollama import translate as tr
from runnerd.api.ollama import upstream
from runnerd.api.ollama.common import ModelRequest, lookup_model, ndjson_line, read_body, start_ndjson
from runnerd.api.ollama.upstream import upstream_first
from runnerd.api.pulling import RequestPull
from runnerd.configs import effective_configuration
from runnerd.scheduler import RunnerKey
from runnerd.sources import from_upstream
from runnerd.store import ModelEntry, PullProgress, StoreError


class PullRequest(ModelRequest):
    stream: bool = True
    insecure: bool = False
    # runnerd extensions: where to fetch from and what the file must hash to. Without `source`, a
    # `model` that is an http(s) URL is the source and the name is the file's stem.
    source: str | None = Field(default=None, max_length=4096)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source: str = Field(min_length=1, max_length=300)
    destination: str = Field(min_length=1, max_length=300)
    force: bool = False  # runnerd extension: replace a model the destination already names (409 otherwise)


# ---------------------------------------------------------------- model listing and details


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _digest(model: ModelEntry) -> str:
    # Models registered in place (not copied into the store) have no digest: shown empty.
    return (model.digest or "").removeprefix("sha256:")


def _header_facts(model: ModelEntry) -> tuple[Any, Any]:
    """(summary, header) of a GGUF model, or (None, None) when the file cannot be read now."""
    try:
        header = cached_header(model.path)
    except (GGUFParseError, OSError):
        return None, None
    return summarize(header), header


def _details(model: ModelEntry, summary: Any) -> dict[str, Any]:
    family = (summary.architecture if summary is not None else None) or model.architecture or ""
    return {
        "parent_model": "",
        "format": str(model.format),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": tr.parameter_size(summary.parameter_count) if summary is not None else "",
        "quantization_level": (summary.quantization or "") if summary is not None else "",
    }


def _listed(model: ModelEntry, summary: Any) -> dict[str, Any]:
    return {"name": model.name, "model": model.name, "modified_at": _iso(model.added_at), "size": model.size,
            "digest": _digest(model), "details": _details(model, summary)}


async def tags(request: web.Request) -> web.Response:
    if not from_upstream(request):
        await daemon(request).sources.discovered()
    models = scopes.visible(daemon(request).store.list(), lambda m: m.name)
    facts = await asyncio.gather(*(asyncio.to_thread(_header_facts, m) for m in models))
    listed = [_listed(m, f[0]) for m, f in zip(models, facts, strict=True)]
    # The upstreams' models and the aliases: names only, their files are elsewhere.
    listed += [{"name": name, "model": name, "modified_at": None, "size": 0, "digest": "",
                "details": {"parent_model": "", "format": "", "family": "", "families": None, "parameter_size": "",
                            "quantization_level": ""}}
               for name in ([] if from_upstream(request) else other_models(daemon(request)))]
    return web.json_response({"models": listed})


async def ps(request: web.Request) -> web.Response:
    d = daemon(request)
    out = []
    for info in scopes.visible(d.scheduler.ps(), lambda r: r.model):
        try:
            model = d.store.get(info.model)
        except StoreError:
            continue  # removed while loaded; /engines/ps still shows the runner
        runner = d.scheduler.runner(RunnerKey(info.backend, info.model, info.mode))
        ctx = (runner.config.context_size if runner is not None else None) or d.settings.default_context_size
        summary, _ = await asyncio.to_thread(_header_facts, model)
        ram = info.measured_ram_bytes or info.memory.ram_bytes
        vram = info.measured_vram_bytes or info.memory.vram_bytes
        # Ollama's "forever" is a far-future time; an idle runner without a deadline is shown likewise.
        expires = info.expires_at if info.expires_at is not None else (
            time.time() + 10 * 365 * 86400 if info.keep_alive is None else time.time() + info.keep_alive)
        out.append({**_listed(model, summary), "size": ram + vram, "size_vram": vram, "expires_at": _iso(expires),
                    "context_length": ctx})
    out += await upstream.running(request, {m["name"] for m in out})
    return web.json_response({"models": out})


def _model_info(header: Any, summary: Any) -> dict[str, Any]:
    if header is None or summary is None:
        return {}
    arch = summary.architecture or "unknown"
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": summary.parameter_count,
                            "general.file_type": summary.quantization}
    for key in ("context_length", "embedding_length", "block_count", "attention.head_count",
                "attention.head_count_kv", "vocab_size", "attention.sliding_window"):
        value = header.arch_get(key)
        if isinstance(value, int | float | str | bool):
            info[f"{arch}.{key}"] = value
    if summary.vocab_size is not None:
        info["tokenizer.ggml.vocab_size"] = summary.vocab_size
    return info


def _template(d: Daemon, header: Any, model: ModelEntry) -> str:
    """Blocking (the engine may read the file): the model's own template, else the engine's default."""
    if header is None:
        return ""
    own = header.get("tokenizer.chat_template")
    if isinstance(own, str):
        return own
    try:
        backend = choose_backend(d, None, model)
    except ApiError:
        return ""
    return backend.default_chat_template(model.ref()) or ""


# Chat templates that can produce reasoning mention one of these: the <think> tags (Qwen3, DeepSeek-R1),
# the switch that turns thinking on or off (enable_thinking, which `think` sets), or an effort level
# (reasoning_effort: gpt-oss). A heuristic, as Ollama's own (it looks for thinking variables in its
# Go templates): a template that thinks in some other way is not detected.
_THINKING_MARKERS = ("<think>", "enable_thinking", "reasoning_effort")


def _capabilities(d: Daemon, model: ModelEntry, template: str) -> list[str]:
    try:
        backend = choose_backend(d, None, model)
    except ApiError:
        return []
    caps = []
    chat = Capability.CHAT in backend.capabilities
    if chat or Capability.COMPLETIONS in backend.capabilities:
        caps.append("completion")
    if Capability.EMBEDDINGS in backend.capabilities:
        caps.append("embedding")
    if Capability.TOOLS in backend.capabilities and "tool" in template:
        caps.append("tools")
    if chat and model.mmproj is not None:
        # The multimodal projector is what lets the engine read images.
        caps.append("vision")
    if chat and any(marker in template for marker in _THINKING_MARKERS):
        caps.append("thinking")
    return caps


def _shown_configuration(d: Daemon, model: ModelEntry) -> BackendConfiguration:
    """What a generic request would run the model with: the engine it would go to decides whether a stored
    configuration applies."""
    try:
        backend = choose_backend(d, None, model)
    except ApiError:
        return effective_configuration(model.config, None)
    return configuration_for(d, backend, model, Mode.COMPLETION)


async def show(request: web.Request) -> web.Response:
    req = await read_body(request, ModelRequest)
    d = daemon(request)
    remote = await upstream_first(request, req.model)
    if remote is not None:
        return await upstream.show(remote)
    model = lookup_model(d, req.model)
    summary, header = await asyncio.to_thread(_header_facts, model)
    config = _shown_configuration(d, model)
    params = {"num_ctx": config.context_size or d.settings.default_context_size}
    parameters = "\n".join(f"{k:<15} {v}" for k, v in params.items())
    template = await asyncio.to_thread(_template, d, header, model)
    modelfile = f"# shown by runnerd {__version__}\nFROM {model.name}\n" + "".join(
        f"PARAMETER {k} {v}\n" for k, v in params.items())
    return web.json_response({
        "modelfile": modelfile, "parameters": parameters, "template": template,
        "details": _details(model, summary), "model_info": _model_info(header, summary),
        "capabilities": _capabilities(d, model, template), "modified_at": _iso(model.added_at),
    })


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


# ---------------------------------------------------------------- store operations


async def delete(request: web.Request) -> web.Response:
    req = await read_body(request, ModelRequest)
    d = daemon(request)
    model = lookup_model(d, req.model)
    if any(r.model == model.name and r.active_requests > 0 for r in d.scheduler.ps()):
        raise ApiError(409, f"model '{req.model}' is serving requests; delete it once they are done")
    # Idle engines go first: a removed model must not keep one running.
    await d.scheduler.unload(models=[model.name], reason="unload")
    try:
        await asyncio.to_thread(d.store.remove, model.name)
    except StoreError as exc:
        raise ApiError(exc.status, str(exc)) from exc
    return web.Response(status=200)


async def copy(request: web.Request) -> web.Response:
    req = await read_body(request, CopyRequest)
    d = daemon(request)
    lookup_model(d, req.source)
    scopes.check_new_name(req.destination, "destination")
    try:
        await asyncio.to_thread(d.store.tag, req.source, req.destination, req.force)
    except StoreError as exc:
        raise ApiError(exc.status, str(exc)) from exc
    return web.Response(status=200)


_PHASES = {"verify": "verifying sha256 digest", "commit": "writing manifest"}


def _pull_source(request: web.Request, req: PullRequest) -> tuple[str, str | None]:
    """(source, name) of a pull. Ollama clients send only `model`: a URL or hf:// reference there is
    the source; runnerd's own `source` field names one explicitly and `model` is then the name."""
    if req.source is not None:
        source, name = req.source, req.model
    elif req.model.startswith(("http://", "https://", "hf://")):
        source, name = req.model, None
    else:
        raise ApiError(400, f"runnerd cannot pull {req.model!r} from a registry: pass an http(s):// URL or "
                            "hf://org/repo[/file] as the model, or a 'source' to fetch it from")
    if source.startswith("/") and not over_unix_socket(request):
        raise ApiError(403, "pulling from a local path is only allowed over the unix socket")
    return source, name


def _progress_line(p: PullProgress) -> dict[str, Any]:
    if p.phase == "download":
        line: dict[str, Any] = {"status": f"pulling {p.file}" if p.file else "pulling"}
        if p.total is not None:
            line["total"] = p.total
        if p.completed is not None:
            line["completed"] = p.completed
        return line
    return {"status": _PHASES.get(p.phase, p.phase)}


async def pull(request: web.Request) -> web.StreamResponse:
    req = await read_body(request, PullRequest)
    d = daemon(request)
    source, name = _pull_source(request, req)
    public_only = not over_unix_socket(request)  # a remote caller must not reach the host's own network
    async with RequestPull(lambda progress: d.store.pull(source, name, req.sha256, progress,
                                                         public_only=public_only),
                           name=f"pull {source[:80]}") as pulling:
        if not req.stream:
            await _pulled(pulling.task)
            return web.json_response({"status": "success"})
        return await _stream_pull(request, pulling)


async def _pulled(task: asyncio.Task[ModelEntry]) -> ModelEntry:
    try:
        return await task
    except StoreError as exc:
        raise ApiError(exc.status, str(exc)) from exc


async def _stream_pull(request: web.Request, pulling: RequestPull) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    while (report := await pulling.next_report()) is not None:
        if response is None:
            response = await _started_pull(request)
        if report.phase != "success":  # the final line says it, once the model is registered
            await response.write(ndjson_line(_progress_line(report)))
    if response is None:
        # Nothing reported before the end: a refused source still gets a real status code.
        await _pulled(pulling.task)
        response = await _started_pull(request)
    try:
        await pulling.task
    except StoreError as exc:
        await response.write(ndjson_line({"error": str(exc)}))
    else:
        await response.write(ndjson_line({"status": "success"}))
    await response.write_eof()
    return response


async def _started_pull(request: web.Request) -> web.StreamResponse:
    response = await start_ndjson(request)
    await response.write(ndjson_line({"status": "pulling manifest"}))
    return response

