from __future__ import annotations

from pathlib import Path

from backends.base import BackendConfiguration, Mode, ModelRef
from backends.llamacpp.argv import LaunchOptions, build_argv, build_env
from backends.llamacpp.options import LlamaCppOptions

MODEL = ModelRef(name="m:latest", path=Path("/models/m.gguf"))
SOCK = Path("/run/r.sock")


def value_after(argv, flag):
    """llama-server applies arguments in order: the last occurrence is the one that counts."""
    idx = max(i for i, a in enumerate(argv) if a == flag)
    return argv[idx + 1]


def test_daemon_flags_come_after_caller_flags():
    config = BackendConfiguration(context_size=2048, runtime_flags=["--temp", "0.5", "--threads", "2"],
                                  llamacpp=LlamaCppOptions(reasoning_budget=-1))
    argv = build_argv(Path("/bin/llama-server"), SOCK, MODEL, Mode.COMPLETION, config, LaunchOptions(threads=1))
    assert value_after(argv, "--model") == "/models/m.gguf"
    assert value_after(argv, "--host") == "/run/r.sock"
    assert value_after(argv, "--ctx-size") == "2048"
    assert value_after(argv, "--reasoning-budget") == "-1"
    # The caller's threads beat the operator's default.
    assert value_after(argv, "--threads") == "2"
    assert argv.index("--temp") < argv.index("--model")
    assert "--embeddings" not in argv
    # No GPU: nothing is offloaded, even by a CUDA build; the prompt cache is off unless configured.
    assert value_after(argv, "--n-gpu-layers") == "0" and value_after(argv, "--cache-ram") == "0"


def test_mode_flags():
    base = BackendConfiguration()
    emb = build_argv(Path("s"), SOCK, MODEL, Mode.EMBEDDING, base, LaunchOptions())
    assert emb[-3:] == ["--embeddings", "--pooling", "mean"]
    emb_file = build_argv(Path("s"), SOCK, MODEL, Mode.EMBEDDING, base, LaunchOptions(), pooling_in_file=True)
    assert emb_file[-1] == "--embeddings" and "--pooling" not in emb_file
    rerank = build_argv(Path("s"), SOCK, MODEL, Mode.RERANKING, base, LaunchOptions())
    assert rerank[-2:] == ["--embeddings", "--reranking"]
    assert value_after(rerank, "--ctx-size") == "4096"


def test_gpu_layers_only_with_a_gpu():
    argv = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, BackendConfiguration(),
                      LaunchOptions(use_gpu=True))
    assert value_after(argv, "--n-gpu-layers") == "all"
    argv = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, BackendConfiguration(),
                      LaunchOptions(use_gpu=True, gpu_layers=10))
    assert value_after(argv, "--n-gpu-layers") == "10"


def test_environment_is_built_not_inherited():
    env = build_env(Path("/opt/llama/bin/llama-server"),
                    {"PATH": "/usr/bin", "HOME": "/root", "LLAMA_ARG_MODEL": "/etc/shadow", "SECRET": "x"})
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "LD_LIBRARY_PATH": "/opt/llama/bin",
                   "XDG_CONFIG_HOME": "/opt/llama/bin/no-user-config"}


# --- whatever the caller's flags, the daemon's own argv elements win ----------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from backends.flags import FlagError  # noqa: E402
from backends.llamacpp.flags import LLAMACPP_FLAGS  # noqa: E402

OWNED_VALUES = {"--model": str(MODEL.path), "--host": str(SOCK), "--alias": MODEL.name, "--ctx-size": "4096"}
SPELLINGS = sorted(LLAMACPP_FLAGS.allowed_spellings | LLAMACPP_FLAGS.daemon_owned)
ELEMENT = st.one_of(st.sampled_from(SPELLINGS), st.sampled_from(["-1", "0.5", "2", "on", "q8_0", "mean"]),
                    st.text(max_size=12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.lists(ELEMENT, max_size=10), mode=st.sampled_from(list(Mode)))
def test_accepted_flags_never_override_the_daemons_own(flags, mode):
    try:
        accepted = LLAMACPP_FLAGS.validate(flags)
    except FlagError:
        return
    argv = build_argv(Path("/bin/llama-server"), SOCK, MODEL, mode, BackendConfiguration(runtime_flags=accepted),
                      LaunchOptions())
    for flag, value in OWNED_VALUES.items():
        assert value_after(argv, flag) == value
    # Mode flags come last, where nothing can follow them.
    tail = {Mode.COMPLETION: ["--no-webui"], Mode.EMBEDDING: ["--embeddings", "--pooling", "mean"],
            Mode.RERANKING: ["--embeddings", "--reranking"]}[mode]
    assert argv[-len(tail):] == tail
    assert not set(accepted) & LLAMACPP_FLAGS.daemon_owned


def test_fallback_chat_template_yields_to_the_callers():
    plain = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, BackendConfiguration(), LaunchOptions(),
                       chat_template="T")
    assert value_after(plain, "--chat-template") == "T"
    chosen = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION,
                        BackendConfiguration(runtime_flags=["--chat-template", "chatml"]), LaunchOptions(),
                        chat_template="T")
    assert value_after(chosen, "--chat-template") == "chatml"


def test_a_projector_is_loaded_beside_the_model():
    model = ModelRef(name="v:latest", path=Path("/m/v.gguf"), mmproj=Path("/m/mmproj.gguf"))
    argv = build_argv(Path("s"), SOCK, model, Mode.COMPLETION, BackendConfiguration(), LaunchOptions())
    assert value_after(argv, "--mmproj") == "/m/mmproj.gguf"


DRAFT = ModelRef(name="small:latest", path=Path("/models/small.gguf"))


def speculative(num_tokens: int = 8, draft: ModelRef | None = DRAFT, flags: list[str] | None = None) -> \
        BackendConfiguration:
    return BackendConfiguration(runtime_flags=flags or [],
                                speculative={"draft_model": "small", "num_tokens": num_tokens, "draft": draft})


def test_resolved_draft_reaches_the_daemon_owned_flags():
    argv = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, speculative(), LaunchOptions())
    # llama.cpp 0.3.36 names (common/arg.cpp): --model-draft is an alias, --draft-max was removed.
    assert value_after(argv, "--spec-draft-model") == "/models/small.gguf"
    assert value_after(argv, "--spec-draft-n-max") == "8"
    # Without a type llama-server loads the draft and never drafts with it.
    assert value_after(argv, "--spec-type") == "draft-simple"
    # CPU host: the draft stays off the GPU like the main model; daemon flags after the operator's.
    assert value_after(argv, "--spec-draft-ngl") == "0"
    assert argv.index("--spec-draft-ngl") < argv.index("--model") < argv.index("--spec-draft-model")
    assert "--draft-max" not in argv and "--model-draft" not in argv


def test_draft_gpu_layers_follow_the_main_model_and_callers_may_tune_them():
    gpu = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, speculative(), LaunchOptions(use_gpu=True))
    assert value_after(gpu, "--spec-draft-ngl") == "all" == value_after(gpu, "--n-gpu-layers")
    some = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, speculative(flags=["--spec-draft-ngl", "3"]),
                      LaunchOptions(use_gpu=True, gpu_layers=10))
    assert value_after(some, "--spec-draft-ngl") == "3" and value_after(some, "--n-gpu-layers") == "10"


def test_a_callers_spec_type_is_not_doubled():
    argv = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, speculative(flags=["--spec-type", "ngram-mod"]),
                      LaunchOptions())
    assert argv.count("--spec-type") == 1 and value_after(argv, "--spec-type") == "ngram-mod"


def test_no_draft_flags_without_a_resolved_draft():
    for config in (BackendConfiguration(), speculative(draft=None)):
        argv = build_argv(Path("s"), SOCK, MODEL, Mode.COMPLETION, config, LaunchOptions())
        assert not any(a.startswith("--spec-") for a in argv)
