"""Pure mapping between Ollama's API and the OpenAI API the engines speak (no I/O here).

Requests: an Ollama chat/generate/embed body becomes an OpenAI body for the engine
(`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`); sampling options take the names of the
engine that serves the model (its backend's sampling dialect). Responses: an OpenAI answer (or its stream of SSE
chunks) becomes Ollama's objects: `message`/`response`, `thinking`, `tool_calls` with arguments as
objects, `done`, `done_reason`, and the timing fields in nanoseconds, taken from the engine's own
`timings` object or, for an engine without one, measured here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("runnerd.ollama")

class TranslationError(ValueError):
    """The request cannot be expressed for the engine; the message says which field and why."""


class OllamaOptions(BaseModel):
    """The `options` object. Unknown keys are ignored, as Ollama ignores options a runner lacks."""

    model_config = ConfigDict(extra="ignore")

    num_ctx: int | None = Field(default=None, gt=0, le=1 << 24)
    # -1: no limit, -2: fill the context; more than a million tokens is no answer any model gives.
    num_predict: int | None = Field(default=None, ge=-2, le=1 << 20)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_keep: int | None = None
    # Not an Ollama option: an engine switch, passed through so callers (and tests on models with
    # random weights) can get exactly num_predict tokens.
    ignore_eos: bool | None = None


# Options with the same name and meaning in the OpenAI-compatible body of the engines (some take top_k,
# min_p, seed and ignore_eos as extra sampling parameters).
_SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
              "ignore_eos")
# Options whose name in the engine's body depends on the engine: its sampling dialect maps them.
_DIALECT_OPTIONS = ("repeat_penalty", "repeat_last_n", "typical_p", "num_keep")


def sampling_fields(options: OllamaOptions | None, dialect: Mapping[str, str]) -> dict[str, Any]:
    """The OpenAI body fields for the sampling options, named as the serving engine's `dialect` says
    (an option the dialect lacks is dropped, as Ollama ignores options a runner lacks). num_ctx is a
    load option: not here."""
    if options is None:
        return {}
    out: dict[str, Any] = {name: getattr(options, name) for name in _SAME_NAME if getattr(options, name) is not None}
    for option in _DIALECT_OPTIONS:
        value = getattr(options, option)
        if value is None:
            continue
        if option in dialect:
            out[dialect[option]] = value
        else:
            log.debug("option %s has no equivalent in the serving engine: ignored", option)
    # Ollama: -1 = no limit, -2 = fill the context; both mean "no max_tokens" for the engine.
    if options.num_predict is not None and options.num_predict >= 0:
        out["max_tokens"] = options.num_predict
    if options.stop is not None:
        out["stop"] = [options.stop] if isinstance(options.stop, str) else options.stop
    return out


Format = Literal["", "json"] | dict[str, Any] | None


def response_format(fmt: Format) -> dict[str, Any] | None:
    """`format: "json"` -> JSON mode; a JSON schema object -> schema-constrained output."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt, "strict": True}}
    raise TranslationError(f"format must be \"json\" or a JSON schema object, not {fmt!r}")


def thinking_fields(think: bool | str | None) -> dict[str, Any]:
    """`think`: a boolean toggles the chat template's thinking switch; a level is an effort."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if think in ("low", "medium", "high"):
        return {"reasoning_effort": think, "chat_template_kwargs": {"enable_thinking": True}}
    raise TranslationError(f"think must be true, false, \"low\", \"medium\" or \"high\", not {think!r}")


def image_url(data: str) -> dict[str, Any]:
    """An Ollama image (base64, no header) as an OpenAI image part with a data URL."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TranslationError("images must be base64-encoded image files") from exc
    return {"type": "image_url", "image_url": {"url": f"data:{_image_mime(raw)};base64,{data}"}}


def _image_mime(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return "image/png"
    if raw.startswith(b"GIF8"):
        return "image/gif"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"  # the engine sniffs the bytes itself; the label only has to be an image type


class ToolFunction(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    function: ToolFunction


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


def openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama messages -> OpenAI messages: images become content parts, tool calls get ids (OpenAI
    links a tool result to its call by id; Ollama by function name), thinking goes back as reasoning."""
    out: list[dict[str, Any]] = []
    call_ids: dict[str, str] = {}  # function name -> id of its latest call
    for n, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role}
        if m.images:
            msg["content"] = [{"type": "text", "text": m.content}, *(image_url(i) for i in m.images)]
        else:
            msg["content"] = m.content
        if m.thinking and m.role == "assistant":
            msg["reasoning_content"] = m.thinking
        if m.tool_calls:
            calls = []
            for i, call in enumerate(m.tool_calls):
                call_id = f"call_{n}_{i}"
                call_ids[call.function.name] = call_id
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.function.name,
                                           "arguments": json.dumps(call.function.arguments)}})
            msg["tool_calls"] = calls
        if m.role == "tool":
            name = m.tool_name
            if name is not None:
                msg["name"] = name
            msg["tool_call_id"] = call_ids.get(name or "", f"call_{n}")
        out.append(msg)
    return out


def ollama_tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI tool calls (arguments as a JSON string) -> Ollama's (arguments as an object)."""
    if not calls:
        return None
    out = []
    for call in calls:
        function = call.get("function") or {}
        raw = function.get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            arguments = {"_raw": raw}  # the model wrote something that is not JSON: keep it visible
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


def done_reason(finish_reason: str | None) -> str:
    # Ollama ends a turn that called tools with "stop" too; "length" is the only other reason it gives.
    return "length" if finish_reason == "length" else "stop"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Clock:
    """Wall-clock marks of one request (perf_counter nanoseconds), for total_duration and load_duration,
    and for the eval durations of an engine that does not report its own."""

    started: int = field(default_factory=time.perf_counter_ns)
    loaded: int | None = None
    first_token: int | None = None
    ended: int | None = None

    def mark_loaded(self) -> None:
        self.loaded = time.perf_counter_ns()

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter_ns()

    def end(self) -> int:
        """The end of the request, fixed at the first call so that every duration agrees."""
        if self.ended is None:
            self.ended = time.perf_counter_ns()
        return self.ended

    def durations(self) -> dict[str, int]:
        return {"total_duration": self.end() - self.started,
                "load_duration": (self.loaded or self.started) - self.started}

    def measured_eval(self) -> dict[str, int]:
        """prompt_eval_duration and eval_duration from the marks: the prompt is evaluated from the load
        to the first token, the rest is generation. An answer not streamed has no first-token mark: all
        of its engine time is counted as generation (clients divide eval_count by eval_duration)."""
        loaded = self.loaded or self.started
        first = self.first_token if self.first_token is not None else loaded
        return {"prompt_eval_duration": first - loaded, "eval_duration": self.end() - first}


def timing_fields(usage: dict[str, Any] | None, timings: dict[str, Any] | None,
                  clock: Clock | None = None) -> dict[str, int]:
    """prompt_eval_* and eval_* from the engine's counts and `timings` (milliseconds -> nanoseconds).
    Durations the engine did not report (not every engine sends `timings`) are measured with `clock`."""
    usage = usage or {}
    timings = timings or {}
    out: dict[str, int] = {}
    prompt = usage.get("prompt_tokens", timings.get("prompt_n"))
    generated = usage.get("completion_tokens", timings.get("predicted_n"))
    if isinstance(prompt, int):
        out["prompt_eval_count"] = prompt
    if isinstance(timings.get("prompt_ms"), int | float):
        out["prompt_eval_duration"] = round(timings["prompt_ms"] * 1e6)
    if isinstance(generated, int):
        out["eval_count"] = generated
    if isinstance(timings.get("predicted_ms"), int | float):
        out["eval_duration"] = round(timings["predicted_ms"] * 1e6)
    if clock is not None:
        for name, value in clock.measured_eval().items():
            out.setdefault(name, value)
    return out


@dataclass
class Turn:
    """What an engine answered for one chat or generate request, gathered from one body or a stream."""

    content: str = ""
    thinking: str = ""
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None

    def calls(self) -> list[dict[str, Any]] | None:
        return ollama_tool_calls([self.tool_calls[i] for i in sorted(self.tool_calls)])


def turn_from_completion(body: dict[str, Any]) -> Turn:
    """A whole (non-streamed) chat or text completion."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    turn = Turn(content=message.get("content") or choice.get("text") or "",
                thinking=_reasoning(message), finish_reason=choice.get("finish_reason"),
                usage=body.get("usage"), timings=body.get("timings"))
    for i, call in enumerate(message.get("tool_calls") or []):
        turn.tool_calls[i] = call
    return turn


def _reasoning(message: dict[str, Any]) -> str:
    # Engines call it reasoning_content or (newer ones) reasoning.
    return message.get("reasoning_content") or message.get("reasoning") or ""


@dataclass
class Delta:
    content: str = ""
    thinking: str = ""


def absorb_chunk(turn: Turn, chunk: dict[str, Any]) -> Delta:
    """Fold one streamed chunk into `turn`; return the text it added. Tool-call fragments are joined
    (the engine streams arguments piecewise; Ollama sends each call whole)."""
    if chunk.get("usage"):
        turn.usage = chunk["usage"]
    if chunk.get("timings"):
        turn.timings = chunk["timings"]
    delta = Delta()
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            turn.finish_reason = choice["finish_reason"]
        d = choice.get("delta") or {}
        text = d.get("content") or choice.get("text") or ""
        delta.content += text
        delta.thinking += _reasoning(d)
        for piece in d.get("tool_calls") or []:
            slot = turn.tool_calls.setdefault(piece.get("index", 0), {"function": {"name": "", "arguments": ""}})
            function = piece.get("function") or {}
            slot["function"]["name"] += function.get("name") or ""
            slot["function"]["arguments"] += function.get("arguments") or ""
    turn.content += delta.content
    turn.thinking += delta.thinking
    return delta


def chat_message(content: str, thinking: str = "", tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_part(model: str, delta: Delta) -> dict[str, Any]:
    return {"model": model, "created_at": now_iso(), "message": chat_message(delta.content, delta.thinking),
            "done": False}


def generate_part(model: str, delta: Delta) -> dict[str, Any]:
    part: dict[str, Any] = {"model": model, "created_at": now_iso(), "response": delta.content, "done": False}
    if delta.thinking:
        part["thinking"] = delta.thinking
    return part


def final_fields(turn: Turn, clock: Clock) -> dict[str, Any]:
    return {"done": True, "done_reason": done_reason(turn.finish_reason), **clock.durations(),
            **timing_fields(turn.usage, turn.timings, clock)}


def chat_tool_part(model: str, turn: Turn) -> dict[str, Any] | None:
    """In a stream, the tool calls go whole in one part of their own, once the engine has sent all
    their fragments (clients take tool calls from any part, not only from the last one)."""
    calls = turn.calls()
    if not calls:
        return None
    return {"model": model, "created_at": now_iso(), "message": chat_message("", tool_calls=calls), "done": False}


def chat_final(model: str, turn: Turn, clock: Clock, *, streamed: bool) -> dict[str, Any]:
    """The last object: the whole message when not streamed; when streamed, an empty message (the
    parts carried it)."""
    message = chat_message("") if streamed else chat_message(turn.content, turn.thinking, turn.calls())
    return {"model": model, "created_at": now_iso(), "message": message, **final_fields(turn, clock)}


def generate_final(model: str, turn: Turn, clock: Clock, *, streamed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "created_at": now_iso(), "response": "" if streamed else turn.content}
    if turn.thinking and not streamed:
        out["thinking"] = turn.thinking
    return {**out, **final_fields(turn, clock)}


def load_answer(model: str, *, chat: bool, unloaded: bool) -> dict[str, Any]:
    """Answer to an empty generate/chat, which only loads (or, with keep_alive 0, unloads) the model."""
    out: dict[str, Any] = {"model": model, "created_at": now_iso()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return {**out, "done": True, "done_reason": "unload" if unloaded else "load"}


def embeddings_from(body: dict[str, Any], dimensions: int | None = None) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer, in input order; cut to `dimensions` and re-normalised
    (what a shorter embedding means for models trained for it)."""
    data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
    vectors: list[list[float]] = [list(d.get("embedding") or []) for d in data]
    if dimensions is None:
        return vectors
    cut = []
    for v in vectors:
        short = v[:dimensions]
        norm = math.sqrt(sum(x * x for x in short))
        cut.append([x / norm for x in short] if norm > 0 else short)
    return cut


def parameter_size(count: int) -> str:
    """A parameter count the way Ollama shows it: 268.10M, 7.6B."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.2f}K"
    return str(count)
