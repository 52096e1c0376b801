"""The vLLM command line and environment for one runner.

Every value is written in vLLM's joined form (``--flag=value``): its parser rewrites a separate value
that starts with ``-`` and holds a ``.`` into a dotted option (see ``backends/vllm/flags.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field

from backends.base import BackendConfiguration, Mode, ModelRef
from backends.vllm.options import vllm_options

ENTRYPOINT = "vllm.entrypoints.openai.api_server"


class VllmLaunch(BaseModel):
    """Operator-level settings (trusted, from the daemon's config) that shape every vLLM runner."""

    use_gpu: bool = False
    default_context_size: int = 4096
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # CPU hosts: KV-cache bytes given to vLLM; None = sized from the memory estimate.
    kv_cache_space: int | None = None
    # Full-length sequences the sized CPU KV cache holds.
    kv_cache_sequences: int = Field(default=4, ge=1)
    # None = eager on CPU hosts (graph capture / compilation cost start time and bring little there).
    enforce_eager: bool | None = None
    # Where vLLM may keep its own caches (compiled kernels); None = vLLM's default under $HOME.
    cache_root: Path | None = None

    @property
    def eager(self) -> bool:
        return not self.use_gpu if self.enforce_eager is None else self.enforce_eager


def mode_flags(mode: Mode) -> list[str]:
    # Embeddings and scores come from vLLM's pooling runner; the model's architecture says which pooler.
    return ["--runner=pooling"] if mode in (Mode.EMBEDDING, Mode.RERANKING) else []


def speculative_config(config: BackendConfiguration) -> str | None:
    """vLLM's --speculative-config for a resolved draft model: compact JSON, as --hf-overrides is."""
    spec = config.speculative
    if spec is None or spec.draft is None:
        return None
    return json.dumps({"model": str(spec.draft.path), "num_speculative_tokens": spec.num_tokens},
                      separators=(",", ":"))


def build_argv(
    python: Path,
    socket_path: Path,
    model: ModelRef,
    mode: Mode,
    config: BackendConfiguration,
    launch: VllmLaunch,
    *,
    max_model_len: int,
    kv_cache_bytes: int | None,
    hf_overrides: str | None,
    dtype: str | None = None,
) -> list[str]:
    """Operator defaults first, then the caller's validated flags, then the daemon's own flags.

    vLLM's parser keeps the last occurrence of an option: the caller can tune what the operator set
    (eager mode, the CPU KV-cache size), and nothing the caller passes can change the model, the
    socket, the served name or the mode.
    """
    operator: list[str] = []
    if launch.eager:
        operator.append("--enforce-eager")
    if kv_cache_bytes is not None:
        operator.append(f"--kv-cache-memory-bytes={kv_cache_bytes}")
    if dtype is not None:
        operator.append(f"--dtype={dtype}")
    owned = [
        f"--model={model.path}",
        f"--uds={socket_path}",
        # Responses name the model as the client knows it, never by its path on this host.
        f"--served-model-name={model.name}",
        f"--max-model-len={max_model_len}",
        *mode_flags(mode),
    ]
    if launch.use_gpu:
        utilization = vllm_options(config).gpu_memory_utilization or launch.gpu_memory_utilization
        owned.append(f"--gpu-memory-utilization={utilization:g}")
    if hf_overrides is not None:
        owned.append(f"--hf-overrides={hf_overrides}")
    speculative = speculative_config(config)
    if speculative is not None:
        owned.append(f"--speculative-config={speculative}")
    return [str(python), "-m", ENTRYPOINT, *operator, *config.runtime_flags, *owned]


def build_env(launch: VllmLaunch, tmpdir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment: only what is listed here reaches vLLM (it reads dozens of VLLM_* variables)."""
    source = os.environ if base is None else base
    env = {k: source[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if k in source}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update({
        # The model is a local directory: nothing may be fetched, and no usage report sent.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmpdir / "hf"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONNOUSERSITE": "1",
        # vLLM puts IPC sockets and vllm_dist_* files under $TMPDIR; a short private one per runner
        # keeps socket paths under the 108-byte limit and is removed with the runner.
        "TMPDIR": str(tmpdir),
    })
    # Every Python process of the runner loads this sitecustomize (see SITECUSTOMIZE).
    env["PYTHONPATH"] = str(tmpdir / "site")
    if launch.cache_root is not None:
        env["VLLM_CACHE_ROOT"] = str(launch.cache_root)
    if not launch.use_gpu:
        # Model inside the engine process: one process fewer, ~6 s faster start (ENGINE-FACTS.md).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Avoids a one-time ~15 s C++ compile on the first logprobs request.
        env["TORCHDYNAMO_DISABLE"] = "1"
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if name in source:
            env[name] = source[name]
    return env


# PR_SET_PDEATHSIG is cleared on fork and is per process: runnerd sets it for the API server only, and
# vLLM's EngineCore (and any worker) would outlive a SIGKILLed daemon, holding memory. Loaded by every
# Python process of the runner through PYTHONPATH, this makes each one die with its own parent, so the
# whole tree goes down in a cascade; `register_at_fork` covers processes forked without an exec.
SITECUSTOMIZE = """\
import ctypes, os, signal

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent():
    if _prctl is not None:
        _prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


_die_with_parent()
os.register_at_fork(after_in_child=_die_with_parent)
"""


def write_site(tmpdir: Path) -> None:
    """The runner's private sitecustomize (see SITECUSTOMIZE), under the directory build_env names."""
    site = tmpdir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
