"""This node's slowly changing facts as Kubernetes node labels, in Node Feature Discovery's feature-file
format, and a task that keeps such a file up to date.

A Kubernetes scheduler places by node labels; NFD's nfd-worker turns every `key=value` line of the files
in `/etc/kubernetes/node-feature-discovery/features.d/` into a label of its node (its "local" feature
source; it watches the directory). The labels are only facts that change slowly: the installed engines
and their versions, the GPUs (model, total memory), total RAM, runnerd's version. Nothing that moves
with requests (free memory, runners, drain state): every change relabels the node through the API
server.

The prefix is `runnerd.feature.node.kubernetes.io/`. NFD accepts a label from a feature file only in an
allowed namespace: `feature.node.kubernetes.io` and its sub-namespaces are always allowed and cannot be
denied (since v0.13 other namespaces are allowed too unless `-deny-label-ns` excludes them; up to v0.12
they needed `-extra-label-ns`), and `*.kubernetes.io` is always denied. A sub-namespace of
`feature.node.kubernetes.io` is therefore the one prefix every NFD version publishes without any
configuration. Names without a prefix are not used: NFD puts them under `feature.node.kubernetes.io/`
(and drops them with its DisableAutoPrefix feature gate).

Kubernetes allows in a label's name (after the prefix) and in its value at most 63 characters of
`[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?` (a value may also be empty). Free text from the host (an
engine's version such as "0.5.0-dev (build 1, commit 0c1e570)", a GPU's name) is made to fit by
`label_value`: each run of other characters becomes one `-`, leading and trailing non-alphanumerics
are dropped, and the result is cut to 63 characters (then trailing non-alphanumerics dropped again):
"0.5.0-dev-build-1-commit-0c1e570". An engine's name goes into label names the same way; one too long
for the name keeps its first characters and gets 8 hex digits of its SHA-256, so two long names stay
apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.atomic import write_atomically
from runnerd import __version__
from runnerd.app_life import runs_with
from runnerd.gpus import GpuInfo

if TYPE_CHECKING:
    from aiohttp import web

    from backends.base import Backend
    from runnerd.config import NodeSettings
    from runnerd.sampler import HostSampler, HostSnapshot

log = logging.getLogger("runnerd.node_labels")

PREFIX = "runnerd.feature.node.kubernetes.io"
MAX_LENGTH = 63
GiB = 1024**3
MiB = 1024**2

_VALID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_OUTSIDE = re.compile(r"[^-A-Za-z0-9_.]+")
_LEADING = re.compile(r"^[^A-Za-z0-9]+")
_TRAILING = re.compile(r"[^A-Za-z0-9]+$")


def label_value(text: str) -> str:
    """`text` as a valid label value (see the module docstring); "" when nothing of it is left."""
    value = _LEADING.sub("", _OUTSIDE.sub("-", text))
    return _TRAILING.sub("", _TRAILING.sub("", value)[:MAX_LENGTH])


def valid_name(name: str) -> bool:
    """Whether `name` is a valid label name after the prefix (and values are checked the same way)."""
    return len(name) <= MAX_LENGTH and _VALID.fullmatch(name) is not None


def _engine_part(engine: str) -> str:
    """An engine's name as it goes into `engine.<name>` and `engine.<name>.version`."""
    part = label_value(engine) or "unnamed"
    room = MAX_LENGTH - len("engine..version")
    if len(part) > room:
        digest = hashlib.sha256(engine.encode()).hexdigest()[:8]
        part = f"{_TRAILING.sub('', part[:room - 9])}-{digest}"
    return part


def compute(*, runnerd_version: str, ram_total_bytes: int, gpus: Iterable[GpuInfo],
            engines: Mapping[str, str | None]) -> dict[str, str]:
    """The labels, full names (`<PREFIX>/<name>`) to values. `engines`: each INSTALLED engine's name and
    its version (None when not known: that engine gets no version label)."""
    names: dict[str, str] = {}
    if version := label_value(runnerd_version):
        names["version"] = version
    names["ram-gib"] = str(max(0, ram_total_bytes) // GiB)
    gpus = sorted(gpus, key=lambda g: g.index)
    names["gpu.count"] = str(len(gpus))
    cuda = next((g.cuda_version for g in gpus if g.cuda_version), None)
    if cuda is not None and (value := label_value(cuda)):
        names["gpu.cuda-version"] = value
    for gpu in gpus:
        if model := label_value(gpu.name):
            names[f"gpu.{gpu.index}.model"] = model
        names[f"gpu.{gpu.index}.memory-mib"] = str(gpu.memory_total_bytes // MiB)
    for engine, engine_version in sorted(engines.items()):
        part = _engine_part(engine)
        names[f"engine.{part}"] = "true"
        if engine_version is not None and (value := label_value(engine_version)):
            names[f"engine.{part}.version"] = value
    assert all(valid_name(n) for n in names), names
    return {f"{PREFIX}/{name}": value for name, value in names.items()}


def from_api(node: Mapping[str, Any], backends: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The labels from the JSON of `GET /node` and `GET /engines/backends` (what `runnerd node --labels`
    reads); the same the daemon writes."""
    return compute(runnerd_version=str(node["runnerd_version"]), ram_total_bytes=int(node["memory"]["total_bytes"]),
                   gpus=[GpuInfo.model_validate(g) for g in node["gpus"]],
                   engines={str(b["name"]): b.get("version") for b in backends if b.get("installed")})


def read(backends: Mapping[str, Backend], snapshot: HostSnapshot) -> dict[str, str] | None:
    """The labels from the host sampler's snapshot and the backends' status (blocking: a status may run
    an engine's --version once). None before the sampler's first reading."""
    if not snapshot.sampled:
        return None
    engines: dict[str, str | None] = {}
    for name, backend in backends.items():
        status = backend.status()
        if status.installed:
            engines[name] = status.version
    return compute(runnerd_version=__version__, ram_total_bytes=snapshot.ram_total, gpus=snapshot.gpus,
                   engines=engines)


def render(labels: Mapping[str, str]) -> str:
    """NFD's feature-file format: one `name=value` line per label, sorted (so equal labels give equal
    files). No comments: `# +...` lines are directives to NFD."""
    return "".join(f"{name}={value}\n" for name, value in sorted(labels.items()))


class LabelsFile:
    """Keeps `path` holding the node's labels: written at start, then checked every `interval` seconds
    and rewritten only when the text changes (a temporary dot file beside it, renamed over it: NFD
    ignores dot files and never reads half a file), mode 0644 (nfd-worker may run as another user).
    Removed at a clean stop, when it still holds what was last written here: a stopped runnerd serves
    nothing, so its node should not be chosen for it; a crash leaves the last labels in place.

    A file that cannot be written is logged (once per distinct error) and tried again at the next
    check: labels are advice to a scheduler, never a reason for the daemon to stop serving."""

    def __init__(self, path: Path, read: Callable[[], Mapping[str, str] | None], interval: float = 30.0) -> None:
        self.path = path
        self.read = read
        self.interval = interval
        self.written: str | None = None  # the text this process last put in the file
        self.writes = 0
        self._task: asyncio.Task[None] | None = None
        self._errors: set[str] = set()
        # A check still running in its thread when the daemon stops must not write after the removal.
        self._lock = threading.Lock()
        self._closed = False

    def refresh(self) -> bool:
        """Blocking: read the labels and write the file when its text would change; True when written."""
        with self._lock:
            return False if self._closed else self._refresh()

    def _refresh(self) -> bool:
        try:
            labels = self.read()
            if labels is None:
                return False
            text = render(labels)
            if text == self.written:
                return False
            if self.written is None and self._on_disk() == text:
                self.written = text  # a previous run left exactly this: leave the file (and its mtime) alone
                return False
            write_atomically(self.path, text.encode(), mode=0o644)
        except Exception as exc:
            self._report(exc)
            return False
        self.written = text
        self.writes += 1
        self._errors.clear()
        log.info("node labels written to %s (%d labels)", self.path, len(labels))
        return True

    def _on_disk(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def _report(self, exc: Exception) -> None:
        text = f"cannot keep the node labels in {self.path}: {exc}"
        if text not in self._errors:
            self._errors.add(text)
            log.warning("%s", text)

    def remove(self) -> None:
        """Blocking: delete the file if it holds what this process last wrote; no writes after this."""
        with self._lock:
            self._closed = True
            self._remove()

    def _remove(self) -> None:
        if self.written is None or self._on_disk() != self.written:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the node labels file %s: %s", self.path, exc)
        else:
            log.info("node labels removed from %s", self.path)

    async def start(self) -> None:
        await asyncio.to_thread(self.refresh)
        self._task = asyncio.create_task(self._loop(), name="node labels")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.refresh)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.remove)


def keep_labels_file(app: web.Application, settings: NodeSettings, backends: Mapping[str, Backend],
                     sampler: HostSampler) -> LabelsFile | None:
    """With `[node] labels_file` set, keep that file up to date for the app's life (its on_startup and
    on_cleanup handlers, added after the sampler's: the first labels come from its first reading)."""
    if settings.labels_file is None:
        return None
    labels = LabelsFile(settings.labels_file, lambda: read(backends, sampler.snapshot), settings.labels_interval)
    runs_with(app, labels)
    return labels
