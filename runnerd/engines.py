"""The registry of engines: the built-in backends, those other packages add through the
`runnerd.backends` entry-point group, and how each is built from the daemon's settings.

This is the only module of the daemon that names a built-in engine. Everything else asks the
Backend protocol (backends/base.py).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from backends.base import Backend, EngineContext, GpuProvider, HostGpu, ModelFormat

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
    from runnerd.gpus import gpu_count

    context = EngineContext(cache_dir=settings.cache_dir, default_context_size=settings.default_context_size,
                            stop_grace=settings.stop_grace, gpu_count=gpu_count(), gpus=gpus)
    return {name: cls.create(context, settings.engine(name)) for name, cls in engine_classes().items()}


def backend_for_format(backends: Mapping[str, Backend], model_format: ModelFormat) -> Backend | None:
    return next((b for b in backends.values() if model_format in b.model_formats), None)

