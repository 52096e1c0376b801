"""OpenAI Responses objects: the response object and its output items, the input items of a conversation,
and the translation to and from an engine's chat completions for engines that do not serve the API."""

from __future__ import annotations

import secrets
import time
from typing import Any

from backends.base import SamplingDialect
from runnerd.api.chat_pieces import Appended, Change, ChatAnswer, Piece, PieceKind, Started, Usage
from runnerd.api.errors import ApiError
from runnerd.api.leased import extra_fields, sampling, sse_event
from runnerd.api.responses.schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# ---------------------------------------------------------------- items


def stored_input(items: list[InputItem]) -> list[dict[str, Any]]:
    """The request's input items as the input_items route lists them: each with an id, a message's text
    as a content part."""
    out = []
    for item in items:
        data = item.model_dump(mode="json", exclude_none=True)
        if isinstance(item, MessageItem) and isinstance(item.content, str):
            part = "output_text" if item.role == "assistant" else "input_text"
            data["content"] = [{"type": part, "text": item.content}]
        data.setdefault("id", new_id("msg" if isinstance(item, MessageItem) else "item"))
        out.append(data)
    return out


def output_as_input(output: list[Any]) -> list[dict[str, Any]]:
    """A response's output as input items for the next turn: messages and function calls, without the ids
    and statuses an engine does not expect on input (reasoning is not replayed)."""
    items: list[dict[str, Any]] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text = "".join(str(p.get("text", "")) for p in item.get("content") or [] if isinstance(p, dict))
            items.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]})
        elif item.get("type") == "function_call":
            items.append({"type": "function_call", "call_id": item.get("call_id"), "name": item.get("name"),
                          "arguments": item.get("arguments") or ""})
    return items


def clean_input(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored input items as an engine takes them (no ids)."""
    return [{k: v for k, v in item.items() if k != "id"} for item in items]


def output_item(piece: Piece, item_id: str, *, done: bool = True) -> dict[str, Any]:
    status = "completed" if done else "in_progress"
    if piece.kind is PieceKind.TEXT:
        content = [{"type": "output_text", "text": piece.text, "annotations": [], "logprobs": []}] if done else []
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}
    if piece.kind is PieceKind.THINKING:
        content = [{"type": "reasoning_text", "text": piece.text}] if done else []
        return {"id": item_id, "type": "reasoning", "status": status, "summary": [], "content": content}
    return {"id": item_id, "type": "function_call", "status": status, "call_id": piece.tool_id,
            "name": piece.tool_name, "arguments": piece.text if done else ""}


def _item_prefix(piece: Piece) -> str:
    return {PieceKind.TEXT: "msg", PieceKind.THINKING: "rs", PieceKind.TOOL: "fc"}[piece.kind]


# ---------------------------------------------------------------- request


def _chat_message(item: MessageItem) -> dict[str, Any]:
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str) or role != "user":
        return {"role": role, "content": item.text()}
    parts: list[dict[str, Any]] = []
    for part in item.content:
        if isinstance(part, InputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, InputImage):
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
    if all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def chat_messages(instructions: str | None, items: list[InputItem]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append(_chat_message(item))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        elif not isinstance(item, ReasoningItem):
            raise ApiError(400, f"input items of type {item.type!r} are not supported", param="input")
    return messages


def _chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, raw in enumerate(tools):
        if raw.get("type") != "function":
            raise ApiError(400, f"tools[{i}]: only function tools can be served here, not {raw.get('type')!r}",
                           param=f"tools[{i}]")
        tool = FunctionTool.model_validate(raw)
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise ApiError(400, f"text.format of type {fmt.get('type')!r} is not supported", param="text.format")


def chat_body(req: ResponsesRequest, items: list[InputItem], model: str, dialect: SamplingDialect) -> dict[str, Any]:
    """The chat-completion request for `model` on an engine whose option names are `dialect`."""
    body: dict[str, Any] = {**extra_fields(req), "model": model,
                            "messages": chat_messages(req.instructions, items),
                            **sampling(dialect, {"temperature": req.temperature, "top_p": req.top_p})}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = _chat_tools(req.tools)
    if isinstance(req.tool_choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if (fmt := _response_format(req.text)) is not None:
        body["response_format"] = fmt
    effort = (req.reasoning or {}).get("effort")
    if isinstance(effort, str):
        body["reasoning_effort"] = effort
        body["chat_template_kwargs"] = {"enable_thinking": effort not in ("none", "minimal")}
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# ---------------------------------------------------------------- the response object


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.input_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.input_tokens + usage.output_tokens}


def response_object(req: ResponsesRequest, model: str, response_id: str, created_at: int, *,
                    status: str = "in_progress", output: list[Any] | None = None,
                    usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response object with every field the API defines, from the request's settings."""
    tool_choice: Any = req.tool_choice.model_dump() if isinstance(req.tool_choice, FunctionChoice) else req.tool_choice
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "background": False,
        "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "model": model, "output": output or [],
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None, **(req.reasoning or {})},
        "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": req.text or {"format": {"type": "text"}}, "tool_choice": tool_choice or "auto",
        "tools": req.tools or [], "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation or "disabled", "usage": usage, "user": req.user, "metadata": req.metadata or {},
    }


def finish(response: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    if finish_reason == "length":
        return {**response, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    return {**response, "status": "completed", "completed_at": int(time.time())}


def from_answer(req: ResponsesRequest, model: str, answer: ChatAnswer) -> dict[str, Any]:
    output = [output_item(p, new_id(_item_prefix(p))) for p in answer.pieces]
    response = response_object(req, model, new_id("resp"), int(time.time()), output=output,
                               usage=_usage(answer.usage))
    return finish(response, answer.finish_reason)


def completed_native(req: ResponsesRequest, model: str, native: dict[str, Any]) -> dict[str, Any]:
    """An engine's own response object with the fields it left out filled from the request, and the daemon's
    model name (an engine may report a file path)."""
    base = response_object(req, model, str(native.get("id") or new_id("resp")),
                           int(native.get("created_at") or time.time()))
    merged = {**base, **{k: v for k, v in native.items() if v is not None}, "model": model,
              "previous_response_id": req.previous_response_id, "store": req.store}
    usage = merged.get("usage")
    if isinstance(usage, dict):
        usage.setdefault("input_tokens_details", {"cached_tokens": 0})
        usage.setdefault("output_tokens_details", {"reasoning_tokens": 0})
    merged.pop("timings", None)
    return merged


# ---------------------------------------------------------------- streams


class _Sequenced:
    def __init__(self) -> None:
        self.sequence = 0

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        data = {"type": name, **data, "sequence_number": self.sequence}
        self.sequence += 1
        return sse_event(name, data)


class ResponseStream(_Sequenced):
    """The Responses event sequence for a streamed chat completion."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        super().__init__()
        self.req = req
        self.response = response_object(req, model, new_id("resp"), int(time.time()))
        self._open: int | None = None
        self._items: dict[int, tuple[Piece, str]] = {}

    def start(self) -> bytes:
        return self.event("response.created", {"response": self.response}) + \
            self.event("response.in_progress", {"response": self.response})

    def _where(self, index: int) -> dict[str, Any]:
        return {"item_id": self._items[index][1], "output_index": index}

    def _open_item(self, index: int, piece: Piece) -> bytes:
        item_id = new_id(_item_prefix(piece))
        self._items[index] = (piece, item_id)
        out = self.event("response.output_item.added",
                         {"output_index": index, "item": output_item(piece, item_id, done=False)})
        if piece.kind is PieceKind.TEXT:
            out += self.event("response.content_part.added", {**self._where(index), "content_index": 0, "part": {
                "type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        elif piece.kind is PieceKind.THINKING:
            out += self.event("response.content_part.added", {**self._where(index), "content_index": 0,
                                                              "part": {"type": "reasoning_text", "text": ""}})
        return out

    def _delta(self, index: int, text: str) -> bytes:
        piece = self._items[index][0]
        if piece.kind is PieceKind.TEXT:
            return self.event("response.output_text.delta",
                              {**self._where(index), "content_index": 0, "delta": text, "logprobs": []})
        if piece.kind is PieceKind.THINKING:
            return self.event("response.reasoning_text.delta",
                              {**self._where(index), "content_index": 0, "delta": text})
        return self.event("response.function_call_arguments.delta", {**self._where(index), "delta": text})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        piece, item_id = self._items[index]
        where = self._where(index)
        item = output_item(piece, item_id)
        if piece.kind is PieceKind.TEXT:
            out = self.event("response.output_text.done",
                             {**where, "content_index": 0, "text": piece.text, "logprobs": []})
            out += self.event("response.content_part.done", {**where, "content_index": 0, "part": item["content"][0]})
        elif piece.kind is PieceKind.THINKING:
            out = self.event("response.reasoning_text.done", {**where, "content_index": 0, "text": piece.text})
            out += self.event("response.content_part.done", {**where, "content_index": 0, "part": item["content"][0]})
        else:
            out = self.event("response.function_call_arguments.done", {**where, "arguments": piece.text})
        return out + self.event("response.output_item.done", {"output_index": index, "item": item})

    def changes(self, changes: list[Change]) -> bytes:
        out = b""
        for change in changes:
            if isinstance(change, Started):
                out += self._close()
                self._open = change.index
                out += self._open_item(change.index, change.piece)
            elif isinstance(change, Appended):
                out += self._delta(change.index, change.text)
        return out

    def finish(self, answer: ChatAnswer) -> bytes:
        out = self._close()
        output = [output_item(piece, item_id) for piece, item_id in (self._items[i] for i in sorted(self._items))]
        self.response = finish({**self.response, "output": output, "usage": _usage(answer.usage)}, answer.finish_reason)
        name = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        return out + self.event(name, {"response": self.response})

    def fail(self, message: str) -> bytes:
        self.response = {**self.response, "status": "failed", "error": {"code": "server_error", "message": message}}
        return self.event("error", {"code": "server_error", "message": message, "param": None}) + \
            self.event("response.failed", {"response": self.response})


class NativeStream(_Sequenced):
    """An engine's own Responses events, completed where the engine leaves fields out (output and content
    indexes, sequence numbers, the response object's fields) so that the SDKs' stream helpers can follow."""

    _RESPONSE_EVENTS = frozenset({"response.created", "response.in_progress", "response.completed",
                                  "response.incomplete", "response.failed"})

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        super().__init__()
        self.req = req
        self.model = model
        self.response: dict[str, Any] | None = None
        self._indexes: dict[str, int] = {}
        self._parts: dict[str, int] = {}

    def relay(self, event: dict[str, Any]) -> bytes:
        name = str(event.get("type") or "")
        data = {k: v for k, v in event.items() if k not in ("type", "sequence_number")}
        if name in self._RESPONSE_EVENTS and isinstance(data.get("response"), dict):
            data["response"] = completed_native(self.req, self.model, data["response"])
            if name != "response.created" and name != "response.in_progress":
                self.response = data["response"]
        if name == "response.output_item.added" and isinstance(data.get("item"), dict):
            data.setdefault("output_index", len(self._indexes))
            self._indexes[str(data["item"].get("id"))] = int(data["output_index"])
        item_id = data.get("item_id")
        if isinstance(item_id, str):
            data.setdefault("output_index", self._indexes.get(item_id, 0))
            if name == "response.content_part.added":
                data.setdefault("content_index", self._parts.get(item_id, 0))
                self._parts[item_id] = int(data["content_index"]) + 1
            elif name.startswith(("response.output_text.", "response.content_part.", "response.reasoning_text.")):
                data.setdefault("content_index", max(self._parts.get(item_id, 1) - 1, 0))
        return self.event(name, data)

    def fail(self, message: str) -> bytes:
        return self.event("error", {"code": "server_error", "message": message, "param": None})


def input_tokens_of(answer: dict[str, Any]) -> int:
    tokens = answer.get("input_tokens")
    if not isinstance(tokens, int):
        raise ApiError(502, "the engine did not say how many tokens the input has")
    return tokens

