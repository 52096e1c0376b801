"""Manifest text (YAML or TOML) -> a checked EngineManifest, with the line of the field a refusal names."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Collection
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from backends.flags import FlagTable
from backends.manifest.checks import check_manifest
from backends.manifest.errors import ManifestError
from backends.manifest.model import EngineManifest

Format = Literal["yaml", "toml"]
MAX_MANIFEST_BYTES = 64 * 1024
Locator = Callable[[tuple[str | int, ...]], int | None]


def field_name(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _loc(field: str, versions: Collection[str] = ()) -> tuple[str | int, ...]:
    """`field` back into its parts; a version's name may hold dots, so those are matched whole."""
    for key in sorted(versions, key=len, reverse=True):
        head = f"versions.{key}"
        if field == head or field.startswith((head + ".", head + "[")):
            return ("versions", key, *_loc(field[len(head):].lstrip(".")))
    parts: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", field):
        parts.append(int(index) if index else name)
    return tuple(parts)


def _yaml_document(text: str) -> tuple[Any, Locator]:
    # Aliases let a small document expand into a huge one for the validator: a manifest needs none.
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            mark = event.start_mark
            raise ManifestError("", "YAML aliases (*name) are not allowed in a manifest",
                                line=mark.line + 1 if mark else None)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    data = yaml.safe_load(text)

    def locate(loc: tuple[str | int, ...]) -> int | None:
        node, line = root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    return data, locate


def _toml_document(text: str) -> tuple[Any, Locator]:
    data = tomllib.loads(text)
    lines = text.splitlines()

    def locate(loc: tuple[str | int, ...]) -> int | None:
        """The line of the deepest key of `loc` found in order (tomllib keeps no positions)."""
        found, start = None, 0
        for part in loc:
            if isinstance(part, int):
                continue
            key = re.escape(part)
            pattern = re.compile(rf"^\s*(?:\[+\s*)?(?:[\w.\"'-]+\.)?[\"']?{key}[\"']?\s*(?:=|\]|\.)")
            hit = next((i for i in range(start, len(lines)) if pattern.search(lines[i])), None)
            if hit is None:
                break
            found, start = hit + 1, hit
        return found

    return data, locate


def parse_manifest(text: str, fmt: Format, *, reserved: Collection[str], check_files: bool = True) \
        -> tuple[EngineManifest, FlagTable | None]:
    """The manifest and its callers' flag table, or ManifestError naming the field and its line.
    `reserved`: engine names taken by built-ins and plug-ins. `check_files` stats the executables (blocking)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise ManifestError("", f"a manifest is at most {MAX_MANIFEST_BYTES // 1024} KiB")
    try:
        data, locate = _yaml_document(text) if fmt == "yaml" else _toml_document(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ManifestError("", f"not valid YAML: {exc.problem}", line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ManifestError("", f"not valid YAML: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError("", f"not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError("", "a manifest is a mapping of fields (name, versions, ...)")
    try:
        manifest = EngineManifest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        raise ManifestError(field_name(loc), error["msg"], line=locate(loc)) from None
    try:
        table = check_manifest(manifest, reserved=reserved, check_files=check_files)
    except ManifestError as exc:
        raise exc.at_line(locate(_loc(exc.field, manifest.versions))) from None
    return manifest, table


def format_of(filename: str) -> Format | None:
    lower = filename.lower()
    if lower.endswith((".yaml", ".yml")):
        return "yaml"
    if lower.endswith(".toml"):
        return "toml"
    return None
