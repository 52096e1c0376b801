"""Anthropic Messages to and from an engine's chat completions, for engines that do not serve the
Messages API themselves: the request becomes a chat completion body, the answer (whole or streamed)
becomes a Message or its event sequence."""

from __future__ import annotations

import json
import secrets
from typing import Any

from backends.base import SamplingDialect
from runnerd.api.anthropic.schema import (
    ContentBlock,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)
from runnerd.api.chat_pieces import Appended, Change, ChatAnswer, Piece, PieceKind, Started, Usage
from runnerd.api.leased import extra_fields, sampling, sse_event

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def _image_part(block: ImageBlock) -> dict[str, Any]:
    source = block.source
    url = source.url if source.type == "url" else f"data:{source.media_type};base64,{source.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(block: ToolResultBlock) -> str:
    if isinstance(block.content, str):
        text = block.content
    else:
        text = "\n".join(b.text for b in block.content if isinstance(b, TextBlock))
    return f"Error: {text}" if block.is_error else text


def _user_messages(blocks: list[ContentBlock]) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (first, answering the assistant's calls); the rest one user turn."""
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_result_text(block)})
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block))
    if parts:
        text_only = all(p["type"] == "text" for p in parts)
        content: Any = "\n".join(p["text"] for p in parts) if text_only else parts
        messages.append({"role": "user", "content": content})
    return messages


def _assistant_message(blocks: list[ContentBlock]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(b.text for b in blocks if isinstance(b, TextBlock))}
    reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(system: str | list[TextBlock] | None, messages: list[InputMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system:
        text = system if isinstance(system, str) else "\n".join(b.text for b in system)
        out.append({"role": "system", "content": text})
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out.extend(_user_messages(message.content))
        else:
            out.append(_assistant_message([b for b in message.content if not isinstance(b, RedactedThinkingBlock)]))
    return out


def _tool_choice(choice: ToolChoice) -> Any:
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name or ""}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def chat_body(req: MessagesRequest, model: str, dialect: SamplingDialect) -> dict[str, Any]:
    """The chat-completion request for `model` on an engine whose option names are `dialect`."""
    body: dict[str, Any] = {**extra_fields(req), "model": model,
                            "messages": chat_messages(req.system, req.messages),
                            "max_tokens": req.max_tokens,
                            **sampling(dialect, {"temperature": req.temperature, "top_p": req.top_p,
                                               "top_k": req.top_k})}
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.input_schema}} for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
        if req.tool_choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if req.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def stop_reason(finish_reason: str | None) -> str:
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def content_block(piece: Piece, *, empty: bool = False) -> dict[str, Any]:
    """A piece as a content block; `empty`: as it opens a stream, before any delta."""
    if piece.kind is PieceKind.THINKING:
        return {"type": "thinking", "thinking": "" if empty else piece.text, "signature": ""}
    if piece.kind is PieceKind.TEXT:
        return {"type": "text", "text": "" if empty else piece.text}
    return {"type": "tool_use", "id": piece.tool_id, "name": piece.tool_name,
            "input": {} if empty else piece.tool_input()}


def _usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def message(answer: ChatAnswer, model: str, msg_id: str) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [content_block(p) for p in answer.pieces], "stop_reason": stop_reason(answer.finish_reason),
            "stop_sequence": None, "usage": _usage(answer.usage)}


def _delta(piece: Piece, text: str) -> dict[str, str]:
    if piece.kind is PieceKind.THINKING:
        return {"type": "thinking_delta", "thinking": text}
    if piece.kind is PieceKind.TEXT:
        return {"type": "text_delta", "text": text}
    return {"type": "input_json_delta", "partial_json": text}


class MessageStream:
    """The Messages event sequence for a streamed chat completion: message_start, ping, one
    content_block_start/_delta.../_stop per piece, message_delta, message_stop."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = message_id()
        self._open: int | None = None
        self._pieces: dict[int, Piece] = {}

    def start(self) -> bytes:
        shell: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                                 "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(Usage())}
        return sse_event("message_start", {"type": "message_start", "message": shell}) + \
            sse_event("ping", {"type": "ping"})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def changes(self, changes: list[Change]) -> bytes:
        out = b""
        for change in changes:
            if isinstance(change, Started):
                out += self._close()
                self._open = change.index
                self._pieces[change.index] = change.piece
                out += sse_event("content_block_start", {"type": "content_block_start", "index": change.index,
                                                         "content_block": content_block(change.piece, empty=True)})
            elif isinstance(change, Appended):
                out += sse_event("content_block_delta", {"type": "content_block_delta", "index": change.index,
                                                         "delta": _delta(self._pieces[change.index], change.text)})
        return out

    def fail(self, message: str) -> bytes:
        return error_event("api_error", message)

    def finish(self, answer: ChatAnswer) -> bytes:
        return self._close() + sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason(answer.finish_reason), "stop_sequence": None},
            "usage": _usage(answer.usage)}) + sse_event("message_stop", {"type": "message_stop"})


def error_event(error_type: str, message: str) -> bytes:
    return sse_event("error", {"type": "error", "error": {"type": error_type, "message": message}})
