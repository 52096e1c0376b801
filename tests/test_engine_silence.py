"""The relay to an engine: no total deadline on a healthy answer, a bounded silence, at most one delivery.

The engine here is tests/standin_engine.py, a stand-in (a real process on a real unix socket) that can
pace, stall, hang or drop a request on demand, which real engines do only by accident.
"""

from __future__ import annotations

import json
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

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
from tests.conftest import app_on_socket

STANDIN = Path(__file__).with_name("standin_engine.py")


class StandInBackend(Backend):
    """Runs the stand-in engine process for any GGUF model."""

    name = "standin"
    capabilities = frozenset({Capability.CHAT, Capability.STREAMING})
    model_formats = frozenset({ModelFormat.GGUF})

    async def install(self, progress=None) -> None:
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


def chat(plan: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "standin": plan}


async def events(client: httpx.AsyncClient, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[Any]:
    """The `data:` events of a streamed answer, parsed ([DONE] kept as the string)."""
    seen: list[Any] = []
    async with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                seen.append(data if data == "[DONE]" else json.loads(data))
    return seen


async def arrivals(client: httpx.AsyncClient) -> int:
    """How many chat requests reached the stand-in engine, asked on its own socket."""
    [runner] = (await client.get("/engines/ps")).json()
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=runner["socket"]),
                                 base_url="http://engine", timeout=10) as engine:
        count: int = (await engine.get("/arrivals")).json()["chat"]
        return count


def standin_daemon(tmp_path: Path, tiny_model: Path, **settings: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """The daemon's app in this process, serving the tiny model with the stand-in engine, and a client for it."""
    return app_on_socket(tmp_path, {"standin": StandInBackend()}, {"tiny": tiny_model}, **settings)


@pytest.mark.timeout(420)
@pytest.mark.anyio
async def test_a_stream_longer_than_five_minutes_reaches_its_end(tmp_path, tiny_model):
    # aiohttp's default client timeout would cut this at 300 s; one event every 2 s keeps each gap short.
    plan = {"pace": 2.0, "events": 156}

    async with standin_daemon(tmp_path, tiny_model, engine_idle_timeout=30) as client:
        seen = await events(client, chat(plan, stream=True))
    assert seen[-1] == "[DONE]"
    assert [e["choices"][0]["delta"]["content"] for e in seen[:-1]] == [f"t{i} " for i in range(156)]


@pytest.mark.anyio
async def test_an_engine_silent_mid_stream_is_cut_with_an_error_event(tmp_path, tiny_model):
    async with standin_daemon(tmp_path, tiny_model, engine_idle_timeout=1.5) as client:
        cut = await events(client, chat({"silent_after": 2}, stream=True))
        # The runner stays usable for the next request.
        after = await events(client, chat({"events": 2}, stream=True))
    assert [e["choices"][0]["delta"]["content"] for e in cut[:2]] == ["t0 ", "t1 "]
    error = cut[2]["error"]
    assert error["code"] == "runner_timeout" and "1.5 s" in error["message"]
    assert len(cut) == 3 and "[DONE]" not in cut
    assert after[-1] == "[DONE]"


@pytest.mark.anyio
async def test_a_non_streamed_answer_waits_while_the_engine_stays_healthy(tmp_path, tiny_model):
    async with standin_daemon(tmp_path, tiny_model, engine_idle_timeout=1) as client:
        # Three idle timeouts of silence, with the engine's health checks passing.
        resp = await client.post("/v1/chat/completions", json=chat({"delay": 3.5}, stream=False))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "done"


@pytest.mark.anyio
async def test_a_hung_engine_is_answered_as_a_failure(tmp_path, tiny_model):
    async with standin_daemon(tmp_path, tiny_model, engine_idle_timeout=1) as client:
        openai_shape = await client.post("/v1/chat/completions", json=chat({"hang": True}, stream=False))
        ollama_shape = await client.post("/api/chat", json={"model": "tiny", "stream": False,
                                                             "messages": [{"role": "user", "content": "hi"}]})
    assert openai_shape.status_code == 504
    error = openai_shape.json()["error"]
    assert error["code"] == "runner_timeout" and "health check" in error["message"]
    # The engine still hangs: the Ollama route gets the same verdict in its own shape.
    assert ollama_shape.status_code == 504 and "health check" in ollama_shape.json()["error"]


@pytest.mark.anyio
async def test_a_request_the_engine_received_is_not_sent_again(tmp_path, tiny_model):
    async with standin_daemon(tmp_path, tiny_model) as client:
        plain = await client.post("/v1/chat/completions", json=chat({"drop": True}, stream=False))
        streamed = await client.post("/v1/chat/completions", json=chat({"drop": True}, stream=True))
        count = await arrivals(client)
    for resp in (plain, streamed):
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "runner_unreachable"
    assert count == 2  # one arrival per request: neither was sent a second time
