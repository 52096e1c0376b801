"""Keep-alive durations with Ollama's semantics."""

from __future__ import annotations

import math
import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_MAX_SECONDS = 10 * 365 * 24 * 3600.0

KeepAlive = float | None
"""Seconds an idle runner stays loaded; 0 = unload after the request; None = never unload."""


def parse_keep_alive(value: str | int | float | None) -> KeepAlive:
    """Parse "5m", "1h30m", "300", 300, "0" or a negative value (= forever).

    Raises ValueError naming the value when it is none of these.
    """
    if value is None:
        raise ValueError("keep_alive is missing")
    if isinstance(value, bool):
        raise ValueError(f"keep_alive {value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        seconds = _parse_text(value.strip())
    if math.isnan(seconds):
        raise ValueError(f"keep_alive {value!r} is not a duration")
    if seconds < 0:
        return None
    return min(seconds, _MAX_SECONDS)


def _parse_text(text: str) -> float:
    if not text or len(text) > 64:
        raise ValueError(f"keep_alive {text!r} is not a duration (examples: 5m, 1h30m, 300, 0, -1)")
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:
        return sign * float(body)
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or pos == 0:
        raise ValueError(f"keep_alive {text!r} is not a duration (examples: 5m, 1h30m, 300, 0, -1)")
    return sign * total


def format_keep_alive(value: KeepAlive) -> str:
    if value is None:
        return "-1"
    return f"{value:g}s"
