"""The manifest's shape: what an operator writes to define an engine (README, "Adding an engine").

pydantic checks types and single fields here; rules that relate fields (placeholders, the listen kind,
flags the daemon owns, names) are in checks.py, which names the field it refuses.
"""

from __future__ import annotations

import shlex
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from backends.base import Api, Capability, Mode, ModelFormat

# Lowercase, usable in a URL path segment and a socket file name; the suffix keeps every manifest
# engine apart from the built-ins and from engines a package registers.
NAME_SUFFIX = "-custom"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,40}-custom$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_+-]*(?:\.[A-Za-z0-9_+-]+)*$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

# The request paths a manifest engine may be sent, by the API each one is.
API_PATHS: dict[Api, str] = {
    Api.CHAT_COMPLETIONS: "/v1/chat/completions",
    Api.COMPLETIONS: "/v1/completions",
    Api.EMBEDDINGS: "/v1/embeddings",
    Api.RERANK: "/v1/rerank",
    Api.MESSAGES: "/v1/messages",
    Api.MESSAGES_COUNT_TOKENS: "/v1/messages/count_tokens",
    Api.RESPONSES: "/v1/responses",
    Api.RESPONSES_INPUT_TOKENS: "/v1/responses/input_tokens",
}
CAPABILITY_APIS: dict[Capability, Api] = {
    Capability.CHAT: Api.CHAT_COMPLETIONS,
    Capability.COMPLETIONS: Api.COMPLETIONS,
    Capability.EMBEDDINGS: Api.EMBEDDINGS,
    Capability.RERANK: Api.RERANK,
}

Element = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class ListenKind(StrEnum):
    UNIX = "unix"
    TCP = "tcp"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Readiness(Strict):
    path: str = Field(default="/health", pattern=r"^/[A-Za-z0-9._~/-]{0,200}$")
    timeout: float = Field(default=120.0, gt=0, le=3600, description="seconds to wait for the first 200")


def _split_command(value: Any) -> Any:
    """A command may be written as one string: split shell-style (quotes respected), never run by a shell."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
    return value


class VersionSpec(Strict):
    command: list[Element] = Field(min_length=1, max_length=256)
    environment: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN, max_length=128)],
                      Annotated[str, StringConstraints(max_length=4096)]] = Field(default_factory=dict,
                                                                                   max_length=64)
    listen: ListenKind = ListenKind.UNIX
    readiness: Readiness = Field(default_factory=Readiness)
    # Arguments added for a mode (`embedding: ["--embeddings"]`); modes the engine serves without any may be absent.
    mode_args: dict[Mode, list[Element]] = Field(default_factory=dict)

    _split = field_validator("command", mode="before")(_split_command)


class FlagRule(Strict):
    """One runtime flag callers may pass, with the type of its value."""

    name: str = Field(pattern=r"^--?[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    aliases: list[Annotated[str, StringConstraints(pattern=r"^--?[A-Za-z][A-Za-z0-9_.-]{0,63}$")]] = \
        Field(default_factory=list, max_length=8)
    type: Literal["switch", "integer", "number", "choice", "text"]
    negation: str | None = Field(default=None, pattern=r"^--?[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    choices: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.+-]{1,64}$")]] = \
        Field(default_factory=list, max_length=128)
    min: float | None = None
    max: float | None = None
    pattern: str | None = Field(default=None, max_length=512)


class FlagPolicy(Strict):
    """Callers' runtime flags: none at all, or those listed (each still passes runnerd's value checks)."""

    policy: Literal["none", "allowlist"] = "none"
    allow: list[FlagRule] = Field(default_factory=list, max_length=256)
    # `separate` (--flag value) or `joined` (--flag=value), as the engine's parser wants.
    value_style: Literal["separate", "joined"] = "separate"


class MemoryPolicy(Strict):
    """How admission learns the runner's size: from the GGUF header (llama.cpp's estimator), a fixed
    size, or not at all (then the runner is admitted unmeasured and measured once it runs)."""

    kind: Literal["gguf", "fixed", "unknown"] = "unknown"
    ram_bytes: int = Field(default=0, ge=0, le=1 << 50)
    vram_bytes: int = Field(default=0, ge=0, le=1 << 50)


class EngineManifest(Strict):
    name: str = Field(min_length=1, max_length=64)  # the naming rule is checks.py's, with its reason
    description: str = Field(default="", max_length=2000)
    model_formats: list[ModelFormat] = Field(default_factory=lambda: [ModelFormat.GGUF], min_length=1)
    modes: list[Mode] = Field(default_factory=lambda: [Mode.COMPLETION], min_length=1)
    capabilities: list[Capability] = Field(min_length=1)
    # Request paths the engine may be sent; None: those of its capabilities. Listing /v1/messages or
    # /v1/responses says it serves those APIs itself (otherwise the daemon translates them to chat).
    paths: list[str] | None = None
    versions: dict[Annotated[str, StringConstraints(max_length=64)], VersionSpec] = Field(min_length=1,
                                                                                          max_length=32)
    default_version: str | None = None
    default_args: list[Element] = Field(default_factory=list, max_length=256)
    flags: FlagPolicy = Field(default_factory=FlagPolicy)
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)

    @property
    def chosen_version(self) -> str:
        return self.default_version or next(iter(self.versions))

    @property
    def version(self) -> VersionSpec:
        return self.versions[self.chosen_version]

    @property
    def request_paths(self) -> list[str]:
        if self.paths is not None:
            return self.paths
        return [API_PATHS[CAPABILITY_APIS[c]] for c in self.capabilities if c in CAPABILITY_APIS]

    @property
    def native_apis(self) -> frozenset[Api]:
        return frozenset(api for api, path in API_PATHS.items() if path in self.request_paths)
