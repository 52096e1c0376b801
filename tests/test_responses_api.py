"""OpenAI's Responses API through the daemon, with the unmodified `openai` SDK and a real llama-server.

Every test runs twice (tests/api_daemons.py): relayed to llama-server's own /v1/responses, and translated
through its chat completions. Stored responses are the daemon's either way.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.api_daemons import WEATHER_SCHEMA, api_daemon

__all__ = ["api_daemon"]  # the fixture

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                "parameters": WEATHER_SCHEMA}
ASK = "What is the capital of France? Answer in one word."
# SmolLM2 repeats the word when it has the first turn, and makes one up when it has not.
SECRET, QUESTION = "The secret word is banana.", "What is the secret word?"


def client(d: Any) -> openai.OpenAI:
    return d.openai("/v1")


def test_a_response_has_the_responses_shape(api_daemon):
    response = client(api_daemon).responses.create(model="smollm2", input=ASK, max_output_tokens=24, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == "smollm2:latest" and response.status in ("completed", "incomplete")
    assert "paris" in response.output_text.lower()
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.usage is not None and response.usage.input_tokens > 10 and 0 < response.usage.output_tokens <= 24
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_a_streamed_response_is_the_responses_event_sequence(api_daemon):
    with client(api_daemon).responses.stream(model="smollm2", input=ASK, max_output_tokens=24,
                                             temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta") < \
        kinds.index("response.output_text.done") < kinds.index("response.output_item.done")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and "paris" in deltas.lower()
    assert final.model == "smollm2:latest"


def test_previous_response_id_continues_the_conversation(api_daemon):
    c = client(api_daemon)
    first = c.responses.create(model="smollm2", input=SECRET, max_output_tokens=32, temperature=0)
    second = c.responses.create(model="smollm2", input=QUESTION, previous_response_id=first.id,
                                max_output_tokens=32, temperature=0)
    assert second.previous_response_id == first.id
    assert "banana" in second.output_text.lower()
    alone = c.responses.create(model="smollm2", input=QUESTION, max_output_tokens=32, temperature=0, store=False)
    assert "banana" not in alone.output_text.lower()
    assert first.usage is not None and second.usage is not None and alone.usage is not None
    # The second turn saw the first one's input and answer.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    # A response that was not stored cannot be continued.
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="smollm2", input="again", previous_response_id=alone.id, max_output_tokens=2)


def test_a_streamed_turn_can_be_continued_too(api_daemon):
    c = client(api_daemon)
    with c.responses.stream(model="smollm2", input=SECRET, max_output_tokens=32, temperature=0) as stream:
        first = stream.get_final_response()
    with c.responses.stream(model="smollm2", input=QUESTION, previous_response_id=first.id, max_output_tokens=32,
                            temperature=0) as stream:
        second = stream.get_final_response()
    assert "banana" in second.output_text.lower()


def test_stored_responses_can_be_read_listed_and_deleted(api_daemon):
    c = client(api_daemon)
    response = c.responses.create(model="tiny", input=[{"role": "user", "content": "hello"},
                                                       {"role": "user", "content": "world"}], max_output_tokens=2)
    again = c.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    items = c.responses.input_items.list(response.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["hello", "world"]  # type: ignore[union-attr]
    assert all(i.id for i in items.data)
    newest = c.responses.input_items.list(response.id, limit=1)
    assert [i.content[0].text for i in newest.data] == ["world"] and newest.has_more  # type: ignore[union-attr]
    c.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(response.id)


def test_tool_definitions_and_outputs_reach_the_engine(api_daemon):
    c = client(api_daemon)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]

    def prompt_tokens(**kw: Any) -> int:
        usage = c.responses.create(model="tools", max_output_tokens=1, **kw).usage
        assert usage is not None
        return usage.input_tokens

    bare = prompt_tokens(input=ask)
    with_tool = prompt_tokens(input=ask, tools=[WEATHER_TOOL])
    assert with_tool > bare + 20
    called = [*ask, {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                     "arguments": '{"city": "Paris"}'}]
    short = prompt_tokens(input=[*called, {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}],
                          tools=[WEATHER_TOOL])
    long = prompt_tokens(input=[*called, {"type": "function_call_output", "call_id": "call_1",
                                          "output": "Sunny and warm, 24 degrees, a light wind from the west"}],
                         tools=[WEATHER_TOOL])
    assert with_tool < short < long


def test_input_tokens_agree_with_the_engine_tokenizer(api_daemon):
    c = client(api_daemon)
    if api_daemon.path_kind == "translated":
        with pytest.raises(openai.APIStatusError) as err:
            c.responses.input_tokens.count(model="smollm2", input=ASK)
        assert err.value.status_code == 501
        return
    counted = c.responses.input_tokens.count(model="smollm2", input=ASK).input_tokens
    response = c.responses.create(model="smollm2", input=ASK, max_output_tokens=1)
    assert response.usage is not None and counted == response.usage.input_tokens
    first = c.responses.create(model="smollm2", input=SECRET, max_output_tokens=4)
    continued = c.responses.input_tokens.count(model="smollm2", input=ASK, previous_response_id=first.id)
    assert continued.input_tokens > counted  # the stored turn is counted too


def test_errors_are_in_the_openai_shape(api_daemon):
    c = client(api_daemon)
    with pytest.raises(openai.NotFoundError) as missing:
        c.responses.create(model="nope", input="hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as unknown_previous:
        c.responses.create(model="tiny", input="hi", previous_response_id="resp_nope")
    assert "resp_nope" in unknown_previous.value.message
    bad_item = api_daemon.post("/v1/responses", {"model": "tiny", "input": [{"type": "hologram"}]})
    assert bad_item.status_code == 400 and bad_item.json()["error"]["type"] == "invalid_request_error"
    too_large = api_daemon.http.post("/v1/responses", content=b'{"x": "' + b"a" * (11 << 20) + b'"}',
                                     headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413 and "error" in too_large.json()


def test_a_client_hanging_up_mid_stream_stops_the_engine(api_daemon):
    client(api_daemon).responses.create(model="smollm2", input="hi", max_output_tokens=1)
    runner = next(r for r in api_daemon.ps() if r["model"] == "smollm2:latest")
    engine = httpx.Client(transport=httpx.HTTPTransport(uds=runner["socket"]), base_url="http://engine")
    body = {"model": "smollm2", "input": "Count from 1 to 1000, one number per line.", "max_output_tokens": 2000,
            "stream": True, "temperature": 0}
    with api_daemon.http.stream("POST", "/v1/responses", json=body) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i == 16:
                assert any(s["is_processing"] for s in engine.get("/slots").json())
                break
    api_daemon.wait_for(lambda: not any(s["is_processing"] for s in engine.get("/slots").json()), timeout=5,
                        what="engine slot released")


def test_the_routes_are_counted_like_chat_completions(api_daemon):
    client(api_daemon).responses.create(model="tiny", input="hi", max_output_tokens=1)
    api_daemon.post("/v1/messages", {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
    text = api_daemon.http.get("/metrics").text
    counted = [line for line in text.splitlines() if line.startswith("runnerd_requests_total{")]
    for route in ("/v1/responses", "/v1/messages"):
        assert any(f'route="{route}"' in line and 'model="tiny:latest"' in line and 'status="200"' in line
                   for line in counted), route
