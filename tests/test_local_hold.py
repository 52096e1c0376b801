"""A local model's answer is held until its engine's first body bytes when an upstream could still serve it.

The local engine is tests/standin_engine.py and the upstream tests/standin_upstream.py, both stand-ins
(real processes or servers on real sockets) that fail before their first body byte on demand, which real
engines do only by accident. The clients are the real `openai` package.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest

from tests.standin_upstream import StandinUpstream
from tests.test_engine_silence import arrivals, standin_daemon

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def front(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[httpx.AsyncClient, openai.AsyncOpenAI]]:
    """A daemon whose local model `tiny` runs on the stand-in engine, with an upstream that hosts `tiny` too."""
    upstream = StandinUpstream("up", "answer", ["tiny"])
    try:
        spec = {"name": "up", "kind": "openai", "base_url": upstream.base_url, "priority": 10}
        async with standin_daemon(tmp_path, tiny_model, upstreams=[spec]) as client:
            with anyio.fail_after(30):  # the first poll of the upstream's model list runs beside start-up
                while (await client.get("/engines/status", params={"upstreams": "1"})).json()["upstreams"]["up"][
                        "models"] != ["tiny"]:
                    await anyio.sleep(0.05)
            yield client, openai.AsyncOpenAI(base_url="http://runnerd/v1", api_key="unused", max_retries=0,
                                             http_client=client)
    finally:
        upstream.close()


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
async def test_a_local_engine_that_fails_before_its_first_byte_is_passed_over_whole(front: Any) -> None:
    http, client = front
    # A healthy local engine answers itself, streamed and not, through the hold.
    assert await _whole(client, {}) == (None, "done")
    assert await _streamed(client, {"events": 3}) == (None, ["t0 ", "t1 ", "t2 "])
    tried = await arrivals(http)
    for plan in ({"status": 500}, {"status": 503}, {"drop": True}, {"cut": True}):
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
