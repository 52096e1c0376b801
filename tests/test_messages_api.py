"""Anthropic's Messages API through the daemon, with the unmodified `anthropic` SDK and a real llama-server.

Every test runs twice (tests/api_daemons.py): relayed to llama-server's own /v1/messages, and translated
through its chat completions, so both paths answer the same client the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.api_daemons import WEATHER_SCHEMA, anthropic_client, api_daemon

WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA}
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


__all__ = ["api_daemon"]  # the fixture


client = anthropic_client


def sse_events(resp: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], ""
    for line in resp.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def test_a_message_is_answered_in_the_messages_shape(api_daemon):
    message = client(api_daemon).messages.create(model="smollm2", max_tokens=24, messages=ASK,
                                                 extra_body={"temperature": 0})
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith(("msg_", "chatcmpl-")) and message.model == "smollm2:latest"
    assert [b.type for b in message.content] == ["text"]
    assert "paris" in message.content[0].text.lower()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 10
    assert 0 < message.usage.output_tokens <= 24


def test_the_prefixed_routes_answer_too(api_daemon):
    for prefix in ("/anthropic", "/engines", "/engines/llama.cpp"):
        message = client(api_daemon, prefix).messages.create(model="tiny", max_tokens=2, messages=ASK)
        assert message.content and message.content[0].type == "text", prefix


def test_a_streamed_message_is_the_messages_event_sequence(api_daemon):
    with client(api_daemon).messages.stream(model="smollm2", max_tokens=24, messages=ASK,
                                            extra_body={"temperature": 0}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert kinds.index("content_block_start") < kinds.index("content_block_delta") < kinds.index("content_block_stop")
    assert "paris" in final.content[0].text.lower()
    assert final.model == "smollm2:latest" and final.usage.output_tokens > 0


def test_the_raw_stream_has_a_ping_and_named_events(api_daemon):
    body = {"model": "tiny", "max_tokens": 3, "messages": ASK, "stream": True}
    api_daemon.post("/v1/messages", {**body, "stream": False})
    # The same prompt again: llama-server, finding all of it in its cache, sends no message_start itself.
    with api_daemon.http.stream("POST", "/v1/messages", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert all(name == data["type"] for name, data in events)
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    assert events[0][1]["message"]["model"] == "tiny:latest"
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn") and delta["usage"]["output_tokens"] > 0


def test_tool_definitions_and_results_reach_the_engine(api_daemon):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    c = client(api_daemon)

    def prompt_tokens(**kw: Any) -> int:
        usage = c.messages.create(model="tools", max_tokens=1, **kw).usage
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)

    bare = prompt_tokens(messages=ask)
    with_tool = prompt_tokens(messages=ask, tools=[WEATHER_TOOL])
    assert with_tool > bare + 20  # the definition was rendered into the prompt
    called = [*ask, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                       "input": {"city": "Paris"}}]}]

    def answered(result: str) -> list[dict[str, Any]]:
        return [*called, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                       "content": result}]}]

    short = prompt_tokens(messages=answered("Sunny"), tools=[WEATHER_TOOL])
    long = prompt_tokens(messages=answered("Sunny and warm, 24 degrees, a light wind from the west"),
                         tools=[WEATHER_TOOL])
    assert with_tool < short < long  # the call and its result are in the conversation the engine saw


def test_a_tool_result_continues_the_conversation(api_daemon):
    turns = [{"role": "user", "content": "What is the weather in Paris?"},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                "input": {"city": "Paris"}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                           "content": "Sunny, 24 degrees"}]}]
    message = client(api_daemon).messages.create(model="smollm2", max_tokens=32, messages=turns,
                                                 tools=[WEATHER_TOOL], extra_body={"temperature": 0})
    assert message.content and message.content[0].type == "text"
    assert message.content[0].text.strip()


def test_count_tokens_agrees_with_the_engine_tokenizer(api_daemon):
    if api_daemon.path_kind == "translated":  # type: ignore[attr-defined]
        with pytest.raises(anthropic.APIStatusError) as err:
            client(api_daemon).messages.count_tokens(model="smollm2", messages=ASK)
        assert err.value.status_code == 501
        assert err.value.body["error"]["type"] == "api_error" and "count" in err.value.body["error"]["message"]
        return
    counted = client(api_daemon).messages.count_tokens(model="smollm2", messages=ASK).input_tokens
    chat = api_daemon.openai().chat.completions.create(model="smollm2", messages=ASK, max_tokens=1)
    assert chat.usage is not None and counted == chat.usage.prompt_tokens
    bare = client(api_daemon).messages.count_tokens(model="tools", messages=ASK).input_tokens
    with_tools = client(api_daemon).messages.count_tokens(model="tools", messages=ASK, tools=[WEATHER_TOOL])
    assert with_tools.input_tokens > bare + 20  # the tool definitions reached the engine's template


def test_errors_are_in_anthropics_shape(api_daemon):
    c = client(api_daemon)
    with pytest.raises(anthropic.NotFoundError) as missing:
        c.messages.create(model="nope", max_tokens=4, messages=ASK)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    no_max = api_daemon.post("/v1/messages", {"model": "tiny", "messages": ASK})
    assert no_max.status_code == 400 and no_max.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in no_max.json()["error"]["message"]
    bad_block = api_daemon.post("/v1/messages", {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "hologram"}]}]})
    assert bad_block.status_code == 400 and bad_block.json()["type"] == "error"
    too_large = api_daemon.http.post("/anthropic/v1/messages", content=b'{"x": "' + b"a" * (11 << 20) + b'"}',
                                     headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "request_too_large"


def test_a_client_hanging_up_mid_stream_stops_the_engine(api_daemon):
    client(api_daemon).messages.create(model="smollm2", max_tokens=1, messages=ASK)
    runner = next(r for r in api_daemon.ps() if r["model"] == "smollm2:latest")
    engine = httpx.Client(transport=httpx.HTTPTransport(uds=runner["socket"]), base_url="http://engine")
    # A long, deterministic answer: the engine is still generating when the client goes.
    count = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    body = {"model": "smollm2", "max_tokens": 2000, "messages": count, "stream": True, "temperature": 0}
    with api_daemon.http.stream("POST", "/v1/messages", json=body) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i == 12:
                assert any(s["is_processing"] for s in engine.get("/slots").json())
                break
    api_daemon.wait_for(lambda: not any(s["is_processing"] for s in engine.get("/slots").json()), timeout=5,
                        what="engine slot released")


def test_over_tcp_the_sdks_authenticate_their_own_way(make_daemon, tiny_model, tmp_path):
    """Claude Code and the anthropic SDK send the key as x-api-key, the openai SDK as a bearer token."""
    token = tmp_path / "token"
    token.write_text("s3cret-for-agents\n")
    d = make_daemon({"tiny": tiny_model}, args=["--listen", "127.0.0.1:0", "--token-file", str(token)])
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    url = f"http://127.0.0.1:{port.group(1)}"
    claude = anthropic.Anthropic(base_url=url, api_key="s3cret-for-agents", max_retries=0)
    message = claude.messages.create(model="tiny", max_tokens=2, messages=ASK)
    assert message.type == "message" and message.usage.output_tokens > 0
    response = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-for-agents", max_retries=0).responses.create(
        model="tiny", input="hi", max_output_tokens=2)
    assert response.status in ("completed", "incomplete")
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=ASK)
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "authentication_error"
