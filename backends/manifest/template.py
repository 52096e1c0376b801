"""Run templates: argv elements with `{placeholder}`s, rendered into an argv list (never a shell string).

`{{` and `}}` are literal braces. A placeholder is a bare name from PLACEHOLDERS: no attribute access,
indexing, conversion or format spec, so rendering can do nothing but substitute the daemon's values.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

PLACEHOLDERS: dict[str, str] = {
    "model_path": "the model file (or directory) the runner serves",
    "model_name": "the name clients use for the model",
    "socket": "the unix socket the engine must listen on (listen: unix)",
    "port": "the loopback TCP port the engine must listen on (listen: tcp)",
    "host": "the address to bind: always the loopback address for TCP, the socket path for unix",
    "ctx": "the context size in tokens",
    "threads": "CPU threads the engine may use",
    "gpu_ids": "comma-separated indices of the GPUs it may use (empty without GPUs)",
}

_FORMATTER = string.Formatter()


def placeholders(element: str) -> list[str]:
    """The placeholders in one element; ValueError naming the first that is not allowed."""
    try:
        parts = list(_FORMATTER.parse(element))
    except ValueError as exc:
        raise ValueError(f"malformed braces in {element!r} ({exc}); write {{{{ and }}}} for literal braces") \
            from None
    found: list[str] = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {{{name}}}; known: {known}")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format spec or conversion")
        found.append(name)
    return found


def render(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Each element with its placeholders replaced; one element stays one argv element whatever the
    values contain (a model path with spaces stays one argument)."""
    argv: list[str] = []
    for element in template:
        out: list[str] = []
        for literal, name, _, _ in _FORMATTER.parse(element):
            out.append(literal)
            if name is not None:
                out.append(values[name])
        argv.append("".join(out))
    return argv
