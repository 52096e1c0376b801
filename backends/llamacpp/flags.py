"""llama-server runtime flags: what callers may tune, and what they may not and why.

Spellings, aliases and accepted values follow ``common/arg.cpp`` of the pinned llama.cpp
(llama-cpp-python 0.3.36's vendor tree). Worth knowing about that parser:

- it does not understand ``--flag=value``: the validated list uses ``--flag value``;
- it reads ``--a_b`` as ``--a-b`` (the validator normalises the same way);
- a value is simply the next argv element, so a missing value would swallow the daemon's next flag:
  every value-taking flag here is validated to have its value;
- when an option repeats, the last one wins: the daemon appends its own flags after these;
- ``LLAMA_ARG_*`` variables and ``/etc/llama.cpp/config.ini`` / ``$XDG_CONFIG_HOME/llama.cpp/config.ini``
  also set options: the runner's environment has to be built explicitly.

The table below is the pinned build's. What a caller may pass to a given build is `version_flags` of
that build's `--help` (backends/llamacpp/help.py): the typed entries here that the build lists, under
the spellings it lists; the refusals here; and every other option it lists, typed from its help line
(see `_inferred`). Not in the build's help means refused as "not on the allowlist".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from backends.flags import (
    FlagSpec,
    FlagTable,
    Refusal,
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
from backends.llamacpp.help import HelpOption

# `--flash-attn`, `--reasoning`: arg.cpp's is_truthy / is_falsey / is_autoy words.
_ON_OFF_AUTO = ("on", "off", "auto", "enabled", "disabled", "true", "false", "1", "0", "-1")
# kv_cache_types in arg.cpp.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# common_sampler_types_from_names: canonical names, kebab-case and no-dash aliases, misc aliases.
_SAMPLER_NAMES = (
    "dry", "top_k", "top_p", "top_n_sigma", "typ_p", "min_p", "temperature", "xtc", "infill",
    "penalties", "adaptive_p",
    "top-k", "top-p", "top-n-sigma", "typ-p", "min-p", "adaptive-p",
    "topk", "topp", "topnsigma", "typp", "minp", "adaptivep",
    "nucleus", "temp", "typ",
)
# LLM_CHAT_TEMPLATES in src/llama-chat.cpp. Only built-in names: a template body would be code
# for the engine's Jinja interpreter, and a file name would be a file.
CHAT_TEMPLATES = (
    "chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1",
    "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4", "falcon3",
    "zephyr", "monarch", "gemma", "orion", "openchat", "vicuna", "vicuna-orca", "deepseek",
    "deepseek2", "deepseek3", "deepseek-ocr", "command-r", "llama3", "chatglm3", "chatglm4",
    "glmedge", "minicpm", "exaone3", "exaone4", "exaone-moe", "rwkv-world", "granite",
    "granite-4.0", "granite-4.1", "gigachat", "megrez", "yandex", "bailing", "bailing-think",
    "bailing2", "llama4", "smolvlm", "hunyuan-moe", "gpt-oss", "hunyuan-dense", "hunyuan-vl",
    "kimi-k2", "seed_oss", "grok-2", "pangu-embedded", "solar-open",
)
# common/speculative.cpp type names.
_SPEC_TYPES = (
    "none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark",
    "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache",
)
# Device names such as CUDA0, Vulkan1, CPU; `none` disables offload. RPC devices (RPC[host:port])
# do not match, on purpose.
_DEVICE_LIST = r"none|[A-Za-z][A-Za-z0-9_]{0,31}(?:,[A-Za-z][A-Za-z0-9_]{0,31}){0,15}"
_CPU_MASK = r"(?:0x)?[0-9A-Fa-f]{1,128}"
_CPU_RANGE = r"\d{1,3}-\d{1,3}"
_INT32_MAX = 2**31 - 1
# Counts the engine turns into allocations or loops (per layer, per token of a window, per slot)
# are capped well above real models, so a caller cannot make it allocate the host away:
# `--n-cpu-moe 2147483647` builds one regex string per "layer" while parsing arguments.
_MAX_LAYERS = 1024
_MAX_WINDOW = 1 << 20  # tokens
_MAX_BATCH = 1 << 16  # tokens

_TUNABLE = (
    # CPU placement and threads.
    integer("--threads", "-t", minimum=-1, maximum=1024),
    integer("--threads-batch", "-tb", minimum=-1, maximum=1024),
    integer("--threads-http", minimum=-1, maximum=1024),
    text("--cpu-mask", "-C", pattern=_CPU_MASK),
    text("--cpu-range", "-Cr", pattern=_CPU_RANGE),
    choice("--cpu-strict", choices=("0", "1")),
    # 3 (realtime) is left out: a realtime engine can starve the rest of the host.
    integer("--prio", minimum=-1, maximum=2),
    integer("--poll", minimum=0, maximum=100),
    text("--cpu-mask-batch", "-Cb", pattern=_CPU_MASK),
    text("--cpu-range-batch", "-Crb", pattern=_CPU_RANGE),
    choice("--cpu-strict-batch", choices=("0", "1")),
    integer("--prio-batch", minimum=0, maximum=2),
    choice("--poll-batch", choices=("0", "1")),
    choice("--numa", choices=("distribute", "isolate", "numactl")),
    # Batching, slots and caches.
    integer("--predict", "-n", "--n-predict", minimum=-2),
    integer("--batch-size", "-b", minimum=1, maximum=_MAX_BATCH),
    integer("--ubatch-size", "-ub", minimum=1, maximum=_MAX_BATCH),
    integer("--keep", minimum=-1),
    integer("--parallel", "-np", minimum=1, maximum=1024, words=("-1",)),
    switch("--cont-batching", "-cb", negation="--no-cont-batching", negation_aliases=("-nocb",)),
    switch("--kv-unified", "-kvu", negation="--no-kv-unified", negation_aliases=("-no-kvu",)),
    switch("--swa-full"),
    integer("--ctx-checkpoints", "-ctxcp", "--swa-checkpoints", minimum=0, maximum=256),
    integer("--checkpoint-min-step", "-cms", minimum=0),
    # -1 (no limit) is left out: an unbounded prompt cache can take all of the host's RAM.
    integer("--cache-ram", "-cram", minimum=0, maximum=1 << 20),
    switch("--cache-idle-slots", negation="--no-cache-idle-slots"),
    switch("--cache-prompt", negation="--no-cache-prompt"),
    integer("--cache-reuse", minimum=0),
    switch("--context-shift", negation="--no-context-shift"),
    number("--slot-prompt-similarity", "-sps", minimum=0.0, maximum=1.0),
    choice("--cache-type-k", "-ctk", choices=KV_CACHE_TYPES),
    choice("--cache-type-v", "-ctv", choices=KV_CACHE_TYPES),
    choice("--flash-attn", "-fa", choices=_ON_OFF_AUTO),
    # Memory placement and devices.
    choice("--load-mode", "-lm", choices=("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")),
    # Builds before --load-mode spelled it as two switches; a build accepts them only if its --help lists them.
    switch("--mmap", negation="--no-mmap"),
    switch("--mlock"),
    choice("--lazy-mode", "-lzm", choices=("on", "auto", "off")),
    integer("--gpu-layers", "-ngl", "--n-gpu-layers", minimum=0, maximum=_MAX_LAYERS * 1000,
            words=("auto", "all")),
    choice("--split-mode", "-sm", choices=("none", "layer", "row", "tensor")),
    # Fewer proportions than llama.cpp's device limit (16), which it checks with `>=`.
    number("--tensor-split", "-ts", minimum=0.0, separator=",", max_items=15),
    integer("--main-gpu", "-mg", minimum=0, maximum=255),
    text("--device", "-dev", pattern=_DEVICE_LIST),
    switch("--kv-offload", "-kvo", negation="--no-kv-offload", negation_aliases=("-nkvo",)),
    switch("--repack", negation="--no-repack", negation_aliases=("-nr",)),
    switch("--no-host"),
    switch("--op-offload", negation="--no-op-offload"),
    switch("--cpu-moe", "-cmoe"),
    integer("--n-cpu-moe", "-ncmoe", minimum=0, maximum=_MAX_LAYERS),
    integer("--n-cpu-ffn", "-ncffn", minimum=0, maximum=_MAX_LAYERS),
    switch("--check-tensors"),
    switch("--warmup", negation="--no-warmup"),
    switch("--perf", negation="--no-perf"),
    # RoPE / YaRN.
    choice("--rope-scaling", choices=("none", "linear", "yarn")),
    number("--rope-scale"),
    number("--rope-freq-base"),
    number("--rope-freq-scale"),
    integer("--yarn-orig-ctx", minimum=0),
    number("--yarn-ext-factor"),
    number("--yarn-attn-factor"),
    number("--yarn-beta-slow"),
    number("--yarn-beta-fast"),
    # Sampling defaults (requests can still override them).
    text("--samplers", pattern=rf"(?:{'|'.join(_SAMPLER_NAMES)})(?:;(?:{'|'.join(_SAMPLER_NAMES)})){{0,15}}"),
    text("--sampler-seq", "--sampling-seq", pattern=r"[dkypsmtxiea]{1,16}"),
    integer("--seed", "-s", minimum=-1, maximum=2**32 - 1),
    number("--temp", "--temperature"),
    integer("--top-k", minimum=0),
    number("--top-p"),
    number("--min-p"),
    number("--top-nsigma", "--top-n-sigma"),
    number("--xtc-probability"),
    number("--xtc-threshold"),
    number("--typical", "--typical-p"),
    integer("--repeat-last-n", minimum=0, maximum=_MAX_WINDOW),
    number("--repeat-penalty", minimum=1e-6),  # the engine refuses <= 0
    number("--presence-penalty"),
    number("--frequency-penalty"),
    number("--dry-multiplier"),
    number("--dry-base"),
    integer("--dry-allowed-length", minimum=0, maximum=_MAX_WINDOW),
    integer("--dry-penalty-last-n", minimum=0, maximum=_MAX_WINDOW),
    text("--dry-sequence-breaker", repeatable=True),
    number("--adaptive-target"),
    number("--adaptive-decay"),
    number("--dynatemp-range"),
    number("--dynatemp-exp"),
    choice("--mirostat", choices=("0", "1", "2")),
    number("--mirostat-lr"),
    number("--mirostat-ent"),
    # TOKEN_ID(+|-)BIAS, e.g. 15043+1 or 2-inf.
    text("--logit-bias", "-l", pattern=r"\d{1,9}[+-](?:\d{1,6}(?:\.\d{1,6})?|inf)", repeatable=True),
    switch("--ignore-eos"),
    switch("--backend-sampling", "-bs"),
    text("--reverse-prompt", "-r", repeatable=True),
    switch("--special", "-sp"),
    switch("--escape", "-e", negation="--no-escape"),
    switch("--spm-infill"),
    # Chat templates and reasoning.
    switch("--jinja", negation="--no-jinja"),
    choice("--chat-template", choices=CHAT_TEMPLATES),
    json_object("--chat-template-kwargs"),
    switch("--skip-chat-parsing", negation="--no-skip-chat-parsing"),
    switch("--prefill-assistant", negation="--no-prefill-assistant"),
    choice("--reasoning-format", choices=("none", "auto", "deepseek", "deepseek-legacy")),
    choice("--reasoning", "-rea", choices=_ON_OFF_AUTO),
    choice("--reasoning-effort",
           choices=("default", "minimal", "low", "medium", "high", "xhigh", "max")),
    integer("--reasoning-budget", minimum=-1),
    text("--reasoning-budget-message"),
    switch("--reasoning-preserve", negation="--no-reasoning-preserve"),
    # Embeddings (the mode flags themselves are runnerd's).
    integer("--embd-normalize", minimum=-1, maximum=64),
    # Multimodal projector tuning (the projector file is runnerd's).
    switch("--mmproj-offload", negation="--no-mmproj-offload"),
    integer("--image-min-tokens", minimum=-1, maximum=_MAX_BATCH),
    integer("--image-max-tokens", minimum=-1, maximum=_MAX_BATCH),
    integer("--mtmd-batch-max-tokens", minimum=1, maximum=_MAX_BATCH),
    # Speculative decoding (the draft model and its token count are runnerd's `speculative`).
    choice("--spec-type", choices=_SPEC_TYPES, separator=",", repeatable=True),
    integer("--spec-draft-n-min", minimum=0, maximum=1024),
    number("--spec-draft-p-split", "--draft-p-split", minimum=0.0, maximum=1.0),
    number("--spec-draft-p-min", "--draft-p-min", minimum=0.0, maximum=1.0),
    switch("--spec-draft-backend-sampling", negation="--no-spec-draft-backend-sampling"),
    integer("--spec-draft-threads", "-td", "--threads-draft", minimum=-1, maximum=1024),
    text("--spec-draft-cpu-mask", "-Cd", "--cpu-mask-draft", pattern=_CPU_MASK),
    text("--spec-draft-cpu-range", "-Crd", "--cpu-range-draft", pattern=_CPU_RANGE),
    choice("--spec-draft-cpu-strict", "--cpu-strict-draft", choices=("0", "1")),
    integer("--spec-draft-prio", "--prio-draft", minimum=0, maximum=2),
    choice("--spec-draft-poll", "--poll-draft", choices=("0", "1")),
    text("--spec-draft-cpu-mask-batch", "-Cbd", "--cpu-mask-batch-draft", pattern=_CPU_MASK),
    choice("--spec-draft-cpu-strict-batch", "--cpu-strict-batch-draft", choices=("0", "1")),
    integer("--spec-draft-prio-batch", "--prio-batch-draft", minimum=0, maximum=2),
    choice("--spec-draft-poll-batch", "--poll-batch-draft", choices=("0", "1")),
    integer("--spec-draft-threads-batch", "-tbd", "--threads-batch-draft", minimum=-1, maximum=1024),
    choice("--spec-draft-type-k", "-ctkd", "--cache-type-k-draft", choices=KV_CACHE_TYPES),
    choice("--spec-draft-type-v", "-ctvd", "--cache-type-v-draft", choices=KV_CACHE_TYPES),
    switch("--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft"),
    integer("--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft", minimum=0,
            maximum=_MAX_LAYERS),
    text("--spec-draft-device", "-devd", "--device-draft", pattern=_DEVICE_LIST),
    integer("--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft",
            minimum=0, maximum=_MAX_LAYERS * 1000, words=("auto", "all")),
    integer("--spec-ngram-mod-n-min", minimum=0, maximum=1024),
    integer("--spec-ngram-mod-n-max", minimum=0, maximum=1024),
    integer("--spec-ngram-mod-n-match", minimum=1, maximum=1024),
    integer("--spec-ngram-simple-size-n", minimum=1, maximum=1024),
    integer("--spec-ngram-simple-size-m", minimum=1, maximum=1024),
    integer("--spec-ngram-simple-min-hits", minimum=1, maximum=_INT32_MAX),
    integer("--spec-ngram-map-k-size-n", minimum=1, maximum=1024),
    integer("--spec-ngram-map-k-size-m", minimum=1, maximum=1024),
    integer("--spec-ngram-map-k-min-hits", minimum=1, maximum=_INT32_MAX),
    integer("--spec-ngram-map-k4v-size-n", minimum=1, maximum=1024),
    integer("--spec-ngram-map-k4v-size-m", minimum=1, maximum=1024),
    integer("--spec-ngram-map-k4v-min-hits", minimum=1, maximum=_INT32_MAX),
)

_LOG = "runnerd reads the engine's log and decides its format"

# Flags runnerd passes itself (backends/llamacpp/argv.py) or keeps off on purpose.
_DAEMON_OWNED = (
    owned("--model", "-m", why="the model is chosen by the runner"),
    owned("--host", "--port", "--reuse-port",
          why="the engine listens only on the runner's private socket"),
    owned("--api-key", "--api-prefix", "--alias", "-a", "--tags",
          why="runnerd decides how clients reach and name the model"),
    owned("--ctx-size", "-c", "--kv-unified-per-slot", use="context_size"),
    owned("--embedding", "--embeddings", "--rerank", "--reranking", "--pooling",
          why="the mode (completion, embedding, reranking) is chosen by the runner"),
    owned("--spec-draft-model", "-md", "--model-draft", use="speculative.draft_model"),
    owned("--spec-draft-n-max", "--draft", "--draft-n", "--draft-max", "--draft-min", "--draft-n-min",
          use="speculative.num_tokens"),
    owned("--sleep-idle-seconds", use="keep_alive"),
    owned("--fit", "-fit", "--fit-target", "-fitt", "--fit-ctx", "-fitc",
          why="runnerd sizes context and offload itself and keeps the engine's fitting off"),
    owned("--metrics", "--props", "--slots", "--no-slots",
          why="runnerd decides which engine endpoints exist"),
    owned("--ui", "--webui", "--no-ui", "--no-webui", "--ui-config", "--webui-config",
          why="the engine's web UI stays off behind runnerd"),
    owned("--cors-origins", "--cors-methods", "--cors-headers", "--cors-credentials",
          "--no-cors-credentials", "--timeout", "-to", "--sse-ping-interval",
          why="runnerd owns the HTTP side of the engine"),
    owned("--mmproj-auto", "--no-mmproj", "--no-mmproj-auto", "--mmproj-device", "-mmdev",
          why="the multimodal projector is chosen by the runner"),
    owned("--models-max", "--models-autoload", "--no-models-autoload",
          why="one engine serves one model; runnerd does the routing"),
    owned("--offline", why="runnerd decides network access"),
    owned("--log-disable", "--log-colors", "--log-prefix", "--no-log-prefix", "--log-timestamps",
          "--no-log-timestamps", "--log-jsonl", "--no-log-jsonl", "-v", "--verbose", "--log-verbose",
          "-lv", "--verbosity", "--log-verbosity", why=_LOG),
)

_DANGEROUS = (
    refused(RefusalKind.FILES,
            "--mmproj", "-mm", "--lora", "--lora-scaled", "--control-vector", "--control-vector-scaled",
            "--lookup-cache-static", "-lcs", "--lookup-cache-dynamic", "-lcd", "--grammar-file",
            "--json-schema-file", "-jf", "--chat-template-file", "--path", "--media-path",
            "--slot-save-path", "--api-key-file", "--ssl-key-file", "--ssl-cert-file", "--log-file",
            "--log-prompts-dir", "--ui-config-file", "--webui-config-file", "--models-dir",
            "--models-preset"),
    refused(RefusalKind.NETWORK,
            "--model-url", "-mu", "--mmproj-url", "-mmu", "--docker-repo", "-dr", "--hf-repo", "-hf",
            "-hfr", "--hf-file", "-hff", "--hf-token", "-hft", "--spec-draft-hf", "-hfd", "-hfrd",
            "--hf-repo-draft", "--rpc",
            why="models and devices come only from the local store"),
    # These presets download their models from Hugging Face.
    refused(RefusalKind.NETWORK,
            "--embd-gemma-default", "--fim-qwen-1.5b-default", "--fim-qwen-3b-default",
            "--fim-qwen-7b-default", "--fim-qwen-7b-spec", "--fim-qwen-14b-spec",
            "--fim-qwen-30b-default", "--gpt-oss-20b-default", "--gpt-oss-120b-default",
            "--vision-gemma-4b-default", "--vision-gemma-12b-default", "--spec-default",
            why="the preset downloads a model"),
    refused(RefusalKind.CODE,
            "--tools", "--tools-runtime", "--agent", "-ag", "--no-agent", "-no-ag",
            "--mcp-servers-config", "--mcp-servers-json", "--ui-mcp-proxy", "--webui-mcp-proxy",
            "--no-ui-mcp-proxy", "--no-webui-mcp-proxy", "--video-ffmpeg-dir"),
    refused(RefusalKind.PROCESS,
            "--help", "-h", "--usage", "--version", "--cache-list", "-cl", "--completion-bash",
            "--list-devices"),
    refused(RefusalKind.UNSUPPORTED,
            "--override-tensor", "-ot", "--spec-draft-override-tensor", "-otd", "--override-tensor-draft",
            "--override-kv",
            why="it moves weights or rewrites the model's metadata in ways the memory estimate cannot count"),
    refused(RefusalKind.UNSUPPORTED, "--control-vector-layer-range", why="control vectors are files"),
)

LLAMACPP_FLAGS = FlagTable(
    backend="llama.cpp",
    value_style="separate",
    flags=_TUNABLE,
    refusals=(*_DAEMON_OWNED, *_DANGEROUS),
)

LLAMACPP_DAEMON_FLAGS: frozenset[str] = LLAMACPP_FLAGS.daemon_owned
"""Every spelling of the llama-server flags runnerd sets itself; callers get a 400 naming the setting."""


# --- the allowlist of one build, from its own option list --------------------------------------------

_FILE_VALUE = re.compile(r"FNAME|FILE|PATH|DIR|FOLDER", re.I)
_FILE_TEXT = re.compile(r"\b(?:file|files|directory|path)\b", re.I)
_NETWORK_VALUE = re.compile(r"URL|HOST|ADDR|PORT|SERVER|REPO|ENDPOINT", re.I)
# Older builds spell a Hugging Face repository `<user>/<model>[:quant]` (`--hf-repo-v`): the description, or a
# value shaped like a path, says it fetches.
_NETWORK_TEXT = re.compile(r"hugging ?face|\bdownload|\bremote\b", re.I)
_REMOVED_TEXT = re.compile(r"has been removed|no longer supported", re.I)
_NUMERIC_VALUE = re.compile(r"N|<-?\d+\.\.\.\d+>")
# A fraction: its default has a decimal point, or it is named as one.
_FRACTION_TEXT = re.compile(r"default:\s*-?\d+\.\d|\b(?:threshold|thold|factor|probabilit\w*|ratio|rate|scale)\b",
                            re.I)


def _inferred(option: HelpOption) -> FlagSpec | Refusal:
    """A spec or a refusal for an option the typed table does not know, from its help line alone.
    Anything that may name a file, a directory or a network place is refused; so is what takes two
    values, or what the build says was removed. The rest is typed: no value is a switch, a listed set
    of values a choice, `N` a number (a float when its default has a decimal point or its text calls it a
    threshold, factor, ratio, rate, scale or probability; else a 32-bit int),
    anything else text under runnerd's character rules (no paths, URLs, hosts)."""
    names = option.all_spellings
    value = option.value
    if _REMOVED_TEXT.search(option.description):
        return refused(RefusalKind.UNSUPPORTED, *names, why="this llama-server build says it was removed")
    if (value and _FILE_VALUE.search(value)) or _FILE_TEXT.search(option.description):
        return refused(RefusalKind.FILES, *names)
    if (value and (_NETWORK_VALUE.search(value) or "/" in value)) or _NETWORK_TEXT.search(option.description):
        return refused(RefusalKind.NETWORK, *names)
    # The canonical spelling is the first long one (`--defrag-thold`, not `-dt`).
    longs = [s for s in option.spellings if s.startswith("--")]
    name = longs[0] if longs else option.spellings[0]
    aliases = [s for s in option.spellings if s != name]
    if value is None:
        negation, *negation_aliases = option.negations or (None,)
        return switch(name, *aliases, negation=negation, negation_aliases=tuple(n for n in negation_aliases if n))
    if " " in value:
        return refused(RefusalKind.UNSUPPORTED, *names, why="it takes more than one value")
    if option.choices:
        return choice(name, *aliases, choices=option.choices)
    if _NUMERIC_VALUE.fullmatch(value):
        if _FRACTION_TEXT.search(option.description):
            return number(name, *aliases)
        return integer(name, *aliases)
    return text(name, *aliases)


def _restricted(spec: FlagSpec, listed: frozenset[str]) -> FlagSpec | None:
    """`spec` with only the spellings this build lists (its canonical name kept when listed); None when
    the build lists none of its positive spellings."""
    positive = [s for s in spec.positive_spellings if s in listed]
    if not positive:
        return None
    negative = [s for s in spec.negative_spellings if s in listed]
    name = spec.name if spec.name in listed else positive[0]
    return spec.model_copy(update={
        "name": name, "aliases": tuple(s for s in positive if s != name),
        "negation": negative[0] if negative else None, "negation_aliases": tuple(negative[1:])})


def version_flags(options: Sequence[HelpOption]) -> FlagTable:
    """The allowlist of the llama-server build whose `--help` listed `options` (see the module's doc)."""
    listed = frozenset(s for option in options for s in option.all_spellings)
    specs: list[FlagSpec] = []
    refusals: list[Refusal] = list(LLAMACPP_FLAGS.refusals)
    known = set(LLAMACPP_FLAGS.allowed_spellings) | {n for r in LLAMACPP_FLAGS.refusals for n in r.names}
    for spec in LLAMACPP_FLAGS.flags:
        kept = _restricted(spec, listed)
        if kept is not None:
            specs.append(kept)
    for option in options:
        fresh = [s for s in option.all_spellings if s not in known]
        if len(fresh) != len(option.all_spellings):
            continue  # typed or refused above (a spelling it shares with a typed entry decides)
        entry = _inferred(option)
        if isinstance(entry, FlagSpec):
            specs.append(entry)
        else:
            refusals.append(entry)
        known.update(fresh)
    return FlagTable(backend="llama.cpp", value_style="separate", flags=tuple(specs), refusals=tuple(refusals))
