"""llama-server's own option list, read from its `--help`: which flags this build knows, their spellings,
and what their values look like.

The layout is common/arg.cpp's `common_params_print_usage`: an option line starts at column 0 with its
comma-separated spellings, then (after one space) the value placeholder (`N`, `FNAME`, `{a,b}`,
`<0|1>`, `[on|off|auto]`), then the description, which continues on indented lines and may say
`allowed values: a, b, c`.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

_SPELLING = r"-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]*"
_OPTION_LINE = re.compile(rf"^(?P<names>{_SPELLING}(?:,\s+{_SPELLING})*)(?: (?P<value>\S+(?: \S+)*?))?(?:\s{{2,}}"
                          r"(?P<text>.*))?$")
_ALLOWED = re.compile(r"allowed values:\s*([A-Za-z0-9_.+-]+(?:,\s*[A-Za-z0-9_.+-]+)*)")


class HelpOption(BaseModel):
    """One option as `--help` prints it."""

    model_config = ConfigDict(frozen=True)

    spellings: tuple[str, ...]  # positive spellings, long and short
    negations: tuple[str, ...] = ()
    value: str | None = None  # the placeholder; None: a switch
    description: str = ""

    @property
    def all_spellings(self) -> tuple[str, ...]:
        return (*self.spellings, *self.negations)

    @property
    def choices(self) -> tuple[str, ...]:
        """The values it allows, when the placeholder or the description lists them."""
        if self.value is not None:
            listed = re.fullmatch(r"[{<\[]([A-Za-z0-9_.+-]+(?:[,|][A-Za-z0-9_.+-]+)+)[}>\]]", self.value)
            if listed:
                return tuple(re.split(r"[,|]", listed.group(1)))
        found = _ALLOWED.search(self.description)
        return tuple(v.strip() for v in found.group(1).split(",")) if found else ()


def _is_negation(spelling: str, after_long: bool) -> bool:
    if spelling.startswith(("--no-", "-no-")):
        return True
    # Short negations (-nkvo, -nocb, -nr) follow the long positive spelling: `-kvo, --kv-offload, -nkvo, ...`.
    return after_long and not spelling.startswith("--") and spelling.startswith("-n")


def _split_switch(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    seen_long = False
    for i, name in enumerate(names):
        if i > 0 and _is_negation(name, seen_long):
            return tuple(names[:i]), tuple(names[i:])
        seen_long = seen_long or name.startswith("--")
    return tuple(names), ()


def parse_help(text: str) -> list[HelpOption]:
    """Every option of a `--help` text, in order (section headers and blank lines skipped)."""
    options: list[HelpOption] = []
    current: dict[str, object] | None = None
    lines: list[str] = []

    def finish() -> None:
        if current is not None:
            options.append(HelpOption.model_validate({**current, "description": " ".join(lines)}))

    for line in text.splitlines():
        match = _OPTION_LINE.match(line) if line.startswith("-") and not line.startswith("-----") else None
        if match:
            finish()
            names = [n.strip() for n in match.group("names").split(",")]
            value = match.group("value")
            positive, negative = _split_switch(names) if value is None else (tuple(names), ())
            current = {"spellings": positive, "negations": negative, "value": value}
            lines = [match.group("text") or ""]
        elif current is not None and line.startswith(" "):
            lines.append(line.strip())
        else:
            finish()
            current, lines = None, []
    finish()
    return options


_cache: dict[tuple[str, float], tuple[HelpOption, ...]] = {}
_cache_lock = threading.Lock()


def help_options(binary: Path, env: dict[str, str]) -> tuple[HelpOption, ...]:
    """Blocking: the options of this llama-server build, from its `--help`, read once per binary (path
    and modification time); OSError or subprocess errors when it cannot be run."""
    key = (str(binary), os.stat(binary).st_mtime)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30, env=env,
                          check=False)
    options = tuple(parse_help(done.stdout + "\n" + done.stderr))
    if not options:
        raise subprocess.SubprocessError(f"{binary} --help listed no options (exit code {done.returncode})")
    with _cache_lock:
        _cache[key] = options
    return options
