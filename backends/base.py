"""The Backend protocol and the value types every engine adapter shares.

A backend knows how to install one engine and how to run ONE engine process serving ONE model on a
unix socket. It knows nothing of HTTP routing, scheduling or other runners: that is runnerd's job.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Mode(StrEnum):
    """What a runner is started for; a runner is keyed by (backend, model, mode)."""

    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANKING = "reranking"


class Capability(StrEnum):
    """Request kinds a backend can serve."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    STREAMING = "streaming"
    TOOLS = "tools"


class ModelFormat(StrEnum):
    GGUF = "gguf"
    SAFETENSORS = "safetensors"


class ModelRef(BaseModel):
    """A model as a backend sees it: a name for logs and a path on disk."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    format: ModelFormat = ModelFormat.GGUF
    mmproj: Path | None = None  # multimodal projector loaded beside the model (llama.cpp)


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reasoning_budget: int | None = Field(default=None, ge=-1)


class VllmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    hf_overrides: dict[str, object] | None = None


class SpeculativeOptions(BaseModel):
    """Speculative decoding with a draft model from runnerd's store.

    Callers name the draft (`draft_model`); the daemon resolves that name to `draft` each time it hands
    the configuration to a backend (backends cannot see the store). `draft` is None when the name no
    longer resolves: the backend then refuses to start rather than run without the draft."""

    model_config = ConfigDict(extra="forbid")

    draft_model: str
    num_tokens: int = Field(default=16, ge=1, le=256)
    draft: ModelRef | None = None  # set by the daemon only; never stored, never taken from a caller

    def usable_draft(self, backend: str, formats: frozenset[ModelFormat]) -> ModelRef:
        """The resolved draft, else a RunnerError: a runner never starts without the draft it was asked for."""
        if self.draft is None:
            raise RunnerError(f"draft model {self.draft_model!r} is not in the store any more: pull it again or "
                              "configure another draft", reason="draft_missing")
        if self.draft.format not in formats:
            raise RunnerError(f"{backend} cannot load {self.draft.name} as a draft: it is in {self.draft.format} "
                              "format", reason="draft_format")
        return self.draft


class BackendConfiguration(BaseModel):
    """Per (model, mode) settings. `runtime_flags` must already have passed flag validation."""

    model_config = ConfigDict(extra="forbid")

    context_size: int | None = Field(default=None, gt=0)
    runtime_flags: list[str] = Field(default_factory=list)
    keep_alive: str | None = None
    llamacpp: LlamaCppOptions = Field(default_factory=LlamaCppOptions)
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    speculative: SpeculativeOptions | None = None


class MemoryBreakdown(BaseModel):
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


class DeviceMemory(BaseModel):
    """What one device (``cpu`` or ``cuda:N``) holds for a runner."""

    device: str
    bytes: int
    breakdown: MemoryBreakdown


class MemoryEstimate(BaseModel):
    """RAM and VRAM a runner would take. ``known=False`` means no estimate could be made: the
    scheduler then admits the model without a memory check and measures it once it runs."""

    known: bool = True
    ram_bytes: int = 0
    vram_bytes: int = 0
    devices: list[DeviceMemory] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @classmethod
    def unknown(cls, why: str) -> MemoryEstimate:
        return cls(known=False, notes=[why])


class Progress(BaseModel):
    """One progress report of a long operation (install, pull)."""

    phase: str
    percent: float | None = None
    message: str = ""


ProgressCallback = Callable[[Progress], None]


class BackendError(Exception):
    """Base of every error a backend raises; the message is meant for the user."""


class InstallError(BackendError):
    pass


class ModelFormatError(BackendError):
    """The backend cannot serve a model stored in this format."""


class RunnerError(BackendError):
    """An engine process failed to start or died. ``reason`` is a short machine-readable kind."""

    def __init__(self, message: str, *, reason: str = "exited", tail: list[str] | None = None,
                 exit_code: int | None = None) -> None:
        self.reason = reason
        self.tail = tail or []
        self.exit_code = exit_code
        detail = "\n".join(self.tail[-8:])
        super().__init__(f"{message}\n--- last engine output ---\n{detail}" if detail else message)
        self.summary = message


class RunnerOutput:
    """The observable side of one engine process: its pid, a bounded tail of what it printed and
    the path of its full log. The supervisor fills it in; the scheduler reads it."""

    def __init__(self, log_path: Path | None = None, tail_lines: int = 200) -> None:
        self.log_path = log_path
        self.pid: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.exit_code: int | None = None
        self.started_at: float | None = None
        # Set on every new chunk of output: readiness polling wakes on it instead of sleeping.
        self.activity = asyncio.Event()
        # Called with the pid as soon as the process exists (the daemon records it in a pid file).
        self.on_spawn: Callable[[int], None] | None = None


@runtime_checkable
class Backend(Protocol):
    """An engine adapter. See DESIGN.md, "The Backend protocol"."""

    name: str
    capabilities: frozenset[Capability]
    model_formats: frozenset[ModelFormat]

    async def install(self, progress: ProgressCallback | None = None) -> None:
        """Make the engine runnable. Idempotent; cancellable (cancel the awaiting task)."""

    async def uninstall(self) -> None: ...

    def status(self) -> str:
        """``Not Installed``, ``Installing: <phase>``, ``Running: <engine> <version>`` or ``Error: …``."""

    def disk_usage(self) -> int: ...

    async def run(self, socket_path: Path, model: ModelRef, mode: Mode,
                  config: BackendConfiguration, output: RunnerOutput) -> None:
        """Start one engine process serving `model` on `socket_path`; return when it exits.

        One-shot: never restarts. Cancelling the awaiting task stops the process (SIGTERM, then
        SIGKILL after a grace period) and removes the socket. An unexpected exit raises RunnerError.
        """

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        """RAM/VRAM the runner would take, from the model's header alone (never loads weights)."""
