"""Hostile input is part of the spec: fuzz the flag parsers and validators.

Properties, for both engines:
- anything at all is either validated or refused with FlagError, never another exception;
- what is accepted is a fixed point (validating it again changes nothing), uses only canonical
  allowlisted names, holds no refused name, and carries no path, URL, address or hidden character;
- every allowlisted flag accepts its values in every spelling and yields one canonical form;
- free text and JSON strings with a hostile fragment anywhere are refused;
- raw flag strings split like a shell and round-trip through shlex.join;
- HF overrides round-trip through JSON, and a bad key at any depth (a key starting with `_` too) is
  refused by path.

Inputs that broke something are kept as regression cases in test_flags.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import shlex
import string
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.flags import (
    FlagError,
    FlagSpec,
    FlagTable,
    ValueKind,
    split_raw_flags,
)
from backends.llamacpp.flags import LLAMACPP_FLAGS
from backends.vllm.flags import VLLM_FLAGS
from backends.vllm.overrides import validate_hf_overrides

TABLES = (LLAMACPP_FLAGS, VLLM_FLAGS)
# Backend names, not tables, go through @given: a failing example then prints one short word.
BACKENDS = st.sampled_from([table.backend for table in TABLES])
BY_NAME = {table.backend: table for table in TABLES}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Hostile wherever they appear, even glued to other text.
HOSTILE_CHARS = (
    "/", "\\", "~", "..", "http://x", "host:80", "[::1]:1", "127.0.0.1", "\x00", "\n", "\r", "\t",
    "\x1b", "\x7f", "\u0085", "\u2028", "\u202e", "\u200b", "\ufeff", "\ud800", "\uff0f", "\uff3c",
    "\uff0d", "\u2212", "\u2010", "\u2215", "\u2216", "\uff1d", "\uff1a", "\u2024", "\uff5e", "\ufe63",
)
# Hostile as a word of their own ("file:" is a URL scheme, "xfile:" is not).
HOSTILE_WORDS = ("C:", "z:x", "file:", "HTTPS:", "hf:org", "::1", "fe80::1")
# Hostile at the start of a value.
HOSTILE_PREFIXES = ("@", "-x", "--host")
HOSTILE_FRAGMENTS = HOSTILE_CHARS + HOSTILE_WORDS + HOSTILE_PREFIXES
# Characters that can appear in free text without meaning anything to the rules.
SAFE_TEXT = st.text(
    alphabet=st.characters(
        codec="utf-8",
        categories=("Lu", "Ll", "Nd", "Zs"),
        include_characters="!#$%&'()*+,;<=>?[]^_`{|}\"",
        exclude_characters="\u2028\u2029",
    ),
    min_size=1,
    max_size=20,
).filter(lambda s: s.strip() != "" and not s.startswith("-"))
INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
IDENTIFIER = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)


def all_spellings(table: FlagTable) -> list[str]:
    spelled = [s for spec in table.flags for s in (*spec.positive_spellings, *spec.negative_spellings)]
    return sorted({*spelled, *(name for refusal in table.refusals for name in refusal.names)})


def element_strategy(table: FlagTable) -> st.SearchStrategy[str]:
    """Elements a hostile caller might send: known spellings, numbers, hostile text, mixtures."""
    names = st.sampled_from(all_spellings(table))
    numbers = st.one_of(st.integers(-(2**40), 2**40).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(repr))
    hostile = st.sampled_from(HOSTILE_FRAGMENTS)
    words = st.sampled_from([w for spec in table.flags for w in spec.choices] or ["x"])
    joined = st.tuples(names, st.one_of(numbers, words, st.text(max_size=8))).map(lambda p: f"{p[0]}={p[1]}")
    mixed = st.tuples(st.text(max_size=6), hostile, st.text(max_size=6)).map("".join)
    return st.one_of(names, names, numbers, words, joined, mixed, st.text(max_size=12))


def canonical_names(table: FlagTable) -> set[str]:
    return {spec.name for spec in table.flags} | {spec.negation for spec in table.flags if spec.negation}


def split_output(table: FlagTable, output: list[str]) -> list[tuple[str, FlagSpec, str | None]]:
    """(flag, spec, value) of a validated list, read the way the engine reads it."""
    read: list[tuple[str, FlagSpec, str | None]] = []
    index = 0
    while index < len(output):
        element = output[index]
        name, equals, joined = element.partition("=") if table.value_style == "joined" else (element, "", "")
        found = table.lookup(name)
        assert isinstance(found, tuple), element
        spec, negated = found
        if table.value_style == "joined" or negated or not spec.takes_value:
            read.append((name, spec, joined if equals else None))
            index += 1
        else:
            read.append((name, spec, output[index + 1]))
            index += 2
    return read


def assert_safe_output(table: FlagTable, output: list[str]) -> None:
    names = canonical_names(table)
    for name, spec, value in split_output(table, output):
        assert name in names, name
        assert (value is None) == (not spec.takes_value or name == spec.negation), (name, value)
        if value is None:
            continue
        assert value.strip() != "", value
        assert not any(unicodedata.category(c) in INVISIBLE for c in value), value
        assert not value.startswith("-") or _is_number(value), value
        if spec.kind is ValueKind.JSON_OBJECT:
            # Compact, ASCII-only JSON: escapes are backslashes, which is why it is checked apart.
            assert value.isascii() and isinstance(json.loads(value), dict), value
            continue
        assert "/" not in value and "\\" not in value and "://" not in value and ".." not in value, value
        assert value.isascii() or spec.kind is ValueKind.STRING, value
    assert table.validate(output) == output


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Anything in: validated or refused, and what passes is safe and canonical
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), backend=BACKENDS)
def test_any_flag_list_is_validated_or_refused(data: st.DataObject, backend: str) -> None:
    table = BY_NAME[backend]
    flags = data.draw(st.lists(element_strategy(table), max_size=8))
    try:
        output = table.validate(flags)
    except FlagError as error:
        assert error.reason and str(error).startswith("runtime flag ")
        assert error.index is None or 0 <= error.index < len(flags)
        return
    assert_safe_output(table, output)


@FUZZ
@given(flags=st.lists(st.text(), max_size=6), backend=BACKENDS)
def test_arbitrary_text_never_escapes_as_another_exception(flags: list[str], backend: str) -> None:
    table = BY_NAME[backend]
    with contextlib.suppress(FlagError):
        assert_safe_output(table, table.validate(flags))


# ---------------------------------------------------------------------------------------------
# Every allowlisted flag, every spelling
# ---------------------------------------------------------------------------------------------


@functools.cache
def value_strategy(spec: FlagSpec) -> st.SearchStrategy[tuple[str, str]]:
    """(value as the caller writes it, value as the validated list must hold it)."""
    one = _item_strategy(spec)
    if spec.separator is None:
        return one
    return st.lists(one, min_size=1, max_size=3).map(
        lambda items: (spec.separator.join(i[0] for i in items), spec.separator.join(i[1] for i in items))  # type: ignore[union-attr]
    )


def _item_strategy(spec: FlagSpec) -> st.SearchStrategy[tuple[str, str]]:
    if spec.kind is ValueKind.ENUM:
        return st.sampled_from(spec.choices).map(lambda w: (w, w))
    if spec.kind is ValueKind.INT:
        low = int(spec.minimum) if spec.minimum is not None else -(2**31)
        high = int(spec.maximum) if spec.maximum is not None else 2**31 - 1
        numbers = st.integers(low, high).flatmap(_int_spellings)
        return st.one_of(numbers, st.sampled_from(spec.choices).map(lambda w: (w, w))) if spec.choices else numbers
    if spec.kind is ValueKind.FLOAT:
        lowest = spec.minimum if spec.minimum is not None else -1e12
        highest = spec.maximum if spec.maximum is not None else 1e12
        return (st.floats(lowest, highest, allow_nan=False, allow_infinity=False)
                .filter(lambda x: x == 0 or abs(x) >= 1e-30)
                .flatmap(lambda x: st.sampled_from([repr(x), f"{x:.17g}", f"{x:e}"]))
                .map(lambda text: (text, repr(float(text))))
                .filter(lambda pair: float(pair[0]) == 0 or abs(float(pair[0])) >= 1e-30))
    if spec.kind is ValueKind.JSON_OBJECT:
        return st.dictionaries(IDENTIFIER, st.one_of(st.integers(-9, 9), st.booleans(), SAFE_TEXT), max_size=3).map(
            lambda d: (json.dumps(d), json.dumps(d, separators=(",", ":"), ensure_ascii=True)))
    if spec.pattern is not None:
        return st.from_regex(re.compile(spec.pattern, re.ASCII), fullmatch=True).map(lambda t: (t, t))
    return SAFE_TEXT.map(lambda t: (t, t))


def _int_spellings(n: int) -> st.SearchStrategy[tuple[str, str]]:
    """An integer as a caller may write it (sign, leading zero) and as the validated list holds it."""
    spellings = [str(n), f"+{n}", f"0{n}"] if n >= 0 else [str(n)]
    return st.sampled_from(spellings).map(lambda text: (text, str(n)))


def spelling_strategy(spec: FlagSpec, negated: bool) -> st.SearchStrategy[str]:
    spellings = spec.negative_spellings if negated else spec.positive_spellings
    return st.sampled_from(spellings).flatmap(
        lambda s: st.sampled_from([s, "--" + s[2:].replace("-", "_")]) if s.startswith("--") else st.just(s))


@FUZZ
@given(data=st.data(), backend=BACKENDS)
def test_every_allowlisted_flag_accepts_its_values_in_every_spelling(data: st.DataObject, backend: str) -> None:
    table = BY_NAME[backend]
    spec = data.draw(st.sampled_from(table.flags))
    negated = bool(spec.negation) and data.draw(st.booleans())
    spelling = data.draw(spelling_strategy(spec, negated))
    if negated or not spec.takes_value:
        assert table.validate([spelling]) == table.render(spec, None, negated)
        return
    written, canonical = data.draw(value_strategy(spec))
    joined = data.draw(st.booleans())
    flags = [f"{spelling}={written}"] if joined else [spelling, written]
    output = table.validate(flags)
    assert output == table.render(spec, canonical, False)
    assert_safe_output(table, output)


@FUZZ
@given(data=st.data(), backend=BACKENDS)
def test_negative_numbers_are_values_not_flags(data: st.DataObject, backend: str) -> None:
    table = BY_NAME[backend]
    specs = [s for s in table.flags if s.kind in (ValueKind.INT, ValueKind.FLOAT) and s.separator is None
             and (s.minimum is None or s.minimum < 0)]
    spec = data.draw(st.sampled_from(specs))
    low = int(spec.minimum) if spec.minimum is not None else -(2**31)
    value = data.draw(st.integers(low, -1)) if spec.kind is ValueKind.INT else data.draw(
        st.floats(max(spec.minimum or -1e12, -1e12), -1e-30, allow_nan=False))
    output = table.validate([spec.name, str(value)])
    assert output == table.render(spec, str(value) if spec.kind is ValueKind.INT else repr(float(str(value))), False)


# ---------------------------------------------------------------------------------------------
# Hostile fragments anywhere are refused
# ---------------------------------------------------------------------------------------------

FREE_TEXT_FLAGS = [(table, spec) for table in TABLES for spec in table.flags
                   if spec.kind is ValueKind.STRING and spec.pattern is None]
PATTERN_FLAGS = [(table, spec) for table in TABLES for spec in table.flags if spec.pattern is not None]


def hostile_value(data: st.DataObject) -> str:
    """Safe text with one hostile fragment placed where it is hostile."""
    before, after = data.draw(SAFE_TEXT), data.draw(SAFE_TEXT)
    kind = data.draw(st.sampled_from(["char", "word", "prefix"]))
    if kind == "prefix":
        return data.draw(st.sampled_from(HOSTILE_PREFIXES)) + after
    fragment = data.draw(st.sampled_from(HOSTILE_CHARS if kind == "char" else HOSTILE_WORDS))
    glue = "" if kind == "char" else " "
    return data.draw(st.sampled_from([before + glue + fragment + glue + after, fragment + glue + after,
                                      before + glue + fragment]))


@FUZZ
@given(data=st.data(), picked=st.integers(0, len(FREE_TEXT_FLAGS) + len(PATTERN_FLAGS) - 1))
def test_free_text_with_a_hostile_fragment_is_refused(data: st.DataObject, picked: int) -> None:
    table, spec = (FREE_TEXT_FLAGS + PATTERN_FLAGS)[picked]
    value = hostile_value(data)
    for flags in ([spec.name, value], [f"{spec.name}={value}"]):
        try:
            output = table.validate(flags)
        except FlagError:
            continue
        raise AssertionError(f"{flags!r} passed as {output!r}")


@FUZZ
@given(data=st.data(), key=IDENTIFIER)
def test_json_strings_with_a_hostile_fragment_are_refused(data: st.DataObject, key: str) -> None:
    text = hostile_value(data)
    if text.startswith(HOSTILE_PREFIXES):
        return  # inside JSON a leading '-' or '@' means nothing
    value = json.dumps({key: [1, {"k": text}]})
    try:
        LLAMACPP_FLAGS.validate(["--chat-template-kwargs", value])
    except FlagError as error:
        assert f"{key}[1].k" in error.reason or "not valid JSON" in error.reason or "character" in error.reason
    else:
        raise AssertionError(value)


LOOKALIKE_DASHES = [c for c in map(chr, range(0x80, 0x10000)) if unicodedata.category(c) == "Pd"] + [
    "\u2212", "\uff0d", "\ufe63", "\u02d7"]


@FUZZ
@given(data=st.data(), backend=BACKENDS)
def test_lookalike_dashes_in_any_flag_name_are_refused(data: st.DataObject, backend: str) -> None:
    table = BY_NAME[backend]
    spelling = data.draw(st.sampled_from(all_spellings(table)))
    positions = [i for i, c in enumerate(spelling) if c == "-"]
    position = data.draw(st.sampled_from(positions))
    dash = data.draw(st.sampled_from(LOOKALIKE_DASHES))
    spoofed = spelling[:position] + dash + spelling[position + 1:]
    try:
        table.validate([spoofed, "1"])
    except FlagError as error:
        assert "look-alike" in error.reason or "invisible" in error.reason
    else:
        raise AssertionError(spoofed)


# ---------------------------------------------------------------------------------------------
# raw_runtime_flags
# ---------------------------------------------------------------------------------------------

PRINTABLE_TOKEN = st.text(alphabet=string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
                          max_size=10)


@FUZZ
@given(tokens=st.lists(PRINTABLE_TOKEN, max_size=8))
def test_raw_flags_round_trip_through_shlex_join(tokens: list[str]) -> None:
    assert split_raw_flags(shlex.join(tokens)) == tokens


@FUZZ
@given(raw=st.text(max_size=40), backend=BACKENDS)
def test_any_raw_string_is_split_and_validated_or_refused(raw: str, backend: str) -> None:
    table = BY_NAME[backend]
    try:
        output = table.validate(split_raw_flags(raw))
    except FlagError:
        return
    assert_safe_output(table, output)


# ---------------------------------------------------------------------------------------------
# HF overrides
# ---------------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), SAFE_TEXT)
# HF override keys: identifiers that do not start with `_` (vLLM's overrides refuse those).
OVERRIDE_KEY = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,12}", fullmatch=True)
VALID_JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(OVERRIDE_KEY, inner, max_size=3)), max_leaves=12)
VALID_OVERRIDES = st.dictionaries(OVERRIDE_KEY.filter(lambda k: k not in ("auto_map", "trust_remote_code")),
                                  VALID_JSON, max_size=4)


def _without_denied_keys(node: object) -> bool:
    if isinstance(node, dict):
        return all(k not in ("auto_map", "trust_remote_code") and _without_denied_keys(v) for k, v in node.items())
    if isinstance(node, list):
        return all(_without_denied_keys(v) for v in node)
    return True


@FEW
@given(overrides=VALID_OVERRIDES.filter(_without_denied_keys))
def test_valid_hf_overrides_round_trip(overrides: dict[str, object]) -> None:
    try:
        compact = validate_hf_overrides(overrides)
    except FlagError as error:
        # Only size may refuse a structurally valid object.
        assert "longer than" in error.reason
        return
    assert json.loads(compact) == overrides
    assert compact.isascii()
    assert validate_hf_overrides(compact) == compact


BAD_KEYS = st.sampled_from(["a-b", "", "1x", "a.b", "a b", "ключ", "a\x00", "a/b", "__import__('os')", "__class__",
                           "_x"])


@FEW
@given(overrides=VALID_OVERRIDES.filter(_without_denied_keys), bad=BAD_KEYS, data=st.data())
def test_a_bad_key_at_any_depth_is_refused_by_path(overrides: dict[str, object], bad: str,
                                                   data: st.DataObject) -> None:
    path: list[str] = []
    node: dict[str, object] = overrides
    while True:
        children = [k for k, v in node.items() if isinstance(v, dict)]
        if not children or not data.draw(st.booleans()):
            break
        key = data.draw(st.sampled_from(children))
        path.append(key)
        node = node[key]  # type: ignore[assignment]
    in_list = data.draw(st.booleans())
    node["wrap"] = [0, {bad: 1}] if in_list else {bad: 1}
    try:
        validate_hf_overrides(overrides)
    except FlagError as error:
        expected = ".".join([*path, "wrap"]) + ("[1]" if in_list else "")
        assert error.element.startswith(expected), (error.element, expected)
        return
    raise AssertionError(overrides)


ANY_OBJECT = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)),
    max_leaves=10)


@FUZZ
@given(obj=ANY_OBJECT)
def test_any_object_is_validated_or_refused(obj: object) -> None:
    try:
        compact = validate_hf_overrides(obj)
    except FlagError:
        return
    assert isinstance(json.loads(compact), dict)
