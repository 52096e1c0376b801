"""An engine's chat completion read as an ordered list of pieces (reasoning, text, one per tool call), the
common ground from which the Messages and Responses translations build their content blocks and output items.

Streamed chunks arrive as deltas; `PieceReader.feed` turns each chunk into piece starts and appends, in
the order a client must see them: a new piece starts when the kind of delta changes (or a tool call
with another index begins), and only one piece is open at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class PieceKind(StrEnum):
    THINKING = "thinking"
    TEXT = "text"
    TOOL = "tool"


@dataclass
class Piece:
    kind: PieceKind
    text: str = ""  # the text, the reasoning, or a tool call's JSON arguments
    tool_id: str = ""
    tool_name: str = ""
    tool_index: int = -1

    def tool_input(self) -> dict[str, Any]:
        """A tool call's arguments as an object (an engine's unparsable arguments are kept as a string)."""
        if not self.text:
            return {}
        try:
            value = json.loads(self.text)
        except json.JSONDecodeError:
            return {"arguments": self.text}
        return value if isinstance(value, dict) else {"arguments": value}


@dataclass(frozen=True)
class Started:
    index: int
    piece: Piece


@dataclass(frozen=True)
class Appended:
    index: int
    text: str


Change = Started | Appended


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        if not isinstance(usage, dict):
            return cls()
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0
        return cls(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), _count(cached))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


@dataclass
class ChatAnswer:
    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces if p.kind is PieceKind.TEXT)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _finish_reason(choice: dict[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) and reason else None


def _reasoning(message: dict[str, Any]) -> str:
    value = message.get("reasoning_content") or message.get("reasoning") or ""
    return value if isinstance(value, str) else ""


def _unique_tool_id(answer: ChatAnswer, wanted: str) -> str:
    """`wanted`, or `wanted` with a suffix when an earlier tool call of the answer has that id: clients match
    results to calls by id, and an engine that interrupts a call with text (then resumes it as a new
    piece) or repeats an id would otherwise give two calls one id."""
    taken = {p.tool_id for p in answer.pieces if p.kind is PieceKind.TOOL}
    candidate, n = wanted, 1
    while candidate in taken:
        n += 1
        candidate = f"{wanted}_{n}"
    return candidate


def answer_from_completion(body: dict[str, Any]) -> ChatAnswer:
    """A whole (non-streamed) chat completion as pieces."""
    answer = ChatAnswer(usage=Usage.from_openai(body.get("usage")))
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    answer.finish_reason = _finish_reason(choice)
    message = _object(choice.get("message"))
    if thinking := _reasoning(message):
        answer.pieces.append(Piece(PieceKind.THINKING, thinking))
    content = message.get("content")
    if isinstance(content, str) and content:
        answer.pieces.append(Piece(PieceKind.TEXT, content))
    for i, call in enumerate(_list(message.get("tool_calls"))):
        if not isinstance(call, dict):
            continue
        function = _object(call.get("function"))
        arguments = function.get("arguments")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
        tool_id = _unique_tool_id(answer, str(call.get("id") or f"call_{i}"))
        answer.pieces.append(Piece(PieceKind.TOOL, text, tool_id=tool_id, tool_name=str(function.get("name") or ""),
                                   tool_index=i))
    return answer


class PieceReader:
    """Folds streamed chat completion chunks into a ChatAnswer, reporting what changed with each chunk."""

    def __init__(self) -> None:
        self.answer = ChatAnswer()

    @property
    def _open(self) -> Piece | None:
        return self.answer.pieces[-1] if self.answer.pieces else None

    def _start(self, piece: Piece) -> Started:
        self.answer.pieces.append(piece)
        return Started(len(self.answer.pieces) - 1, piece)

    def _text(self, kind: PieceKind, text: str) -> list[Change]:
        changes: list[Change] = []
        if self._open is None or self._open.kind is not kind:
            changes.append(self._start(Piece(kind)))
        assert self._open is not None
        self._open.text += text
        changes.append(Appended(len(self.answer.pieces) - 1, text))
        return changes

    def _tool(self, call: dict[str, Any]) -> list[Change]:
        changes: list[Change] = []
        raw_index = call.get("index")
        index = raw_index if isinstance(raw_index, int) else 0
        function = _object(call.get("function"))
        open_piece = self._open
        if open_piece is None or open_piece.kind is not PieceKind.TOOL or open_piece.tool_index != index:
            tool_id = _unique_tool_id(self.answer, str(call.get("id") or f"call_{index}"))
            changes.append(self._start(Piece(PieceKind.TOOL, tool_id=tool_id, tool_name=str(function.get("name") or ""),
                                             tool_index=index)))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            piece = self._open
            assert piece is not None
            piece.text += arguments
            changes.append(Appended(len(self.answer.pieces) - 1, arguments))
        return changes

    def feed(self, chunk: dict[str, Any]) -> list[Change]:
        if chunk.get("usage"):
            self.answer.usage = Usage.from_openai(chunk["usage"])
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        self.answer.finish_reason = _finish_reason(choice) or self.answer.finish_reason
        delta = _object(choice.get("delta"))
        changes: list[Change] = []
        if thinking := _reasoning(delta):
            changes += self._text(PieceKind.THINKING, thinking)
        content = delta.get("content")
        if isinstance(content, str) and content:
            changes += self._text(PieceKind.TEXT, content)
        for call in _list(delta.get("tool_calls")):
            if isinstance(call, dict):
                changes += self._tool(call)
        return changes
