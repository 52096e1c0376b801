"""The relay against clients that ask for huge answers, hang up early, or unload a model in use.

The engine is tests/standin_bulk_engine.py, a stand-in (a real process on a real unix socket) that can
hold the second half of a large answer, or its whole answer, until the test opens its gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web

from backends.base import (
    Backend,
    BackendConfiguration,
    BackendState,
    BackendStatus,
    Capability,
    MemoryEstimate,
    Mode,
    ModelFormat,
    ModelRef,
    RunnerOutput,
)
from backends.endpoint import Endpoint
from backends.process import run_process
from runnerd import proxy
from runnerd.api.context import DAEMON
from runnerd.config import load_settings
from runnerd.server import bind_unix_socket, create_app

STANDIN = Path(__file__).with_name("standin_bulk_engine.py")
MIB = 1 << 20


class BulkStandInBackend(Backend):
    """Runs the bulk stand-in engine process for any GGUF model."""

    name = "standin"
    capabilities = frozenset({Capability.CHAT, Capability.STREAMING})
    model_formats = frozenset({ModelFormat.GGUF})

    async def install(self, progress: Any = None) -> None:
        return None

    async def uninstall(self) -> None:
        return None

    def status(self) -> BackendStatus:
        return BackendStatus(state=BackendState.INSTALLED, version="standin")

    def disk_usage(self) -> int:
        return 0

    async def run(self, endpoint: Endpoint, model: ModelRef, mode: Mode, config: BackendConfiguration,
                  output: RunnerOutput) -> None:
        await run_process([sys.executable, str(STANDIN), str(endpoint.path)], env={"PATH": "/usr/bin:/bin"},
                          endpoint=endpoint, output=output, grace=2)

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        return MemoryEstimate(ram_bytes=1 << 20)


@contextlib.asynccontextmanager
async def daemon_app(tmp_path: Path, tiny_model: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's app in this process serving the tiny model with the stand-in engine, set up as
    `runnerd serve` sets it up: a client that hangs up cancels its request's handler."""
    sock_path = Path("/tmp") / f"rd-hr-{os.getpid()}-{time.monotonic_ns()}.sock"
    app = create_app(load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data", socket=sock_path,
                                   **settings), backends={"standin": BulkStandInBackend()})
    app[DAEMON].store.add("tiny", tiny_model)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, bind_unix_socket(sock_path)).start()
    try:
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock_path)),
                                     base_url="http://runnerd", timeout=httpx.Timeout(60, read=None)) as client:
            yield client
    finally:
        await runner.cleanup()
        sock_path.unlink(missing_ok=True)


def chat(plan: dict[str, Any] | None = None, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if plan is not None:
        body["standin"] = plan
    return body


async def ps(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    runners: list[dict[str, Any]] = (await client.get("/engines/ps")).json()
    return runners


@contextlib.asynccontextmanager
async def engine(client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the stand-in engine's own socket (its runner loaded by a first request)."""
    assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
    [runner] = await ps(client)
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=runner["socket"]),
                                 base_url="http://engine", timeout=10) as direct:
        yield direct


@contextlib.asynccontextmanager
async def gate(direct: httpx.AsyncClient) -> AsyncIterator[None]:
    """Open the engine's gate when the block ends, if the test has not: a failed test holds no answer back."""
    try:
        yield
    finally:
        await direct.post("/open")


async def counts(direct: httpx.AsyncClient) -> dict[str, int]:
    answer: dict[str, int] = (await direct.get("/counts")).json()
    return answer


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)
    del what  # named for the reader of a failed test's traceback


# ---------------------------------------------------------------- large answers


@pytest.mark.anyio
async def test_a_large_answer_reaches_the_client_before_the_engine_has_sent_all_of_it(tmp_path, tiny_model):
    size = 8 * MIB
    received = bytearray()
    async with daemon_app(tmp_path, tiny_model) as client, engine(client) as direct, gate(direct):
        request = client.build_request("POST", "/v1/chat/completions", json=chat({"bulk": size, "gated": True}))
        sending = asyncio.create_task(client.send(request, stream=True))
        # The engine holds its second half until the gate opens: the status line must arrive without it.
        arrived, _ = await asyncio.wait({sending}, timeout=20)
        if not arrived:
            await direct.post("/open")  # lets the test end; it has failed already
        resp = await sending
        try:
            assert arrived, "the answer's status line waited for the engine's last bytes"
            assert resp.status_code == 200
            assert int(resp.headers["Content-Length"]) == size
            chunks = resp.aiter_raw()
            while len(received) < size // 4:  # the first bytes too, the gate still shut
                received += await anext(chunks)
            assert (await counts(direct))["answered"] == 1  # the loading request only: this one is unfinished
            await direct.post("/open")
            async for chunk in chunks:
                received += chunk
        finally:
            await resp.aclose()
    answer = json.loads(received)
    assert len(received) == size and answer["choices"][0]["message"]["content"].startswith("xxx")


@pytest.mark.anyio
async def test_an_answer_broken_midway_is_cut_not_passed_off_as_whole(tmp_path, tiny_model):
    async with daemon_app(tmp_path, tiny_model) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/chat/completions", json=chat({"bulk": 2 * MIB, "break": True}))
        # The runner is unharmed and serves the next request whole.
        after = await client.post("/v1/chat/completions", json=chat())
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "done"


@pytest.mark.anyio
async def test_a_translated_answer_over_the_bound_is_refused_with_502(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(proxy, "MAX_TRANSLATED_ANSWER_BYTES", MIB, raising=False)
    ollama_chat = {"model": "tiny", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    async with daemon_app(tmp_path, tiny_model) as client, engine(client) as direct:
        await direct.post("/plan", json={"bulk": MIB // 2})
        under = await client.post("/api/chat", json=ollama_chat)
        await direct.post("/plan", json={"bulk": 3 * MIB})
        over = await client.post("/api/chat", json=ollama_chat)
        relayed = await client.post("/v1/chat/completions", json=chat({"bulk": 3 * MIB}))
    assert under.status_code == 200, under.text
    assert over.status_code == 502
    assert f"more than {MIB} bytes" in over.json()["error"]
    assert relayed.status_code == 200 and len(relayed.content) == 3 * MIB  # the relay itself has no bound


# ---------------------------------------------------------------- clients that hang up


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
async def test_the_runner_stays_busy_until_the_engine_answers_a_client_that_hung_up(tmp_path, tiny_model, caplog,
                                                                                     route):
    caplog.set_level(logging.INFO, logger="runnerd.proxy")
    async with daemon_app(tmp_path, tiny_model) as client, engine(client) as direct, gate(direct):
        await direct.post("/plan", json={"gated": True})  # the Ollama route sends no plan of its own
        body = chat() if route == "/api/chat" else chat({"gated": True})
        asking = asyncio.create_task(client.post(route, json=body))

        async def arrived() -> bool:
            return (await counts(direct))["arrived"] == 2

        await until(arrived, "the request to reach the engine")
        asking.cancel()  # the client hangs up while the engine computes
        with contextlib.suppress(asyncio.CancelledError):
            await asking

        async def noticed() -> bool:
            [runner] = await ps(client)
            return runner["active_requests"] == 0 or "client hung up" in caplog.text

        await until(noticed, "the daemon to notice the hang-up")
        [busy] = await ps(client)
        assert (busy["state"], busy["active_requests"]) == ("ready", 1)
        assert (await counts(direct))["answered"] == 1

        await direct.post("/open")  # the engine finishes its answer

        async def idle() -> bool:
            [runner] = await ps(client)
            return bool(runner["active_requests"] == 0)

        await until(idle, "the runner to go idle")
        [after] = await ps(client)
        assert after["state"] == "idle" and after["expires_at"] is not None  # its keep-alive runs again
        assert (await counts(direct))["answered"] == 2


# ---------------------------------------------------------------- unloading a runner in use


async def _stream_events(client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event) -> list[Any]:
    seen: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                seen.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return seen


@pytest.mark.anyio
async def test_unload_lets_a_stream_in_flight_finish_and_answers_after_it(tmp_path, tiny_model):
    async with daemon_app(tmp_path, tiny_model) as client:
        refused = await client.post("/engines/unload", json={"models": ["tiny"], "timeout": -1})
        started = asyncio.Event()
        order: list[str] = []

        async def streaming() -> list[Any]:
            seen = await _stream_events(client, chat({"pace": 0.2, "events": 12}, stream=True), started)
            order.append("stream ended")
            return seen

        async def unloading() -> httpx.Response:
            await started.wait()
            resp = await client.post("/engines/unload", json={"models": ["tiny"]})
            order.append("unload answered")
            return resp

        stream_task = asyncio.create_task(streaming())
        unload_task = asyncio.create_task(unloading())

        async def retiring() -> bool:
            return any(r["state"] == "stopping" for r in await ps(client))

        await until(retiring, "the unload to begin")
        # Meanwhile a new request is served, by a fresh runner: the one unloading takes no new request.
        meanwhile = await client.post("/v1/chat/completions", json=chat())
        runners = await ps(client)
        seen, unloaded = await stream_task, await unload_task
        left = await ps(client)

    assert refused.status_code == 400 and "timeout" in refused.text
    assert order == ["stream ended", "unload answered"]
    assert seen[-1] == "[DONE]" and not any("error" in e for e in seen if isinstance(e, dict))
    assert [e["choices"][0]["delta"]["content"] for e in seen[:-1]] == [f"t{i} " for i in range(12)]
    assert unloaded.status_code == 200, unloaded.text
    answer = unloaded.json()
    assert (answer["unloaded"], answer["drained"], answer["cut"], answer["timeout"]) == (1, 1, 0, 60)
    assert meanwhile.status_code == 200
    assert sorted(r["state"] for r in runners) == ["idle", "stopping"]
    assert [r["state"] for r in left] == ["idle"]  # the fresh runner stays; the unloaded one is gone


@pytest.mark.anyio
async def test_unload_cuts_what_is_still_in_flight_at_its_timeout_and_says_so(tmp_path, tiny_model):
    async with daemon_app(tmp_path, tiny_model) as client:
        started = asyncio.Event()
        stream_task = asyncio.create_task(
            _stream_events(client, chat({"pace": 0.5, "events": 200}, stream=True), started))
        await started.wait()
        unloaded = await client.post("/engines/unload", json={"all": True, "timeout": 0.5})
        seen = await stream_task
        left = await ps(client)
    answer = unloaded.json()
    assert (answer["unloaded"], answer["drained"], answer["cut"]) == (1, 0, 1)
    assert "[DONE]" not in seen and "error" in seen[-1]  # the stream ends with the engine's failure
    assert left == []
