"""Rules that relate a manifest's fields, each refusal naming the field it is about.

Defining an engine is code execution on the host, so a manifest is held to what runnerd's own engines
guarantee: the executable is an absolute path to a file nobody else can swap, the engine listens only
where the daemon says, the daemon alone chooses the model, the address and the name, and callers' flags
pass an allowlist that cannot reach what the template sets.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection, Iterator, Sequence

from backends.base import Capability, ModelFormat
from backends.flags import FlagTable
from backends.manifest.daemon_options import daemon_option
from backends.manifest.errors import ManifestError
from backends.manifest.flagtable import flag_table
from backends.manifest.model import (
    API_PATHS,
    CAPABILITY_APIS,
    ENV_NAME_PATTERN,
    NAME_PATTERN,
    NAME_SUFFIX,
    VERSION_PATTERN,
    EngineManifest,
    ListenKind,
)
from backends.manifest.template import placeholders


def check_name(name: str, reserved: Collection[str]) -> None:
    stem = name.removesuffix(NAME_SUFFIX)
    if name in reserved or stem in reserved:
        raise ManifestError("name", f"{name!r} shadows the engine {stem if stem in reserved else name!r}, which "
                            f"runnerd has already; manifest engines are named <name>{NAME_SUFFIX}")
    if not re.fullmatch(NAME_PATTERN, name):
        raise ManifestError("name", f"{name!r} is not a manifest engine name: lowercase letters, digits, '.', '_' "
                            f"and '-', at most 48 characters, ending in {NAME_SUFFIX!r} (so it never shadows a "
                            "built-in engine)")


def executable_problem(path: str) -> str | None:
    """Why `path` cannot be a manifest engine's executable (blocking: it stats the file)."""
    if not os.path.isabs(path):
        return f"{path!r} is not an absolute path (no search through PATH)"
    if os.path.normpath(path) != path or "//" in path:
        return f"{path!r} is not a normalised path ('..', '.' or '//' in it)"
    try:
        info = os.stat(path)
        parent = os.stat(os.path.dirname(path))
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if not os.access(path, os.X_OK):
        return f"{path} is not executable"
    # Allowed locations: a file, and a directory, that only its owner and group can change.
    if info.st_mode & stat.S_IWOTH:
        return f"{path} is writable by every user: anyone could replace what runnerd runs"
    if parent.st_mode & stat.S_IWOTH:
        return f"{os.path.dirname(path)} is writable by every user (like /tmp): keep engines where only their " \
               "owner can replace them"
    return None


def _placeholders(field: str, element: str) -> list[str]:
    try:
        return placeholders(element)
    except ValueError as exc:
        raise ManifestError(field, str(exc)) from None


def _options(elements: Sequence[str]) -> Iterator[tuple[int, str, str | None]]:
    """(index, option, its value or None) for each element that is an option."""
    for i, element in enumerate(elements):
        if not element.startswith("-") or element == "-" or re.fullmatch(r"-[\d.]+", element):
            continue
        name, eq, joined = element.partition("=")
        value = joined if eq else (elements[i + 1] if i + 1 < len(elements) else None)
        yield i, name, value


def _check_daemon_options(field: str, elements: Sequence[str], offset: int = 0) -> None:
    for i, name, value in _options(elements):
        allowed = daemon_option(name)
        if allowed is None:
            continue
        where = f"{field}[{i + offset}]"
        if not allowed:
            raise ManifestError(where, f"{name} is the daemon's: runnerd talks to the engine without it")
        if value not in allowed:
            want = " or ".join(sorted(allowed))
            raise ManifestError(where, f"{name} is the daemon's: its value must be {want}, not {value!r}")


def template_options(manifest: EngineManifest) -> set[str]:
    """Every option the manifest's templates pass: callers may not pass them again."""
    names: set[str] = set()
    for version in manifest.versions.values():
        names |= {name for _, name, _ in _options(version.command[1:])}
        for args in version.mode_args.values():
            names |= {name for _, name, _ in _options(args)}
    return names


def check_manifest(manifest: EngineManifest, *, reserved: Collection[str],
                   check_files: bool = True) -> FlagTable | None:
    """ManifestError for the first rule the manifest breaks; its callers' flag table when it breaks none.
    `check_files`: also check each executable on disk (blocking)."""
    check_name(manifest.name, reserved)
    if manifest.default_version is not None and manifest.default_version not in manifest.versions:
        raise ManifestError("default_version", f"{manifest.default_version!r} is not one of the versions "
                            f"({', '.join(manifest.versions)})")
    if manifest.default_version is None and len(manifest.versions) > 1:
        raise ManifestError("default_version", f"say which of {', '.join(manifest.versions)} serves by default")
    for key, version in manifest.versions.items():
        field = f"versions.{key}"
        if "/" in key or ".." in key or not re.fullmatch(VERSION_PATTERN, key):
            raise ManifestError(field, f"version name {key!r} must be letters, digits and '._+-', without '/' or "
                                "'..' (it names a directory)")
        executable = version.command[0]
        if _placeholders(f"{field}.command[0]", executable):
            raise ManifestError(f"{field}.command[0]", "the executable cannot be a placeholder")
        problem = executable_problem(executable) if check_files else (
            None if os.path.isabs(executable) and os.path.normpath(executable) == executable
            else f"{executable!r} is not an absolute, normalised path")
        if problem:
            raise ManifestError(f"{field}.command[0]", problem)
        used = {p for i, e in enumerate(version.command) for p in _placeholders(f"{field}.command[{i}]", e)}
        for mode, args in version.mode_args.items():
            if mode not in manifest.modes:
                raise ManifestError(f"{field}.mode_args.{mode}", f"mode {mode} is not among the modes")
            for i, e in enumerate(args):
                _placeholders(f"{field}.mode_args.{mode}[{i}]", e)
            _check_daemon_options(f"{field}.mode_args.{mode}", args)
        for env_name, env_value in version.environment.items():
            if not re.fullmatch(ENV_NAME_PATTERN, env_name):
                raise ManifestError(f"{field}.environment", f"{env_name!r} is not a variable name")
            if re.search(r"(?:^|_)(?:HOST|PORT|API_KEY|UDS|SOCKET)$", env_name, re.I):
                # Engines read options from variables too (LLAMA_ARG_HOST, VLLM_PORT): the daemon's as well.
                raise ManifestError(f"{field}.environment.{env_name}", "the listen address and API keys are the "
                                    "daemon's, in variables too")
            _placeholders(f"{field}.environment.{env_name}", env_value)
        need, never = ("port", "socket") if version.listen is ListenKind.TCP else ("socket", "port")
        if need not in used:
            raise ManifestError(f"{field}.command", f"listen: {version.listen} needs {{{need}}} in the command: "
                                "the engine must listen where the daemon says")
        if never in used:
            raise ManifestError(f"{field}.command", f"{{{never}}} has no value when listen is {version.listen}")
        _check_daemon_options(f"{field}.command", version.command[1:], offset=1)
    for i, e in enumerate(manifest.default_args):
        if {"port", "socket"} & set(_placeholders(f"default_args[{i}]", e)):
            raise ManifestError(f"default_args[{i}]", "the listen address belongs in the version's command")
    _check_daemon_options("default_args", manifest.default_args)
    _check_paths(manifest)
    if manifest.memory.kind == "fixed" and not (manifest.memory.ram_bytes or manifest.memory.vram_bytes):
        raise ManifestError("memory", "kind fixed needs ram_bytes or vram_bytes")
    if manifest.memory.kind == "gguf" and ModelFormat.GGUF not in manifest.model_formats:
        raise ManifestError("memory.kind", "gguf estimates need gguf among the model_formats")
    return flag_table(manifest, template_options(manifest))


def _check_paths(manifest: EngineManifest) -> None:
    paths = manifest.request_paths
    known = set(API_PATHS.values())
    for i, path in enumerate(paths):
        if path not in known:
            raise ManifestError(f"paths[{i}]", f"{path!r} is not a path runnerd sends to engines; known: "
                                f"{', '.join(API_PATHS.values())}")
    if len(set(paths)) != len(paths):
        raise ManifestError("paths", "a path is listed twice")
    for capability, api in CAPABILITY_APIS.items():
        path = API_PATHS[api]
        if (capability in manifest.capabilities) != (path in paths):
            raise ManifestError("paths" if capability in manifest.capabilities else "capabilities",
                                f"capability {capability} and path {path} go together: list both or neither")
    if Capability.TOOLS in manifest.capabilities and Capability.CHAT not in manifest.capabilities:
        raise ManifestError("capabilities", "tools needs chat")

