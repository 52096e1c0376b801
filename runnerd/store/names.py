"""Model names: `name[:tag]` with up to four '/' namespaces; a name without a tag means `:latest`.

Lengths are bounded so that every file a name becomes fits a file name (NAME_MAX, 255 bytes): the
manifest is the name percent-encoded ('/' and ':' take three characters each) plus `.json`, and its
temporary file while it is written adds a dot and nine characters more. Any name a manifest was ever
written under still fits.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import quote

from runnerd.store.errors import StoreError

MAX_PART_CHARS = 128  # one namespace, the model's own name, or the tag
# The whole `name:tag` (`:latest` added when no tag is given) as its manifest's file name spells it.
MAX_NAME_CHARS = 255 - len(".json") - len(".-12345678")
_SEGMENT = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_PART_CHARS - 1}}}"
_NAME = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT}){{0,3}}(?::(?P<tag>{_SEGMENT}))?$")
_CHARACTERS = re.compile(r"^[A-Za-z0-9._:/-]*$")
DEFAULT_TAG = "latest"


def _too_long(name: str) -> StoreError | None:
    """The length rule a name breaks, named with its limit; None when every part fits."""
    base, _, tag = name.partition(":")
    if len(tag) > MAX_PART_CHARS:
        return StoreError(f"invalid model name: the tag is {len(tag)} characters long, at most {MAX_PART_CHARS} "
                          "are allowed", code="name_too_long")
    for part in base.split("/"):
        if len(part) > MAX_PART_CHARS:
            return StoreError(f"invalid model name: the part {part[:40]!r}... is {len(part)} characters long, at "
                              f"most {MAX_PART_CHARS} are allowed between '/'", code="name_too_long")
    whole = len(quote(name if tag else f"{name}:{DEFAULT_TAG}", safe=""))
    if whole > MAX_NAME_CHARS:
        return StoreError(f"invalid model name: with its tag it is {whole} characters long, at most "
                          f"{MAX_NAME_CHARS} are allowed (each '/' and ':' counts as 3)", code="name_too_long")
    return None


def canonical_name(name: str) -> str:
    """`gemma3` -> `gemma3:latest`; raises StoreError for a name that cannot be a model reference."""
    if not isinstance(name, str) or len(name) > 4 * MAX_NAME_CHARS:
        raise StoreError(f"invalid model name: at most {MAX_NAME_CHARS} characters are allowed (name and tag "
                         "together, each '/' and ':' counts as 3)", code="name_too_long")
    return _canonical(name)


# Every request looks its model up by name: checking a name costs microseconds, a cached answer
# nanoseconds. A refused name raises, so only valid names are kept, at most this many.
@functools.lru_cache(maxsize=4096)
def _canonical(name: str) -> str:
    if not _CHARACTERS.match(name):
        raise _invalid(name)
    too_long = _too_long(name)
    if too_long is not None:
        raise too_long
    match = _NAME.match(name)
    if match is None or ".." in name:
        raise _invalid(name)
    return name if match.group("tag") else f"{name}:{DEFAULT_TAG}"


def _invalid(name: str) -> StoreError:
    return StoreError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', optional '/' "
                      "namespaces and an optional ':tag'", code="invalid_name")
