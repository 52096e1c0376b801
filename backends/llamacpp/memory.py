"""RAM and VRAM a llama-server runner takes, from the GGUF header alone.

The estimate follows what the pinned llama.cpp (llama-cpp-python 0.3.36's vendor/llama.cpp) allocates
for a runner started with runnerd's command line (backends/llamacpp/argv.py), term by term:

- weights: every tensor goes where llama_model_base::load_tensors puts it (src/llama-model.cpp: the
  input layer stays on the CPU, layers il >= n_layer + 1 - n_gpu_layers and then the output layer go
  to the GPUs, split by free memory or --tensor-split). On the CPU the model is mmapped and read in
  full by the first request, so the file range holding CPU tensors is resident (the loader unmaps
  the rest: llama_model_loader::load_all_data, unmap_fragment). Matrices the CPU backend repacks
  (ggml/src/ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type) are also copied into
  anonymous memory of the same size.
- KV cache: llama_kv_cache's constructor (src/llama-kv-cache.cpp) allocates, per layer with a cache,
  K [n_embd_k_gqa(il), kv_size, n_stream] and V likewise (padded to the largest layer when V is
  stored transposed, i.e. without flash attention) and clears it, so all of it is resident.
  kv_size and n_stream come from llama_context's constructor (src/llama-context.cpp: n_ctx padded
  to 256; one stream of n_ctx cells when unified, else n_seq streams of n_ctx/n_seq padded to 256).
  Sliding-window layers live in a second cache of pad(min(kv_size, n_swa * n_seq + n_ubatch), 256)
  cells (src/llama-kv-cache-iswa.cpp). Recurrent layers hold (n_embd_r + n_embd_s) f32 per sequence
  instead (src/llama-memory-recurrent.cpp, llama_hparams::n_embd_r/s).
- compute: the scheduler reserves, per device, the peak of the worst-case graph (n_ubatch tokens
  over the whole cache: llama_context::sched_reserve). A structural formula reproduces the "compute
  buffer size" llama-server logs (fitted on 120 logged reservations of generated llama models, CPU
  backend, every one within 5 %; see compute_bytes). VRAM is committed when allocated. On the CPU the
  pages are committed as graphs use them: after chat requests only a small graph's worth is resident,
  which is what `cpu_compute="resident"` (the default) counts, with a note of how much long prompts
  over a full context can add; `"reserved"` counts the whole reservation. In embedding mode one input
  of a whole batch touches all of it (logits for every token), so it is counted in full.
- output buffer: logits (and embeddings in embedding mode) for max(n_outputs, n_seq) rows, cleared at
  allocation, grown and never shrunk (llama_context::output_reserve): n_seq x (1 + n_draft) rows for
  chat, a whole batch for embeddings.
- overhead: shared libraries and the process's own heap: the vocabulary's in-memory form
  (src/llama-vocab.cpp: token strings, lookup maps, one map entry per BPE merge), graph structures
  sized by the tensor count, KV cell bookkeeping, the output buffer. Fitted on generated models
  (bench/memory.py --calibration; figures and command in tests/fixtures/memory_measured.json).

Not counted, and said so in the notes: what llama-server adds later as it is used (its prompt cache,
--cache-ram, 8 GiB by default, unless `count_prompt_cache` asks for its whole budget, as runnerd's
backend does for admission; checkpoints of sliding-window or recurrent state; compute pages touched
by long prompts). Measured on this host, the estimate is within 2.5 % of the resident memory after a
warm-up request on every recorded row (81 rows: Gemma 3 270M and generated models, 2k-32k context,
f16/q8_0 cache, 1 slot, llama-server's automatic 4 slots with one unified cache, an explicit -np 4
with four per-slot streams, embedding mode; a BERT encoder in embedding and reranking mode).

Encoders (bert and the other ENCODER_ARCHS): llama_model::create_memory returns no memory for them
(src/llama-model.cpp: the no-cache architectures), so there is no KV cache at all, whatever the
context; llama_context::decode hands their batches to encode(), which needs the whole input in one
ubatch (non-causal attention), so the compute reservation (and the attention mask, ubatch x ubatch)
scales with --ubatch-size, not with the context; the graph ends at the pooled embeddings (mean, cls,
last; rank adds the classification head), with no logits, though output_reserve still sizes the
output buffer with n_vocab logits per output row (every token of a batch in pooled modes).

GPU terms (CUDA context, VRAM compute buffers) follow the same code paths but could not be measured
here: they are marked in the notes.
"""

from __future__ import annotations

import functools
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.base import BackendConfiguration, DeviceMemory, MemoryBreakdown, MemoryEstimate, Mode
from backends.formats.gguf import GGUFHeader, LazyArray, TensorInfo
from backends.llamacpp.flags import KV_CACHE_TYPES, LLAMACPP_FLAGS

MiB = 1 << 20
DEFAULT_CTX = 4096  # runnerd's default --ctx-size (backends/llamacpp/argv.py, LaunchOptions)
AUTO_PARALLEL = 4  # tools/server/server.cpp: n_parallel = -1 (auto) becomes 4 slots, unified KV
CTX_PAD = 256  # src/llama-context.cpp: n_ctx = GGML_PAD(n_ctx, 256); the SWA cache pads the same
MAX_LAYERS = 512  # src/llama-hparams.h, LLAMA_MAX_LAYERS

# --- measured constants (CPU build 0.3.36-cpu, this host; tests/fixtures/memory_measured.json) ---------
# File-backed pages of libllama, libggml*, libmtmd, libllama-server-impl and libc++ that are resident
# in every runner: RssFile minus the mapped model, constant across all measured models.
CPU_LIBRARIES = int(16.45 * MiB)
# The four heap terms below are one least-squares fit of VmRSS minus every other term over the
# generated models (1k..256k-token vocabularies, SentencePiece and BPE; 2..96 layers; the bench's two
# tiny models at 2k..32k context): every one of those rows within 1.1 MiB. Gemma 3 270M is not in
# the fit and comes out 4-6 MiB (1.5 %) under: 7 % of its tokens are longer than 15 bytes, and such
# strings live on the heap, three copies each, where the generated tokens never do.
# Anonymous memory of a runner with a tiny model: threads, HTTP server, ggml contexts, templates.
CPU_BASE_HEAP = int(4.80 * MiB)
# Per vocabulary entry (token text, token_to_id map node, token data, the piece cache; the sampler
# candidates and a logits row of the one slot the warm-up used).
HEAP_PER_TOKEN = 164
# Per BPE merge (a bpe_ranks std::map node holding two strings).
HEAP_PER_MERGE = 110
# BPE tokenizers also compile their pre-tokenizer regexes on the first request.
BPE_BASE_HEAP = int(2.81 * MiB)
# Per tensor in the model: llama.cpp sizes its graphs by tensor count (graph_max_nodes: 8 nodes per
# tensor), and the graph results, scheduler hash sets and ggml contexts sized by it are resident.
HEAP_PER_TENSOR = 7900
# Host-side bookkeeping of every KV cell, in every stream of every cache (src/llama-kv-cells.h:
# pos 4 + ext 12 + shift 4 + a 256-bit sequence set 32 bytes).
KV_CELL_BYTES = 52
# Encoders (ENCODER_ARCHS) in embedding/reranking mode after one input of a whole batch: what stays
# resident beyond every other term, measured on generated BERT models (2k..100k-token WordPiece
# vocabularies, n_embd 128/512, ubatch 128..512): 0.9-2.2 MiB, 1.9 on average; not yet traced to
# one allocation (the WPM tokenizer's word splitting and the pooled-embedding path are candidates).
ENCODER_HEAP = int(1.5 * MiB)
# Tokens of the warm-up request a "resident" CPU compute term is sized for.
WARM_TOKENS = 32

# --- compute-buffer formula, fitted on logged reservations (see module docstring) -------------------
# Peak of one layer's activations, in f32 values per token of the ubatch: the FFN phase holds
# 3 n_ff + 4 n_embd, the attention phase 3 n_embd + 2 (n_head * head_dim) + 2 (n_head_kv * head_dim);
# without flash attention the attention phase also holds KQ (n_kv x n_tokens x n_head, f32).
FFN_FF, FFN_EMBD = 3, 4
ATTN_EMBD, ATTN_Q, ATTN_KV = 3, 2, 2

# --- not measured here (no GPU on the machines this was written on): typical figures ---------------
# CUDA context, cuBLAS workspace and kernels resident on each GPU a runner uses.
CUDA_CONTEXT_VRAM = 384 * MiB
# Host side of the CUDA runtime (libcudart, libcublas pages, pinned staging) per runner.
CUDA_HOST_RAM = 256 * MiB

# Architectures whose graph keeps no KV cache (llama_model::create_memory returns nullptr).
NO_CACHE_ARCHS = frozenset({
    "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2", "jina-bert-v3",
    "eurobert", "wavtokenizer-dec", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1",
})
# Encoders among them: the graph ends at the (pooled) embeddings, with no output projection to the
# vocabulary (src/models/bert.cpp and the other *-bert.cpp, gemma-embedding.cpp set only t_embd).
ENCODER_ARCHS = NO_CACHE_ARCHS - {"wavtokenizer-dec", "dream", "llada", "llada-moe", "rnd1"}
# Encoders whose feed-forward is one up projection, an activation and a down projection (bert.cpp:
# LLM_FFN_GELU, LLM_FFN_SEQ for bert, nomic-bert-moe, jina-bert-v3); the others gate it like llama.
UNGATED_FFN_ARCHS = frozenset({"bert", "nomic-bert-moe", "jina-bert-v3"})
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset({
    "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
    "qwen3next", "kimi-linear", "qwen35", "qwen35moe",
})


@dataclass(frozen=True)
class SwaRule:
    """How an architecture marks sliding-window layers (src/models/<arch>.cpp, load_arch_hparams)."""

    period: int  # default of `<arch>.attention.sliding_window_pattern`
    dense_first: bool = False  # llama_hparams::set_swa_pattern: dense layer first, not last
    default_window: int | None = None  # window when the file gives none (None: no SWA without the key)


SWA_RULES: dict[str, SwaRule] = {
    "gemma2": SwaRule(2, default_window=4096),
    "gemma3": SwaRule(6),
    "gemma3n": SwaRule(5, default_window=512),
    "gemma-embedding": SwaRule(6, default_window=512),
    "cohere2": SwaRule(4, default_window=4096),
    "cohere2moe": SwaRule(4, dense_first=True, default_window=4096),
    "gpt-oss": SwaRule(2, default_window=128),
    "llama4": SwaRule(4, default_window=8192),
    "olmo2": SwaRule(4),
    "afmoe": SwaRule(4),
    "mellum": SwaRule(4),
    "plamo3": SwaRule(8),
    "modern-bert": SwaRule(3, dense_first=True),
    "exaone-moe": SwaRule(4, default_window=128),
    "muse-glimmer": SwaRule(4),
}
# Architectures whose KV layout this module follows; others get the generic estimate, marked so.
KNOWN_ARCHS = frozenset({
    "llama", "llama-embed", "mistral3", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "qwen2vl", "qwen3vl",
    "qwen3vlmoe", "phi2", "phi3", "phimoe", "gemma", "gemma2", "gemma3", "starcoder", "starcoder2", "stablelm",
    "deepseek", "deepseek2", "granite", "granitemoe", "olmo", "olmo2", "olmoe", "command-r", "cohere2",
    "internlm2", "minicpm", "minicpm3", "smollm3", "gpt-oss", "deci", "exaone", "exaone4", "falcon", "bloom",
    "gpt2", "gptneox", "mpt", "baichuan", "chatglm", "glm4", "glm4moe", "hunyuan-moe", "hunyuan-dense",
    "ernie4_5", "ernie4_5-moe", "seed_oss", "apertus", "arcee", "llama4",
}) | NO_CACHE_ARCHS | RECURRENT_ARCHS


class GpuDevice(BaseModel):
    """One GPU llama.cpp may place layers on; free memory sets the default layer split."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    free_bytes: int | None = Field(default=None, ge=0)


class LlamaCppMemorySettings(BaseModel):
    """The llama-server settings that decide its memory, as runnerd would start it."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    mode: Mode = Mode.COMPLETION
    ctx_size: int | None = Field(default=None, gt=0)  # None: runnerd's default, DEFAULT_CTX
    parallel: int | None = Field(default=None, ge=1)  # None: llama-server's auto (4 slots, unified KV)
    kv_unified: bool | None = None  # None: what llama-server picks (unified only when parallel is auto)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: Literal["auto", "on", "off"] = "auto"
    batch_size: int = Field(default=2048, ge=1)
    ubatch_size: int = Field(default=512, ge=1)
    gpus: list[GpuDevice] = Field(default_factory=list)  # empty: CPU only
    gpu_layers: int | None = None  # None or negative: all (llama.cpp's default with --fit off)
    tensor_split: list[float] | None = None
    kv_offload: bool = True
    use_mmap: bool = True
    repack: bool = True  # --no-repack turns the CPU backend's weight repacking off
    cpu_repack_types: frozenset[str] | None = None  # ggml types repacked on the CPU; None: detect here
    swa_full: bool = False
    pooling: str | None = None  # --pooling; None: the file's, or mean in embedding mode (argv.py)
    n_draft: int = Field(default=0, ge=0)  # speculative tokens per step: more output rows
    mmproj: GGUFHeader | None = None  # multimodal projector, when the runner loads one
    draft: GGUFHeader | None = None  # draft model for speculative decoding
    cache_ram_mib: int = 8192  # --cache-ram: llama-server's prompt cache limit (-1: none, 0: off)
    # Count the prompt cache's whole budget in RAM: what admission needs, since the cache fills as prompts
    # change and a caller may ask for up to 1 TiB of it. Off, it is only noted (the calibration measures
    # memory after a warm-up request, before the cache holds anything).
    count_prompt_cache: bool = False
    cpu_compute: Literal["resident", "reserved"] = "resident"

    @field_validator("cache_type_k", "cache_type_v")
    @classmethod
    def _known_cache_type(cls, value: str) -> str:
        if value.lower() not in KV_CACHE_TYPES:
            raise ValueError(f"unknown KV cache type {value!r} (llama-server accepts {', '.join(KV_CACHE_TYPES)})")
        return value.lower()


# --- settings from runnerd's configuration --------------------------------------------------------


def settings_from_config(mode: Mode, config: BackendConfiguration, default_ctx: int, use_gpu: bool, *,
                         gpu_layers: int | None = None, gpus: Sequence[GpuDevice] = (),
                         draft: GGUFHeader | None = None, mmproj: GGUFHeader | None = None,
                         cache_ram_mib: int | None = None) -> LlamaCppMemorySettings:
    """The settings llama-server ends up with for runnerd's argv: the operator's GPU choice, then the
    caller's validated runtime flags (last one wins, as in llama-server), then runnerd's own flags.
    A value that does not pass the flag table is ignored here: llama-server will refuse it with its own
    words. gpu_layers and cache_ram_mib are what runnerd itself passes (operator settings), if anything."""
    flags = _flag_values(config.runtime_flags)
    values: dict[str, Any] = {"mode": mode, "ctx_size": config.context_size or default_ctx,
                              "draft": draft, "mmproj": mmproj}
    chosen = _offload(list(gpus), flags) if use_gpu else None
    if chosen is not None:
        values["gpus"] = chosen or [GpuDevice(index=0)]
        values["gpu_layers"] = gpu_layers
        if "--gpu-layers" in flags:
            values["gpu_layers"] = _layers(flags["--gpu-layers"], gpu_layers)
    if draft is not None and config.speculative is not None:
        values["n_draft"] = config.speculative.num_tokens
    for key, flag in (("parallel", "--parallel"), ("batch_size", "--batch-size"), ("ubatch_size", "--ubatch-size")):
        number = _int_or_none(flags.get(flag))
        if number is not None and number >= 1:
            values[key] = number
        elif key == "parallel" and number is not None and number < 0:
            values[key] = None  # -np -1: auto
    for key, flag in (("cache_type_k", "--cache-type-k"), ("cache_type_v", "--cache-type-v")):
        if flags.get(flag, "").lower() in KV_CACHE_TYPES:
            values[key] = flags[flag].lower()
    if "--flash-attn" in flags:
        values["flash_attn"] = _switch(flags["--flash-attn"])
    for key, flag in (("kv_unified", "--kv-unified"), ("kv_offload", "--kv-offload"), ("repack", "--repack"),
                      ("swa_full", "--swa-full")):
        if flag in flags:
            values[key] = flags[flag] == "1"
    if flags.get("--load-mode") in _MMAP_MODES:  # common/arg.cpp --load-mode: auto/mmap map the file
        values["use_mmap"] = _MMAP_MODES[flags["--load-mode"]]
    if "--mmap" in flags:  # builds before --load-mode: --no-mmap reads the weights into RAM
        values["use_mmap"] = flags["--mmap"] == "1"
    # --mlock (those builds) locks the pages the estimate already counts as resident: no change in size.
    if "--tensor-split" in flags:
        split = [_float_or_none(x) for x in re.split(r"[,/]", flags["--tensor-split"]) if x]
        if split and all(x is not None and x >= 0 for x in split):
            values["tensor_split"] = split
    cache_ram = _int_or_none(flags.get("--cache-ram")) if cache_ram_mib is None else cache_ram_mib
    if cache_ram is not None and cache_ram >= -1:
        values["cache_ram_mib"] = cache_ram
    if mode is Mode.RERANKING:
        values["pooling"] = "rank"
    return LlamaCppMemorySettings(**values)


_MMAP_MODES = {"auto": True, "mmap": True, "mmap+mlock": True, "none": False, "mlock": False, "dio": False}


def _flag_values(argv: Sequence[str]) -> dict[str, str]:
    """What llama-server reads from these runtime flags, by canonical flag name ("1"/"0" for a switch
    and its negation), through the same flag table and parser that validated them. Lenient: a flag
    the table would refuse, or whose value it would refuse, is skipped; the last occurrence wins."""
    return {name: ("1" if value else "0") if isinstance(value, bool) else value
            for name, value in LLAMACPP_FLAGS.values(argv, strict=False).items()}


def offload_devices(gpus: Sequence[GpuDevice], flags: Sequence[str]) -> list[GpuDevice] | None:
    """Which of `gpus` (the GPUs llama-server sees, in its order) it puts layers on, given runtime flags;
    None when it offloads nothing. An empty result means "GPUs unknown"."""
    return _offload(list(gpus), _flag_values(flags))


def _offload(gpus: list[GpuDevice], flags: dict[str, str]) -> list[GpuDevice] | None:
    """common/arg.cpp, llama_model_load: `--device` picks and orders devices by name (CUDA<n> is the n-th
    GPU it sees; `none`: no offload), and `--split-mode none` keeps only the `--main-gpu`-th of those
    (default 0), so the whole model lands on that one GPU. Layer and row splits use every device, split
    by free memory or --tensor-split (row is modelled like layer). Values llama-server would refuse are
    left alone here: it reports them itself when it starts."""
    chosen = gpus
    device = flags.get("--device")
    if device == "none":
        return None
    if device is not None:
        picked = [int(name[4:]) for name in device.split(",") if name.startswith("CUDA") and name[4:].isdigit()]
        if picked and all(n < len(chosen) for n in picked):
            chosen = [chosen[n] for n in picked]
    if flags.get("--split-mode") == "none":
        main = flags.get("--main-gpu")
        position = int(main) if main is not None and main.isdigit() else 0
        if chosen and position < len(chosen):
            chosen = [chosen[position]]
        elif not chosen and position:
            chosen = [GpuDevice(index=position)]  # GPUs unknown: assume NVML order matches
    return chosen


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _switch(text: str) -> Literal["auto", "on", "off"]:
    value = text.lower()
    if value in ("on", "1", "true", "enabled"):
        return "on"
    if value in ("off", "0", "false", "disabled"):
        return "off"
    return "auto"


def _layers(text: str, operator: int | None) -> int | None:
    """--n-gpu-layers N | all | auto; None means all (with --fit off, auto and -1 mean all)."""
    if text in ("all", "auto"):
        return None
    number = _int_or_none(text)
    if number is None:
        return operator  # llama-server will refuse the value itself
    return None if number < 0 else number


# --- what the header says about the model ---------------------------------------------------------


@dataclass
class ModelShape:
    """The hyper-parameters memory depends on, per layer where llama.cpp allows arrays."""

    arch: str
    known: bool
    n_layer: int  # layers with weights, NextN/MTP layers included (llama.cpp's n_layer_all)
    n_layer_main: int  # layers the main graph runs (n_layer_all - nextn_predict_layers)
    n_embd: int
    n_embd_out: int
    n_vocab: int
    n_merges: int
    tokenizer: str
    head_count: list[int]
    head_count_kv: list[int]
    key_length: list[int]
    value_length: list[int]
    n_ff: list[int]
    is_swa: list[bool]
    n_swa: int
    is_recurrent: list[bool]
    has_kv: list[bool]
    recurrent_state_floats: int  # n_embd_r + n_embd_s, per recurrent layer and sequence
    causal: bool
    no_cache: bool
    has_v: bool  # False for MLA: the cache holds K only
    pooling_in_file: bool
    notes: list[str] = field(default_factory=list)
    encoder: bool = False  # non-causal, no KV cache, no logits in the graph (ENCODER_ARCHS)

    @property
    def swa_any(self) -> bool:
        return any(self.is_swa)


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _per_layer(header: GGUFHeader, key: str, n: int, default: int) -> list[int]:
    """A key llama.cpp reads with get_key_or_arr: one value for all layers, or one per layer."""
    value = header.arch_get(key)
    if isinstance(value, list):
        values = [_int(v, default) for v in value[:n]]
        return values + [values[-1] if values else default] * (n - len(values))
    return [_int(value, default)] * n


def _vocab_size(header: GGUFHeader) -> int:
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list | LazyArray):
        return len(tokens)
    size = _int(header.arch_get("vocab_size"))
    if size:
        return size
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    return embd.shape[1] if embd is not None and len(embd.shape) == 2 else 0


def model_shape(header: GGUFHeader) -> ModelShape:
    arch = header.architecture or "unknown"
    notes: list[str] = []
    known = arch in KNOWN_ARCHS or arch in SWA_RULES or arch in HYBRID_ARCHS
    if not known:
        notes.append(f"unknown architecture {arch!r}: generic estimate from the generic keys")
    n_layer = _int(header.arch_get("block_count"))
    n_embd = _int(header.arch_get("embedding_length"))
    if n_layer > MAX_LAYERS:
        notes.append(f"block_count {n_layer} is over llama.cpp's {MAX_LAYERS}-layer limit: llama-server will refuse "
                     "this model")
        n_layer = 0
    if n_layer == 0 or n_embd == 0:
        notes.append("no block_count/embedding_length in the header: weights and fixed costs only")
    nextn = min(_int(header.arch_get("nextn_predict_layers")), n_layer)
    heads = _per_layer(header, "attention.head_count", n_layer, 0)
    kv_heads = _per_layer(header, "attention.head_count_kv", n_layer, 0) \
        if header.arch_get("attention.head_count_kv") is not None else list(heads)
    head0 = max(heads, default=0)
    default_head = n_embd // head0 if head0 else 0
    key_full = _int(header.arch_get("attention.key_length"), default_head)
    value_full = _int(header.arch_get("attention.value_length"), default_head)
    key_swa = _int(header.arch_get("attention.key_length_swa"), key_full)
    value_swa = _int(header.arch_get("attention.value_length_swa"), value_full)
    is_swa, n_swa = _swa_layers(header, arch, n_layer, notes)
    key = [key_swa if s else key_full for s in is_swa]
    value = [value_swa if s else value_full for s in is_swa]
    is_recurrent = _recurrent_layers(header, arch, n_layer, kv_heads)
    has_kv = _kv_layers(header, arch, n_layer)
    pooling = header.arch_get("pooling_type")
    shape = ModelShape(
        arch=arch, known=known, n_layer=n_layer, n_layer_main=n_layer - nextn, n_embd=n_embd,
        n_embd_out=_int(header.arch_get("embedding_length_out"), n_embd), n_vocab=_vocab_size(header),
        n_merges=len(m) if isinstance(m := header.get("tokenizer.ggml.merges"), list | LazyArray) else 0,
        tokenizer=str(header.get("tokenizer.ggml.model", "")),
        head_count=heads, head_count_kv=kv_heads, key_length=key, value_length=value,
        n_ff=_ffn_widths(header, n_layer), is_swa=is_swa, n_swa=n_swa, is_recurrent=is_recurrent, has_kv=has_kv,
        recurrent_state_floats=_recurrent_state(header, n_embd, head0),
        causal=bool(header.arch_get("attention.causal", arch not in NO_CACHE_ARCHS)),
        no_cache=arch in NO_CACHE_ARCHS,
        has_v=not (header.arch_get("attention.key_length_mla") and header.arch_get("attention.value_length_mla")),
        pooling_in_file=pooling is not None and pooling != 0, notes=notes, encoder=arch in ENCODER_ARCHS,
    )
    if arch in HYBRID_ARCHS or arch in RECURRENT_ARCHS:
        notes.append(f"{arch} keeps recurrent state: its size follows the ssm/wkv keys (approximate)")
    return shape


def _swa_layers(header: GGUFHeader, arch: str, n_layer: int, notes: list[str]) -> tuple[list[bool], int]:
    rule = SWA_RULES.get(arch)
    window = _int(header.arch_get("attention.sliding_window"))
    pattern = header.arch_get("attention.sliding_window_pattern")
    if rule is None:
        if window and pattern is not None:
            rule = SwaRule(1)
            notes.append(f"sliding window on {arch!r} read from the generic keys")
        else:
            return [False] * n_layer, 0
    window = window or rule.default_window or 0
    if window == 0:
        return [False] * n_layer, 0
    if isinstance(pattern, list):  # one flag per layer (llama_model_base::load_swa_pattern)
        flags = [bool(p) for p in pattern[:n_layer]]
        return flags + [False] * (n_layer - len(flags)), window
    period = _int(pattern, rule.period)
    if rule.dense_first:
        return [period == 0 or il % period != 0 for il in range(n_layer)], window
    return [period == 0 or il % period < period - 1 for il in range(n_layer)], window


def _recurrent_layers(header: GGUFHeader, arch: str, n_layer: int, kv_heads: list[int]) -> list[bool]:
    if arch in RECURRENT_ARCHS:
        return [True] * n_layer
    if arch not in HYBRID_ARCHS:
        return [False] * n_layer
    interval = header.arch_get("full_attention_interval")
    if arch in ("qwen3next", "qwen35", "qwen35moe", "kimi-linear") or interval is not None:
        period = _int(interval, 4) or 4
        return [(il + 1) % period != 0 for il in range(n_layer)]
    if arch == "falcon-h1":  # every layer has both attention and an SSM
        return [True] * n_layer
    # jamba, granitehybrid, nemotron_h, lfm2, plamo2: a layer without KV heads is recurrent.
    return [h == 0 for h in kv_heads]


def _kv_layers(header: GGUFHeader, arch: str, n_layer: int) -> list[bool]:
    """llama_hparams::has_kv: later layers of gemma3n/gemma4 reuse earlier layers' caches."""
    first_shared = n_layer
    if arch == "gemma3n":
        first_shared = min(20, n_layer)
    shared = _int(header.arch_get("attention.shared_kv_layers"))
    if shared:
        first_shared = n_layer - min(shared, n_layer)
    return [il < first_shared for il in range(n_layer)]


def _ffn_widths(header: GGUFHeader, n_layer: int) -> list[int]:
    """Widest FFN activation per layer: the dense n_ff, or the used experts' (plus shared) widths."""
    dense = _per_layer(header, "feed_forward_length", n_layer, 0)
    n_used = _int(header.arch_get("expert_used_count"))
    if not n_used:
        return dense
    expert = _per_layer(header, "expert_feed_forward_length", n_layer, 0)
    shared = _int(header.arch_get("expert_shared_feed_forward_length")) * max(
        _int(header.arch_get("expert_shared_count"), 1), 1)
    return [max(d, n_used * e + shared) for d, e in zip(dense, expert, strict=True)]


def _recurrent_state(header: GGUFHeader, n_embd: int, n_head: int) -> int:
    """llama_hparams::n_embd_r() + n_embd_s(), in f32 values per recurrent layer and sequence."""
    wkv = _int(header.arch_get("wkv.head_size"))
    if wkv:
        return _int(header.arch_get("token_shift_count"), 2) * n_embd + n_embd * wkv
    l_cache = _int(header.arch_get("shortconv.l_cache"))
    if l_cache:
        return n_embd * (l_cache - 1)
    d_conv = _int(header.arch_get("ssm.conv_kernel"))
    d_inner = _int(header.arch_get("ssm.inner_size"))
    d_state = _int(header.arch_get("ssm.state_size"))
    groups = _int(header.arch_get("ssm.group_count"))
    return max(d_conv - 1, 0) * (d_inner + 2 * groups * d_state) + d_state * d_inner


# --- the runner's context parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class ContextPlan:
    """What llama_context's constructor and the server derive from the settings."""

    n_ctx: int  # total cells over all streams (padded)
    n_seq: int
    n_stream: int
    kv_size: int  # cells per stream in the full-attention cache
    swa_size: int  # cells per stream in the sliding-window cache
    n_batch: int
    n_ubatch: int
    n_outputs: int  # rows the output buffer holds
    flash_attn: bool
    embeddings: bool


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def context_plan(shape: ModelShape, s: LlamaCppMemorySettings) -> ContextPlan:
    n_ctx = _pad(s.ctx_size or DEFAULT_CTX, CTX_PAD)
    n_seq = s.parallel or AUTO_PARALLEL
    unified = s.kv_unified if s.kv_unified is not None else s.parallel is None
    embeddings = s.mode is not Mode.COMPLETION
    n_stream = 1 if unified else n_seq
    kv_size = n_ctx if unified else _pad(n_ctx // n_seq, CTX_PAD)
    n_ctx = kv_size * n_stream
    # tools/server/server.cpp: embeddings need the whole input in one ubatch, so n_batch = n_ubatch.
    n_batch = min(s.batch_size, s.ubatch_size) if embeddings else s.batch_size
    if shape.causal:
        n_batch = min(n_ctx, n_batch)  # llama_context: with causal attention the batch fits the context
    n_ubatch = min(n_batch, s.ubatch_size)
    swa_size = kv_size if s.swa_full else \
        _pad(min(kv_size, shape.n_swa * (n_seq if unified else 1) + n_ubatch), CTX_PAD)
    # Output rows: the server asks for n_parallel x (1 + n_draft) (tools/server/server-context.cpp,
    # server_output_limits); embedding batches output every token, up to n_batch.
    n_outputs = n_batch if embeddings else max(n_seq * (1 + s.n_draft), n_seq)
    flash = s.flash_attn != "off"  # auto resolves to on wherever the backend supports it
    return ContextPlan(n_ctx, n_seq, n_stream, kv_size, swa_size, n_batch, n_ubatch, n_outputs, flash, embeddings)


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of n values of a ggml type (whole blocks: rows are padded to the block size)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return -(-n // block) * size


# --- devices ----------------------------------------------------------------------------------------

CPU = "cpu"


@dataclass
class Placement:
    """Which device each layer, the input and the output layer live on."""

    layers: list[str]
    output: str
    gpus: list[str]

    def layer(self, il: int) -> str:
        return self.layers[il] if 0 <= il < len(self.layers) else CPU


def placement(shape: ModelShape, s: LlamaCppMemorySettings) -> Placement:
    """llama_model_base::load_tensors: layers il >= i_gpu_start go to the GPUs (the output layer counts
    as layer n_layer), split in proportion to free memory or --tensor-split."""
    n = shape.n_layer
    if not s.gpus:
        return Placement([CPU] * n, CPU, [])
    names = [f"cuda:{g.index}" for g in s.gpus]
    ngl = n + 1 if s.gpu_layers is None or s.gpu_layers < 0 else s.gpu_layers
    act = min(ngl, n + 1)
    start = max(n + 1 - ngl, 0)
    weights = s.tensor_split if s.tensor_split and any(s.tensor_split) else \
        [float(g.free_bytes or 1) for g in s.gpus]
    weights = (weights + [0.0] * len(names))[:len(names)]
    total = sum(weights) or 1.0
    bounds: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w / total
        bounds.append(acc)

    def device(il: int) -> str:
        if il < start or il - start >= act:
            return CPU
        frac = (il - start) / act
        idx = next((i for i, b in enumerate(bounds) if frac < b), len(names) - 1)
        return names[idx]

    return Placement([device(il) for il in range(n)], device(n), names)


_LAYER = re.compile(r"^blk\.(\d+)\.")
_OUTPUT = ("output.", "output_norm.", "cls.", "cls_out.")


def tensor_device(t: TensorInfo, place: Placement) -> str:
    m = _LAYER.match(t.name)
    if m:
        return place.layer(int(m.group(1)))
    if t.name.startswith(_OUTPUT):
        return place.output
    return CPU  # input layer (token embeddings and the like) always stays on the CPU


@functools.lru_cache(maxsize=1)
def host_repack_types() -> frozenset[str]:
    """ggml types the CPU backend repacks on this host (ggml_repack_get_optimal_repack_type)."""
    flags = _cpu_flags()
    machine = platform.machine().lower()
    found: set[str] = set()
    if machine in ("x86_64", "amd64", "i686"):
        # Q2_K also repacks with AVX-512, but runnerd's build (GGML_NATIVE=OFF, install.py) has no
        # AVX-512 kernels: its system_info lists AVX2 and not AVX512.
        if "avx2" in flags:
            found |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    elif machine in ("aarch64", "arm64") and ("asimddp" in flags or "i8mm" in flags):
        # NEON with dot products (or int8 matmul) repacks these into 4x4/4x8/8x4 interleaves.
        found |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"}
    return frozenset(found)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    words: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            words |= set(line.split(":", 1)[1].split())
    return words


_NOT_MATMUL = ("token_embd.", "position_embd.", "token_types.", "per_layer_token_embd.", "rope_")


def _repacked(t: TensorInfo, types: frozenset[str]) -> bool:
    """Weights the repack buffer type takes: matrices used by MUL_MAT (2-D) or MUL_MAT_ID (3-D)
    whose rows interleave by 8 (repack.cpp: ne[1] % 8 == 0)."""
    if t.type_name not in types or len(t.shape) not in (2, 3) or t.shape[1] % 8:
        return False
    return not t.name.startswith(_NOT_MATMUL) and ".attn_norm" not in t.name


# --- the estimate -----------------------------------------------------------------------------------


class _Ledger:
    """Bytes per device and term."""

    def __init__(self) -> None:
        self.terms: dict[str, MemoryBreakdown] = {}

    def add(self, device: str, term: str, n: int) -> None:
        entry = self.terms.setdefault(device, MemoryBreakdown())
        setattr(entry, term, getattr(entry, term) + int(n))

    def devices(self) -> list[DeviceMemory]:
        order = sorted(self.terms, key=lambda d: (d != CPU, d))
        return [DeviceMemory(device=d, bytes=self.terms[d].total, breakdown=self.terms[d]) for d in order]


def estimate(header: GGUFHeader, settings: LlamaCppMemorySettings) -> MemoryEstimate:
    """RAM and VRAM llama-server takes for this model with these settings (see the module docstring)."""
    ledger = _Ledger()
    notes = _add_model(ledger, header, settings, primary=True)
    if settings.mmproj is not None:
        notes += _add_projector(ledger, settings.mmproj, settings)
    if settings.draft is not None:
        notes += _add_model(ledger, settings.draft, settings.model_copy(update={"draft": None, "n_draft": 0}),
                            primary=False)
    devices = ledger.devices()
    ram = sum(d.bytes for d in devices if d.device == CPU)
    vram = sum(d.bytes for d in devices if d.device != CPU)
    return MemoryEstimate(ram_bytes=ram, vram_bytes=vram, devices=devices, notes=_unique(notes))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _add_model(ledger: _Ledger, header: GGUFHeader, s: LlamaCppMemorySettings, *, primary: bool) -> list[str]:
    shape = model_shape(header)
    plan = context_plan(shape, s)
    place = placement(shape, s)
    notes = list(shape.notes)
    _add_weights(ledger, header, shape, place, s)
    notes += _add_cache(ledger, shape, plan, place, s)
    notes += _add_compute(ledger, shape, plan, place, s)
    notes += _add_output(ledger, shape, plan)
    _add_overhead(ledger, header, shape, plan, place, primary=primary)
    if plan.n_ctx // plan.n_stream > _int(header.arch_get("context_length"), 1 << 62):
        notes.append("the context is larger than the model's training context: slots are capped to it, "
                     "the KV cache is not")
    if primary:
        notes += _add_prompt_cache(ledger, plan, s)
        notes += _growth_notes(shape, plan, s)
    else:
        notes.append("draft model included (its own weights, KV cache and compute buffers)")
    if place.gpus:
        notes.append("GPU terms (CUDA context, VRAM compute buffers) follow llama.cpp's code paths but were "
                     "not measured on a GPU")
    return notes


def _growth_notes(shape: ModelShape, plan: ContextPlan, s: LlamaCppMemorySettings) -> list[str]:
    """Memory llama-server takes later, as it is used, that the estimate does not count."""
    notes = []
    if s.cache_ram_mib != 0 and not plan.embeddings and not _prompt_cache_counted(plan, s):
        limit = "without limit" if s.cache_ram_mib < 0 else f"up to {s.cache_ram_mib} MiB"
        notes.append(f"llama-server's prompt cache (--cache-ram) can take {limit} more as slots change prompts")
    # tools/server/server-context.cpp: SWA and recurrent state cannot be rolled back, so the server keeps
    # checkpoints of it (--ctx-checkpoints, 32 per slot at most, --checkpoint-min-step 8192 tokens apart).
    swa_cells = min(plan.swa_size, shape.n_swa + plan.n_ubatch)
    per_seq = sum(row_bytes(s.cache_type_k, shape.key_length[il] * shape.head_count_kv[il])
                  + row_bytes(s.cache_type_v, shape.value_length[il] * shape.head_count_kv[il])
                  for il in range(shape.n_layer_main) if shape.is_swa[il] and not s.swa_full) * swa_cells
    per_seq += sum(shape.recurrent_state_floats * 4 for il in range(shape.n_layer_main) if shape.is_recurrent[il])
    if per_seq and not plan.embeddings:
        notes.append(f"context checkpoints of the sliding-window/recurrent state take {per_seq / MiB:.1f} MiB each, "
                     "kept per slot as conversations grow")
    return notes


def _prompt_cache_counted(plan: ContextPlan, s: LlamaCppMemorySettings) -> bool:
    return s.count_prompt_cache and s.cache_ram_mib > 0 and not plan.embeddings


def _add_prompt_cache(ledger: _Ledger, plan: ContextPlan, s: LlamaCppMemorySettings) -> list[str]:
    """llama-server's prompt cache (--cache-ram) in host RAM, at its full budget, when asked to count it."""
    if not _prompt_cache_counted(plan, s):
        return []
    ledger.add(CPU, "overhead", s.cache_ram_mib * MiB)
    return [f"includes llama-server's prompt cache (--cache-ram) at its limit, {s.cache_ram_mib} MiB of RAM"]


def _add_weights(ledger: _Ledger, header: GGUFHeader, shape: ModelShape, place: Placement,
                 s: LlamaCppMemorySettings) -> None:
    repack_types = (s.cpu_repack_types if s.cpu_repack_types is not None else host_repack_types()) \
        if s.repack else frozenset()
    spans: dict[int, tuple[int, int]] = {}
    for t in header.tensors:
        device = tensor_device(t, place)
        if device != CPU:
            ledger.add(device, "weights", t.n_bytes)
            continue
        if _repacked(t, repack_types):
            # The repacked copy, in anonymous memory. Its source pages are resident only where they
            # lie inside the mapped range of the other CPU tensors: the loader unmaps the rest.
            ledger.add(CPU, "weights", t.n_bytes)
        elif s.use_mmap:
            spans[t.shard] = _widen(spans.get(t.shard), header.file_offset(t), t.n_bytes)
        else:
            ledger.add(CPU, "weights", t.n_bytes)
    ledger.add(CPU, "weights", sum(end - start for start, end in spans.values()))
    if place.output != CPU and not any(t.name == "output.weight" for t in header.tensors):
        # Tied embeddings: the output layer gets its own copy of token_embd (TENSOR_DUPLICATED).
        embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
        if embd is not None:
            ledger.add(place.output, "weights", embd.n_bytes)


def _widen(span: tuple[int, int] | None, start: int, size: int) -> tuple[int, int]:
    if span is None:
        return start, start + size
    return min(span[0], start), max(span[1], start + size)


def _cache_type_check(s: LlamaCppMemorySettings, plan: ContextPlan) -> list[str]:
    if not plan.flash_attn and s.cache_type_v not in ("f32", "f16", "bf16"):
        return [f"llama-server refuses a quantized V cache ({s.cache_type_v}) without flash attention"]
    return []


def _add_cache(ledger: _Ledger, shape: ModelShape, plan: ContextPlan, place: Placement,
               s: LlamaCppMemorySettings) -> list[str]:
    notes = _cache_type_check(s, plan)
    if shape.no_cache:
        return notes
    v_trans = not plan.flash_attn
    attn_layers = [il for il in range(shape.n_layer_main) if shape.has_kv[il] and not shape.is_recurrent[il]]
    v_max = max((shape.value_length[il] * shape.head_count_kv[il] for il in attn_layers), default=0)
    for il in attn_layers:
        cells = (plan.swa_size if shape.is_swa[il] else plan.kv_size) * plan.n_stream
        k = row_bytes(s.cache_type_k, shape.key_length[il] * shape.head_count_kv[il])
        v = 0
        if shape.has_v:
            v_width = v_max if v_trans else shape.value_length[il] * shape.head_count_kv[il]
            v = row_bytes(s.cache_type_v, v_width)
        device = place.layer(il) if s.kv_offload else CPU
        ledger.add(device, "kv_cache", (k + v) * cells)
    # Recurrent state: r and s in f32 for each of max(1, n_seq) sequences (llama_memory_recurrent).
    for il in range(shape.n_layer_main):
        if shape.is_recurrent[il]:
            device = place.layer(il) if s.kv_offload else CPU
            ledger.add(device, "kv_cache", shape.recurrent_state_floats * 4 * max(1, plan.n_seq))
    return notes


def compute_bytes(shape: ModelShape, plan: ContextPlan, *, n_tokens: int, n_outputs: int,
                  kv_cells: int | None = None) -> int:
    """Peak of the graph's activations for n_tokens tokens attending over the caches (or over
    kv_cells cells of each when given, for a graph that has not filled them): the structural fit
    described at the constants FFN_* / ATTN_*."""
    t = n_tokens
    e = shape.n_embd
    layers = range(shape.n_layer_main)
    ff = max((shape.n_ff[il] for il in layers), default=0)
    if shape.encoder:
        return _encoder_compute_bytes(shape, plan, t, ff)
    hq = max((shape.head_count[il] * shape.key_length[il] for il in layers), default=0)
    hkv = max((shape.head_count_kv[il] * shape.key_length[il] for il in layers), default=0)
    heads = max(shape.head_count, default=0)
    if shape.no_cache:
        caches = [t]  # attention over the batch itself
    else:
        caches = [plan.kv_size]
        if shape.swa_any:
            caches.append(plan.swa_size)
        if kv_cells is not None:
            caches = [min(c, kv_cells) for c in caches]
    mask_bytes = 2 if plan.flash_attn else 4
    masks = sum(c * t * mask_bytes for c in caches)
    ffn = t * 4 * (FFN_FF * ff + FFN_EMBD * e)
    attn = t * 4 * (ATTN_EMBD * e + ATTN_Q * hq + ATTN_KV * hkv)
    if not plan.flash_attn:
        attn += max(caches) * t * heads * 4  # KQ, softmax in place
    out = n_outputs * shape.n_vocab * 4 + t * e * 4
    return masks + max(ffn, attn, out)


def _encoder_compute_bytes(shape: ModelShape, plan: ContextPlan, t: int, ff: int) -> int:
    """An encoder's graph (src/models/bert.cpp): attention over the ubatch itself, no KV cache and no
    logits. Fitted on the "compute buffer size" llama-server logged for generated BERT models (n_embd
    128/256, n_ff 512/1024, 4/8 heads, ubatch 128/512, flash attention on and off; every one within
    0.05 MiB): the FFN phase holds (n_ff + 4 n_embd) f32 values per token for a GELU FFN (2 n_ff more
    for a gated one, as the llama fit has); with flash attention the mask adds t x t bytes; without it
    the attention phase holds KQ per head plus its f32 mask (t x t x 4 x (n_head + 1)) and 6 n_embd
    values per token."""
    e = shape.n_embd
    ffn = t * 4 * ((1 if shape.arch in UNGATED_FFN_ARCHS else FFN_FF) * ff + FFN_EMBD * e)
    if plan.flash_attn:
        return ffn + t * t
    heads = max(shape.head_count, default=0)
    return max(ffn, t * t * 4 * (heads + 1) + t * 4 * 6 * e)


def _add_compute(ledger: _Ledger, shape: ModelShape, plan: ContextPlan, place: Placement,
                 s: LlamaCppMemorySettings) -> list[str]:
    if shape.n_layer == 0:
        return []
    t = min(plan.n_ctx, plan.n_ubatch)  # llama_context::sched_reserve
    reserved = compute_bytes(shape, plan, n_tokens=t, n_outputs=min(t, plan.n_outputs))
    devices = set(place.layers) | {place.output}
    for device in devices - {CPU}:
        ledger.add(device, "compute", reserved)  # VRAM is committed when allocated
    if CPU not in devices:
        # Everything offloaded: the CPU still holds the graph inputs (embeddings, masks) in host memory.
        ledger.add(CPU, "compute", t * shape.n_embd * 4 + plan.kv_size * t * 4)
        return []
    # An embedding input of a whole batch is an ordinary request, and it touches the whole
    # reservation (logits for every token); chat requests touch a small graph's worth.
    if s.cpu_compute == "reserved" or plan.embeddings:
        ledger.add(CPU, "compute", reserved)
        return []
    warm = compute_bytes(shape, plan, n_tokens=min(t, WARM_TOKENS), n_outputs=1, kv_cells=CTX_PAD)
    ledger.add(CPU, "compute", warm)
    if reserved - warm > 16 * MiB:
        return [f"long prompts over a full context can add up to {(reserved - warm) / MiB:.0f} MiB of CPU compute "
                "buffers (reserved, committed as used)"]
    return []


def _add_output(ledger: _Ledger, shape: ModelShape, plan: ContextPlan) -> list[str]:
    """llama_context::output_reserve: logits (and embeddings) rows, cleared when allocated. It starts at
    n_seq rows and grows to the largest batch's outputs; in embedding mode every token is an output, so
    one input of n_batch tokens takes it to n_batch rows, and it never shrinks."""
    width = shape.n_vocab + (shape.n_embd_out if plan.embeddings else 0)
    ledger.add(CPU, "overhead", width * plan.n_outputs * 4)  # host memory, pinned when offloaded
    if plan.embeddings and shape.n_vocab:
        return [f"embedding mode: llama-server keeps logits for every token of a batch ({plan.n_batch} tokens: "
                f"{2 * shape.n_vocab * plan.n_batch * 4 / MiB:.0f} MiB of output and compute buffers)"]
    return []


def _add_overhead(ledger: _Ledger, header: GGUFHeader, shape: ModelShape, plan: ContextPlan, place: Placement,
                  *, primary: bool) -> None:
    vocab = shape.n_vocab * HEAP_PER_TOKEN + shape.n_merges * HEAP_PER_MERGE
    if shape.tokenizer == "gpt2":
        vocab += BPE_BASE_HEAP
    ledger.add(CPU, "overhead", vocab + len(header.tensors) * HEAP_PER_TENSOR)
    if shape.encoder:
        ledger.add(CPU, "overhead", ENCODER_HEAP)
    if not shape.no_cache:
        caches = plan.kv_size + (plan.swa_size if shape.swa_any else 0)
        ledger.add(CPU, "overhead", caches * plan.n_stream * KV_CELL_BYTES)
    if primary:
        ledger.add(CPU, "overhead", CPU_LIBRARIES + CPU_BASE_HEAP)
        if place.gpus:
            ledger.add(CPU, "overhead", CUDA_HOST_RAM)
    if primary:  # llama.cpp initialises every device it is given, layers or not
        for gpu in place.gpus:
            ledger.add(gpu, "overhead", CUDA_CONTEXT_VRAM)


def _add_projector(ledger: _Ledger, header: GGUFHeader, s: LlamaCppMemorySettings) -> list[str]:
    """libmtmd's CLIP model: weights read into a backend buffer (GPU when offloaded) plus the vision
    encoder's compute buffer for the largest image (approximate: patches x width, and attention)."""
    device = f"cuda:{s.gpus[0].index}" if s.gpus else CPU
    ledger.add(device, "weights", header.tensor_bytes)
    size = _int(header.get("clip.vision.image_size"))
    patch = _int(header.get("clip.vision.patch_size"))
    width = _int(header.get("clip.vision.embedding_length"))
    ff = _int(header.get("clip.vision.feed_forward_length"))
    heads = _int(header.get("clip.vision.attention.head_count"), 1) or 1
    if size and patch and width:
        n = (size // patch) ** 2
        ledger.add(device, "compute", n * 4 * (3 * ff + 4 * width) + n * n * heads * 4)
    return ["multimodal projector included (weights exact, vision compute buffer approximate)"]
