"""A local model's answer is held until its engine's first body bytes when an upstream could still serve it,
and a local engine that fails before then is passed over on every route: OpenAI's, Ollama's, Messages and
Responses.

The local engine is tests/standin_engine.py and the upstream tests/standin_upstream.py, both stand-ins
(real processes or servers on real sockets) that fail before their first body byte on demand, which real
engines do only by accident. The clients are the real `openai`, `ollama` and `anthropic` packages.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import ollama
import openai
import pytest

from backends.base import Capability
from tests.conftest import app_on_socket
from tests.standin_upstream import StandinUpstream
from tests.test_engine_silence import StandInBackend, standin_daemon

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
# What the local stand-in engine can be told to do before its first body byte; each is passed over.
FAILURES: list[dict[str, Any]] = [{"status": 500}, {"status": 503}, {"drop": True}, {"cut": True}]
# One failure with a status and one without, for the routes that share a path already tried with all of
# them (a broken connection costs the daemon's two-second wait to learn whether the engine exited).
SOME_FAILURES: list[dict[str, Any]] = [{"status": 503}, {"drop": True}]


class StandInEmbeddingBackend(StandInBackend):
    """The stand-in engine, declared to embed too (it answers /v1/embeddings)."""

    capabilities = frozenset({Capability.CHAT, Capability.STREAMING, Capability.EMBEDDINGS})


@dataclass
class Front:
    http: httpx2.AsyncClient
    socket: Path
    upstream: StandinUpstream

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://runnerd/v1", api_key="unused", max_retries=0,
                                  http_client=self.http)

    def ollama(self) -> ollama.AsyncClient:
        # The ollama package speaks through httpx, not httpx2.
        return ollama.AsyncClient(host="http://runnerd", transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                  timeout=60)

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url="http://runnerd", api_key="unused", max_retries=0,
                                        http_client=self.http)


@pytest.fixture
async def front(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Front]:
    """A daemon whose local model `tiny` runs on the stand-in engine, with an upstream that hosts `tiny` too."""
    upstream = StandinUpstream("up", "answer", ["tiny"])
    socket = Path("/tmp") / f"rd-hold-{os.getpid()}-{time.monotonic_ns()}.sock"
    try:
        spec = {"name": "up", "kind": "openai", "base_url": upstream.base_url, "priority": 10}
        async with app_on_socket(tmp_path, {"standin": StandInEmbeddingBackend()}, {"tiny": tiny_model},
                                 upstreams=[spec], socket=socket) as client:
            with anyio.fail_after(30):  # the first poll of the upstream's model list runs beside start-up
                while (await client.get("/engines/status", params={"upstreams": "1"})).json()["upstreams"]["up"][
                        "models"] != ["tiny"]:
                    await anyio.sleep(0.05)
            yield Front(client, socket, upstream)
    finally:
        upstream.close()


async def arrivals(http: httpx2.AsyncClient) -> int:
    """How many requests reached the stand-in engines (the chat runner's and the embedding runner's)."""
    count = 0
    for runner in (await http.get("/engines/ps")).json():
        async with httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=runner["socket"]),
                                      base_url="http://engine", timeout=10) as engine:
            count += int((await engine.get("/arrivals")).json()["chat"])
    return count


def _planned(plan: dict[str, Any]) -> str:
    """A request text that tells the stand-in engine what to do (for routes that build the engine's body)."""
    return "standin:" + json.dumps(plan)


async def _streamed(client: openai.AsyncOpenAI, plan: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The source header and every content piece of a streamed answer."""
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, stream=True, extra_body={"standin": plan})
    pieces = [chunk.choices[0].delta.content or "" async for chunk in raw.parse() if chunk.choices]
    return raw.headers.get("x-runnerd-source"), pieces


async def _whole(client: openai.AsyncOpenAI, plan: dict[str, Any]) -> tuple[str | None, str | None]:
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, extra_body={"standin": plan})
    return raw.headers.get("x-runnerd-source"), raw.parse().choices[0].message.content


@pytest.mark.anyio
async def test_a_local_engine_that_fails_before_its_first_byte_is_passed_over_whole(front: Front) -> None:
    http, client = front.http, front.openai()
    # A healthy local engine answers itself, streamed and not, through the hold.
    assert await _whole(client, {}) == (None, "done")
    assert await _streamed(client, {"events": 3}) == (None, ["t0 ", "t1 ", "t2 "])
    tried = await arrivals(http)
    for plan in FAILURES:
        # The upstream's answer, whole, and not one byte of the local engine's (its content is t0 ..., done).
        assert await _whole(client, plan) == ("up", "up"), plan
        assert await _streamed(client, plan) == ("up", ["up-1 ", "up-2"]), plan
    # Every one of them was tried locally first.
    assert await arrivals(http) == tried + 8


@pytest.mark.anyio
async def test_a_local_answer_with_no_source_after_it_is_not_held(tmp_path: Path, tiny_model: Path) -> None:
    """Without another candidate, the local engine's refusal reaches the client as it always did."""
    async with standin_daemon(tmp_path, tiny_model) as client:
        refused = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                                   "standin": {"status": 503}})
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "stand-in engine failure"


@pytest.mark.anyio
async def test_ollama_routes_pass_a_local_engine_failing_before_its_first_event_over(front: Front) -> None:
    client = front.ollama()
    hi = [{"role": "user", "content": "hi"}]
    # A healthy local engine answers itself.
    assert (await client.chat(model="tiny", messages=hi)).message.content == "done"
    assert [p.message.content async for p in await client.chat(model="tiny", messages=hi, stream=True)
            if p.message.content] == ["t0 ", "t1 ", "t2 "]
    assert (await client.embed(model="tiny", input="hi")).embeddings == [[0.0, 1.0]]
    tried = await arrivals(front.http)
    for plan in FAILURES:
        text = _planned(plan)
        said = [{"role": "user", "content": text}]
        # The upstream's answer whole (its content is `up`, or `up-1 ` and `up-2`), none of the local engine's.
        assert (await client.chat(model="tiny", messages=said)).message.content == "up", plan
        streamed = await client.chat(model="tiny", messages=said, stream=True)
        assert "".join([p.message.content async for p in streamed]) == "up-1 up-2", plan
        assert (await client.embed(model="tiny", input=text)).embeddings == [[1.0, 0.0, 0.5]], plan
    for plan in SOME_FAILURES:
        text = _planned(plan)
        assert (await client.generate(model="tiny", prompt=text)).response == "up", plan
        streamed_generate = await client.generate(model="tiny", prompt=text, stream=True)
        assert "".join([p.response async for p in streamed_generate]) == "up-1 up-2", plan
    assert await arrivals(front.http) == tried + 3 * len(FAILURES) + 2 * len(SOME_FAILURES)
    # The local runner's lease was given back each time: it still serves, and no request waits on it.
    assert (await client.chat(model="tiny", messages=hi)).message.content == "done"
    # With the upstream failing too, no source is left: a 502 naming why each one failed.
    front.upstream.mode = "500"
    said = [{"role": "user", "content": _planned({"status": 503})}]
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as refused:
            if stream:  # the streamed request is sent when its parts are first asked for
                [p async for p in await client.chat(model="tiny", messages=said, stream=True)]
            else:
                await client.chat(model="tiny", messages=said)
        assert refused.value.status_code == 502, stream
        assert "local: stand-in engine failure" in refused.value.error and "up: it answered 500" in \
            refused.value.error, refused.value.error


@pytest.mark.anyio
async def test_messages_and_responses_pass_a_local_engine_failing_before_its_first_event_over(front: Front) -> None:
    claude, gpt = front.anthropic(), front.openai()
    tried = await arrivals(front.http)
    for plan in SOME_FAILURES:
        text = _planned(plan)
        said: list[Any] = [{"role": "user", "content": text}]
        raw = await claude.messages.with_raw_response.create(model="tiny", max_tokens=8, messages=said)
        assert raw.headers.get("x-runnerd-source") == "up", plan
        assert [b.text for b in (await raw.parse()).content if b.type == "text"] == ["up"], plan
        events = await claude.messages.create(model="tiny", max_tokens=8, messages=said, stream=True)
        assert "".join([e.delta.text async for e in events if e.type == "content_block_delta"
                        and e.delta.type == "text_delta"]) == "up-1 up-2", plan
        answered = await gpt.responses.with_raw_response.create(model="tiny", input=text)
        assert answered.headers.get("x-runnerd-source") == "up", plan
        assert answered.parse().output_text == "up", plan
        streamed = await gpt.responses.create(model="tiny", input=text, stream=True)
        assert "".join([e.delta async for e in streamed if e.type == "response.output_text.delta"]) == \
            "up-1 up-2", plan
    assert await arrivals(front.http) == tried + 4 * len(SOME_FAILURES)
