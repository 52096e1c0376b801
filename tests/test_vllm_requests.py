"""Requests vLLM would take but answer wrongly as configured (backends/vllm/requests.py)."""

from __future__ import annotations

import pytest

from backends.vllm.requests import auto_tool_choice, request_problem

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
PARSER = ["--enable-auto-tool-choice", "--tool-call-parser=hermes"]


@pytest.mark.parametrize(("flags", "expected"), [
    ([], False),
    (["--enable-auto-tool-choice"], False),  # vLLM needs the parser too
    (["--tool-call-parser=hermes"], False),
    (PARSER, True),
    ([*PARSER, "--no-enable-auto-tool-choice"], False),  # the last spelling wins
    (["--no-enable-auto-tool-choice", *PARSER], True),
])
def test_auto_tool_choice_needs_the_switch_and_a_parser(flags, expected):
    assert auto_tool_choice(flags) is expected


def test_auto_tools_without_a_parser_are_refused_with_the_fix():
    why = request_problem([], {"tools": TOOLS})
    assert why is not None and "--enable-auto-tool-choice" in why and "--tool-call-parser" in why
    assert request_problem([], {"tools": TOOLS, "tool_choice": "auto"}) == why
    assert request_problem([], {"tools": TOOLS, "tool_choice": None}) == why


@pytest.mark.parametrize("payload", [
    {"messages": []},
    {"tools": [], "tool_choice": "auto"},
    {"tools": TOOLS, "tool_choice": "none"},
    {"tools": TOOLS, "tool_choice": "required"},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
])
def test_requests_vllm_answers_right_are_let_through(payload):
    assert request_problem([], payload) is None


def test_configured_parser_lets_auto_tools_through():
    assert request_problem(PARSER, {"tools": TOOLS}) is None
