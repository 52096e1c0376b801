"""Settings: defaults, then the TOML config file, then RUNNERD_* variables, then command-line flags.

Directories follow the mode the daemon runs in: under systemd the directories it hands over
(RUNTIME_DIRECTORY, STATE_DIRECTORY, CACHE_DIRECTORY, LOGS_DIRECTORY); otherwise the user's XDG
directories. Every one can be set explicitly.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    HttpUrl,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from backends.external import UpstreamSpec
from runnerd.durations import parse_keep_alive
from runnerd.engines import EngineRegistryError, engine_classes, engine_settings, settings_aliases

_config_file: ContextVar[Path | None] = ContextVar("runnerd_config_file", default=None)
_engine_environment: ContextVar[dict[str, dict[str, Any]]] = ContextVar("runnerd_engine_environment",
                                                                        default={})  # noqa: B039

MiB = 1024 * 1024


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, variable or key."""


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets, `[::1]:8434`) -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8434 or [::1]:8434), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 address in brackets, e.g. [{host}]:{port_text}")
    port = int(port_text)
    if not host or port > 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {value!r}")
    return host, port


class HttpSettings(BaseModel):
    """The TCP listener for parent schedulers. Off unless `listen` is set; then a token is required."""

    # A misspelt key here could leave the listener without the token the operator meant to set.
    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(default=None, description="HOST:PORT; unset = no TCP listener")
    token_file: Path | None = Field(default=None, description="file holding the bearer token (an admin token "
                                    "named http-token)")
    tokens_file: Path | None = Field(default=None, description="TOML file of named tokens, each with a role, "
                                     "model patterns and limits, stored as hashes (runnerd/tokens.py)")
    tokens_poll_interval: float = Field(default=2.0, gt=0, description="seconds between checks of the tokens "
                                        "file for a change (SIGHUP reloads it at once)")
    # Counted when accepted, before a byte is read or a token checked; over a cap the connection is reset.
    max_connections: int = Field(default=1024, ge=1, description="TCP connections open at once; lowered at "
                                 "start to what the open-file limit leaves after fd_reserve (two per connection)")
    max_connections_per_peer: int = Field(default=128, ge=1, description="TCP connections open at once from one "
                                          "peer address")
    header_timeout: float = Field(default=10.0, gt=0, description="seconds a new TCP connection has to send its "
                                  "first request's headers")
    keepalive_timeout: float = Field(default=60.0, gt=0, description="seconds an idle keep-alive connection (TCP "
                                     "or unix) stays open; also bounds the headers of each later request")
    fd_reserve: int = Field(default=256, ge=0, description="open files kept back from TCP connections for the "
                            "unix socket, runners, logs and model files")

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


class AuditSettings(BaseModel):
    """The audit log of admin and operator actions, refusals and limit hits (runnerd/audit.py)."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(default=None, description="default <state>/audit.log")
    max_bytes: ByteSize = Field(default=ByteSize(10 * MiB), gt=0, description="rotate when a file reaches this")
    backups: int = Field(default=5, ge=0, description="rotated files kept (audit.log.1 ...)")


class NodeSettings(BaseModel):
    """This node as an orchestrator sees it (runnerd/node_labels.py)."""

    model_config = ConfigDict(extra="forbid")

    labels_file: Path | None = Field(
        default=None, description="keep the node's labels in this Node Feature Discovery feature file, e.g. "
        "/etc/kubernetes/node-feature-discovery/features.d/runnerd; unset = off")
    labels_interval: float = Field(default=30.0, gt=0, description="seconds between checks of the labels")


class MemorySettings(BaseModel):
    """What runnerd may use for engines. Sizes are bytes or strings such as "64MiB" or "8GiB"."""

    model_config = ConfigDict(extra="forbid")

    ram_limit: ByteSize | None = Field(default=None, description="cap on RAM held by runners; unset = the host's")
    vram_limit: ByteSize | None = Field(default=None, description="cap on VRAM held by runners; unset = the GPUs'")
    ram_reserve: ByteSize = Field(default=ByteSize(1024 * MiB), description="RAM always left to the host")
    vram_reserve: ByteSize = Field(default=ByteSize(512 * MiB), description="VRAM left free on each GPU")


class HuggingFaceSettings(BaseModel):
    """Where `hf://org/repo/file` references are fetched from: the hub or a mirror of it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(default="https://huggingface.co", description="hub or mirror, http(s)://host[/prefix]")
    token_file: Path | None = Field(default=None, description="file holding a hub token (sent to the hub only)")

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or any(c.isspace() for c in value):
            raise ValueError(f"base_url must be an http(s):// URL, got {value!r}")
        return value.rstrip("/")


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class StoreSettings(BaseModel):
    """Model downloads (`runnerd pull`, POST /models/create). Over TCP a pull reaches public addresses
    only; `pull_allowed_hosts` names the mirrors on the host's own network that it may reach too."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_downloads: int = Field(default=2, ge=1, le=16)
    read_timeout: float = Field(default=60.0, gt=0, description="seconds without a byte before a download fails")
    retries: int = Field(default=3, ge=0, le=20, description="resumes (HTTP Range) after a dropped connection")
    max_download_size: ByteSize = Field(default=ByteSize(512 * 1024 * MiB), gt=0,
                                        description="largest file a pull may download")
    min_download_rate: ByteSize = Field(default=ByteSize(32 * 1024), ge=0,
                                        description="bytes per second a download must average over min_rate_window")
    min_rate_window: float = Field(default=60.0, gt=0, description="seconds over which min_download_rate is measured")
    pull_allowed_hosts: list[str] = Field(
        default_factory=list, max_length=256,
        description="host names or CIDRs TCP clients may pull from although loopback, private or link-local")

    @field_validator("pull_allowed_hosts")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOST_NAME.match(entry):
                    raise ValueError(f"pull_allowed_hosts: {entry[:100]!r} is neither a host name nor a CIDR") from None
        return [entry.lower() for entry in value]


class ApiSettings(BaseModel):
    """The Anthropic Messages and OpenAI Responses routes."""

    model_config = ConfigDict(extra="forbid")

    translate: list[Literal["messages", "responses"]] = Field(
        default_factory=list, description="APIs always translated through the engine's chat completions, even "
        "for engines that serve them themselves")
    responses_store_entries: int = Field(default=1000, ge=0, description="responses kept for previous_response_id "
                                         "(in memory, least recently used dropped first; 0 = none)")
    responses_store_bytes: ByteSize = Field(default=ByteSize(64 * MiB), ge=0,
                                            description="memory the stored responses may take")


# The source name of the daemon's own engines in aliases.
LOCAL_SOURCE = "local"


class RoutingSettings(BaseModel):
    """How a model is looked for among the local engines and the upstreams."""

    model_config = ConfigDict(extra="forbid")

    local_first: bool = Field(default=True, description="local engines before every upstream; false = after")
    discovery_interval: float = Field(default=30.0, ge=1, le=86400,
                                      description="seconds between polls of the upstreams' model lists")


class AliasTarget(BaseModel):
    """One candidate of an alias: a source (an upstream's name, or "local") and the model there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, max_length=63)
    model: str = Field(min_length=1, max_length=300)


def _env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value.split(":")[0]) if value else None


def default_runtime_dir() -> Path:
    if (systemd := _env("RUNTIME_DIRECTORY")) is not None:
        return systemd
    if (xdg := _env("XDG_RUNTIME_DIR")) is not None:
        return xdg / "runnerd"
    return Path("/tmp") / f"runnerd-{os.getuid()}"


def _xdg(variable: str, fallback: str) -> Path:
    return (_env(variable) or Path.home() / fallback) / "runnerd"


# Browser origins allowed by default: pages served from this host (any port), and the schemes desktop
# shells (Electron's app://, Tauri, VS Code webviews) give their pages. `null` (file:// pages, sandboxed
# frames) is not among them: any site can produce it.
DEFAULT_ALLOWED_ORIGINS = (
    "http://localhost", "https://localhost", "http://127.0.0.1", "https://127.0.0.1", "http://[::1]",
    "https://[::1]", "app://*", "tauri://*", "vscode-webview://*",
)

# Where runnerd.socket puts the system service's socket.
SYSTEM_SOCKET = Path("/run/runnerd/runnerd.sock")


def default_socket() -> Path:
    explicit = os.environ.get("RUNNERD_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("RUNNERD_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "runnerd.sock"
    own = default_runtime_dir() / "runnerd.sock"
    # No daemon of one's own, but the system service's socket is there: clients use that one.
    return SYSTEM_SOCKET if not own.exists() and SYSTEM_SOCKET.exists() else own


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUNNERD_", env_nested_delimiter="__", extra="forbid")

    runtime_dir: Path = Field(default_factory=default_runtime_dir)
    data_dir: Path = Field(default_factory=lambda: _env("STATE_DIRECTORY") or _xdg("XDG_DATA_HOME", ".local/share"))
    cache_dir: Path = Field(default_factory=lambda: _env("CACHE_DIRECTORY") or _xdg("XDG_CACHE_HOME", ".cache"))
    log_dir: Path | None = Field(default=None, description="runner logs; default <state>/logs")
    socket: Path | None = Field(default=None, description="default <runtime_dir>/runnerd.sock")
    runner_log_max_bytes: int = Field(default=64 * MiB, ge=4096, description="a runner's log file is rotated "
                                      "once it would grow past this")
    runner_log_files: int = Field(default=3, ge=0, le=100, description="rotated runner log files kept beside the "
                                  "current one")

    engine_cpu_policy: Literal["batch", "normal"] = Field(
        default="batch", description="Linux scheduling policy of engine processes: 'batch' (SCHED_BATCH) lets a "
        "woken engine wait for the running task's slice rather than preempt it; 'normal' is the default policy")
    keep_alive: str = Field(default="5m", description="how long an idle runner stays loaded")
    default_context_size: int = Field(default=4096, gt=0)
    readiness_timeout: float = Field(default=600.0, gt=0, description="seconds a runner may take to load")
    engine_idle_timeout: float = Field(
        default=600.0, gt=0, description="seconds an engine may send nothing on a streamed answer (first token "
        "included) before the request fails; a non-streamed answer waits as long as the engine stays healthy, "
        "checked this often")
    drain_timeout: float = Field(default=10.0, ge=0, description="seconds in-flight requests get at shutdown")
    stop_grace: float = Field(default=5.0, ge=0, description="seconds between SIGTERM and SIGKILL")
    max_body_bytes: int = Field(default=10 * MiB, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engines: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="[engines.<name>] tables, each validated by that engine's settings")
    memory: MemorySettings = Field(default_factory=MemorySettings)
    max_runners: int | None = Field(default=None, ge=1, description="most runners at once; unset = no cap")
    queue_timeout: float = Field(default=120.0, ge=0, description="seconds a load waits for memory before 503")
    queue_size: int = Field(default=256, ge=0, description="loads that may wait for memory at once")
    min_residency: float = Field(default=0.0, ge=0, description="seconds a runner stays before it may be evicted")
    crash_backoff: float = Field(default=5.0, gt=0, description="first hold-back after 3 failed starts in a row")
    http: HttpSettings = Field(default_factory=HttpSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    allowed_origins: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_ORIGINS),
                                       description="browser origins allowed to call the API (runnerd/api/cors.py)")
    store: StoreSettings = Field(default_factory=StoreSettings)
    catalog_file: Path | None = Field(default=None, description="operator catalog (YAML) of installable engines, "
                                      "added to the shipped one; an engine named in both is the operator's")
    catalog_url: HttpUrl | None = Field(default=None, description="operator catalog fetched over http(s), checked "
                                        "like catalog_file; the last good copy is kept in the data directory")
    catalog_refresh: float = Field(default=3600.0, ge=1, description="seconds between fetches of catalog_url")
    catalog_fetch_timeout: float = Field(default=30.0, gt=0, le=600,
                                         description="seconds one fetch of catalog_url may take in all")
    huggingface: HuggingFaceSettings = Field(default_factory=HuggingFaceSettings)
    apis: ApiSettings = Field(default_factory=ApiSettings)
    upstreams: list[UpstreamSpec] = Field(default_factory=list, max_length=64,
                                          description="external endpoints ([[upstreams]], README)")
    aliases: dict[str, list[AliasTarget]] = Field(default_factory=dict,
                                                  description="name -> ordered (source, model) candidates")
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    @field_validator("catalog_url")
    @classmethod
    def _no_credentials(cls, url: HttpUrl | None) -> HttpUrl | None:
        # The URL is shown in /engines/backends/catalog, the logs and the kept copy.
        if url is not None and (url.username or url.password):
            raise ValueError("must not carry a user name or password: it is shown in /engines/backends/catalog "
                             "and the logs; serve the catalog from a URL that needs none")
        return url

    @model_validator(mode="after")
    def _sources(self) -> Settings:
        """Upstream names are unique and not an engine's; aliases name known sources."""
        names: set[str] = set()
        for spec in self.upstreams:
            if spec.name in names:
                raise ValueError(f"upstreams: two upstreams are named {spec.name!r}")
            if spec.name == LOCAL_SOURCE or spec.name in engine_classes():
                raise ValueError(f"upstreams: {spec.name!r} is reserved (the local engines' or an engine's name)")
            names.add(spec.name)
        for alias, targets in self.aliases.items():
            if not alias or len(alias) > 300:
                raise ValueError(f"aliases: {alias!r} is not a model name")
            if not targets:
                raise ValueError(f"aliases.{alias}: give at least one {{source, model}} candidate")
            for target in targets:
                if target.source != LOCAL_SOURCE and target.source not in names:
                    raise ValueError(f"aliases.{alias}: unknown source {target.source!r} (known: "
                                     f"{', '.join([LOCAL_SOURCE, *sorted(names)])})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    _engine_settings: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _engine_tables(cls, data: Any) -> Any:
        """Gather each engine's settings into `engines`: from its older top-level table (an engine's
        `settings_aliases`), `[engines.<name>]`, then the environment (see `engine_environment`)."""
        if not isinstance(data, dict):
            return data
        aliases = settings_aliases()
        engines: dict[str, dict[str, Any]] = {}
        for alias, name in aliases.items():
            if isinstance(data.get(alias), dict):
                engines.setdefault(name, {}).update(data.pop(alias))
        for name, table in (data.get("engines") or {}).items():
            if isinstance(table, dict):
                engines.setdefault(name, {}).update(table)
            else:
                engines[name] = table  # the engine's settings model says what is wrong
        for name, table in _engine_environment.get().items():
            engines.setdefault(name, {}).update(table)
        data["engines"] = engines
        return data

    def engine(self, name: str) -> BaseModel:
        """An engine's validated settings (its defaults when it has no table)."""
        return self._engine_settings[name]

    @property
    def socket_path(self) -> Path:
        return self.socket or self.runtime_dir / "runnerd.sock"

    @property
    def runner_log_dir(self) -> Path:
        return self.log_dir or _env("LOGS_DIRECTORY") or self.data_dir / "logs"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.data_dir / "audit.log"


def _check_config_file(path: Path) -> None:
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _systemd_config_file() -> Path | None:
    """Under systemd (ConfigurationDirectory=runnerd), /etc/runnerd/runnerd.toml when it exists."""
    directory = _env("CONFIGURATION_DIRECTORY")
    candidate = directory / "runnerd.toml" if directory is not None else None
    return candidate if candidate is not None and candidate.is_file() else None


def _nested(keys: list[str], value: str) -> dict[str, Any]:
    return {keys[0]: _nested(keys[1:], value) if len(keys) > 1 else value}


def engine_environment(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Engine settings from `RUNNERD_<TABLE>__<KEY>` variables, where TABLE is one of an engine's older
    table names (`settings_aliases`), and from each engine's short variables (`settings_env`); a full
    variable beats a short one."""
    tables: dict[str, dict[str, Any]] = {}
    for name, cls in engine_classes().items():
        for variable, key in cls.settings_env.items():
            if environ.get(variable):
                tables.setdefault(name, {})[key] = environ[variable]
    prefixes = {f"RUNNERD_{alias.upper()}__": name for alias, name in settings_aliases().items()}
    for variable, value in environ.items():
        for prefix, name in prefixes.items():
            if variable.upper().startswith(prefix) and len(variable) > len(prefix):
                keys = variable[len(prefix):].lower().split("__")
                table = tables.setdefault(name, {})
                for key in keys[:-1]:
                    table = table.setdefault(key, {})
                table[keys[-1]] = value
    return tables


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; raises ConfigError naming what is wrong."""
    if config_file is None and os.environ.get("RUNNERD_CONFIG"):
        config_file = Path(os.environ["RUNNERD_CONFIG"])
    if config_file is None:
        config_file = _systemd_config_file()
    if config_file is not None:
        _check_config_file(config_file)
    init = {k: v for k, v in overrides.items() if v is not None}
    source = f" (config file {config_file})" if config_file else ""
    token = _config_file.set(config_file)
    env_token = _engine_environment.set(engine_environment(os.environ))
    try:
        settings = Settings(**init)
        settings._engine_settings = engine_settings(settings.engines)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings{source}: {_describe(exc)}") from exc
    except EngineRegistryError as exc:
        raise ConfigError(f"invalid settings{source}: {exc}") from exc
    finally:
        _config_file.reset(token)
        _engine_environment.reset(env_token)
    try:
        parse_keep_alive(settings.keep_alive)
    except ValueError as exc:
        raise ConfigError(f"invalid settings: keep_alive: {exc}") from exc
    return settings
