"""Runtime-flag validation: an engine-free library of the rules and the table type engines declare.

Callers tune engines per model with runtime flags, and every flag they send ends up on an engine's
command line. The rules here make sure nothing a caller sends can make an engine read or write a
host file, reach the network, run code, or change what the daemon owns (where the engine listens,
which model it serves, in which mode):

- every flag must be on the engine's allowlist (``backends/<engine>/flags.py``), declared with the
  type of its value, so a value is consumed by its flag and checked (``-1`` and ``-0.5`` are values,
  never flags);
- flags that are known but refused carry the reason (set by runnerd, touches files, network, code);
- every element passes character rules (no control or invisible characters, no Unicode look-alikes
  of ``/ \\ - = : . ~ @``) and free text passes path/URL/address rules, checked on the text and on its
  NFKC normal form;
- the result is rewritten in one canonical spelling per flag (long name, engine-specific value
  placement), so the daemon can place its own flags after the caller's and know they win.

This module knows no engine: each engine package builds its ``FlagTable`` from the builders here
(``backends/llamacpp/flags.py``, ``backends/vllm/flags.py``) and validates through it
(``table.validate(flags)``, ``table.values(flags)``). Engine packages import this module, never the
reverse.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import shlex
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

__all__ = [
    "MAX_ELEMENTS",
    "MAX_ELEMENT_BYTES",
    "MAX_FLAGS",
    "MAX_RAW_BYTES",
    "FlagError",
    "FlagSpec",
    "FlagTable",
    "KeyRule",
    "Refusal",
    "RefusalKind",
    "ValueKind",
    "choice",
    "integer",
    "json_object",
    "number",
    "owned",
    "refused",
    "split_raw_flags",
    "switch",
    "text",
    "validate_json_object",
    "validate_json_option",
]

MAX_FLAGS = 64
"""At most this many flags (a flag and its value count as one)."""
MAX_ELEMENTS = 2 * MAX_FLAGS
"""Bound on the list length, checked before parsing so hostile input costs little."""
MAX_ELEMENT_BYTES = 4096
"""Per element, in UTF-8 bytes; also bounds a serialised JSON value (one argv element)."""
MAX_RAW_BYTES = 64 * 1024
"""Bound on ``raw_runtime_flags`` before it is split."""
MAX_JSON_DEPTH = 16
MAX_JSON_KEY_CHARS = 256

_SHOWN_CHARS = 80


class FlagError(ValueError):
    """A runtime flag (or a JSON option such as vLLM's HF overrides, or the raw flag string) was refused.

    ``element`` is the offending element as the caller sent it, ``reason`` says why in words meant
    for the caller, ``index`` is its position in the flag list when there is one. A ValueError, so a
    pydantic validator that raises it turns into a validation error; the API answers 400.
    """

    def __init__(self, element: str, reason: str, *, index: int | None = None,
                 subject: str = "runtime flag") -> None:
        self.element = element
        self.reason = reason
        self.index = index
        self.subject = subject
        super().__init__(f"{subject} {_shown(element)} refused: {reason}")


def _shown(text: str) -> str:
    # ascii() makes control characters and look-alikes visible (and harmless in a log line).
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return ascii(text)


# --------------------------------------------------------------------------------------------
# Allowlist types
# --------------------------------------------------------------------------------------------


class ValueKind(StrEnum):
    """What a flag takes. A switch takes nothing; every other kind takes exactly one value."""

    SWITCH = "switch"
    INT = "int"
    FLOAT = "float"
    ENUM = "enum"
    STRING = "string"
    JSON_OBJECT = "json-object"


class FlagSpec(BaseModel):
    """One allowlisted flag: its spellings and the type of its value.

    ``name`` is the canonical (long) spelling the validated list uses; ``aliases`` are accepted and
    rewritten to it. A boolean pair such as ``--mmap``/``--no-mmap`` is one spec with a
    ``negation``. ``choices`` are the allowed values of an ENUM, or extra words an INT also accepts
    (``auto``/``all`` for ``--gpu-layers``). With a ``separator`` the value is a list of items of the
    kind, each checked.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    aliases: tuple[str, ...] = ()
    negation: str | None = None
    negation_aliases: tuple[str, ...] = ()
    kind: ValueKind
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    separator: str | None = None
    max_items: int = 16
    pattern: str | None = None
    repeatable: bool = False
    human: bool = False
    """INT only: also accept 64k (10^3) / 64K (2^10) style suffixes; the value is passed as a plain
    integer after the range check."""

    @property
    def takes_value(self) -> bool:
        return self.kind is not ValueKind.SWITCH

    @property
    def positive_spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def negative_spellings(self) -> tuple[str, ...]:
        return (self.negation, *self.negation_aliases) if self.negation else ()


class RefusalKind(StrEnum):
    """Why a known flag is refused; the kind decides the first words of the message."""

    DAEMON_OWNED = "daemon-owned"
    FILES = "files"
    NETWORK = "network"
    CODE = "code"
    PROCESS = "process"
    UNSUPPORTED = "unsupported"


_REFUSAL_LEADS: dict[RefusalKind, str] = {
    RefusalKind.DAEMON_OWNED: "set by runnerd",
    RefusalKind.FILES: "it reads or writes files on the host",
    RefusalKind.NETWORK: "it fetches or connects over the network",
    RefusalKind.CODE: "it runs code or tools",
    RefusalKind.PROCESS: "it makes the engine exit or act as another program",
    RefusalKind.UNSUPPORTED: "not supported by runnerd",
}


class Refusal(BaseModel):
    """Flags the engine knows that callers may not pass, with the reason they are told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    names: tuple[str, ...]
    kind: RefusalKind
    detail: str = ""

    @property
    def reason(self) -> str:
        lead = _REFUSAL_LEADS[self.kind]
        return f"{lead}; {self.detail}" if self.detail else lead


ValueStyle = Literal["separate", "joined"]
_VALUE_STYLES: tuple[ValueStyle, ...] = ("separate", "joined")


@dataclass(frozen=True, eq=False)
class FlagTable:
    """An engine's allowlist, its known-but-refused flags, and how it wants values placed.

    ``backend`` is the engine's name, used in messages ("not on the llama.cpp allowlist").
    ``value_style`` is ``separate`` (``--flag value``: llama.cpp, which does not understand
    ``--flag=value``) or ``joined`` (``--flag=value``: vLLM, whose argument parser misreads a
    separate value such as ``-0.5`` as a dotted option).

    ``validate`` gives the flags to put on a command line; ``values`` gives what they set, by
    canonical name. Both parse with the same parser and raise FlagError naming the offending flag.
    """

    backend: str
    value_style: ValueStyle
    flags: tuple[FlagSpec, ...]
    refusals: tuple[Refusal, ...]

    _allowed: dict[str, tuple[FlagSpec, bool]] = field(default_factory=dict, init=False, repr=False)
    _refused: dict[str, Refusal] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.value_style not in _VALUE_STYLES:
            raise ValueError(f"{self.backend}: value_style must be one of {_VALUE_STYLES}")
        object.__setattr__(self, "flags", tuple(self.flags))
        object.__setattr__(self, "refusals", tuple(self.refusals))
        for spec in self.flags:
            _check_spec(spec)
            for spelling in spec.positive_spellings:
                self._add_spelling(spelling)
                self._allowed[spelling] = (spec, False)
            for spelling in spec.negative_spellings:
                self._add_spelling(spelling)
                self._allowed[spelling] = (spec, True)
        for refusal in self.refusals:
            for spelling in refusal.names:
                self._add_spelling(spelling)
                self._refused[spelling] = refusal

    def _add_spelling(self, spelling: str) -> None:
        # A spelling on two entries would make the table's answer depend on order: refuse the table.
        if not _FLAG_NAME.fullmatch(spelling):
            raise ValueError(f"{self.backend}: malformed flag spelling {spelling!r}")
        if spelling in self._allowed or spelling in self._refused:
            raise ValueError(f"{self.backend}: flag spelling {spelling!r} declared twice")

    def lookup(self, name: str) -> tuple[FlagSpec, bool] | Refusal | None:
        """The spec (and whether this spelling negates it), the refusal, or None if unknown."""
        found = self._allowed.get(name)
        if found is not None:
            return found
        # Case-insensitive for refusals only: `--HOST` is no valid flag either, but say why.
        return self._refused.get(name) or self._refused.get(name.lower())

    @property
    def allowed_spellings(self) -> frozenset[str]:
        return frozenset(self._allowed)

    @property
    def daemon_owned(self) -> frozenset[str]:
        """Every spelling of the flags runnerd sets itself (and callers may not)."""
        return frozenset(
            name for refusal in self.refusals if refusal.kind is RefusalKind.DAEMON_OWNED
            for name in refusal.names
        )

    def render(self, spec: FlagSpec, value: str | None, negated: bool) -> list[str]:
        """The canonical elements for one validated flag."""
        if negated:
            assert spec.negation is not None
            return [spec.negation]
        if value is None:
            return [spec.name]
        if self.value_style == "joined":
            return [f"{spec.name}={value}"]
        return [spec.name, value]

    def validate(self, flags: Sequence[str]) -> list[str]:
        """The flags to append to the engine's command line, in canonical form, or FlagError.

        Canonical form: the long spelling of each flag, values placed as ``value_style`` says
        (``--flag value`` or ``--flag=value``); numbers are rewritten in one spelling; JSON values
        are compacted. The error names the offending flag (its ``element`` and ``index``).
        """
        result: list[str] = []
        for parsed in _parse(self, flags):
            result += self.render(parsed.spec, parsed.value, parsed.negated)
        return result

    def values(self, flags: Sequence[str], *, strict: bool = True) -> dict[str, str | bool]:
        """Canonical flag name -> value (``True``/``False`` for a switch and its negation).

        For code that needs a tuned value (the memory estimates read ``--cache-type-k``). Strict, it
        validates exactly as ``validate`` does. With ``strict=False`` nothing is refused: a flag
        that is unknown or refused, misses its value or holds a value that fails its check is
        skipped (a bare element or one failing the character rules too), a flag may repeat and its
        last valid occurrence wins, as in the engines' own parsers, and the count limits do not
        apply. That form is for estimates over flag lists the daemon assembles (stored flags plus
        tuned ones); it never yields argv. A repeatable flag keeps its last value in both forms.
        """
        values: dict[str, str | bool] = {}
        for parsed in _parse(self, flags, strict=strict):
            values[parsed.spec.name] = parsed.value if parsed.value is not None else not parsed.negated
        return values


def _check_spec(spec: FlagSpec) -> None:
    if spec.kind is ValueKind.ENUM and not spec.choices:
        raise ValueError(f"{spec.name}: an enum needs choices")
    if spec.kind is ValueKind.SWITCH and (spec.choices or spec.separator or spec.pattern):
        raise ValueError(f"{spec.name}: a switch takes no value")
    if spec.negation and spec.kind is not ValueKind.SWITCH:
        raise ValueError(f"{spec.name}: only switches have a negation")


# Builders that keep the allowlist modules one line per flag.


def switch(name: str, *aliases: str, negation: str | None = None,
           negation_aliases: tuple[str, ...] = ()) -> FlagSpec:
    return FlagSpec(name=name, aliases=aliases, negation=negation,
                    negation_aliases=negation_aliases, kind=ValueKind.SWITCH)


def integer(name: str, *aliases: str, minimum: int | None = None, maximum: int | None = None,
            words: tuple[str, ...] = (), separator: str | None = None,
            repeatable: bool = False, human: bool = False) -> FlagSpec:
    return FlagSpec(name=name, aliases=aliases, kind=ValueKind.INT, minimum=minimum,
                    maximum=maximum, choices=words, separator=separator, repeatable=repeatable,
                    human=human)


def number(name: str, *aliases: str, minimum: float | None = None, maximum: float | None = None,
           separator: str | None = None, max_items: int = 16) -> FlagSpec:
    return FlagSpec(name=name, aliases=aliases, kind=ValueKind.FLOAT, minimum=minimum,
                    maximum=maximum, separator=separator, max_items=max_items)


def choice(name: str, *aliases: str, choices: Sequence[str], separator: str | None = None,
           repeatable: bool = False) -> FlagSpec:
    return FlagSpec(name=name, aliases=aliases, kind=ValueKind.ENUM, choices=tuple(choices),
                    separator=separator, repeatable=repeatable)


def text(name: str, *aliases: str, pattern: str | None = None, repeatable: bool = False) -> FlagSpec:
    return FlagSpec(name=name, aliases=aliases, kind=ValueKind.STRING, pattern=pattern,
                    repeatable=repeatable)


def json_object(name: str, *aliases: str) -> FlagSpec:
    return FlagSpec(name=name, aliases=aliases, kind=ValueKind.JSON_OBJECT)


def owned(*names: str, use: str | None = None, why: str = "") -> Refusal:
    """Flags runnerd sets itself; ``use`` names the configuration setting that controls it."""
    detail = f"use the {use} setting instead" if use else why
    return Refusal(names=names, kind=RefusalKind.DAEMON_OWNED, detail=detail)


def refused(kind: RefusalKind, *names: str, why: str = "") -> Refusal:
    return Refusal(names=names, kind=kind, detail=why)


# --------------------------------------------------------------------------------------------
# Character rules
# --------------------------------------------------------------------------------------------

_FLAG_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9_.-]*")
FLAG_NAME = _FLAG_NAME  # what a flag spelling looks like, for tables built elsewhere (manifests)
# Accepts what numbers look like to the engines' own parsers; `-1` and `-.5` are values.
# re.ASCII: `\d` would otherwise accept other scripts' digits, which Python reads but engines don't.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d{1,19}", re.ASCII)

_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# ASCII characters that give a value a meaning as a path, URL, address, option or argument file.
_LOOKALIKE_TARGETS = "/\\-=:.~@"
# Look-alikes that NFKC does not fold to their ASCII twin (dashes of category Pd are caught by
# category). Kept short: NFKC covers the fullwidth and small forms.
_EXTRA_LOOKALIKES: dict[str, str] = {
    "\u2212": "-",  # MINUS SIGN
    "\u02d7": "-",  # MODIFIER LETTER MINUS SIGN
    "\u2043": "-",  # HYPHEN BULLET
    "\u2796": "-",  # HEAVY MINUS SIGN
    "\u2215": "/",  # DIVISION SLASH
    "\u2044": "/",  # FRACTION SLASH
    "\u29f8": "/",  # BIG SOLIDUS
    "\u2571": "/",  # BOX DRAWINGS LIGHT DIAGONAL UPPER RIGHT TO LOWER LEFT
    "\u27cb": "/",  # MATHEMATICAL RISING DIAGONAL
    "\u3033": "/",  # VERTICAL KANA REPEAT MARK UPPER HALF
    "\u2216": "\\",  # SET MINUS
    "\u29f5": "\\",  # REVERSE SOLIDUS OPERATOR
    "\u29f9": "\\",  # BIG REVERSE SOLIDUS
    "\u2572": "\\",  # BOX DRAWINGS LIGHT DIAGONAL UPPER LEFT TO LOWER RIGHT
    "\u27cd": "\\",  # MATHEMATICAL FALLING DIAGONAL
    "\ua78a": "=",  # MODIFIER LETTER SHORT EQUALS SIGN
    "\u1400": "=",  # CANADIAN SYLLABICS HYPHEN
    "\u30a0": "=",  # KATAKANA-HIRAGANA DOUBLE HYPHEN
    "\u2e40": "=",  # DOUBLE HYPHEN
    "\u2236": ":",  # RATIO
    "\u0589": ":",  # ARMENIAN FULL STOP
    "\u02d0": ":",  # MODIFIER LETTER TRIANGULAR COLON
    "\ua789": ":",  # MODIFIER LETTER COLON
    "\u2024": ".",  # ONE DOT LEADER (NFKC folds it, listed for clarity)
    "\u2027": ".",  # HYPHENATION POINT
    "\u02dc": "~",  # SMALL TILDE
    "\u223c": "~",  # TILDE OPERATOR
}


def _lookalike_target(char: str) -> str | None:
    """The ASCII character a non-ASCII ``char`` could pass for, if it is one we care about."""
    if char in _EXTRA_LOOKALIKES:
        return _EXTRA_LOOKALIKES[char]
    if unicodedata.category(char) == "Pd":
        return "-"
    folded = unicodedata.normalize("NFKC", char)
    return next((c for c in folded if c in _LOOKALIKE_TARGETS), None)


def _char_refusal(text: str) -> str | None:
    """Why ``text`` holds a character no element may hold, or None."""
    for char in text:
        if char.isascii():
            if char.isprintable():
                continue
            if char == "\x00":
                return "contains a NUL character"
            if char in "\n\r":
                return "contains a line break"
            return f"contains the control character {char!a}"
        category = unicodedata.category(char)
        code = f"U+{ord(char):04X}"
        if category in _INVISIBLE_CATEGORIES:
            return f"contains the invisible or control character {code}"
        target = _lookalike_target(char)
        if target is not None:
            name = unicodedata.name(char, "unnamed")
            return f"contains {code} ({name}), a look-alike of {target!r}"
    return None


def _check_element(element: object, index: int) -> str:
    """Type, size and character rules every element passes, whatever its position."""
    if not isinstance(element, str):
        raise FlagError(repr(element), "every element must be a string", index=index)
    if len(element.encode("utf-8", "surrogatepass")) > MAX_ELEMENT_BYTES:
        raise FlagError(element, f"longer than {MAX_ELEMENT_BYTES} bytes", index=index)
    reason = _char_refusal(element)
    if reason is not None:
        raise FlagError(element, reason, index=index)
    return element


# --------------------------------------------------------------------------------------------
# Free-text rules (free-string values and strings inside JSON values)
# --------------------------------------------------------------------------------------------

# These rules are deliberately wider than what any engine would act on: free text has no business
# looking like a location at all. The colon rules look at words, so prose such as "User:" passes.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_SCHEMES = re.compile(
    r"(?<![A-Za-z0-9+.-])(?:file|https?|ftps?|wss?|data|hf|s3|gs|az|abfss?|ssh|git|unix|tcp|udp|docker"
    r"|oci|runai)\s*:",
    re.IGNORECASE,
)
_DRIVE = re.compile(r"(?<![A-Za-z])[A-Za-z]:")
_HOST_PORT = re.compile(r"[A-Za-z0-9_.\]-]:\d")
_IPV4 = re.compile(r"\d{1,10}(?:\.\d{1,10}){3}")
_IPV6 = re.compile(r"(?<![A-Za-z0-9_])[0-9A-Fa-f]{0,4}::[0-9A-Fa-f]")


def _text_refusal(value: str, *, leading_dash_ok: bool = False) -> str | None:
    """Why free text could name a path, URL, address, option or argument file; None if it cannot.

    Checked on the text and on its NFKC form, so compatibility spellings cannot hide anything.
    """
    for form in dict.fromkeys((value, unicodedata.normalize("NFKC", value))):
        reason = _ascii_text_refusal(form, leading_dash_ok=leading_dash_ok)
        if reason is not None:
            return reason
    return None


def _ascii_text_refusal(value: str, *, leading_dash_ok: bool) -> str | None:
    checks: tuple[tuple[bool, str], ...] = (
        (_URL.search(value) is not None or _URL_SCHEMES.search(value) is not None, "names a URL"),
        ("/" in value or "\\" in value, "names a path ('/' or '\\')"),
        ("~" in value, "names a path ('~')"),
        (".." in value, "names a path ('..')"),
        (_DRIVE.search(value) is not None, "names a path (drive letter)"),
        (_HOST_PORT.search(value) is not None, "names a network address (host:port)"),
        (_IPV4.search(value) is not None or _IPV6.search(value) is not None,
         "names a network address (IP)"),
        (value.startswith("@"), "starts with '@' (argument-file syntax)"),
        (not leading_dash_ok and value.startswith("-") and not _NUMBER.fullmatch(value),
         "starts with '-' (looks like a flag)"),
    )
    return next((reason for failed, reason in checks if failed), None)


# --------------------------------------------------------------------------------------------
# JSON values (HF overrides and JSON-valued flags)
# --------------------------------------------------------------------------------------------

_JSON_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JSON_INT_LIMIT = 2**63
# Keys that only matter for loading remote code; refused even though remote code is off.
_JSON_DENIED_KEYS = frozenset({"auto_map", "trust_remote_code"})

KeyRule = Callable[[str], str | None]
"""An engine's extra rule for the keys of a JSON option: why a key (already an identifier) is refused,
or None."""


def validate_json_object(obj: object, *, subject: str, key_rule: KeyRule | None = None) -> str:
    """Check a JSON object and return it serialised compactly (ASCII, no spaces).

    Keys are identifiers at every depth (inside lists too), and pass ``key_rule`` when one is given;
    values are JSON scalars, lists and objects; strings pass the free-text rules. Errors name the
    offending path.
    """
    if not isinstance(obj, Mapping):
        raise FlagError(subject, "must be a JSON object", subject=subject)
    _check_json_node(obj, path="", depth=0, subject=subject, key_rule=key_rule)
    serialised = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    if len(serialised) > MAX_ELEMENT_BYTES:
        raise FlagError(subject, f"serialised, longer than {MAX_ELEMENT_BYTES} bytes", subject=subject)
    return serialised


def _check_json_node(node: object, *, path: str, depth: int, subject: str, key_rule: KeyRule | None) -> None:
    def fail(reason: str) -> FlagError:
        return FlagError(path or "(top level)", reason, subject=subject)

    if depth > MAX_JSON_DEPTH:
        raise fail(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if node is None or isinstance(node, bool):
        return
    if isinstance(node, int):
        if not -_JSON_INT_LIMIT <= node < _JSON_INT_LIMIT:
            raise fail("integer out of the 64-bit range")
        return
    if isinstance(node, float):
        if not math.isfinite(node):
            raise fail("numbers must be finite")
        return
    if isinstance(node, str):
        _check_json_string(node, fail)
        return
    if isinstance(node, list):
        for position, item in enumerate(node):
            _check_json_node(item, path=f"{path}[{position}]", depth=depth + 1, subject=subject,
                             key_rule=key_rule)
        return
    if isinstance(node, Mapping):
        for key, item in node.items():
            child = _check_json_key(key, path=path, subject=subject, key_rule=key_rule)
            _check_json_node(item, path=child, depth=depth + 1, subject=subject, key_rule=key_rule)
        return
    raise fail(f"{type(node).__name__} is not a JSON value")


def _check_json_key(key: object, *, path: str, subject: str, key_rule: KeyRule | None) -> str:
    shown = key if isinstance(key, str) else repr(key)
    child = f"{path}.{shown}" if path else shown
    if not isinstance(key, str) or not _JSON_KEY.fullmatch(key) or len(key) > MAX_JSON_KEY_CHARS:
        raise FlagError(child, "keys must be identifiers ([A-Za-z_][A-Za-z0-9_]*)", subject=subject)
    if key in _JSON_DENIED_KEYS:
        raise FlagError(child, "this key only serves remote code", subject=subject)
    reason = key_rule(key) if key_rule is not None else None
    if reason is not None:
        raise FlagError(child, reason, subject=subject)
    return child


def _check_json_string(value: str, fail: Callable[[str], FlagError]) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ELEMENT_BYTES:
        raise fail(f"string longer than {MAX_ELEMENT_BYTES} bytes")
    reason = _char_refusal(value) or _text_refusal(value, leading_dash_ok=True)
    if reason is not None:
        raise fail(reason)


def _parse_json_text(raw: str, *, subject: str) -> object:
    """Parse JSON text strictly: no NaN/Infinity, no duplicate keys (parsers disagree on them)."""

    def reject_constant(name: str) -> object:
        raise ValueError(f"{name} is not allowed")

    def unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = value
        return result

    try:
        return json.loads(raw, parse_constant=reject_constant, object_pairs_hook=unique_pairs)
    except (ValueError, RecursionError) as exc:
        raise FlagError(raw, f"not valid JSON ({exc})", subject=subject) from None


def validate_json_option(obj: object, *, subject: str, key_rule: KeyRule | None = None) -> str:
    """Check a JSON-object option given as the decoded object (a dict) or as JSON text, and return
    the compact JSON (``validate_json_object``). Text is bounded, passes the character rules and is
    parsed strictly first. Raises FlagError with ``subject`` naming the offending key path."""
    if isinstance(obj, str):
        if len(obj.encode("utf-8", "surrogatepass")) > MAX_ELEMENT_BYTES:
            raise FlagError(obj, f"longer than {MAX_ELEMENT_BYTES} bytes", subject=subject)
        reason = _char_refusal(obj)
        if reason is not None:
            raise FlagError(obj, reason, subject=subject)
        obj = _parse_json_text(obj, subject=subject)
    return validate_json_object(obj, subject=subject, key_rule=key_rule)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------

_DEFAULT_INT_RANGE = (-(2**31), 2**31 - 1)  # llama.cpp reads ints with std::stoi
_DEFAULT_FLOAT_LIMIT = 1e12
_SMALLEST_FLOAT = 1e-30


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII)


class _ValueRefused(Exception):
    """Internal: a value failed its type; the caller turns it into a FlagError naming the flag."""


def _check_value(spec: FlagSpec, raw: str) -> str:
    """The canonical value for ``spec``; raises _ValueRefused with the reason."""
    if spec.kind is ValueKind.JSON_OBJECT:
        try:
            return validate_json_object(_parse_json_text(raw, subject=spec.name), subject=spec.name)
        except FlagError as exc:
            # The key path is caller text: shown escaped, it cannot break a log line.
            where = "" if exc.element in (raw, spec.name) else f" at {_shown(exc.element)}"
            raise _ValueRefused(f"is refused{where}: {exc.reason}") from None
    if spec.separator is None:
        return _check_item(spec, raw)
    items = raw.split(spec.separator)
    if len(items) > spec.max_items:
        raise _ValueRefused(f"more than {spec.max_items} items")
    return spec.separator.join(_check_item(spec, item) for item in items)


def _check_item(spec: FlagSpec, raw: str) -> str:
    if spec.kind is ValueKind.ENUM:
        if raw not in spec.choices:
            raise _ValueRefused(f"must be one of: {', '.join(spec.choices)}")
        return raw
    if spec.kind is ValueKind.INT:
        return raw if raw in spec.choices else _check_int(spec, raw)
    if spec.kind is ValueKind.FLOAT:
        return _check_float(spec, raw)
    return _check_string(spec, raw)


def _check_int(spec: FlagSpec, raw: str) -> str:
    words = f" or one of: {', '.join(spec.choices)}" if spec.choices else ""
    value = _human_int(raw) if spec.human else (int(raw) if _INTEGER.fullmatch(raw) else None)
    if value is None:
        kind = "an integer (suffixes k, K, m, M, g, G, t, T allowed)" if spec.human else "an integer"
        raise _ValueRefused(f"must be {kind}{words}")
    low = _DEFAULT_INT_RANGE[0] if spec.minimum is None else spec.minimum
    high = _DEFAULT_INT_RANGE[1] if spec.maximum is None else spec.maximum
    if not low <= value <= high:
        raise _ValueRefused(f"must be between {int(low)} and {int(high)}{words}")
    return str(value)


_HUMAN_INT = re.compile(r"(\d{1,15})(?:\.(\d{1,6}))?([kmgtKMGT])", re.ASCII)
_DECIMAL_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _human_int(raw: str) -> int | None:
    """vLLM's human-readable integers: 4096, 1.5k (decimal), 64K (binary, whole numbers only)."""
    if _INTEGER.fullmatch(raw):
        return int(raw)
    match = _HUMAN_INT.fullmatch(raw)
    if match is None:
        return None
    whole, fraction, suffix = match.groups()
    if suffix in _BINARY_SUFFIX:
        return None if fraction else int(whole) * _BINARY_SUFFIX[suffix]
    # Decimal, not float: 1.1k must be 1100 exactly.
    return int(Decimal(f"{whole}.{fraction or 0}") * _DECIMAL_SUFFIX[suffix])


def _check_float(spec: FlagSpec, raw: str) -> str:
    if not _NUMBER.fullmatch(raw):
        raise _ValueRefused("must be a number")
    value = float(raw)
    low = -_DEFAULT_FLOAT_LIMIT if spec.minimum is None else spec.minimum
    high = _DEFAULT_FLOAT_LIMIT if spec.maximum is None else spec.maximum
    if not (math.isfinite(value) and low <= value <= high):
        raise _ValueRefused(f"must be between {low:g} and {high:g}")
    if value != 0 and abs(value) < _SMALLEST_FLOAT:
        # llama.cpp reads floats with std::stof, which throws on float32 underflow.
        raise _ValueRefused(f"is too close to zero (use 0 or at least {_SMALLEST_FLOAT:g})")
    # repr() is the shortest spelling that reads back to the same number, in both engines.
    return repr(value)


def _check_string(spec: FlagSpec, raw: str) -> str:
    if raw.strip() == "":
        raise _ValueRefused("is empty")
    if spec.pattern is not None and not _compiled(spec.pattern).fullmatch(raw):
        raise _ValueRefused("is not in the accepted format")
    reason = _text_refusal(raw)
    if reason is not None:
        raise _ValueRefused(reason)
    return raw


# --------------------------------------------------------------------------------------------
# Parsing a flag list
# --------------------------------------------------------------------------------------------


class ParsedFlag(NamedTuple):
    spec: FlagSpec
    value: str | None
    negated: bool


def _split_flag(element: str, index: int) -> tuple[str, str | None]:
    """The flag's name (engine-normalised) and a value joined with ``=``, if any."""
    if not element.startswith("-") or _NUMBER.fullmatch(element):
        raise FlagError(element, "expected a flag here, got a bare value (values follow their flag)",
                        index=index)
    name, equals, joined = element.partition("=")
    if not _FLAG_NAME.fullmatch(name):
        raise FlagError(element, "malformed flag name", index=index)
    if name.startswith("--"):
        # Both engines read `--a_b` as `--a-b`; normalise so the lookup sees what the engine sees.
        name = "--" + name[2:].replace("_", "-")
    return name, (joined if equals else None)


def _lookup(table: FlagTable, name: str, element: str, index: int) -> tuple[FlagSpec, bool]:
    found = table.lookup(name)
    if isinstance(found, Refusal):
        raise FlagError(element, found.reason, index=index)
    if found is None:
        raise FlagError(element, _unknown_reason(table, name), index=index)
    return found


def _unknown_reason(table: FlagTable, name: str) -> str:
    if "." in name:
        # vLLM reads `--flag.key value` as a field of a JSON-valued flag: the syntax is refused.
        return "dotted option names (--flag.key) are not accepted"
    reason = f"not on the {table.backend} allowlist"
    close = difflib.get_close_matches(name, sorted(table.allowed_spellings), n=1, cutoff=0.8)
    return f"{reason} (did you mean {close[0]}?)" if close else reason


def _take_value(flags: Sequence[str], index: int, element: str) -> str:
    """The element after a flag that takes a value; it may be a number but not another flag."""
    if index + 1 >= len(flags):
        raise FlagError(element, "expects a value, but none follows", index=index)
    value = flags[index + 1]
    if value.startswith("-") and not _NUMBER.fullmatch(value):
        raise FlagError(element, f"expects a value, but the next element {_shown(value)} is a flag",
                        index=index)
    return value


def _parse(table: FlagTable, flags: Sequence[str], *, strict: bool = True) -> Iterator[ParsedFlag]:
    """The flags one by one. Strict, the first problem raises FlagError; not strict, a flag (or bare
    element) with a problem is skipped and parsing goes on with the next element."""
    if isinstance(flags, str):
        raise FlagError(flags[:_SHOWN_CHARS], "runtime flags must be a list of strings")
    if strict:
        if len(flags) > MAX_ELEMENTS:
            raise FlagError(f"{len(flags)} elements", f"more than {MAX_ELEMENTS} elements")
        for index, element in enumerate(flags):
            _check_element(element, index)
    seen: set[str] = set()
    index = 0
    count = 0
    while index < len(flags):
        element = flags[index]
        try:
            spec, negated, value, used = _parse_one(table, flags, index, strict=strict)
        except FlagError:
            if strict:
                raise
            index += 1
            continue
        if strict:
            if spec.name in seen and not spec.repeatable:
                raise FlagError(element, f"{spec.name} is given more than once", index=index)
            seen.add(spec.name)
            count += 1
            if count > MAX_FLAGS:
                raise FlagError(element, f"more than {MAX_FLAGS} flags", index=index)
        yield ParsedFlag(spec, value, negated)
        index += used


def _parse_one(table: FlagTable, flags: Sequence[str], index: int, *,
               strict: bool) -> tuple[FlagSpec, bool, str | None, int]:
    """The flag at ``index``: its spec, whether negated, its checked value, how many elements it used.
    Strict parsing has checked every element already; otherwise the ones used are checked here."""
    element = flags[index]
    if not strict:
        _check_element(element, index)
    name, joined = _split_flag(element, index)
    spec, negated = _lookup(table, name, element, index)
    if not strict and spec.takes_value and joined is None and index + 1 < len(flags):
        _check_element(flags[index + 1], index + 1)
    value, used = _flag_value(spec, negated, flags, index, joined)
    return spec, negated, value, used


def _flag_value(spec: FlagSpec, negated: bool, flags: Sequence[str], index: int,
                joined: str | None) -> tuple[str | None, int]:
    """The checked value of the flag at ``index`` and how many elements the flag used."""
    element = flags[index]
    if negated or not spec.takes_value:
        if joined is not None:
            raise FlagError(element, "takes no value", index=index)
        return None, 1
    raw, used = (joined, 1) if joined is not None else (_take_value(flags, index, element), 2)
    try:
        return _check_value(spec, raw), used
    except _ValueRefused as exc:
        raise FlagError(element if joined is not None else f"{element} {raw}",
                        f"value {_shown(raw)} {exc}", index=index) from None


# --------------------------------------------------------------------------------------------
# Raw flag strings
# --------------------------------------------------------------------------------------------


def split_raw_flags(raw: str) -> list[str]:
    """Split ``raw_runtime_flags`` the way a POSIX shell would (quotes, backslashes), nothing more.

    No expansion of any kind happens: no variables, globs or command substitution. Space, tab and
    newline separate elements; any other control character is refused, as are unbalanced quotes.
    """
    subject = "raw_runtime_flags"
    if not isinstance(raw, str):
        raise FlagError(repr(raw), "must be a string", subject=subject)
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_RAW_BYTES:
        raise FlagError(raw, f"longer than {MAX_RAW_BYTES} bytes", subject=subject)
    stray = next((c for c in raw if c not in " \t\n" and _char_refusal(c) is not None), None)
    if stray is not None:
        raise FlagError(raw, _char_refusal(stray) or "", subject=subject)
    try:
        return shlex.split(raw, comments=False, posix=True)
    except ValueError as exc:
        raise FlagError(raw, f"cannot be split like a shell command line: {str(exc).lower()}",
                        subject=subject) from None
