"""The llama-server command line and environment for one runner."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from backends.base import BackendConfiguration, Mode, ModelRef
from backends.llamacpp.options import llamacpp_options


class LaunchOptions(BaseModel):
    """Operator-level settings (trusted, from the daemon's config) that shape every runner."""

    threads: int | None = None
    gpu_layers: int | None = None
    use_gpu: bool = False
    default_context_size: int = 4096
    # llama-server's host prompt cache grows to 8 GiB by default as slots switch prompts: memory that
    # admission cannot see coming. Off unless the operator (or a caller's --cache-ram) sets a budget.
    prompt_cache_mib: int = 0


def mode_flags(mode: Mode, pooling_in_file: bool) -> list[str]:
    if mode is Mode.EMBEDDING:
        # Without a pooling type llama-server refuses OpenAI embeddings ("Pooling type 'none'").
        return ["--embeddings"] if pooling_in_file else ["--embeddings", "--pooling", "mean"]
    if mode is Mode.RERANKING:
        return ["--embeddings", "--reranking"]
    return []


def draft_flags(config: BackendConfiguration, gpu_layers: str) -> tuple[list[str], list[str]]:
    """(operator-level, daemon-owned) flags for speculative decoding with a draft model.

    Flag names are llama.cpp 0.3.36's (common/arg.cpp): `--model-draft` survives only as an alias of
    `--spec-draft-model`, and `--draft-max` was removed (llama-server exits on it). The draft's GPU layers
    follow the main model's (the memory estimate places both the same way); a caller may tune them
    with --spec-draft-ngl like --n-gpu-layers. Without a `--spec-type`, llama-server loads the draft
    but drafts nothing (type "none"), so runnerd asks for plain draft-model speculation unless the
    caller chose a type.
    """
    spec = config.speculative
    if spec is None or spec.draft is None:
        return [], []
    owned = ["--spec-draft-model", str(spec.draft.path), "--spec-draft-n-max", str(spec.num_tokens)]
    if not any(flag.partition("=")[0] == "--spec-type" for flag in config.runtime_flags):
        owned += ["--spec-type", "draft-simple"]
    return ["--spec-draft-ngl", gpu_layers], owned


def build_argv(
    binary: Path,
    socket_path: Path,
    model: ModelRef,
    mode: Mode,
    config: BackendConfiguration,
    options: LaunchOptions,
    *,
    pooling_in_file: bool = False,
    chat_template: str | None = None,
) -> list[str]:
    """Operator defaults first, then the caller's validated flags, then the daemon's own flags.

    llama-server applies arguments in order, so anything placed last wins: the caller can tune what
    the operator set, and nothing the caller passes can change the model, the socket or the mode.
    """
    operator: list[str] = []
    if options.threads is not None:
        operator += ["--threads", str(options.threads)]
    if options.use_gpu:
        layers = options.gpu_layers
        gpu_layers = "all" if layers is None or layers < 0 else str(layers)
    else:
        # With --fit off a CUDA build would otherwise offload every layer to a GPU runnerd did not admit for.
        gpu_layers = "0"
    draft_operator, draft_owned = draft_flags(config, gpu_layers)
    operator += ["--n-gpu-layers", gpu_layers, *draft_operator]
    operator += ["--cache-ram", str(options.prompt_cache_mib)]
    owned = [
        "--model", str(model.path),
        "--host", str(socket_path),
        # Responses name the model as the client knows it, never by its path on this host.
        "--alias", model.name,
        "--ctx-size", str(config.context_size or options.default_context_size),
        # runnerd decides what fits; the engine must not shrink the context behind its back.
        "--fit", "off",
        "--metrics",
        "--no-webui",
        *mode_flags(mode, pooling_in_file),
    ]
    if model.mmproj is not None:
        owned += ["--mmproj", str(model.mmproj)]
    owned += draft_owned
    if chat_template is not None and "--chat-template" not in config.runtime_flags:
        owned += ["--chat-template", chat_template]
    budget = llamacpp_options(config).reasoning_budget
    if budget is not None:
        owned += ["--reasoning-budget", str(budget)]
    return [str(binary), *operator, *config.runtime_flags, *owned]


def build_env(binary: Path, base: Mapping[str, str] | None = None, keep: Sequence[str] = ()) -> dict[str, str]:
    """A clean environment: nothing inherited can set LLAMA_ARG_* options behind the argv."""
    source = os.environ if base is None else base
    env = {k: source[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", *keep) if k in source}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    # The build links libllama/libggml next to the executable.
    env["LD_LIBRARY_PATH"] = str(binary.parent)
    # llama-server reads presets from $XDG_CONFIG_HOME/llama.cpp/config.ini: point it where there are
    # none, so a runner's options are exactly its argv.
    env["XDG_CONFIG_HOME"] = str(binary.parent / "no-user-config")
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if name in source:
            env[name] = source[name]
    return env
