"""Stored per-(model, mode) backend configurations, kept across restarts.

The file is written atomically (temp file, fsync, rename). A file that cannot be read back is never
silently dropped: it is moved aside under a name that says so, and the problem is reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from backends.base import BackendConfiguration, Mode
from runnerd.atomic import write_atomically

log = logging.getLogger("runnerd.configs")


class StoredConfiguration(BaseModel):
    model: str
    mode: Mode
    backend: str
    config: BackendConfiguration
    updated_at: float


class _ConfigFile(BaseModel):
    configurations: list[StoredConfiguration] = Field(default_factory=list)


class ConfigStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "configurations.json"
        self.problems: list[str] = []
        self._items: dict[tuple[str, Mode], StoredConfiguration] = {}
        for item in self._load().configurations:
            self._items[(item.model, item.mode)] = item

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
        return self._items.get((model, mode))

    def list(self, model: str | None = None) -> list[StoredConfiguration]:
        return [c for c in sorted(self._items.values(), key=lambda c: (c.model, c.mode))
                if model is None or c.model == model]

    def put(self, item: StoredConfiguration) -> None:
        self._save({**self._items, (item.model, item.mode): item})

    def delete(self, model: str, mode: Mode) -> StoredConfiguration | None:
        item = self._items.get((model, mode))
        if item is not None:
            self._save({k: v for k, v in self._items.items() if k != (model, mode)})
        return item


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
