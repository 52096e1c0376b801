"""Request bodies as JSON objects, refused at the door when an engine or a handler could not take them.

Python's json module accepts what JSON does not (NaN, Infinity), turns what it cannot represent into
something else (1e999 becomes inf) and lets through what no engine can encode (lone surrogates, integers
of any size). Each of those is a 400 here, naming the value and, where the parse tree shows it, its path.
Nesting is bounded: json.loads itself gives up only at the interpreter's recursion limit, and every later
consumer (pydantic, json.dumps, the engines' parsers) walks the tree again.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from runnerd.api.errors import ApiError

# Deeper than any chat request, tool schema or structured-output schema in practice; far below the
# interpreter's recursion limit, so no consumer of the parsed body can hit it.
MAX_DEPTH = 128
# Seeds, token ids and counts fit in 64 bits (signed or unsigned); nothing an engine takes is larger.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
_INT_DIGITS = len(str(INT_MAX))
# Bodies this large are parsed in a worker thread: parsing megabytes would stall every other request.
THREAD_THRESHOLD = 256 * 1024


# The object read_json_body returned, for what reports on a request after its handler (the audit log
# names what an action was done to). A shallow copy: what the handler then changes in its own does not show.
JSON_BODY = web.RequestKey("json_body", dict)


class BodyRefused(ValueError):
    """A request body that is not a JSON object runnerd can pass on; the message says why."""


def _no_constant(name: str) -> Any:
    raise BodyRefused(f"{name} is not a JSON number; send a finite number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyRefused(f"number {text[:40]} is out of range for a 64-bit float")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    # Checked before int(): converting thousands of digits is itself the cost an attacker wants.
    if digits > _INT_DIGITS:
        raise BodyRefused(f"integer {text[:24]}... ({digits} digits) is out of range: integers must lie "
                          f"between {INT_MIN} and {INT_MAX}")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise BodyRefused(f"integer {text} is out of range: integers must lie between {INT_MIN} and {INT_MAX}")
    return value


def _path(parts: tuple[str | int, ...]) -> str:
    out = "$"
    for part in parts:
        # A key may be megabytes long: the message names its start.
        out += f"[{part}]" if isinstance(part, int) else f".{part[:40]}"
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_tree(payload: Any) -> None:
    """Depth and lone surrogates, walked with an explicit stack (no recursion however deep the tree)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(payload, ())]
    while stack:
        node, parts = stack.pop()
        if len(parts) > MAX_DEPTH:
            raise BodyRefused(f"JSON nested more than {MAX_DEPTH} levels deep (at {_path(parts[:8])}...)")
        if isinstance(node, dict):
            for key, value in node.items():
                if not _encodable(key):
                    raise BodyRefused(f"a key in {_path(parts)} holds a lone UTF-16 surrogate (\\ud800-\\udfff); "
                                      "send valid Unicode")
                stack.append((value, (*parts, key)))
        elif isinstance(node, list):
            stack.extend((value, (*parts, i)) for i, value in enumerate(node))
        elif isinstance(node, str) and not _encodable(node):
            raise BodyRefused(f"string at {_path(parts)} holds a lone UTF-16 surrogate (\\ud800-\\udfff); "
                              "send valid Unicode")


# One decoder for every body: json.loads with hooks builds a decoder and its scanner on each call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)


def _may_need_walk(raw: bytes) -> bool:
    """Whether the tree could be too deep or hold a lone surrogate; counted on the raw bytes at C speed.
    Nesting needs an opening bracket per level, and strict UTF-8 decodes no surrogate, so one can only
    come from a \\uD800-\\uDFFF escape (brackets and escapes inside strings only make this say yes)."""
    return (raw.count(b"{") + raw.count(b"[") > MAX_DEPTH) or b"\\ud" in raw or b"\\uD" in raw


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object runnerd can forward; BodyRefused says what is wrong with it."""
    try:
        # Strict UTF-8: json.loads(bytes) would also take UTF-16/32 and UTF-8-encoded surrogates.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRefused(f"request body is not UTF-8: invalid byte at position {exc.start}") from exc
    try:
        payload = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise BodyRefused(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BodyRefused(f"JSON nested more than {MAX_DEPTH} levels deep") from exc
    if not isinstance(payload, dict):
        raise BodyRefused("request body must be a JSON object")
    if _may_need_walk(raw):
        _check_tree(payload)
    return payload


async def read_json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 413 past the body limit, 400 for anything but a JSON object runnerd can
    forward to an engine. A copy stays on the request under JSON_BODY."""
    raw = await request.read()
    try:
        if len(raw) > THREAD_THRESHOLD:
            payload = await asyncio.to_thread(parse_json_object, raw)
        else:
            payload = parse_json_object(raw)
    except BodyRefused as exc:
        raise ApiError(400, str(exc), code="invalid_json") from exc
    request[JSON_BODY] = dict(payload)
    return payload
