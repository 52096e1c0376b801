"""The Backend protocol and the value types every engine adapter shares.

A backend knows how to install one engine and how to run ONE engine process serving ONE model on a
unix socket. It knows nothing of HTTP routing, scheduling or other runners: that is runnerd's job.
"""

from __future__ import annotations

import asyncio
import collections
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import AliasChoices, AliasGenerator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.endpoint import Endpoint, EndpointKind
from backends.formats.kind import ModelFormat as ModelFormat

if TYPE_CHECKING:
    from backends.flags import FlagTable
    from backends.formats.summary import ModelSummary


def _snake_or_kebab(name: str) -> AliasChoices:
    return AliasChoices(name, name.replace("_", "-"))


# For request bodies that Docker Model Runner's clients also send: its spelling (`context-size`,
# `reasoning-budget`) validates into the same fields as runnerd's own (`context_size`). Only validation
# takes the kebab name: dumps, and so stored configurations, keep the field names. Models that use it
# write `model_config = KEBAB_CASE_TOO | ConfigDict(...)`.
KEBAB_CASE_TOO = ConfigDict(alias_generator=AliasGenerator(validation_alias=_snake_or_kebab), populate_by_name=True)


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


class ModelRef(BaseModel):
    """A model as a backend sees it: a name for logs and a path on disk."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    format: ModelFormat = ModelFormat.GGUF
    mmproj: Path | None = None  # multimodal projector loaded beside the model (llama.cpp)


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
    """Per (model, mode) settings. `runtime_flags` must already have passed flag validation.

    Engine-specific options are extra keys, one table per engine named by its `options_key`
    (`{"llamacpp": {"reasoning_budget": 0}}`): the daemon stores and merges them without knowing
    them; each backend validates its own table with its `options_model`."""

    model_config = ConfigDict(extra="allow")

    context_size: int | None = Field(default=None, gt=0)
    runtime_flags: list[str] = Field(default_factory=list)
    keep_alive: str | None = None
    speculative: SpeculativeOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _tables_as_dicts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) and k not in cls.model_fields
                    else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _tables_only(self) -> BackendConfiguration:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"{key}: engine options must be an object, not {type(value).__name__}")
        return self

    def engine_table(self, key: str) -> dict[str, Any]:
        """The raw options table an engine keeps under `key` (empty when none was configured)."""
        table = (self.model_extra or {}).get(key)
        return dict(table) if isinstance(table, dict) else {}


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
        # The log rotates past this many bytes, keeping this many older files (<log>.1 the newest).
        self.log_max_bytes: int | None = None
        self.log_files = 3
        # Run the engine under SCHED_BATCH: its threads, when woken, wait for the running task's slice to end
        # rather than preempting it, so the daemon is not cut off mid-turn each time it hands an engine bytes.
        self.batch_scheduling = True
        self.pid: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.exit_code: int | None = None
        self.started_at: float | None = None
        # Set on every new chunk of output: readiness polling wakes on it instead of sleeping.
        self.activity = asyncio.Event()
        # Called with the pid as soon as the process exists (the daemon records it in a pid file).
        self.on_spawn: Callable[[int], None] | None = None


class Api(StrEnum):
    """HTTP APIs an engine may serve itself; the daemon translates the ones it does not."""

    CHAT_COMPLETIONS = "chat_completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    MESSAGES = "messages"  # Anthropic
    MESSAGES_COUNT_TOKENS = "messages_count_tokens"
    RESPONSES = "responses"  # OpenAI Responses
    RESPONSES_INPUT_TOKENS = "responses_input_tokens"


class BackendState(StrEnum):
    NOT_INSTALLED = "not_installed"
    INSTALLING = "installing"
    INSTALLED = "installed"
    ERROR = "error"


class BackendStatus(BaseModel):
    """Whether an engine can run, as a value: the state, the engine's own version, and what is going on."""

    state: BackendState
    version: str | None = None
    product: str | None = None  # what the version is of, when the version does not say
    detail: str = ""

    @property
    def installed(self) -> bool:
        return self.state is BackendState.INSTALLED

    @property
    def text(self) -> str:
        """The one-line form: ``Not Installed``, ``Installing: <phase>``, ``Running: <version>``, ``Error: …``."""
        if self.state is BackendState.INSTALLED:
            version = self.version or "unknown version"
            return f"Running: {self.product} {version}" if self.product else f"Running: {version}"
        if self.state is BackendState.INSTALLING:
            return f"Installing: {self.detail}"
        if self.state is BackendState.ERROR:
            return f"Error: {self.detail}"
        return "Not Installed"


class HostGpu(BaseModel):
    """One GPU of the host as NVML numbers it (the daemon samples them; backends pick their view)."""

    model_config = ConfigDict(frozen=True)

    index: int
    uuid: str = ""
    name: str = ""
    memory_total_bytes: int
    memory_free_bytes: int


GpuProvider = Callable[[], Sequence[HostGpu]]


def _no_gpus() -> Sequence[HostGpu]:
    return ()


def host_cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one): what an engine
    it starts inherits."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class EngineContext(BaseModel):
    """What the daemon tells every backend it builds: where its files go and the daemon-wide defaults."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    cache_dir: Path
    default_context_size: int = 4096
    stop_grace: float = 5.0
    gpu_count: int = 0
    gpus: GpuProvider = _no_gpus  # called when a backend needs the GPUs now (free memory changes)
    cpu_count: int = Field(default_factory=host_cpu_count, ge=1)


class Launch(BaseModel):
    """How one runner listens and shows it is ready (engines whose versions differ answer per configuration)."""

    model_config = ConfigDict(frozen=True)

    endpoint_kind: EndpointKind
    readiness_path: str
    readiness_timeout: float | None  # None: the daemon's readiness_timeout


class NoOptions(BaseModel):
    """An engine with nothing to configure here: any key is refused."""

    model_config = ConfigDict(extra="forbid")


# Ollama option -> the engine's body field, for the sampling options whose names differ among engines
# (temperature, top_p, top_k, min_p, seed, the penalties and stop are the same everywhere).
SamplingDialect = Mapping[str, str]
OPENAI_SAMPLING: SamplingDialect = {}


class Backend(ABC):
    """An engine adapter: everything the daemon may ask of an engine. See DESIGN.md, "The Backend protocol".

    Subclasses set the class attributes and implement the abstract methods; the others have defaults
    that suit an OpenAI-compatible engine serving every model of its formats the same way."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]
    model_formats: ClassVar[frozenset[ModelFormat]]
    # Runtime flags callers may pass (None: none at all), per-model options (`_configure`, under
    # `options_key`) and daemon-wide settings (`[engines.<name>]`).
    flag_table: ClassVar[FlagTable | None] = None
    options_model: ClassVar[type[BaseModel]] = NoOptions
    options_key: ClassVar[str | None] = None  # None: the backend's name
    settings_model: ClassVar[type[BaseModel]] = NoOptions
    # Older top-level names of the settings table (`[llamacpp]` for `[engines."llama.cpp"]`).
    settings_aliases: ClassVar[tuple[str, ...]] = ()
    # Short environment variables for single settings (`RUNNERD_LLAMA_SERVER` -> `server`).
    settings_env: ClassVar[Mapping[str, str]] = {}
    sampling_dialect: ClassVar[SamplingDialect] = OPENAI_SAMPLING
    readiness_path: ClassVar[str] = "/health"
    # Seconds the engine may take to answer its readiness path; None: the daemon's readiness_timeout.
    readiness_timeout: ClassVar[float | None] = None
    endpoint_kind: ClassVar[EndpointKind] = EndpointKind.UNIX
    native_apis: ClassVar[frozenset[Api]] = frozenset(
        {Api.CHAT_COMPLETIONS, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RERANK})
    # The engine refuses a request whose `model` is not the name it serves (the daemon rewrites it).
    checks_model_name: ClassVar[bool] = False
    # The estimate's tuning parameters this engine understands (`/models/{m}/estimate?parallel=4`) and
    # the runtime flag each stands for.
    estimate_parameters: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def create(cls, context: EngineContext, settings: BaseModel) -> Self:
        """Build the backend from the daemon's context and its validated `settings_model`."""
        return cls()

    # --- install ---------------------------------------------------------------------------------

    @abstractmethod
    async def install(self, progress: ProgressCallback | None = None) -> None:
        """Make the engine runnable. Idempotent; cancellable (cancel the awaiting task)."""

    @abstractmethod
    async def uninstall(self) -> None: ...

    @abstractmethod
    def status(self) -> BackendStatus:
        """Blocking (may run the engine's --version once): call it off the event loop."""

    @abstractmethod
    def disk_usage(self) -> int: ...

    @property
    def installable_version(self) -> str | None:
        """The version `install` would install, when there is a choice to report."""
        return None

    def installed_versions(self) -> list[str]:
        """Blocking, like `status`."""
        status = self.status()
        return [status.version] if status.installed and status.version else []

    def launch_for(self, config: BackendConfiguration) -> Launch:
        """How a runner started with `config` listens and gets ready: asked before its endpoint is made,
        so a version a configuration pins may listen or answer readiness its own way."""
        return Launch(endpoint_kind=self.endpoint_kind, readiness_path=self.readiness_path,
                      readiness_timeout=self.readiness_timeout)

    # --- models and requests -----------------------------------------------------------------------

    def model_capabilities(self, model: ModelRef) -> frozenset[Capability]:
        """What this backend serves for `model` (some serve a capability only for some models)."""
        return self.capabilities

    def request_problem(self, model: ModelRef, config: BackendConfiguration,
                        payload: Mapping[str, Any]) -> str | None:
        """Why the engine, run with `config`, would accept this request but answer it wrongly."""
        return None

    def configuration_problem(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> str | None:
        """Why a runner started with `config` (the effective one: defaults, stored and new parts merged)
        would fail or overload the host, for what no single flag or option shows on its own (slots
        against the context, say); None when nothing is wrong. Asked before a configuration is stored.
        Blocking (it may look at installed files): call it off the event loop."""
        return None

    def validate_flags(self, flags: Sequence[str]) -> list[str]:
        """The flags normalised, or FlagError naming the one refused."""
        from backends.flags import FlagError

        if self.flag_table is None:
            if flags:
                raise FlagError(flags[0], f"the {self.name} backend accepts no runtime flags", index=0)
            return []
        return self.flag_table.validate(list(flags))

    def validate_flags_for(self, flags: Sequence[str], config: BackendConfiguration) -> list[str]:
        """`validate_flags` against the option list of the version a runner with `config` would run (an
        engine whose versions take different flags answers per version). Blocking: it may read that
        version's option list once; call it off the event loop."""
        return self.validate_flags(flags)

    def estimate_flags(self, parameters: Mapping[str, str]) -> list[str]:
        """Estimate parameters as validated runtime flags; FlagError names one this engine does not take."""
        from backends.flags import FlagError

        flags: list[str] = []
        for parameter, value in parameters.items():
            flag = self.estimate_parameters.get(parameter)
            if flag is None:
                raise FlagError(parameter, f"the {self.name} backend's estimate does not take it",
                                subject="estimate parameter")
            try:
                flags += self.validate_flags([flag, value])
            except FlagError as exc:
                raise FlagError(parameter, exc.reason, subject="estimate parameter") from exc
        return flags

    @property
    def options_table(self) -> str:
        return self.options_key or self.name

    def validate_options(self, table: Mapping[str, Any]) -> dict[str, Any]:
        """This engine's per-model options table, checked (pydantic's ValidationError otherwise)."""
        return self.options_model.model_validate(dict(table)).model_dump(exclude_unset=True)

    def options(self, config: BackendConfiguration) -> Any:
        """The engine's options from a configuration, as its `options_model`."""
        try:
            return self.options_model.model_validate(config.engine_table(self.options_table))
        except ValidationError as exc:
            raise RunnerError(f"stored {self.options_table} options are invalid: {exc.errors()[0]['msg']}",
                              reason="bad_config") from exc

    def describe(self, model: ModelRef) -> ModelSummary:
        """Blocking: the header summary `inspect`, `/api/show`, `/api/tags` and `GET /models/{m}` show
        (raises one of backends.formats.FORMAT_ERRORS, or OSError, for a file it cannot read)."""
        from backends.formats import describe

        return describe(model.path, model.format)

    def default_chat_template(self, model: ModelRef) -> str | None:
        """The chat template the engine uses for a model whose file has none (None: it has no default)."""
        return None

    # --- run ---------------------------------------------------------------------------------------

    @abstractmethod
    async def run(self, endpoint: Endpoint, model: ModelRef, mode: Mode,
                  config: BackendConfiguration, output: RunnerOutput) -> None:
        """Start one engine process serving `model` on `endpoint`; return when it exits.

        One-shot: never restarts. Cancelling the awaiting task stops the process (SIGTERM, then
        SIGKILL after a grace period) and removes a socket it leaves. An unexpected exit raises
        RunnerError.
        """

    @abstractmethod
    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        """RAM/VRAM the runner would take, from the model's header alone (never loads weights)."""
