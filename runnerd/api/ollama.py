"""Ollama's API (/api/...) over the same scheduler and engines as the OpenAI routes.

Each inference request is translated (runnerd.ollama_translate) into an OpenAI request to the
runner's engine (llama-server or vLLM, with that engine's option names) and its answer back into
Ollama's objects, streamed as NDJSON by default.
Errors on these routes are `{"error": "..."}` (error_middleware renders that shape under /api/).

`options.num_ctx` is a load-time setting: it is stored as the model's configured context size for
that mode (what `POST /engines/_configure` stores), so it outlives the request, as a Modelfile
parameter would; an idle runner with another context is restarted, a busy one keeps serving and the
new size applies at its next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.base import Backend, BackendConfiguration, Capability, Mode
from backends.gguf import GGUFParseError
from backends.llamacpp import cached_header
from backends.llamacpp.summary import summarize
from backends.llamacpp.templates import fallback_chat_template
from runnerd import __version__
from runnerd import ollama_translate as tr
from runnerd.api.context import Daemon, daemon, over_unix_socket
from runnerd.api.engines import check_capabilities, check_request, choose_backend, lease_runner, read_json_body
from runnerd.api.errors import ApiError
from runnerd.configs import StoredConfiguration, effective_configuration
from runnerd.durations import parse_keep_alive
from runnerd.metrics import REQUEST_MODEL
from runnerd.proxy import answer_watch, engine_failure, send_to_runner
from runnerd.pull import PullProgress
from runnerd.scheduler import UNSET, Lease, RunnerKey, Unset
from runnerd.store import ModelEntry, StoreError

NDJSON = "application/x-ndjson"
_T = TypeVar("_T", bound=BaseModel)
_R = TypeVar("_R")
KeepAliveValue = str | int | float | None


# ---------------------------------------------------------------- request bodies


class _Request(BaseModel):
    # Clients send fields this daemon has no use for (e.g. `truncate`, `logprobs`): ignore, as Ollama does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(default="", max_length=300)
    name: str | None = Field(default=None, max_length=300)  # the older spelling of `model`

    @model_validator(mode="after")
    def _model_given(self) -> _Request:
        if not self.model and self.name:
            self.model = self.name
        if not self.model:
            raise ValueError("model is required")
        return self


class _Inference(_Request):
    options: tr.OllamaOptions | None = None
    keep_alive: KeepAliveValue = None
    stream: bool = True
    format: tr.Format = None
    think: bool | str | None = None


class ChatRequest(_Inference):
    messages: list[tr.OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Inference):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]] = ""
    options: tr.OllamaOptions | None = None
    keep_alive: KeepAliveValue = None
    dimensions: int | None = Field(default=None, gt=0)


class EmbeddingsRequest(_Request):
    prompt: str = ""
    options: tr.OllamaOptions | None = None
    keep_alive: KeepAliveValue = None


class PullRequest(_Request):
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


async def _body(request: web.Request, cls: type[_T]) -> _T:
    try:
        return cls.model_validate(await read_json_body(request))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}" if where else err["msg"]) from exc


def _keep_alive(value: KeepAliveValue) -> float | Unset | None:
    if value is None:
        return UNSET
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


def _translated(fn: Callable[..., _R], *args: Any) -> _R:
    try:
        return fn(*args)
    except tr.TranslationError as exc:
        raise ApiError(400, str(exc)) from exc


# ---------------------------------------------------------------- leasing a runner


def _model(d: Daemon, name: str) -> ModelEntry:
    try:
        return d.store.get(name)
    except StoreError as exc:
        # Ollama's wording, which some clients match to offer a pull.
        raise ApiError(exc.status, f"model '{name}' not found" if exc.status == 404 else str(exc)) from exc


def _configuration(d: Daemon, backend: Backend, model: ModelEntry, mode: Mode, num_ctx: int | None) -> \
        BackendConfiguration:
    """The effective configuration, after storing `num_ctx` as the model's context size when it changes."""
    stored = d.configs.get(model.name, mode)
    config = effective_configuration(model.config, stored)
    if num_ctx is None or config.context_size == num_ctx:
        return config
    base = stored.config if stored is not None and stored.backend == backend.name else BackendConfiguration()
    item = StoredConfiguration(model=model.name, mode=mode, backend=backend.name,
                               config=base.model_copy(update={"context_size": num_ctx}), updated_at=time.time())
    d.configs.put(item)
    return effective_configuration(model.config, item)


async def _restart_if_idle(d: Daemon, key: RunnerKey, config: BackendConfiguration) -> None:
    runner = d.scheduler.runner(key)
    if runner is not None and runner.config != config and runner.active == 0:
        await runner.stop("reconfigure")


class Job:
    """One leased inference: the model, the backend serving it (whose option names the body uses), its
    runner, and the request's clock."""

    def __init__(self, model: ModelEntry, backend: str, lease: Lease, clock: tr.Clock) -> None:
        self.model = model
        self.backend = backend
        self.lease = lease
        self.clock = clock


async def _lease(request: web.Request, name: str, mode: Mode, needed: list[Capability],
                 options: tr.OllamaOptions | None, keep_alive: KeepAliveValue) -> Job:
    clock = tr.Clock()
    d = daemon(request)
    model = _model(d, name)
    backend = choose_backend(d, None, model)
    check_capabilities(backend, needed, model)
    ttl = _keep_alive(keep_alive)
    config = _configuration(d, backend, model, mode, options.num_ctx if options else None)
    # Ollama has no tool_choice: tools always leave the choice to the model ("auto").
    check_request(backend, model, config, {"tools": Capability.TOOLS in needed})
    if options is not None and options.num_ctx is not None:
        await _restart_if_idle(d, RunnerKey(backend.name, model.name, mode), config)
    lease = await lease_runner(d, backend, model, mode, config, ttl)
    clock.mark_loaded()
    request[REQUEST_MODEL] = model.name
    return Job(model, backend.name, lease, clock)


# ---------------------------------------------------------------- talking to the runner


async def _call(job: Job, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST an OpenAI body to the runner and return its JSON answer; engine errors keep their status."""
    runner = job.lease.runner
    try:
        async with answer_watch(runner):
            upstream, one_off = await send_to_runner(runner, path, json.dumps(body).encode(),
                                                     {"Content-Type": "application/json"}, stream=False)
            try:
                raw = await upstream.read()
                status = upstream.status
            finally:
                upstream.release()
                if one_off is not None:
                    await one_off.close()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise await engine_failure(runner, exc) from exc
    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = {"error": raw.decode(errors="replace")[:500]}
    if status >= 400 or not isinstance(answer, dict):
        raise ApiError(status if status >= 400 else 502, tr.error_text(answer))
    return answer


async def _chunks(job: Job, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The runner's streamed answer, one parsed SSE chunk at a time. Errors before the first chunk raise
    ApiError; an error event mid-stream is yielded as {"error": ...} for the caller to pass on."""
    runner = job.lease.runner
    try:
        upstream, one_off = await send_to_runner(runner, path, json.dumps(body).encode(),
                                                 {"Content-Type": "application/json", "Accept": "text/event-stream"},
                                                 stream=True)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise await engine_failure(runner, exc) from exc
    try:
        if upstream.status >= 400:
            raw = await upstream.read()
            try:
                message = tr.error_text(json.loads(raw))
            except (UnicodeDecodeError, json.JSONDecodeError):
                message = raw.decode(errors="replace")[:500]
            raise ApiError(upstream.status, message)
        try:
            async for line in upstream.content:
                event = tr.parse_sse_line(line)
                if event == "done":
                    return
                if event is not None:
                    yield event
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = await engine_failure(runner, exc)
            yield {"error": failure.message}
    finally:
        upstream.release()
        if one_off is not None:
            await one_off.close()


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def _ndjson(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
    await response.prepare(request)
    return response


# ---------------------------------------------------------------- chat and generate


def _openai_body(req: _Inference, job: Job) -> dict[str, Any]:
    body: dict[str, Any] = {"model": job.model.name, **tr.sampling_fields(req.options, job.backend)}
    fmt = _translated(tr.response_format, req.format)
    if fmt is not None:
        body["response_format"] = fmt
    body.update(_translated(tr.thinking_fields, req.think))
    return body


async def _load_only(request: web.Request, req: _Inference, *, chat: bool) -> web.Response:
    """An empty chat/generate: load the model, or unload it when keep_alive is 0 (Ollama's idiom)."""
    d = daemon(request)
    model = _model(d, req.model)
    ttl = _keep_alive(req.keep_alive)
    if ttl == 0:
        await d.scheduler.unload(models=[model.name], reason="unload")
        return web.json_response(tr.load_answer(model.name, chat=chat, unloaded=True))
    job = await _lease(request, req.model, Mode.COMPLETION, [Capability.CHAT], req.options, req.keep_alive)
    job.lease.release()
    return web.json_response(tr.load_answer(model.name, chat=chat, unloaded=False))


async def _answer(request: web.Request, job: Job, path: str, body: dict[str, Any], stream: bool,
                  part: Any, final: Any) -> web.StreamResponse:
    """Run one chat/generate on the leased runner and answer as one object or as NDJSON parts."""
    name = job.model.name
    if not stream:
        turn = tr.turn_from_completion(await _call(job, path, body))
        return web.json_response(final(name, turn, job.clock, streamed=False))
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}  # usage carries the timings
    async with contextlib.aclosing(_chunks(job, path, body)) as chunks:
        first = await anext(chunks, None)  # an engine refusal still gets a real status line
        response = await _ndjson(request)
        turn = tr.Turn()
        async for chunk in _prepend([first] if first is not None else [], chunks):
            if "error" in chunk and "choices" not in chunk:
                await response.write(_line({"error": tr.error_text(chunk)}))
                await response.write_eof()
                return response
            delta = tr.absorb_chunk(turn, chunk)
            if delta.content or delta.thinking or turn.tool_calls:
                job.clock.mark_first_token()  # the eval durations of an engine without timings start here
            if delta.content or delta.thinking:
                await response.write(_line(part(name, delta)))
    if part is tr.chat_part and (calls := tr.chat_tool_part(name, turn)) is not None:
        await response.write(_line(calls))
    await response.write(_line(final(name, turn, job.clock, streamed=True)))
    await response.write_eof()
    return response


async def _prepend(first: list[dict[str, Any]], rest: AsyncIterator[dict[str, Any]]) -> \
        AsyncIterator[dict[str, Any]]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def chat(request: web.Request) -> web.StreamResponse:
    req = await _body(request, ChatRequest)
    if not req.messages:
        return await _load_only(request, req, chat=True)
    needed = [Capability.CHAT] + ([Capability.STREAMING] if req.stream else []) + \
        ([Capability.TOOLS] if req.tools else [])
    messages = _translated(tr.openai_messages, req.messages)
    job = await _lease(request, req.model, Mode.COMPLETION, needed, req.options, req.keep_alive)
    try:
        body = {**_openai_body(req, job), "messages": messages}
        if req.tools:
            body["tools"] = req.tools
        return await _answer(request, job, "/v1/chat/completions", body, req.stream, tr.chat_part, tr.chat_final)
    finally:
        job.lease.release()


async def generate(request: web.Request) -> web.StreamResponse:
    req = await _body(request, GenerateRequest)
    if not req.prompt and not req.images:
        return await _load_only(request, req, chat=False)
    if req.suffix:
        raise ApiError(400, f"{req.model} does not support insert (suffix)")
    if req.raw:
        if req.images:
            # A raw prompt goes to the text completion route, which takes no images.
            raise ApiError(400, "images cannot be sent with raw: true; send them without raw (the model's "
                                "template places them) or through /api/chat")
        kind, path = Capability.COMPLETIONS, "/v1/completions"
        extra: dict[str, Any] = {"prompt": req.prompt}
    else:
        # Ollama applies the model's template to a generate prompt: the engine's chat route does that.
        kind, path = Capability.CHAT, "/v1/chat/completions"
        messages = [tr.OllamaMessage(role="system", content=req.system)] if req.system else []
        messages.append(tr.OllamaMessage(role="user", content=req.prompt, images=req.images))
        extra = {"messages": _translated(tr.openai_messages, messages)}
    needed = [kind] + ([Capability.STREAMING] if req.stream else [])
    job = await _lease(request, req.model, Mode.COMPLETION, needed, req.options, req.keep_alive)
    try:
        body = {**_openai_body(req, job), **extra}
        return await _answer(request, job, path, body, req.stream, tr.generate_part, tr.generate_final)
    finally:
        job.lease.release()


# ---------------------------------------------------------------- embeddings


async def _embed(request: web.Request, req: _Request, inputs: Any, options: tr.OllamaOptions | None,
                 keep_alive: KeepAliveValue, dimensions: int | None = None) -> tuple[Job, list[list[float]], int]:
    job = await _lease(request, req.model, Mode.EMBEDDING, [Capability.EMBEDDINGS], options, keep_alive)
    try:
        answer = await _call(job, "/v1/embeddings", {"model": job.model.name, "input": inputs})
    finally:
        job.lease.release()
    usage = answer.get("usage") or {}
    return job, tr.embeddings_from(answer, dimensions), int(usage.get("prompt_tokens") or 0)


async def _load_embedding(request: web.Request, name: str, options: tr.OllamaOptions | None,
                          keep_alive: KeepAliveValue) -> Job:
    """Nothing to embed: Ollama's way to load the model (an unknown model is still a 404)."""
    job = await _lease(request, name, Mode.EMBEDDING, [Capability.EMBEDDINGS], options, keep_alive)
    job.lease.release()
    return job


async def embed(request: web.Request) -> web.Response:
    req = await _body(request, EmbedRequest)
    if req.input == "" or req.input == []:
        job = await _load_embedding(request, req.model, req.options, req.keep_alive)
        return web.json_response({"model": job.model.name, "embeddings": []})
    job, vectors, prompt_tokens = await _embed(request, req, req.input, req.options, req.keep_alive,
                                               req.dimensions)
    return web.json_response({"model": job.model.name, "embeddings": vectors, **job.clock.durations(),
                              "prompt_eval_count": prompt_tokens})


async def embeddings(request: web.Request) -> web.Response:
    """The older single-prompt route: one vector, as the engine computed it."""
    req = await _body(request, EmbeddingsRequest)
    if not req.prompt:
        # As Ollama does: load the model, answer an empty vector.
        await _load_embedding(request, req.model, req.options, req.keep_alive)
        return web.json_response({"embedding": []})
    _, vectors, _ = await _embed(request, req, req.prompt, req.options, req.keep_alive)
    return web.json_response({"embedding": vectors[0] if vectors else []})


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
    models = daemon(request).store.list()
    facts = await asyncio.gather(*(asyncio.to_thread(_header_facts, m) for m in models))
    return web.json_response({"models": [_listed(m, f[0]) for m, f in zip(models, facts, strict=True)]})


async def ps(request: web.Request) -> web.Response:
    d = daemon(request)
    out = []
    for info in d.scheduler.ps():
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


def _template(header: Any, model: ModelEntry) -> str:
    if header is None:
        return ""
    own = header.get("tokenizer.chat_template")
    if isinstance(own, str):
        return own
    return fallback_chat_template(header.architecture, False) or ""


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
        # The multimodal projector is what lets llama-server read images.
        caps.append("vision")
    if chat and any(marker in template for marker in _THINKING_MARKERS):
        caps.append("thinking")
    return caps


async def show(request: web.Request) -> web.Response:
    req = await _body(request, _Request)
    d = daemon(request)
    model = _model(d, req.model)
    summary, header = await asyncio.to_thread(_header_facts, model)
    config = effective_configuration(model.config, d.configs.get(model.name, Mode.COMPLETION))
    params = {"num_ctx": config.context_size or d.settings.default_context_size}
    parameters = "\n".join(f"{k:<15} {v}" for k, v in params.items())
    template = _template(header, model)
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
    req = await _body(request, _Request)
    d = daemon(request)
    model = _model(d, req.model)
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
    req = await _body(request, CopyRequest)
    d = daemon(request)
    _model(d, req.source)
    try:
        await asyncio.to_thread(d.store.tag, req.source, req.destination)
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
    req = await _body(request, PullRequest)
    d = daemon(request)
    source, name = _pull_source(request, req)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[PullProgress] = asyncio.Queue()

    def progress(p: PullProgress) -> None:
        # Local imports report from a worker thread: hand every report to the loop.
        loop.call_soon_threadsafe(events.put_nowait, p)

    task = asyncio.create_task(d.store.pull(source, name, req.sha256, progress), name=f"pull {source[:80]}")
    try:
        if not req.stream:
            await _pulled(task)
            return web.json_response({"status": "success"})
        return await _stream_pull(request, task, events)
    finally:
        task.cancel()  # the client went away before the end: stop fetching for it


async def _pulled(task: asyncio.Task[ModelEntry]) -> ModelEntry:
    try:
        return await task
    except StoreError as exc:
        raise ApiError(exc.status, str(exc)) from exc


async def _stream_pull(request: web.Request, task: asyncio.Task[ModelEntry],
                       events: asyncio.Queue[PullProgress]) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    while True:
        getter = asyncio.ensure_future(events.get())
        waiting: set[asyncio.Future[Any]] = {task, getter}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        if response is None:
            response = await _started_pull(request)
        report = getter.result()
        if report.phase != "success":  # the final line says it, once the model is registered
            await response.write(_line(_progress_line(report)))
    if response is None:
        # Nothing reported before the end: a refused source still gets a real status code.
        await _pulled(task)
        response = await _started_pull(request)
    try:
        await task
    except StoreError as exc:
        await response.write(_line({"error": str(exc)}))
    else:
        await response.write(_line({"status": "success"}))
    await response.write_eof()
    return response


async def _started_pull(request: web.Request) -> web.StreamResponse:
    response = await _ndjson(request)
    await response.write(_line({"status": "pulling manifest"}))
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", delete)
    app.router.add_post("/api/copy", copy)
