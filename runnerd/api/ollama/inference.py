"""Ollama's inference routes: chat, generate, embed and embeddings.

Each request is translated (translate.py) into an OpenAI request to the runner's engine (with that
engine's option names) and its answer back into Ollama's objects, streamed as NDJSON by default.

`options.num_ctx` is a load-time setting: it is stored as the model's configured context size for
that mode (what `POST /engines/_configure` stores), so it outlives the request, as a Modelfile
parameter would; an idle runner with another context is restarted, a busy one keeps serving and the
new size applies at its next start. Before it is stored it is capped at the model's training context
(as Ollama caps it) and checked to fit the host (runnerd/api/fit.py): a size that could never fit is
a 400 for that request alone, and the stored configuration stays as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import Field

from backends.base import Backend, BackendConfiguration, Capability, Mode
from backends.formats import FORMAT_ERRORS
from runnerd import failover
from runnerd.api.context import Daemon, daemon
from runnerd.api.engines import check_capabilities, check_request, choose_backend, configuration_for, lease_runner
from runnerd.api.errors import ApiError
from runnerd.api.fit import refuse_unfit
from runnerd.api.ollama import translate as tr
from runnerd.api.ollama.common import ModelRequest, lookup_model, ndjson_line, read_body, start_ndjson
from runnerd.api.ollama.upstream import UpstreamJob, fallback_job, upstream_first, upstream_job
from runnerd.configs import StoredConfiguration, effective_configuration
from runnerd.durations import parse_keep_alive
from runnerd.metrics import REQUEST_MODEL
from runnerd.proxy import call_engine, engine_events
from runnerd.scheduler import UNSET, Lease, RunnerKey, Unset
from runnerd.sse import error_text
from runnerd.store import ModelEntry

log = logging.getLogger("runnerd.ollama")

_R = TypeVar("_R")
_UNREADABLE: tuple[type[Exception], ...] = (*FORMAT_ERRORS, OSError)
KeepAliveValue = str | int | float | None


# ---------------------------------------------------------------- request bodies


class _Inference(ModelRequest):
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


class EmbedRequest(ModelRequest):
    input: str | list[str] | list[int] | list[list[int]] = ""
    options: tr.OllamaOptions | None = None
    keep_alive: KeepAliveValue = None
    dimensions: int | None = Field(default=None, gt=0)


class EmbeddingsRequest(ModelRequest):
    prompt: str = ""
    options: tr.OllamaOptions | None = None
    keep_alive: KeepAliveValue = None


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


async def _trained_context(backend: Backend, model: ModelEntry) -> int | None:
    """The context the model was trained for, from its header; None when the header does not say."""
    try:
        summary = await asyncio.to_thread(backend.describe, model.ref())
    except _UNREADABLE:
        return None
    return summary.context_length if summary.context_length and summary.context_length > 0 else None


async def _configuration(d: Daemon, backend: Backend, model: ModelEntry, mode: Mode, num_ctx: int | None) -> \
        BackendConfiguration:
    """The effective configuration, after storing `num_ctx` as the model's context size when it changes
    (capped at the training context, and only when the result can fit the host)."""
    stored = d.configs.get(model.name, mode)
    config = configuration_for(d, backend, model, mode)
    if num_ctx is None or config.context_size == num_ctx:
        return config
    trained = await _trained_context(backend, model)
    if trained is not None and num_ctx > trained:
        log.info("num_ctx %d for %s is above its training context: capped at %d", num_ctx, model.name, trained)
        num_ctx = trained
        if config.context_size == num_ctx:
            return config
    base = stored.config if stored is not None and stored.backend == backend.name else BackendConfiguration()
    item = StoredConfiguration(model=model.name, mode=mode, backend=backend.name,
                               config=base.model_copy(update={"context_size": num_ctx}), updated_at=time.time())
    candidate = effective_configuration(model.config, d.configs.resolved(item))
    await refuse_unfit(d, backend, model, mode, candidate, param="options.num_ctx")
    # Stored only if nothing else stored this model's configuration while the checks ran; in a thread, since
    # the store syncs its file to disk.
    await asyncio.to_thread(d.configs.put_unless_changed, item, stored)
    return configuration_for(d, backend, model, mode)


async def _restart_if_idle(d: Daemon, key: RunnerKey, config: BackendConfiguration) -> None:
    runner = d.scheduler.runner(key)
    if runner is not None and runner.config != config and runner.active == 0:
        await runner.stop("reconfigure")


class Job:
    """One leased inference: the model, the backend serving it (whose option names the body uses), its
    runner, and the request's clock."""

    def __init__(self, model: ModelEntry, backend: Backend, lease: Lease, clock: tr.Clock) -> None:
        self.model = model
        self.backend = backend
        self.lease = lease
        self.clock = clock
        self.name = model.name
        self.dialect = backend.sampling_dialect
        # The engine's own failure before its answer started (none of it reached the client), which the
        # upstreams hosting the model may still answer; any other ApiError is not theirs to retry.
        self.failure: ApiError | None = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await call_engine(self.lease.runner, path, body)
        except ApiError as exc:
            self.failure = exc
            raise

    async def events(self, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        async with contextlib.aclosing(engine_events(self.lease.runner, path, body)) as events:
            try:
                first = await anext(events, None)
            except ApiError as exc:
                self.failure = exc
                raise
            if first is None:
                return
            yield first
            async for event in events:  # a failure from here on is an event, not an ApiError
                yield event

    def release(self) -> None:
        self.lease.release()


async def _job(request: web.Request, name: str, needed: list[Capability], options: tr.OllamaOptions | None,
               keep_alive: KeepAliveValue) -> Job | UpstreamJob:
    """Where a chat or generate goes: the upstreams hosting the model, or a leased local runner."""
    remote = await upstream_job(request, name, needed)
    if remote is not None:
        return remote
    return await _lease_or_fall_back(request, name, Mode.COMPLETION, needed, options, keep_alive)


async def _lease_or_fall_back(request: web.Request, name: str, mode: Mode, needed: list[Capability],
                              options: tr.OllamaOptions | None, keep_alive: KeepAliveValue) -> Job | UpstreamJob:
    """A leased local runner; when its engine cannot start (a 5xx before any answer), the upstreams that
    host the same model, as the OpenAI routes fail over."""
    try:
        return await _lease(request, name, mode, needed, options, keep_alive)
    except ApiError as exc:
        fallback = await _fall_back(request, name, needed, exc)
        if fallback is None:
            raise
        return fallback


async def _fall_back(request: web.Request, name: str, needed: list[Capability], exc: ApiError) -> \
        UpstreamJob | None:
    """The upstreams hosting `name` when the local engine's failure `exc` passes the request on to them
    (failover.local_moves_on: the rule every route follows); None: `exc` is the answer."""
    if not failover.local_moves_on(exc, last=False):
        return None
    fallback = await fallback_job(request, name, needed, [failover.local_failure(exc)])
    if fallback is not None:
        log.warning("the local engine for %s failed before answering, trying its upstreams: %s", name,
                    exc.message.splitlines()[0])
    return fallback


async def _served(request: web.Request, name: str, job: Job | UpstreamJob, needed: list[Capability],
                  answer: Callable[[Job | UpstreamJob], Awaitable[_R]]) -> _R:
    """`answer(job)`, the job's lease released after it. When a local engine fails before its answer
    started, `answer` runs again for the upstreams hosting `name` (as the request named it: the store's
    canonical name may differ) and builds the body for whichever job it is given (their sampling names,
    their model name); the local lease is released first."""
    try:
        try:
            return await answer(job)
        finally:
            job.release()
    except ApiError as exc:
        if not isinstance(job, Job) or exc is not job.failure:
            raise
        fallback = await _fall_back(request, name, needed, exc)
        if fallback is None:
            raise
    try:
        return await answer(fallback)
    finally:
        fallback.release()


async def _lease(request: web.Request, name: str, mode: Mode, needed: list[Capability],
                 options: tr.OllamaOptions | None, keep_alive: KeepAliveValue, preload: bool = False) -> Job:
    clock = tr.Clock()
    d = daemon(request)
    model = lookup_model(d, name)
    backend = choose_backend(d, None, model, mode)
    check_capabilities(backend, needed, model)
    ttl = _keep_alive(keep_alive)
    # The request's own fields first: a refused one must not leave a stored context size behind.
    # Ollama has no tool_choice: tools always leave the choice to the model ("auto"). The sampling options
    # go to the engine under its names: its backend bounds them as it bounds its own API's fields.
    payload = {"tools": Capability.TOOLS in needed, **tr.sampling_fields(options, backend.sampling_dialect)}
    check_request(backend, model, configuration_for(d, backend, model, mode), payload)
    config = await _configuration(d, backend, model, mode, options.num_ctx if options else None)
    if options is not None and options.num_ctx is not None:
        await _restart_if_idle(d, RunnerKey(backend.name, model.name, mode), config)
    lease = await lease_runner(d, backend, model, mode, config, ttl, preload=preload)
    clock.mark_loaded()
    request[REQUEST_MODEL] = model.name
    return Job(model, backend, lease, clock)


# ---------------------------------------------------------------- chat and generate


def _openai_body(req: _Inference, job: Job | UpstreamJob) -> dict[str, Any]:
    body: dict[str, Any] = {"model": job.name, **tr.sampling_fields(req.options, job.dialect)}
    fmt = _translated(tr.response_format, req.format)
    if fmt is not None:
        body["response_format"] = fmt
    body.update(_translated(tr.thinking_fields, req.think))
    return body


async def _load_only(request: web.Request, req: _Inference, *, chat: bool) -> web.Response:
    """An empty chat/generate: load the model, or unload it when keep_alive is 0 (Ollama's idiom). For a
    model an upstream serves, the same answer and nothing sent: the upstream manages its own models."""
    d = daemon(request)
    ttl = _keep_alive(req.keep_alive)
    if await upstream_first(request, req.model) is not None:
        return web.json_response(tr.load_answer(req.model, chat=chat, unloaded=ttl == 0))
    model = lookup_model(d, req.model)
    if ttl == 0:
        await d.scheduler.unload(models=[model.name], reason="unload")
        return web.json_response(tr.load_answer(model.name, chat=chat, unloaded=True))
    job = await _lease(request, req.model, Mode.COMPLETION, [Capability.CHAT], req.options, req.keep_alive,
                       preload=True)
    job.lease.release()
    return web.json_response(tr.load_answer(model.name, chat=chat, unloaded=False))


async def _answer(request: web.Request, job: Job | UpstreamJob, path: str, body: dict[str, Any], stream: bool,
                  part: Any, final: Any) -> web.StreamResponse:
    """Run one chat/generate on the leased runner and answer as one object or as NDJSON parts."""
    name = job.name
    if not stream:
        turn = tr.turn_from_completion(await job.call(path, body))
        return web.json_response(final(name, turn, job.clock, streamed=False))
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}  # usage carries the timings
    async with contextlib.aclosing(job.events(path, body)) as chunks:
        first = await anext(chunks, None)  # an engine refusal still gets a real status line
        response = await start_ndjson(request)
        turn = tr.Turn()
        async for chunk in _prepend([first] if first is not None else [], chunks):
            if "error" in chunk and "choices" not in chunk:
                await response.write(ndjson_line({"error": error_text(chunk)}))
                await response.write_eof()
                return response
            delta = tr.absorb_chunk(turn, chunk)
            if delta.content or delta.thinking or turn.tool_calls:
                job.clock.mark_first_token()  # the eval durations of an engine without timings start here
            if delta.content or delta.thinking:
                await response.write(ndjson_line(part(name, delta)))
    if part is tr.chat_part and (calls := tr.chat_tool_part(name, turn)) is not None:
        await response.write(ndjson_line(calls))
    await response.write(ndjson_line(final(name, turn, job.clock, streamed=True)))
    await response.write_eof()
    return response


async def _prepend(first: list[dict[str, Any]], rest: AsyncIterator[dict[str, Any]]) -> \
        AsyncIterator[dict[str, Any]]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def chat(request: web.Request) -> web.StreamResponse:
    req = await read_body(request, ChatRequest)
    if not req.messages:
        return await _load_only(request, req, chat=True)
    needed = [Capability.CHAT] + ([Capability.STREAMING] if req.stream else []) + \
        ([Capability.TOOLS] if req.tools else [])
    messages = _translated(tr.openai_messages, req.messages)
    job = await _job(request, req.model, needed, req.options, req.keep_alive)

    async def answer(job: Job | UpstreamJob) -> web.StreamResponse:
        body = {**_openai_body(req, job), "messages": messages}
        if req.tools:
            body["tools"] = req.tools
        return await _answer(request, job, "/v1/chat/completions", body, req.stream, tr.chat_part, tr.chat_final)

    return await _served(request, req.model, job, needed, answer)


async def generate(request: web.Request) -> web.StreamResponse:
    req = await read_body(request, GenerateRequest)
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
    job = await _job(request, req.model, needed, req.options, req.keep_alive)

    async def answer(job: Job | UpstreamJob) -> web.StreamResponse:
        body = {**_openai_body(req, job), **extra}
        return await _answer(request, job, path, body, req.stream, tr.generate_part, tr.generate_final)

    return await _served(request, req.model, job, needed, answer)


# ---------------------------------------------------------------- embeddings


async def _embed(request: web.Request, req: ModelRequest, inputs: Any, options: tr.OllamaOptions | None,
                 keep_alive: KeepAliveValue, dimensions: int | None = None) -> tuple[Job | UpstreamJob,
                                                                                     list[list[float]], int]:
    needed = [Capability.EMBEDDINGS]
    job: Job | UpstreamJob | None = await upstream_job(request, req.model, needed)
    if job is None:
        job = await _lease_or_fall_back(request, req.model, Mode.EMBEDDING, needed, options, keep_alive)

    async def answer(job: Job | UpstreamJob) -> tuple[Job | UpstreamJob, dict[str, Any]]:
        return job, await job.call("/v1/embeddings", {"model": job.name, "input": inputs})

    served, answered = await _served(request, req.model, job, needed, answer)
    usage = answered.get("usage") or {}
    return served, tr.embeddings_from(answered, dimensions), int(usage.get("prompt_tokens") or 0)


async def _load_embedding(request: web.Request, name: str, options: tr.OllamaOptions | None,
                          keep_alive: KeepAliveValue) -> str:
    """Nothing to embed: Ollama's way to load the model (an unknown model is still a 404); nothing is sent
    to an upstream. The model's name as answered."""
    if await upstream_first(request, name) is not None:
        return name
    job = await _lease(request, name, Mode.EMBEDDING, [Capability.EMBEDDINGS], options, keep_alive, preload=True)
    job.lease.release()
    return job.model.name


async def embed(request: web.Request) -> web.Response:
    req = await read_body(request, EmbedRequest)
    if req.input == "" or req.input == []:
        name = await _load_embedding(request, req.model, req.options, req.keep_alive)
        return web.json_response({"model": name, "embeddings": []})
    job, vectors, prompt_tokens = await _embed(request, req, req.input, req.options, req.keep_alive,
                                               req.dimensions)
    return web.json_response({"model": job.name, "embeddings": vectors, **job.clock.durations(),
                              "prompt_eval_count": prompt_tokens})


async def embeddings(request: web.Request) -> web.Response:
    """The older single-prompt route: one vector, as the engine computed it."""
    req = await read_body(request, EmbeddingsRequest)
    if not req.prompt:
        # As Ollama does: load the model, answer an empty vector.
        await _load_embedding(request, req.model, req.options, req.keep_alive)
        return web.json_response({"embedding": []})
    _, vectors, _ = await _embed(request, req, req.prompt, req.options, req.keep_alive)
    return web.json_response({"embedding": vectors[0] if vectors else []})

