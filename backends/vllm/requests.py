"""Requests that vLLM, as configured, would accept but answer wrongly: refused up front, with the fix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

AUTO_TOOLS = "--enable-auto-tool-choice"
NO_AUTO_TOOLS = "--no-enable-auto-tool-choice"
TOOL_PARSER = "--tool-call-parser"


def auto_tool_choice(runtime_flags: Sequence[str]) -> bool:
    """Whether the flags (validated, so `--flag=value` form) turn on vLLM's tool-call parsing."""
    enabled = False
    for flag in runtime_flags:  # the last of a switch and its negation wins, as in vLLM's parser
        if flag == AUTO_TOOLS:
            enabled = True
        elif flag == NO_AUTO_TOOLS:
            enabled = False
    return enabled and any(f.startswith(TOOL_PARSER + "=") for f in runtime_flags)


def request_problem(runtime_flags: Sequence[str], payload: Mapping[str, Any]) -> str | None:
    """Why this request would go wrong on a vLLM run with `runtime_flags`, or None.

    Without a tool-call parser vLLM takes `tools` with tool_choice "auto" (the default) and answers
    in plain text, never with tool_calls; a named tool or "required" works (structured output).
    """
    if payload.get("tools") and payload.get("tool_choice", "auto") in (None, "auto") \
            and not auto_tool_choice(runtime_flags):
        return ("tools with tool_choice \"auto\" need vLLM's tool-call parser for this model: configure its "
                f"runtime_flags with {AUTO_TOOLS} and {TOOL_PARSER}=NAME (the parser for the model's family, "
                "e.g. hermes or llama3_json) via POST /engines/vllm/_configure, or name the tool in tool_choice")
    return None
