"""Whatever flags a caller gets past validation, vLLM's parser (last occurrence wins) ends up with the
daemon's model, socket, served name, context length and mode."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import BackendConfiguration, Mode, ModelFormat, ModelRef
from backends.flags import FlagError
from backends.vllm.argv import VllmLaunch, build_argv
from backends.vllm.flags import VLLM_FLAGS

MODEL = ModelRef(name="tiny:latest", path=Path("/models/tiny"), format=ModelFormat.SAFETENSORS)
SOCK = Path("/run/runnerd/runners/tiny.sock")
OWNED = {"--model": str(MODEL.path), "--uds": str(SOCK), "--served-model-name": MODEL.name,
         "--max-model-len": "512"}
SPELLINGS = sorted(VLLM_FLAGS.allowed_spellings | VLLM_FLAGS.daemon_owned)
VALUES = ["-1", "0.5", "-0.5", "2", "auto", "float32", "fp8", '{"a": 1}', "hermes", "pooling", "/etc/passwd"]
ELEMENT = st.one_of(st.sampled_from(SPELLINGS), st.sampled_from(VALUES),
                    st.builds(lambda f, v: f"{f}={v}", st.sampled_from(SPELLINGS), st.sampled_from(VALUES)),
                    st.text(max_size=12))


def last_values(argv: list[str]) -> dict[str, str]:
    """What vLLM's parser keeps: the last `--flag=value` for each flag (every element is joined form)."""
    seen: dict[str, str] = {}
    for element in argv[3:]:
        name, _, value = element.partition("=")
        seen[name] = value
    return seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.lists(ELEMENT, max_size=10), mode=st.sampled_from(list(Mode)), gpu=st.booleans())
def test_accepted_flags_never_override_the_daemons_own(flags: list[str], mode: Mode, gpu: bool) -> None:
    try:
        accepted = VLLM_FLAGS.validate(flags)
    except FlagError:
        return
    assert not {a.partition("=")[0] for a in accepted} & VLLM_FLAGS.daemon_owned
    assert all(a.startswith("--") for a in accepted)  # joined, long form: nothing for the parser to re-read
    argv = build_argv(Path("/py"), SOCK, MODEL, mode, BackendConfiguration(runtime_flags=accepted),
                      VllmLaunch(use_gpu=gpu), max_model_len=512, kv_cache_bytes=None, hf_overrides=None)
    kept = last_values(argv)
    for flag, value in OWNED.items():
        assert kept[flag] == value, (flag, argv)
    if mode is not Mode.COMPLETION:
        assert kept["--runner"] == "pooling"
    if gpu:
        assert "--gpu-memory-utilization" in kept
