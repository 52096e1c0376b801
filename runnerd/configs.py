"""Stored per-(model, mode) backend configurations, kept across restarts.

The file is written atomically (temp file, fsync, rename). A file that cannot be read back is never
silently dropped: it is moved aside under a name that says so, and the problem is reported. A
temporary file a crash left mid-write is removed at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from backends.atomic import write_atomically
from backends.base import BackendConfiguration, Mode, ModelRef

log = logging.getLogger("runnerd.configs")


class StoredConfiguration(BaseModel):
    model: str
    mode: Mode
    backend: str
    config: BackendConfiguration
    updated_at: float


class _ConfigFile(BaseModel):
    configurations: list[StoredConfiguration] = Field(default_factory=list)


# Resolves a model name to the model as a backend sees it; None when the store has no such model.
ModelResolver = Callable[[str], ModelRef | None]


class ConfigStore:
    def __init__(self, data_dir: Path, resolve_model: ModelResolver | None = None) -> None:
        self.path = data_dir / "configurations.json"
        self.problems: list[str] = []
        self._remove_temporary_files()
        # How a speculative draft's name becomes a path (the model store). Without one, drafts stay
        # unresolved and a backend refuses to start them: never a silent run without the draft.
        self.resolve_model = resolve_model
        self._items: dict[tuple[str, Mode], StoredConfiguration] = {}
        for item in self._load().configurations:
            self._items[(item.model, item.mode)] = item

    def _remove_temporary_files(self) -> None:
        """write_atomically's temporaries ("." + the name + "-" + tempfile's 8 random characters) that a
        crash left: never read, only renamed into place once complete."""
        pattern = re.compile(rf"^\.{re.escape(self.path.name)}-[a-z0-9_]{{8}}$")
        if not self.path.parent.is_dir():
            return
        for path in self.path.parent.iterdir():
            if pattern.match(path.name):
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink():
                        path.unlink()
                        log.info("removed %s: a write of the configurations cut short", path.name)

    def _load(self) -> _ConfigFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _ConfigFile()
        try:
            return _ConfigFile.model_validate_json(raw)
        except ValidationError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            problem = (f"stored configurations in {self.path} could not be read "
                       f"({exc.errors()[0]['msg']}); the file was kept as {aside}")
            log.error(problem)
            self.problems.append(problem)
            return _ConfigFile()

    def _save(self, items: dict[tuple[str, Mode], StoredConfiguration]) -> None:
        payload = _ConfigFile(configurations=sorted(items.values(), key=lambda c: (c.model, c.mode)))
        # exclude_unset keeps "not configured" apart from "configured to the default".
        write_atomically(self.path, json.dumps(payload.model_dump(mode="json", exclude_unset=True), indent=2).encode())
        self._items = items

    def get(self, model: str, mode: Mode) -> StoredConfiguration | None:
        """The stored configuration with its draft model resolved now, so a runner spawned from it
        loads the draft the store holds today (a re-pulled draft has a new path)."""
        item = self._items.get((model, mode))
        return None if item is None else self.resolved(item)

    def for_backend(self, model: str, mode: Mode, backend: str) -> StoredConfiguration | None:
        """The stored configuration when it names `backend`: another engine's runtime flags and options
        mean nothing to this one (a request sent to another engine by its path, or a configuration whose
        manifest engine was deleted)."""
        item = self.get(model, mode)
        return item if item is not None and item.backend == backend else None

    def resolved(self, item: StoredConfiguration) -> StoredConfiguration:
        spec = item.config.speculative
        if spec is None:
            return item
        draft = self.resolve_model(spec.draft_model) if self.resolve_model is not None else None
        config = item.config.model_copy(update={"speculative": spec.model_copy(update={"draft": draft})})
        return item.model_copy(update={"config": config})

    def list(self, model: str | None = None) -> list[StoredConfiguration]:
        return [c for c in sorted(self._items.values(), key=lambda c: (c.model, c.mode))
                if model is None or c.model == model]

    # put and delete sync the file to disk: callers on the event loop run them in a thread. Writers take
    # turns; readers see the old items or the new ones, swapped whole once the file is safe.
    _writing = threading.Lock()

    def put(self, item: StoredConfiguration) -> None:
        with self._writing:
            self._save({**self._items, (item.model, item.mode): _unresolved(item)})

    def put_unless_changed(self, item: StoredConfiguration, expected: StoredConfiguration | None) -> bool:
        """Store `item` only if the model's configuration for its mode is still `expected` (as `get` gave
        it): a configuration stored meanwhile by someone else is kept. Whether `item` was stored."""
        with self._writing:
            if self.get(item.model, item.mode) != expected:
                return False
            self._save({**self._items, (item.model, item.mode): _unresolved(item)})
            return True

    def delete(self, model: str, mode: Mode) -> StoredConfiguration | None:
        with self._writing:
            item = self._items.get((model, mode))
            if item is not None:
                self._save({k: v for k, v in self._items.items() if k != (model, mode)})
            return item


def _unresolved(item: StoredConfiguration) -> StoredConfiguration:
    """The item as it is kept: a draft by name only, its path resolved again on every read."""
    spec = item.config.speculative
    if spec is None or spec.draft is None:
        return item
    bare = type(spec).model_validate(spec.model_dump(exclude_unset=True, exclude={"draft"}))
    return item.model_copy(update={"config": item.config.model_copy(update={"speculative": bare})})


def effective_configuration(defaults: BackendConfiguration, stored: StoredConfiguration | None) -> \
        BackendConfiguration:
    """The model's registration defaults, overridden by what was configured for this mode."""
    if stored is None:
        return defaults
    merged = defaults.model_dump(exclude_unset=True)
    for key, value in stored.config.model_dump(exclude_unset=True).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return BackendConfiguration.model_validate(merged)
