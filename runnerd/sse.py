"""Reading an engine's OpenAI-shaped answers: SSE lines and error bodies, whatever their shape."""

from __future__ import annotations

import json
from typing import Any, Literal


def parse_sse_line(line: bytes) -> dict[str, Any] | Literal["done"] | None:
    """One line of an SSE stream -> the JSON payload of a `data:` line, "done" at `[DONE]`, else None."""
    text = line.strip()
    if text.startswith(b"error:"):
        # Some engines report a failure inside a stream as an `error:` event.
        try:
            error = json.loads(text[6:])
        except (UnicodeDecodeError, json.JSONDecodeError):
            error = text[6:].decode(errors="replace").strip()
        return {"error": error}
    if not text.startswith(b"data:"):
        return None
    payload = text[5:].strip()
    if payload == b"[DONE]":
        return "done"
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def error_text(body: Any) -> str:
    """The message of an engine's error body, whatever its shape."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if error is not None:
            return str(error)
    return str(body)
