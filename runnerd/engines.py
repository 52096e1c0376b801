"""The registry of engines: the built-in backends, those other packages add through the
`runnerd.backends` entry-point group, and how each is built from the daemon's settings.

This is the only module of the daemon that names a built-in engine. Everything else asks the
Backend protocol (backends/base.py).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Collection, Iterable, Mapping
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from backends.atomic import write_atomically
from backends.base import Backend, EngineContext, GpuProvider, HostGpu, ModelFormat, NoOptions
from backends.external import ExternalEndpoint, ExternalError
from backends.manifest import Format, ManifestError, backend_class, format_of, parse_manifest

if TYPE_CHECKING:
    from runnerd.config import Settings
    from runnerd.gpus import GpuInfo

log = logging.getLogger("runnerd.engines")

ENTRY_POINT_GROUP = "runnerd.backends"

# name -> "module:Class", imported on first use. The order is the order of preference when a request
# names no backend: the first that serves a model's format serves it.
BUILTIN: dict[str, str] = {
    "llama.cpp": "backends.llamacpp:LlamaCppBackend",
    "vllm": "backends.vllm:VllmBackend",
}


class EngineRegistryError(Exception):
    """An engine cannot be registered or configured; the message names it and the key."""


def _load(target: str) -> type[Backend]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise EngineRegistryError(f"{target} is not a backends.base.Backend subclass")
    return cls


@cache
def engine_classes() -> dict[str, type[Backend]]:
    """Every engine this daemon can offer: the built-ins, then entry-point plug-ins (which can neither
    replace a built-in nor each other)."""
    classes = {name: _load(target) for name, target in BUILTIN.items()}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            cls = point.load()
        except Exception as exc:  # a broken plug-in must not take the daemon down
            log.error("engine plug-in %s (%s) cannot be loaded: %s", point.name, point.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            log.error("engine plug-in %s (%s) is not a backends.base.Backend subclass: ignored", point.name,
                      point.value)
            continue
        if cls.name in classes:
            log.error("engine plug-in %s names itself %r, which is taken: ignored", point.value, cls.name)
            continue
        classes[cls.name] = cls
    return classes


def settings_aliases() -> dict[str, str]:
    """Older top-level table names -> engine name (`llamacpp` -> `llama.cpp`)."""
    return {alias: name for name, cls in engine_classes().items() for alias in cls.settings_aliases}


def engine_settings(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, BaseModel]:
    """Each engine's `[engines.<name>]` table validated by that engine's settings model; an unknown
    engine or key raises EngineRegistryError naming it."""
    classes = engine_classes()
    unknown = sorted(set(tables) - set(classes))
    if unknown:
        raise EngineRegistryError(f"engines.{unknown[0]}: no such engine (known: {', '.join(classes)})")
    validated: dict[str, BaseModel] = {}
    for name, cls in classes.items():
        try:
            validated[name] = cls.settings_model.model_validate(dict(tables.get(name, {})))
        except ValidationError as exc:
            where = "; ".join(f"engines.{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                              for err in exc.errors())
            raise EngineRegistryError(where) from exc
    return validated


def as_host_gpus(gpus: Iterable[GpuInfo]) -> list[HostGpu]:
    return [HostGpu(index=g.index, uuid=g.uuid, name=g.name, memory_total_bytes=g.memory_total_bytes,
                    memory_free_bytes=g.memory_free_bytes) for g in gpus]


def host_gpus() -> list[HostGpu]:
    """The host's GPUs now, read once (for callers without the daemon's sampler)."""
    from runnerd.gpus import read_gpus

    return as_host_gpus(read_gpus()[0])


def default_backends(settings: Settings, gpus: GpuProvider = host_gpus) -> dict[str, Backend]:
    """Every registered engine, built from its settings; `gpus` tells them the host's GPUs when they ask."""
    context = engine_context(settings, gpus)
    backends = {name: cls.create(context, settings.engine(name)) for name, cls in engine_classes().items()}
    backends.update(manifest_backends(settings, context, set(backends)))
    return backends


def backend_for_format(backends: Mapping[str, Backend], model_format: ModelFormat) -> Backend | None:
    return next((b for b in backends.values() if model_format in b.model_formats), None)



# --- engines defined by a manifest -------------------------------------------------------------

MANIFEST_DIRECTORY = "engines"
# One definition at a time: the name check and the file write happen together.
_defining = threading.Lock()


def manifest_dir(settings: Settings) -> Path:
    return settings.data_dir / MANIFEST_DIRECTORY


def _manifest_files(directory: Path) -> list[Path]:
    # Dot files are write_atomically's temporaries.
    return sorted(p for p in directory.glob("*") if not p.name.startswith(".") and format_of(p.name) is not None
                  and p.is_file())


def manifest_backends(settings: Settings, context: EngineContext, taken: Collection[str]) -> dict[str, Backend]:
    """The engines defined by files in the data directory's engines/, each built from its checked manifest.
    A file that fails its checks is logged and left out: a broken definition must not take the daemon down.
    Executables are checked when a runner starts, not here (the engine may be installed later)."""
    engines: dict[str, Backend] = {}
    directory = manifest_dir(settings)
    if not directory.is_dir():
        return engines
    for path in _manifest_files(directory):
        fmt = format_of(path.name)
        assert fmt is not None
        try:
            manifest, flags = parse_manifest(path.read_text(encoding="utf-8"), fmt,
                                             reserved={*taken, *engines}, check_files=False)
        except (OSError, UnicodeDecodeError, ManifestError) as exc:
            log.error("engine manifest %s ignored: %s", path, exc)
            continue
        if path.name.rsplit(".", 1)[0] != manifest.name:
            log.error("engine manifest %s ignored: it defines %r; name the file %s.%s", path, manifest.name,
                      manifest.name, fmt)
            continue
        engines[manifest.name] = backend_class(manifest, flags).create(context, NoOptions())
    return engines


class ManifestConflict(Exception):
    """The name is already an engine's."""


def define_engine(settings: Settings, context: EngineContext, text: str, fmt: Format,
                  taken: Collection[str]) -> Backend:
    """Blocking: check a manifest (executables included), store it under engines/ atomically and build its
    backend; the caller adds it to the registry. ManifestError or ManifestConflict, and nothing stored,
    when it cannot be defined."""
    manifest, flags = parse_manifest(text, fmt, reserved=engine_classes().keys(), check_files=True)
    directory = manifest_dir(settings)
    with _defining:
        stored = [p for p in _manifest_files(directory) if p.name.rsplit(".", 1)[0] == manifest.name] \
            if directory.is_dir() else []
        if manifest.name in taken or stored:
            raise ManifestConflict(f"an engine named {manifest.name!r} exists already; delete it first")
        write_atomically(directory / f"{manifest.name}.{fmt}", text.encode("utf-8"), mode=0o600)
    return backend_class(manifest, flags).create(context, NoOptions())


def forget_engine(settings: Settings, name: str) -> bool:
    """Blocking: remove a manifest engine's stored definition; False when it has none."""
    directory = manifest_dir(settings)
    removed = False
    with _defining:
        for path in _manifest_files(directory) if directory.is_dir() else []:
            if path.name.rsplit(".", 1)[0] == name:
                path.unlink()
                removed = True
    return removed


def engine_context(settings: Settings, gpus: GpuProvider = host_gpus) -> EngineContext:
    from runnerd.gpus import gpu_count

    return EngineContext(cache_dir=settings.cache_dir, default_context_size=settings.default_context_size,
                         stop_grace=settings.stop_grace, gpu_count=gpu_count(), gpus=gpus)


# --- upstreams: external endpoints runnerd does not start ------------------------------------

# Sent with every request to an upstream. A runnerd receiving it serves and lists its own models only, so
# two daemons that are each other's upstreams neither pass a request back and forth nor list each other's
# lists.
VIA_UPSTREAM_HEADER = "X-Runnerd-Upstream"


def upstream_endpoints(settings: Settings) -> dict[str, ExternalEndpoint]:
    """Blocking (reads token files): an endpoint per `[[upstreams]]` table, in priority order (ties
    keep the file's order). EngineRegistryError names an unusable one."""
    endpoints: dict[str, ExternalEndpoint] = {}
    for spec in sorted(settings.upstreams, key=lambda s: s.priority):
        try:
            endpoints[spec.name] = ExternalEndpoint.from_spec(spec, {VIA_UPSTREAM_HEADER: "1"})
        except ExternalError as exc:
            raise EngineRegistryError(f"upstream {spec.name}: {exc}") from exc
    return endpoints
