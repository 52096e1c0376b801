"""How the Messages and Responses routes fail: a capability the engine lacks, and a stream the engine
breaks, each in the API's own shape. The engine is tests/standin_engine.py (a stand-in that can stall a
stream on demand, which real engines do only by accident); it serves only chat completions, so these
requests take the translation path."""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import app_on_socket
from tests.test_engine_silence import StandInBackend

HI = [{"role": "user", "content": "hi"}]
TOOL_MESSAGES = {"name": "t", "input_schema": {"type": "object"}}
TOOL_RESPONSES = {"type": "function", "name": "t", "parameters": {"type": "object"}}


async def named_events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    seen, name = [], ""
    async with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                seen.append((name, json.loads(line[6:])))
    return seen


@pytest.mark.anyio
async def test_a_capability_the_engine_lacks_is_501_in_each_apis_shape(tmp_path, tiny_model):
    async with app_on_socket(tmp_path, {"standin": StandInBackend()}, {"tiny": tiny_model}) as client:
        messages = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 4, "messages": HI,
                                                           "tools": [TOOL_MESSAGES]})
        responses = await client.post("/v1/responses", json={"model": "tiny", "input": "hi",
                                                             "tools": [TOOL_RESPONSES]})
    assert messages.status_code == 501 and messages.json()["type"] == "error"
    assert messages.json()["error"]["type"] == "api_error" and "tools" in messages.json()["error"]["message"]
    assert responses.status_code == 501 and responses.json()["error"]["code"] == "capability_not_supported"


@pytest.mark.anyio
async def test_a_stream_the_engine_breaks_ends_with_the_apis_error_event(tmp_path, tiny_model):
    async with app_on_socket(tmp_path, {"standin": StandInBackend()}, {"tiny": tiny_model},
                             engine_idle_timeout=1) as client:
        stalled = {"silent_after": 2}
        messages = await named_events(client, "/v1/messages", {"model": "tiny", "max_tokens": 50, "messages": HI,
                                                               "stream": True, "standin": stalled})
        responses = await named_events(client, "/v1/responses", {"model": "tiny", "input": "hi", "stream": True,
                                                                 "standin": stalled})
    assert [n for n, _ in messages][:2] == ["message_start", "ping"]
    assert "content_block_delta" in [n for n, _ in messages]
    name, error = messages[-1]
    assert name == "error" and error["type"] == "error" and "stopped answering" in error["error"]["message"]
    assert [n for n, _ in responses][-2:] == ["error", "response.failed"]
    failed = responses[-1][1]["response"]
    assert failed["status"] == "failed" and "stopped answering" in failed["error"]["message"]
    assert "response.output_text.delta" in [n for n, _ in responses]
