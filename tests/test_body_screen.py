"""The body check's shortcut: the tree walk (depth, lone surrogates) is skipped only for bodies it would pass."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runnerd.api.body import MAX_DEPTH, BodyRefused, _check_tree, _may_need_walk, parse_json_object

# Text with lone surrogates, backslashes, brackets and quotes: what could fool a byte-level screen.
_TEXT = st.text(alphabet=st.sampled_from(["a", "é", "\\", "[", "{", '"', "u", "D", "d", "\ud800", "\udfff",
                                          "\U0001f600"]), max_size=12)
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-1000, 1000) | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=40)


def _nested(depth: int, leaf: object) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@settings(max_examples=400, deadline=None)
@given(value=_JSON, depth=st.integers(0, MAX_DEPTH + 3), ascii_only=st.booleans())
def test_a_body_the_screen_lets_by_passes_the_walk(value, depth, ascii_only):
    raw = json.dumps({"model": "m", "x": _nested(depth, value)}, ensure_ascii=ascii_only).encode("utf-8",
                                                                                                   "surrogatepass")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return  # UTF-8-encoded surrogates: refused before any walk
    walk_refuses = False
    try:
        _check_tree(payload)
    except BodyRefused:
        walk_refuses = True
    if walk_refuses:
        assert _may_need_walk(raw)
        with pytest.raises(BodyRefused):
            parse_json_object(raw)
    else:
        assert parse_json_object(raw) == payload


def test_the_screen_lets_an_ordinary_chat_request_by():
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo 😀"}], "max_tokens": 8},
                     ensure_ascii=False).encode()
    assert not _may_need_walk(raw)


@pytest.mark.parametrize("literal", ['"\\ud800"', '"\\uDFFF"', '{"\\ud83d": 1}'])
def test_escaped_lone_surrogates_are_walked_and_refused(literal):
    raw = f'{{"model": "m", "x": {literal}}}'.encode()
    assert _may_need_walk(raw)
    with pytest.raises(BodyRefused, match="lone UTF-16 surrogate"):
        parse_json_object(raw)
