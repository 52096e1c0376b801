"""Observability routes: GET /metrics (Prometheus) and GET /logs (the daemon's and runners' logs).

The request middleware (runnerd/api/middleware.py) makes two metric observations per request plus one
when the headers go out (time to first byte); it never parses a body. The model label comes from the
proxy, which knows which registered model a request was served by, so unknown names never become label
values.

A token limited to some models sees only their series: a sample whose `model` label it may not use is
left out, and only its models' runners are scraped; the host's own series (queue, memory held, runners
by state, event-loop lag) stay whole. Its `?runner=` logs for a model it may not use answer exactly as
for a model that has no logs, and the daemon's own log reaches it without the lines that name such a
model.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import Mode
from runnerd.api import scopes
from runnerd.api.context import DAEMON, Daemon, daemon
from runnerd.api.errors import ApiError
from runnerd.logs import DAEMON_LOG
from runnerd.metrics import REQUEST_MODEL
from runnerd.prometheus_text import text_exposition
from runnerd.runner_logs import read_end
from runnerd.scheduler import RunnerInfo, RunnerKey, RunnerState
from runnerd.store import StoreError, canonical_name

STARTED = web.RequestKey("started", float)
_SCRAPE_TIMEOUT = 1.0
# A scrape this small (a few hundred lines, about 1 ms) is encoded on the event loop: handing it to a thread
# cost more CPU than the encoding (the GIL changes hands many times meanwhile: 3.3 against 1.8 ms a scrape).
# A larger one goes to a thread, so that no scrape holds the loop for long.
_INLINE_TIMED_SERIES = 16
_INLINE_ENGINE_TEXT = 32 << 10
_FOLLOW_POLL = 0.25
_TAIL_BYTES = 1024 * 1024
LOGS_CLOSING = web.AppKey("logs_closing", asyncio.Event)


# --- request metrics ---------------------------------------------------------------------------

def route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def observe_answer(request: web.Request, started: float, status: int) -> None:
    """The request's count and duration, once its handler returned (499: the client went away first)."""
    request.app[DAEMON].metrics.observe_request(route_label(request), request.get(REQUEST_MODEL, ""), status,
                                                time.perf_counter() - started)


def observe_first_byte(request: web.Request) -> None:
    """The time to the response's headers, when they go out."""
    started = request.get(STARTED)
    if started is not None:
        request.app[DAEMON].metrics.observe_first_byte(route_label(request), request.get(REQUEST_MODEL, ""),
                                                       time.perf_counter() - started)


# --- /metrics ----------------------------------------------------------------------------------

async def scrape_runner(session: aiohttp.ClientSession | None, info: RunnerInfo,
                        timeout: float = _SCRAPE_TIMEOUT) -> str | None:
    """The runner's own /metrics text from its endpoint, over the runner's session (a scrape every few
    seconds reuses its connection), or None if it did not answer in time."""
    if session is None or session.closed:
        return None
    try:
        async with session.get(info.endpoint.url("/metrics"), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


def _parse(text: str) -> list[Metric] | None:
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        return None


def runner_families(scraped: Iterable[tuple[RunnerInfo, str | None]]) -> list[Metric]:
    """Every runner's samples, each labelled with its runner, merged into one family per name
    (the text format allows a family only once), plus whether each runner could be scraped."""
    up = GaugeMetricFamily("runnerd_runner_metrics_up", "Whether a ready runner's own metrics could be read",
                           labels=["backend", "model", "mode"])
    merged: dict[str, Metric] = {}
    for info, text in scraped:
        labels = {"backend": info.backend, "model": info.model, "mode": str(info.mode)}
        families = _parse(text) if text is not None else None
        up.add_metric(list(labels.values()), 0 if families is None else 1)
        for family in families or []:
            if family.name.startswith("runnerd_"):
                continue  # an engine cannot speak for the daemon
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            if target.type != family.type:
                continue
            for sample in family.samples:
                target.add_sample(sample.name, {**sample.labels, **labels}, sample.value, sample.timestamp)
    return [up, *merged.values()]


def _shown_samples(families: list[Metric], allowed: Callable[[str], bool]) -> list[Metric]:
    """The families with only the samples whose model (if they name one) is `allowed`."""
    shown = []
    for family in families:
        kept = Metric(family.name, family.documentation, family.type)
        kept.samples = [s for s in family.samples if not s.labels.get("model") or allowed(s.labels["model"])]
        shown.append(kept)
    return shown


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _exposition(registry: CollectorRegistry, live: list[Metric], scraped: list[tuple[RunnerInfo, str | None]],
                accept: str, allowed: Callable[[str], bool]) -> tuple[bytes, str]:
    """Collect the daemon's histograms, parse the engines' texts and encode everything: the costly part
    of a scrape. The plain text format (what Prometheus asks for unless told otherwise) is written by
    runnerd.prometheus_text; the others by prometheus_client."""
    families = _shown_samples([*registry.collect(), *live, *runner_families(scraped)], allowed)
    encode, content_type = choose_encoder(accept)
    if encode is generate_latest:
        return text_exposition(families), content_type
    kept = CollectorRegistry()
    kept.register(_Families(families))
    return encode(kept), content_type


def _session_of(d: Daemon, info: RunnerInfo) -> aiohttp.ClientSession | None:
    runner = d.scheduler.runner(RunnerKey(info.backend, info.model, info.mode))
    return runner.session if runner is not None else None


async def get_metrics(request: web.Request) -> web.Response:
    d = daemon(request)
    # A ready runner with nothing in flight shows as idle: both answer /metrics.
    allowed = scopes.model_filter()
    ready = [r for r in d.scheduler.ps() if r.state in (RunnerState.READY, RunnerState.IDLE) and allowed(r.model)]
    texts = await asyncio.gather(*(scrape_runner(_session_of(d, r), r) for r in ready))
    args = (d.metrics.registry, d.metrics.live_families(), list(zip(ready, texts, strict=True)),
            request.headers.get("Accept", ""), allowed)
    if d.metrics.timed_series() <= _INLINE_TIMED_SERIES and sum(len(t or "") for t in texts) <= _INLINE_ENGINE_TEXT:
        body, content_type = _exposition(*args)
    else:
        body, content_type = await asyncio.to_thread(_exposition, *args)
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- /logs -------------------------------------------------------------------------------------

class LogsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runner: str | None = Field(default=None, min_length=1, max_length=300, description="a model's runner logs")
    mode: Mode | None = None
    follow: bool = False
    tail: int = Field(default=200, ge=0, le=10_000)


def _runner_logs(d: Daemon, name: str, mode: Mode | None) -> list[tuple[str, Path]]:
    """(mode, log file) for each runner of the model, running or not: logs outlive their runners."""
    try:
        model = canonical_name(name)
    except StoreError as exc:
        raise ApiError(400, str(exc), param="runner") from exc
    missing = ApiError(404, f"no runner logs for {model}" + (f" ({mode})" if mode else ""), code="logs_not_found",
                       param="runner")
    # The caller's patterns are matched before anything is looked for, as for a request's model: a model
    # it may not use, stored or not, with logs or not, takes the same path in the same time (looking first
    # and refusing after took measurably longer for one that has logs).
    if not scopes.may_use(model):
        raise missing
    found: dict[Path, str] = {}
    for info in d.scheduler.ps():
        if info.model == model and info.log_path and (mode is None or info.mode == mode):
            found[Path(info.log_path)] = str(info.mode)
    log_dir = d.settings.runner_log_dir
    for backend in d.backends:
        for m in [mode] if mode is not None else list(Mode):
            path = RunnerKey(backend, model, m).log_path(log_dir)
            if path.is_file():
                found.setdefault(path, str(m))
    if not found:
        raise missing
    return [(m, p) for p, m in sorted(found.items(), key=lambda item: item[1])]


def _hidden_models(d: Daemon) -> re.Pattern[str] | None:
    """What finds, in the daemon's log, the models the caller may not use; None when there are none."""
    if scopes.sees_every_model():
        return None
    names = [m.name for m in d.store.list()] + [r.model for r in d.scheduler.ps()]
    return scopes.hidden_names_pattern([*names, *d.sources.external_models(), *d.sources.aliases])


def _without(hidden: re.Pattern[str] | None, lines: list[str]) -> list[str]:
    return lines if hidden is None else [line for line in lines if not hidden.search(line)]


def _read_lines(path: Path, position: int, partial: bool) -> tuple[list[str], int]:
    """Lines written at or after `position` (a truncated file starts over); a line still being
    written is left for next time unless `partial`."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            position = 0 if size < position else position
            f.seek(position)
            data = f.read(size - position)
    except OSError:
        return [], position
    if not partial:
        data = data[: data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace").splitlines(), position + len(data)


def _tail_file(path: Path, count: int, partial: bool) -> tuple[list[str], int]:
    """The last `count` lines within a MiB, read across the rotated files too; and where to follow from."""
    data, cut, end = read_end(path, _TAIL_BYTES)
    if not partial:
        whole = data[: data.rfind(b"\n") + 1]
        end = max(0, end - (len(data) - len(whole)))  # the line being written is followed from its start
        data = whole
    lines = data.decode("utf-8", "replace").splitlines()
    if cut:
        lines = lines[1:]
    return (lines[-count:] if count else []), end


def _prefixed(label: str | None, lines: list[str]) -> list[str]:
    return [f"[{label}] {line}" for line in lines] if label else lines


async def _send(response: web.StreamResponse, lines: list[str]) -> None:
    if lines:
        await response.write(("\n".join(lines) + "\n").encode())


async def _follow(request: web.Request, response: web.StreamResponse, files: list[tuple[str, Path]],
                  positions: list[int], seq: int) -> None:
    closing = request.app[LOGS_CLOSING]
    while not closing.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), _FOLLOW_POLL)
        if not files:
            lines, seq = DAEMON_LOG.since(seq)
            if lines:  # the names to hide asked again: a model stored or loaded since may be one
                await _send(response, _without(_hidden_models(daemon(request)), lines))
        for i, (mode, path) in enumerate(files):
            lines, positions[i] = await asyncio.to_thread(_read_lines, path, positions[i], False)
            await _send(response, _prefixed(mode if len(files) > 1 else None, lines))


async def get_logs(request: web.Request) -> web.StreamResponse:
    """The daemon's recent log lines, or with ?runner=MODEL that model's runner logs; follow=true
    keeps the response open and sends new lines as they are written."""
    d = daemon(request)
    try:
        query = LogsQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"invalid logs query: {field}: {err['msg']}", param=field) from exc
    files = _runner_logs(d, query.runner, query.mode) if query.runner else []
    lines: list[str] = []
    positions: list[int] = []
    seq = 0
    if not files:
        lines, seq = DAEMON_LOG.tail(query.tail)
        lines = _without(_hidden_models(d), lines)
    for mode, path in files:
        # Up to a MiB per file: read off the event loop, which proxies inference meanwhile.
        tail, end = await asyncio.to_thread(_tail_file, path, query.tail, not query.follow)
        lines += _prefixed(mode if len(files) > 1 else None, tail)
        positions.append(end)
    if not query.follow:
        return web.Response(text="\n".join(lines) + "\n" if lines else "", content_type="text/plain")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    await _send(response, lines)
    with contextlib.suppress(ConnectionResetError):
        await _follow(request, response, files, positions, seq)
        await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app[LOGS_CLOSING] = asyncio.Event()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/logs", get_logs)

    async def end_follows(app: web.Application) -> None:
        app[LOGS_CLOSING].set()

    app.on_shutdown.append(end_follows)
