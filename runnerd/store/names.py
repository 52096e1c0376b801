"""Model names: `name[:tag]` with up to four '/' namespaces; a name without a tag means `:latest`."""

from __future__ import annotations

import re

from runnerd.store.errors import StoreError

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT}){{0,3}}(?::(?P<tag>{_SEGMENT}))?$")
DEFAULT_TAG = "latest"


def canonical_name(name: str) -> str:
    """`gemma3` -> `gemma3:latest`; raises StoreError for a name that cannot be a model reference."""
    if not isinstance(name, str) or len(name) > 300 or not _NAME.match(name) or ".." in name:
        raise StoreError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', "
                         "optional '/' namespaces and an optional ':tag'", code="invalid_name")
    match = _NAME.match(name)
    assert match is not None
    return name if match.group("tag") else f"{name}:{DEFAULT_TAG}"
