"""The pure Ollama <-> OpenAI mapping (runnerd.api.ollama.translate) and the CORS origin rules."""

from __future__ import annotations

import base64
import json

import pytest

from backends.base import OPENAI_SAMPLING
from backends.llamacpp import LlamaCppBackend
from backends.vllm import VllmBackend
from runnerd.api.cors import origin_allowed
from runnerd.api.ollama import translate as tr
from runnerd.config import DEFAULT_ALLOWED_ORIGINS
from runnerd.sse import error_text, parse_sse_line


def test_sampling_options_map_to_engine_fields():
    options = tr.OllamaOptions.model_validate({
        "num_ctx": 2048, "num_predict": 12, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7,
        "stop": "###", "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
        "mirostat": 2,  # unknown to the engine: ignored
    })
    assert tr.sampling_fields(options, LlamaCppBackend.sampling_dialect) == {
        "max_tokens": 12, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["###"],
        "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
    }
    # num_predict -1 (unlimited) and -2 (fill the context) set no limit.
    assert "max_tokens" not in tr.sampling_fields(tr.OllamaOptions(num_predict=-1), OPENAI_SAMPLING)
    assert tr.sampling_fields(None, OPENAI_SAMPLING) == {}


def test_llama_server_names_for_llama_cpp_models():
    options = tr.OllamaOptions(repeat_penalty=1.1, repeat_last_n=32, typical_p=0.7, num_keep=5, min_p=0.05)
    assert tr.sampling_fields(options, LlamaCppBackend.sampling_dialect) == {
        "repeat_penalty": 1.1, "repeat_last_n": 32, "typical_p": 0.7, "n_keep": 5, "min_p": 0.05}


def test_vllm_names_and_dropped_options(caplog):
    options = tr.OllamaOptions.model_validate({
        "num_predict": 8, "temperature": 0.2, "top_k": 40, "min_p": 0.05, "seed": 7, "stop": ["###"],
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "ignore_eos": True,
        "repeat_penalty": 1.1, "repeat_last_n": 32, "typical_p": 0.7, "num_keep": 5,
    })
    with caplog.at_level("DEBUG", logger="runnerd.ollama"):
        fields = tr.sampling_fields(options, VllmBackend.sampling_dialect)
    assert fields == {
        "max_tokens": 8, "temperature": 0.2, "top_k": 40, "min_p": 0.05, "seed": 7, "stop": ["###"],
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "ignore_eos": True, "repetition_penalty": 1.1,
    }
    # What vLLM cannot do is dropped, and the debug log says so.
    dropped = {r.getMessage().split()[1] for r in caplog.records}
    assert dropped == {"repeat_last_n", "typical_p", "num_keep"}


def test_format_and_think():
    assert tr.response_format("json") == {"type": "json_object"}
    assert tr.response_format("") is None and tr.response_format(None) is None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert tr.response_format(schema)["json_schema"]["schema"] == schema  # type: ignore[index]
    assert tr.thinking_fields(False) == {"chat_template_kwargs": {"enable_thinking": False}}
    assert tr.thinking_fields("high")["reasoning_effort"] == "high"
    with pytest.raises(tr.TranslationError):
        tr.thinking_fields("extreme")


def test_messages_images_and_tool_calls_both_ways():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n rest").decode()
    messages = [
        tr.OllamaMessage(role="user", content="what is this?", images=[png]),
        tr.OllamaMessage(role="assistant", content="", thinking="hmm", tool_calls=[
            tr.ToolCall(function=tr.ToolFunction(name="weather", arguments={"city": "Oslo"}))]),
        tr.OllamaMessage(role="tool", content="12 C", tool_name="weather"),
    ]
    out = tr.openai_messages(messages)
    assert out[0]["content"][1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    call = out[1]["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}
    assert out[1]["reasoning_content"] == "hmm"
    assert out[2]["tool_call_id"] == call["id"]
    with pytest.raises(tr.TranslationError):
        tr.openai_messages([tr.OllamaMessage(role="user", images=["not base64!"])])
    back = tr.ollama_tool_calls([{"function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}])
    assert back == [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]


def test_completion_turn_and_timings():
    body = {
        "choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": "hi",
                                                             "reasoning_content": "think"}}],
        "usage": {"prompt_tokens": 27, "completion_tokens": 3},
        "timings": {"prompt_n": 27, "prompt_ms": 1.5, "predicted_n": 3, "predicted_ms": 0.25},
    }
    turn = tr.turn_from_completion(body)
    out = tr.chat_final("m", turn, tr.Clock(), streamed=False)
    assert out["message"] == {"role": "assistant", "content": "hi", "thinking": "think"}
    assert out["done"] is True and out["done_reason"] == "length"
    assert (out["prompt_eval_count"], out["prompt_eval_duration"]) == (27, 1_500_000)
    assert (out["eval_count"], out["eval_duration"]) == (3, 250_000)
    assert out["total_duration"] >= out["load_duration"] >= 0


def test_timings_measured_when_the_engine_reports_none():
    # vLLM sends usage but no `timings`: the durations come from the clock's marks (nanoseconds).
    body = {"choices": [{"finish_reason": "stop", "message": {"content": "hi", "reasoning": "hmm"}}],
            "usage": {"prompt_tokens": 27, "completion_tokens": 3}}
    turn = tr.turn_from_completion(body)
    assert turn.thinking == "hmm"  # newer vLLM releases name it `reasoning`
    streamed = tr.generate_final("m", turn, tr.Clock(started=0, loaded=10, first_token=30, ended=100), streamed=True)
    assert (streamed["total_duration"], streamed["load_duration"]) == (100, 10)
    assert (streamed["prompt_eval_count"], streamed["prompt_eval_duration"]) == (27, 20)
    assert (streamed["eval_count"], streamed["eval_duration"]) == (3, 70)
    # Not streamed: no first-token mark, so all the engine's time counts as generation.
    whole = tr.generate_final("m", turn, tr.Clock(started=0, loaded=10, ended=100), streamed=False)
    assert (whole["prompt_eval_duration"], whole["eval_duration"]) == (0, 90)
    # Engine timings, when present, win over the measurement.
    timed = tr.timing_fields(None, {"prompt_ms": 1.0, "predicted_ms": 2.0}, tr.Clock(started=0, ended=100))
    assert (timed["prompt_eval_duration"], timed["eval_duration"]) == (1_000_000, 2_000_000)


def test_clock_first_token_mark_is_kept():
    clock = tr.Clock()
    clock.mark_first_token()
    first = clock.first_token
    clock.mark_first_token()
    assert clock.first_token == first
    assert clock.durations()["total_duration"] == clock.end() - clock.started  # the end is fixed once


def test_stream_chunks_join_tool_call_fragments():
    turn = tr.Turn()
    tr.absorb_chunk(turn, {"choices": [{"delta": {"content": "a", "reasoning_content": "r"}}]})
    for piece in ('{"ci', 'ty": "Oslo"}'):
        tr.absorb_chunk(turn, {"choices": [{"delta": {"tool_calls": [
            {"index": 0, "function": {"name": "weather" if piece.startswith("{") else "", "arguments": piece}}]}}]})
    tr.absorb_chunk(turn, {"choices": [{"finish_reason": "tool_calls", "delta": {}}]})
    tr.absorb_chunk(turn, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9},
                           "timings": {"predicted_ms": 2.0}})
    calls = tr.chat_tool_part("m", turn)
    assert calls is not None and calls["done"] is False
    assert calls["message"]["tool_calls"] == [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    final = tr.chat_final("m", turn, tr.Clock(), streamed=True)
    assert final["message"] == {"role": "assistant", "content": ""}  # the parts carried the message
    assert final["done_reason"] == "stop" and final["eval_count"] == 9
    assert turn.content == "a" and turn.thinking == "r"


def test_sse_lines_and_errors():
    assert parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_sse_line(b"data: [DONE]\n") == "done"
    assert parse_sse_line(b'error: {"code": 500, "message": "boom"}') == {"error": {"code": 500, "message": "boom"}}
    assert parse_sse_line(b"\n") is None and parse_sse_line(b": comment") is None
    assert error_text({"error": {"message": "boom", "code": 400}}) == "boom"
    assert error_text({"error": "plain"}) == "plain"


def test_embeddings_order_and_dimensions():
    body = {"data": [{"index": 1, "embedding": [0.0, 3.0, 4.0]}, {"index": 0, "embedding": [1.0, 0.0, 0.0]}]}
    assert tr.embeddings_from(body) == [[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]]
    assert tr.embeddings_from(body, dimensions=2) == [[1.0, 0.0], [0.0, 1.0]]


def test_parameter_size():
    assert tr.parameter_size(268_098_176) == "268.10M"
    assert tr.parameter_size(7_615_616_512) == "7.6B"


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://localhost", True),
    ("http://localhost:5173", True),
    ("https://127.0.0.1:8443", True),
    ("http://[::1]:3000", True),
    ("app://obsidian.md", True),
    ("tauri://localhost", True),
    ("null", False),
    ("http://localhost.evil.example", False),
    ("https://evil.example", False),
    ("http://user@localhost", False),
    ("http://localhost:99999", False),
])
def test_default_origins(origin, allowed):
    assert origin_allowed(origin, list(DEFAULT_ALLOWED_ORIGINS)) is allowed


def test_origin_patterns_with_ports_and_wildcards():
    assert origin_allowed("https://chat.example:8443", ["https://chat.example:8443"])
    assert not origin_allowed("https://chat.example:9000", ["https://chat.example:8443"])
    assert origin_allowed("https://anything.example", ["*"])
    assert not origin_allowed("https://anything.example", [])
