"""llama.cpp's daemon-wide settings (`[engines."llama.cpp"]`, also `[llamacpp]`) and per-model options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.base import KEBAB_CASE_TOO, BackendConfiguration

OPTIONS_KEY = "llamacpp"


class LlamaCppSettings(BaseModel):
    # A misspelt key (`thread = 4`) must not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    server: Path | None = Field(default=None, description="llama-server binary to use instead of a build")
    cuda: Literal["auto", "on", "off"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    gpu_layers: int | None = Field(default=None, description="layers to offload; unset = all when a GPU is there")
    prompt_cache_mib: int = Field(default=0, ge=0, le=1 << 20,
                                  description="llama-server's host prompt cache (--cache-ram); 0 = off")


class LlamaCppOptions(BaseModel):
    """Per-model options (`_configure` body: `"llamacpp": {"reasoning_budget": 0}`, or Docker Model Runner's
    `"reasoning-budget"`)."""

    model_config = KEBAB_CASE_TOO | ConfigDict(extra="forbid")

    # llama-server reads it with std::stoi: a value beyond a 32-bit int makes it exit at startup.
    reasoning_budget: int | None = Field(default=None, ge=-1, le=2**31 - 1)
    # A llama-cpp-python release whose vendored llama-server runs this model (`runnerd backends install
    # llama.cpp@VERSION` builds it); unset: the backend's default build.
    backend_version: str | None = Field(default=None, pattern=r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}$")


def llamacpp_options(config: BackendConfiguration) -> LlamaCppOptions:
    return LlamaCppOptions.model_validate(config.engine_table(OPTIONS_KEY))
