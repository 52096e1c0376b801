"""The installed vLLM release's own option list, read from its argument parser and cached beside the install.

Reading it means importing vllm (about 10 s of CPU), so it happens once per release: at install time, or
the first time runnerd meets an environment installed before (``load_options``), in a thread or a
subprocess, never on the event loop. The result is a JSON file named after the release
(``vllm-options-<distribution>-<version>.json``), written atomically; when the environment's vLLM
changes version the name no longer matches, the list is read again and the old file removed.

Which directory holds the file is the install's business (backends/vllm/install.py, `options_dir`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.atomic import write_atomically
from backends.base import InstallError

DUMP_SCRIPT = Path(__file__).with_name("dump_options.py")
PREFIX = "vllm-options-"
# Bumped when dump_options.py records something new: a cached list of another format is read again.
FORMAT = 1
READ_TIMEOUT_S = 300

OptionType = Literal["bool", "int", "float", "str", "json"]


class ParserOption(BaseModel):
    """One option of vLLM's parser, as argparse holds it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    names: tuple[str, ...] = Field(min_length=1)
    takes_value: bool
    type: OptionType
    type_name: str | None = None  # vLLM's parse function (human_readable_int, parse_dataclass, ...)
    human: bool = False  # vLLM reads 64k / 1.5M style integers
    choices: tuple[str, ...] | None = None
    nargs: int | str | None = None
    repeats: bool = False  # argparse's append action
    help: str = ""


class OptionList(BaseModel):
    """What `dump_options.py` writes: the release it read, and every option of its server parser."""

    model_config = ConfigDict(extra="ignore")

    format: int = FORMAT
    vllm: str  # "<distribution> <version>", as read_version says it
    allow_abbrev: bool = True
    options: tuple[ParserOption, ...] = Field(min_length=1)


def cache_file(directory: Path, version: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._+-" else "-" for c in version)
    return directory / f"{PREFIX}{safe}.json"


def dump_argv(python: Path, out: Path) -> list[str]:
    return [str(python), "-I", str(DUMP_SCRIPT), str(out)]


def dump_env(base: Mapping[str, str]) -> dict[str, str]:
    # Importing vllm must fetch nothing and report nothing.
    return {**base, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "PYTHONNOUSERSITE": "1"}


def parse_dump(out: Path, python: Path) -> OptionList:
    """The option list the dump script wrote to `out`; InstallError if it wrote none or a malformed one."""
    try:
        raw = out.read_bytes()
    except OSError as exc:
        raise InstallError(f"reading vLLM's options with {python} wrote no option list ({exc.strerror})") from exc
    try:
        return OptionList.model_validate_json(raw)
    except ValidationError as exc:
        raise InstallError(f"vLLM's option list from {python} is malformed: {exc.errors()[0]['msg']}") from exc


def read_options(python: Path) -> OptionList:
    """Blocking: run the dump script with `python` (about 10 s of CPU) and parse what it wrote;
    InstallError when it fails or writes something else."""
    with tempfile.TemporaryDirectory(prefix="runnerd-vllm-options-") as work:
        out = Path(work) / "options.json"
        try:
            done = subprocess.run(dump_argv(python, out), capture_output=True, text=True, timeout=READ_TIMEOUT_S,
                                  env=dump_env(os.environ), check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise InstallError(f"cannot read vLLM's options with {python}: {exc}") from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise InstallError(f"reading vLLM's options with {python} failed (exit {done.returncode}): {last}")
        return parse_dump(out, python)


def _load(path: Path, version: str) -> OptionList | None:
    try:
        found = OptionList.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None
    return found if found.format == FORMAT and found.vllm == version else None


def store(path: Path, options: OptionList) -> None:
    """The whole file or nothing: a reader never sees half a list, and older releases' lists are removed."""
    write_atomically(path, options.model_dump_json().encode())
    for old in path.parent.glob(f"{PREFIX}*.json"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()


def load_options(python: Path, directory: Path, version: str) -> OptionList:
    """Blocking: the option list of the vLLM `python` runs (`version`, as read_version says it), from
    `directory`'s cache when it was made for that release, else read from the parser and cached there.
    InstallError when it cannot be read."""
    path = cache_file(directory, version)
    cached = _load(path, version)
    if cached is not None:
        return cached
    fresh = read_options(python)
    if fresh.vllm != version:
        raise InstallError(f"{python} reports {version!r} in its metadata but its parser is {fresh.vllm!r}")
    # An unwritable cache costs a new read next time, nothing else.
    with contextlib.suppress(OSError):
        store(path, fresh)
    return fresh
