"""The Messages and Responses translations of chat completion answers, checked by the SDKs' own stream
accumulators (the code that turns events into the final message a client sees).

The chunk sequences are llama-server's shapes for a tool call and for a reasoning model; no model that
runs here makes a tool call on its own, so these are the place where a tool call comes back through
each translation.
"""

from __future__ import annotations

import json
from typing import Any

from anthropic._models import construct_type as anthropic_construct
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai import omit
from openai._models import construct_type as openai_construct
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from runnerd.api.anthropic import translate as messages
from runnerd.api.chat_pieces import PieceReader, answer_from_completion
from runnerd.api.responses import translate as responses
from runnerd.api.responses.schema import ResponsesRequest


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def tool_delta(index: int, arguments: str, *, call_id: str = "", name: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


TOOL_CALL_STREAM = [
    chunk({"role": "assistant", "content": None}),
    chunk({"content": "Let me check."}),
    chunk(tool_delta(0, "", call_id="call_a", name="get_weather")),
    chunk(tool_delta(0, '{"city": ')),
    chunk(tool_delta(0, '"Paris"}')),
    chunk(tool_delta(1, '{"city": "Rome"}', call_id="call_b", name="get_weather")),
    chunk({}, "tool_calls"),
    {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 21}},
]

REASONING_STREAM = [
    chunk({"reasoning_content": "The user "}),
    chunk({"reasoning_content": "wants a word."}),
    chunk({"content": "Paris"}),
    chunk({}, "stop"),
]


def sse(raw: bytes) -> list[dict[str, Any]]:
    """The data of each event, checking that every event's name is its type."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        events.append(payload)
    return events


def anthropic_final(chunks: list[dict[str, Any]]) -> Any:
    stream, reader = messages.MessageStream("m:latest"), PieceReader()
    raw = stream.start() + b"".join(stream.changes(reader.feed(c)) for c in chunks) + stream.finish(reader.answer)
    snapshot, buffers = None, {}
    for event in sse(raw):
        if event["type"] == "ping":
            continue
        typed = anthropic_construct(type_=RawMessageStreamEvent, value=event)
        snapshot = accumulate_event(event=typed, current_snapshot=snapshot, json_bufs=buffers)
    return snapshot


def responses_final(chunks: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    req = ResponsesRequest(model="m", input="hi")
    stream, reader = responses.ResponseStream(req, "m:latest"), PieceReader()
    raw = stream.start() + b"".join(stream.changes(reader.feed(c)) for c in chunks) + stream.finish(reader.answer)
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    final = None
    events = sse(raw)
    for event in events:
        for handled in state.handle_event(openai_construct(type_=ResponseStreamEvent, value=event)):
            if handled.type == "response.completed":
                final = handled.response
    return final, events


def test_a_streamed_tool_call_becomes_tool_use_blocks():
    final = anthropic_final(TOOL_CALL_STREAM)
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Let me check."
    assert (final.content[1].id, final.content[1].name, final.content[1].input) == \
        ("call_a", "get_weather", {"city": "Paris"})
    assert final.content[2].input == {"city": "Rome"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 21


def test_a_streamed_tool_call_becomes_function_call_items():
    final, events = responses_final(TOOL_CALL_STREAM)
    assert [i.type for i in final.output] == ["message", "function_call", "function_call"]
    call = final.output[1]
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_a", "get_weather", {"city": "Paris"})
    assert final.output[2].arguments == '{"city": "Rome"}'
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert final.usage.input_tokens == 40 and final.usage.total_tokens == 61


def test_reasoning_comes_first_as_thinking_and_reasoning():
    final = anthropic_final(REASONING_STREAM)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == \
        [("thinking", "The user wants a word."), ("text", "Paris")]
    final_response, _ = responses_final(REASONING_STREAM)
    assert [i.type for i in final_response.output] == ["reasoning", "message"]
    assert final_response.output_text == "Paris"


def test_a_whole_completion_with_tool_calls():
    completion = {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    answer = answer_from_completion(completion)
    message = messages.message(answer, "m:latest", "msg_1")
    assert message["content"] == [{"type": "tool_use", "id": "call_a", "name": "get_weather",
                                   "input": {"city": "Paris"}}]
    assert message["stop_reason"] == "tool_use"
    response = responses.from_answer(ResponsesRequest(model="m", input="hi"), "m:latest", answer)
    assert [(i["type"], i["name"], i["arguments"]) for i in response["output"]] == \
        [("function_call", "get_weather", '{"city":"Paris"}')]
    assert response["status"] == "completed"


def test_a_cut_answer_is_max_tokens_and_incomplete():
    answer = answer_from_completion({"choices": [{"finish_reason": "length", "message": {"content": "Par"}}]})
    assert messages.message(answer, "m", "msg_1")["stop_reason"] == "max_tokens"
    response = responses.from_answer(ResponsesRequest(model="m", input="hi"), "m", answer)
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_conversation_becomes_chat_messages():
    req = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "Noon"}]},
        {"type": "reasoning", "summary": []},
        {"role": "developer", "content": "Use Celsius."}]})
    chat = responses.chat_messages(req.instructions, list(req.input))  # type: ignore[arg-type]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "tool", "system"]
    assert [c["id"] for c in chat[2]["tool_calls"]] == ["c1", "c2"]  # consecutive calls are one turn
    assert chat[4]["content"] == "Noon"


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                                    max_size=4), max_leaves=12)
CHUNK = st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({
    "delta": st.dictionaries(st.sampled_from(["content", "reasoning_content", "tool_calls", "role"]), JSONISH,
                             max_size=3),
    "finish_reason": st.none() | st.sampled_from(["stop", "length", "tool_calls"])}), max_size=2)}) | \
    st.dictionaries(st.text(max_size=10), JSONISH, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(CHUNK, max_size=8))
@example([{"choices": [{"delta": {"tool_calls": 1}, "finish_reason": None}]}])  # once crashed the reader
# A tool call interrupted by text and resumed once gave two output items one call_id.
@example([{"choices": [{"delta": {"content": None, "reasoning_content": None, "tool_calls": [{}]},
                        "finish_reason": None}]},
          {"choices": [{"delta": {"content": "0"}, "finish_reason": None}]},
          {"choices": [{"delta": {"tool_calls": [{}]}, "finish_reason": None}]}])
def test_whatever_an_engine_streams_the_translations_end_well_formed(chunks):
    final = anthropic_final(chunks)
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use", "refusal")
    response, events = responses_final(chunks)
    assert response is not None or events[-1]["type"] == "response.incomplete"
