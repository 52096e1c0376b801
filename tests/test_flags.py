"""Runtime-flag validation: accepted spellings, the canonical form, and every class of refusal.

The fuzzing lives in test_flags_fuzz.py; inputs that once broke something are kept here, in
REGRESSIONS, with what went wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backends.flags import (
    MAX_ELEMENT_BYTES,
    MAX_FLAGS,
    FlagError,
    FlagSpec,
    FlagTable,
    ValueKind,
    integer,
    split_raw_flags,
)
from backends.llamacpp.flags import LLAMACPP_DAEMON_FLAGS, LLAMACPP_FLAGS
from backends.vllm.flags import VLLM_DAEMON_FLAGS, VLLM_FLAGS
from backends.vllm.overrides import validate_hf_overrides

LLAMA = LLAMACPP_FLAGS
VLLM = VLLM_FLAGS


def refusal(table: FlagTable, flags: list[str]) -> FlagError:
    with pytest.raises(FlagError) as caught:
        table.validate(flags)
    return caught.value


# ---------------------------------------------------------------------------------------------
# Accepted, in canonical form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    ([], []),
    # The issue's own examples: negative numbers are values, not flags.
    (["--reasoning-budget", "-1"], ["--reasoning-budget", "-1"]),
    (["--temp=-0.5"], ["--temp", "-0.5"]),
    (["--temperature", "-.5"], ["--temp", "-0.5"]),
    # Short aliases and underscores become the long spelling.
    (["-ctk", "q8_0", "-ctv=q4_0"], ["--cache-type-k", "q8_0", "--cache-type-v", "q4_0"]),
    (["--n_gpu_layers", "all"], ["--gpu-layers", "all"]),
    (["-ngl", "099"], ["--gpu-layers", "99"]),
    (["-nkvo", "-nocb"], ["--no-kv-offload", "--no-cont-batching"]),
    (["--flash-attn", "auto"], ["--flash-attn", "auto"]),
    (["-fa=-1"], ["--flash-attn", "-1"]),
    (["-ts", "3,1"], ["--tensor-split", "3.0,1.0"]),
    (["--top-p", ".9", "--seed", "+42"], ["--top-p", "0.9", "--seed", "42"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["-l", "15043-inf", "--logit-bias", "2+1.5"], ["--logit-bias", "15043-inf", "--logit-bias", "2+1.5"]),
    (["--spec-type", "ngram-mod,ngram-simple", "--spec-ngram-mod-n-match", "4"],
     ["--spec-type", "ngram-mod,ngram-simple", "--spec-ngram-mod-n-match", "4"]),
    (["--samplers", "top_k;top-p;temp"], ["--samplers", "top_k;top-p;temp"]),
    (["--chat-template-kwargs", '{"enable_thinking": false}'],
     ["--chat-template-kwargs", '{"enable_thinking":false}']),
    (["--chat-template", "chatml", "--jinja"], ["--chat-template", "chatml", "--jinja"]),
    (["-r", "User:", "-r", "Ärger"], ["--reverse-prompt", "User:", "--reverse-prompt", "Ärger"]),
    (["--load-mode", "mmap+mlock", "--numa", "isolate"], ["--load-mode", "mmap+mlock", "--numa", "isolate"]),
    (["-C", "0xff", "-Cr", "0-3", "-dev", "CUDA0,CUDA1"],
     ["--cpu-mask", "0xff", "--cpu-range", "0-3", "--device", "CUDA0,CUDA1"]),
    (["-np", "-1", "--cache-ram", "0"], ["--parallel", "-1", "--cache-ram", "0"]),
])
def test_llamacpp_flags_are_accepted_in_canonical_form(flags: list[str], expected: list[str]) -> None:
    assert LLAMA.validate(flags) == expected


@pytest.mark.parametrize(("flags", "expected"), [
    (["--max-num-seqs", "8"], ["--max-num-seqs=8"]),
    (["--max_num_seqs=8"], ["--max-num-seqs=8"]),
    (["-tp", "2", "-q", "fp8"], ["--tensor-parallel-size=2", "--quantization=fp8"]),
    # Human-readable sizes are range-checked and passed as plain integers.
    (["--kv-cache-memory-bytes", "64M", "--max-num-batched-tokens=1.5k"],
     ["--kv-cache-memory-bytes=67108864", "--max-num-batched-tokens=1500"]),
    (["--kv-cache-memory-bytes=2g"], ["--kv-cache-memory-bytes=2000000000"]),
    (["--enforce-eager", "--no-enable-prefix-caching"], ["--enforce-eager", "--no-enable-prefix-caching"]),
    # A negative decimal must reach vLLM joined: separate, its parser takes `-0.5` for `--x.y`.
    (["--override-generation-config", '{"temperature": -0.5, "top_p": 0.9}'],
     ['--override-generation-config={"temperature":-0.5,"top_p":0.9}']),
    (["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser=qwen3"],
     ["--enable-auto-tool-choice", "--tool-call-parser=hermes", "--reasoning-parser=qwen3"]),
    (["--max-logprobs", "-1"], ["--max-logprobs=-1"]),
])
def test_vllm_flags_are_accepted_in_canonical_form(flags: list[str], expected: list[str]) -> None:
    assert VLLM.validate(flags) == expected


def test_flag_values_map_canonical_names() -> None:
    values = LLAMA.values(["-ctk", "q8_0", "-nkvo", "--jinja", "-ngl", "all"])
    assert values == {"--cache-type-k": "q8_0", "--kv-offload": False, "--jinja": True, "--gpu-layers": "all"}
    with pytest.raises(FlagError, match="set by runnerd"):
        LLAMA.values(["--jinja", "--host", "x"])


def test_lenient_flag_values_skip_what_validation_refuses() -> None:
    # For estimates over flag lists the daemon assembles (stored flags plus tuned ones): nothing is
    # refused, what would be refused is skipped, and the last valid occurrence wins.
    flags = ["--parallel", "2", "--host", "h", "--tempp", "1", "--batch-size", "lots", "-ctk", "q3_k",
             "--parallel", "3", "--ubatch-size", "--jinja", "-ts", "1,x", "bare", "-ngl", "7", "--no-repack",
             "-r", "a\nb", "--top-k"]
    assert LLAMA.values(flags, strict=False) == {"--parallel": "3", "--jinja": True, "--gpu-layers": "7",
                                                 "--repack": False}
    assert LLAMA.values([1, "-ngl", "\x00", "-ngl", "2"], strict=False) == {"--gpu-layers": "2"}  # type: ignore[list-item]
    assert LLAMA.values(["-r", "x"] * (MAX_FLAGS + 1), strict=False) == {"--reverse-prompt": "x"}
    with pytest.raises(FlagError):
        LLAMA.values("--jinja", strict=False)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Refused, with the reason
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "setting"), [
    (["-c", "4096"], "context_size"),
    (["--ctx-size=4096"], "context_size"),
    (["--ctx_size", "4096"], "context_size"),
    (["--kv-unified-per-slot", "512"], "context_size"),
    (["-md", "draft"], "speculative.draft_model"),
    (["--spec-draft-n-max", "8"], "speculative.num_tokens"),
    (["--sleep-idle-seconds", "60"], "keep_alive"),
])
def test_llamacpp_daemon_owned_flags_point_to_their_setting(flags: list[str], setting: str) -> None:
    error = refusal(LLAMA, flags)
    assert error.reason == f"set by runnerd; use the {setting} setting instead"
    assert error.index == 0


def test_error_message_names_the_flag_and_the_setting() -> None:
    error = refusal(LLAMA, ["--temp", "1", "-c", "4096"])
    assert str(error) == "runtime flag '-c' refused: set by runnerd; use the context_size setting instead"
    assert (error.element, error.index) == ("-c", 2)


@pytest.mark.parametrize(("flags", "setting"), [
    (["--max-model-len", "4096"], "context_size"),
    (["--gpu-memory-utilization=0.5"], "vllm.gpu_memory_utilization"),
    (["--hf-overrides", "{}"], "vllm.hf_overrides"),
    (["--speculative-config", "{}"], "speculative"),
])
def test_vllm_daemon_owned_flags_point_to_their_setting(flags: list[str], setting: str) -> None:
    assert refusal(VLLM, flags).reason == f"set by runnerd; use the {setting} setting instead"


@pytest.mark.parametrize(("backend", "flag"), [
    *((LLAMA, f) for f in ("--host", "--port", "--HOST", "--Port", "--api-key", "--api_prefix", "--alias", "-a",
                           "-m", "--model", "--embeddings", "--reranking", "--pooling", "--metrics", "--no-webui",
                           "--fit", "--slots", "--log-disable", "--offline")),
    *((VLLM, f) for f in ("--uds", "--host", "--port", "--model", "--served-model-name", "--api-key",
                          "--runner", "--task", "--convert", "--root-path", "--headless", "-dp")),
])
def test_flags_that_set_where_the_engine_listens_or_what_it_serves_are_refused(backend: FlagTable, flag: str) -> None:
    assert refusal(backend, [flag, "x"]).reason.startswith("set by runnerd")


@pytest.mark.parametrize(("backend", "flag", "lead"), [
    *((LLAMA, f, "it fetches or connects") for f in ("-hf", "--hf-repo", "-hff", "--hf-token", "-mu",
                                                     "--model-url", "-dr", "--docker-repo", "--rpc",
                                                     "-hfd", "--mmproj-url", "--spec-default")),
    *((LLAMA, f, "it runs code or tools") for f in ("--tools", "--tools-runtime", "--agent", "-ag",
                                                    "--mcp-servers-json", "--mcp-servers-config",
                                                    "--ui-mcp-proxy", "--video-ffmpeg-dir")),
    *((LLAMA, f, "it reads or writes files") for f in ("--lora", "--log-file", "--slot-save-path", "--path",
                                                       "--chat-template-file", "--grammar-file", "-lcs",
                                                       "--mmproj", "--api-key-file", "--media-path")),
    *((LLAMA, f, "it makes the engine exit") for f in ("--help", "-h", "--version", "--list-devices")),
    *((VLLM, f, "it fetches or connects") for f in ("--kv-transfer-config", "--revision", "--hf-token",
                                                    "--tool-server", "--otlp-traces-endpoint",
                                                    "--distributed-executor-backend")),
    *((VLLM, f, "it runs code or tools") for f in ("--trust-remote-code", "--trust_remote_code", "--middleware",
                                                   "--tool-parser-plugin", "--reasoning-parser-plugin",
                                                   "--logits-processors", "--worker-cls",
                                                   "--enable-prompt-embeds")),
    *((VLLM, f, "it reads or writes files") for f in ("--tokenizer", "--download-dir", "--load-format",
                                                      "--config", "--chat-template", "--compilation-config",
                                                      "-O")),
])
def test_flags_that_touch_files_fetch_or_run_code_are_refused(backend: FlagTable, flag: str, lead: str) -> None:
    assert refusal(backend, [flag]).reason.startswith(lead)


@pytest.mark.parametrize(("backend", "flags", "reason"), [
    (LLAMA, ["--override-tensor", "x=CPU"],
     "not supported by runnerd; it moves weights or rewrites the model's metadata in ways the memory estimate "
     "cannot count"),
    (LLAMA, ["--grammar", "root"], "not on the llama.cpp allowlist"),
    (LLAMA, ["--tempp", "1"], "not on the llama.cpp allowlist (did you mean --temp?)"),
    (VLLM, ["--max-model"], "not on the vllm allowlist"),  # argparse would expand this prefix
    (VLLM, ["-O3"], "not on the vllm allowlist"),
    (VLLM, ["--compilation-config.level", "3"], "dotted option names (--flag.key) are not accepted"),
    (LLAMA, ["model.gguf"], "expected a flag here, got a bare value (values follow their flag)"),
    (VLLM, ["--seed", "1", "org/model"], "expected a flag here, got a bare value (values follow their flag)"),
    (LLAMA, ["-1"], "expected a flag here, got a bare value (values follow their flag)"),
    (LLAMA, ["--"], "malformed flag name"),
    (LLAMA, ["-"], "malformed flag name"),
    (LLAMA, ["---host"], "malformed flag name"),
    (LLAMA, ["--temp"], "expects a value, but none follows"),
    (LLAMA, ["--temp", "--top-k", "4"], "expects a value, but the next element '--top-k' is a flag"),
    (LLAMA, ["-r", "-x"], "expects a value, but the next element '-x' is a flag"),
    (LLAMA, ["--reverse-prompt=-x"], "value '-x' starts with '-' (looks like a flag)"),
    (LLAMA, ["--reverse-prompt", "  "], "value '  ' is empty"),
    (LLAMA, ["--reverse-prompt="], "value '' is empty"),
    (LLAMA, ["--jinja=1"], "takes no value"),
    (LLAMA, ["--no-jinja=0"], "takes no value"),
    (VLLM, ["--enforce-eager=false"], "takes no value"),
    (LLAMA, ["--temp", "1", "--temperature", "2"], "--temp is given more than once"),
    (LLAMA, ["--jinja", "--no-jinja"], "--jinja is given more than once"),
])
def test_structural_refusals(backend: FlagTable, flags: list[str], reason: str) -> None:
    assert refusal(backend, flags).reason == reason


@pytest.mark.parametrize(("flags", "reason"), [
    (["--top-k", "1.5"], "must be an integer"),
    (["--top-k", "0x10"], "must be an integer"),
    (["--top-k", "1e3"], "must be an integer"),
    (["--temp", "nan"], "must be a number"),
    (["--temp", "inf"], "must be a number"),
    (["--temp", "1e999"], "must be between"),
    (["--temp", "1e-40"], "too close to zero"),
    (["--temp", "0x1p3"], "must be a number"),
    (["--temp", "1_0"], "must be a number"),
    (["--temp", " 1"], "must be a number"),
    (["--cache-type-k", "q9"], "must be one of: f32, f16"),
    (["--cache-type-k", "Q8_0"], "must be one of"),
    (["--parallel", "0"], "must be between 1 and 1024 or one of: -1"),
    (["--prio", "3"], "must be between -1 and 2"),
    (["--cache-ram", "-1"], "must be between 0"),
    (["--gpu-layers", "most"], "must be an integer or one of: auto, all"),
    (["--tensor-split", "1,,2"], "must be a number"),
    (["--tensor-split", ",".join(["1"] * 16)], "more than 15 items"),
    (["--repeat-penalty", "0"], "must be between 1e-06"),
    (["--repeat-last-n", "-1"], "must be between 0"),
    (["--chat-template", "{{ bos_token }}"], "must be one of"),
    (["--samplers", "top_k;evil"], "is not in the accepted format"),
    (["--device", "RPC[10.0.0.1:50052]"], "is not in the accepted format"),
    (["--chat-template-kwargs", "[1]"], "must be a JSON object"),
    (["--chat-template-kwargs", '{"a": NaN}'], "not valid JSON"),
    (["--chat-template-kwargs", '{"a": 1, "a": 2}'], "duplicate key"),
    (["--chat-template-kwargs", '{"a-b": 1}'], "at 'a-b': keys must be identifiers"),
])
def test_values_are_checked_against_their_type(flags: list[str], reason: str) -> None:
    error = refusal(LLAMA, flags)
    assert reason in error.reason
    assert error.element.startswith(flags[0])


HOSTILE_TEXT = [
    ("/etc/passwd", "names a path"),
    ("a/b", "names a path"),
    ("..\\x", "names a path"),
    ("\\\\server\\share", "names a path"),
    ("~root", "names a path ('~')"),
    ("a..b", "names a path ('..')"),
    ("C:", "names a path (drive letter)"),
    ("Q: x", "names a path (drive letter)"),
    ("http://example.com", "names a URL"),
    ("HTTPS://x", "names a URL"),
    ("file:secret", "names a URL"),
    ("hf:org", "names a URL"),
    ("localhost:8080", "names a network address (host:port)"),
    ("[::1]:80", "names a network address (host:port)"),
    ("10.0.0.1", "names a network address (IP)"),
    ("@args.txt", "starts with '@'"),
    ("a\nb", "contains a line break"),
    ("a\rb", "contains a line break"),
    ("a\x00b", "contains a NUL character"),
    ("a\tb", "contains the control character '\\t'"),
    ("a\x7fb", "contains the control character"),
    ("a\x85b", "invisible or control character U+0085"),
    ("a\u202eb", "invisible or control character U+202E"),
    ("a\u200bb", "invisible or control character U+200B"),
    ("a\u2028b", "invisible or control character U+2028"),
    ("a\ufdd0b", "invisible or control character U+FDD0"),
    ("\uff0fetc", "U+FF0F (FULLWIDTH SOLIDUS), a look-alike of '/'"),
    ("a\u2215b", "a look-alike of '/'"),
    ("a\uff3cb", "a look-alike of '\\\\'"),
    ("a\u2216b", "a look-alike of '\\\\'"),
    ("\u2212x", "a look-alike of '-'"),
    ("\u2010x", "a look-alike of '-'"),
    ("a\uff1db", "a look-alike of '='"),
    ("host\uff1a80", "a look-alike of ':'"),
    ("\u2024\u2024", "a look-alike of '.'"),
    ("\uff5eroot", "a look-alike of '~'"),
]


@pytest.mark.parametrize(("value", "reason"), HOSTILE_TEXT)
def test_free_text_values_cannot_name_paths_urls_addresses_or_hide_characters(value: str, reason: str) -> None:
    for flags in (["--reverse-prompt", value], [f"--reverse-prompt={value}"]):
        assert reason in refusal(LLAMA, flags).reason


@pytest.mark.parametrize(("value", "reason"), HOSTILE_TEXT)
def test_json_strings_follow_the_same_rules(value: str, reason: str) -> None:
    assert reason in refusal(LLAMA, ["--chat-template-kwargs", json.dumps({"x": value})]).reason


@pytest.mark.parametrize("flag", [
    "\uff0d\uff0dhost",  # fullwidth hyphen-minus
    "\u2212\u2212temp",  # minus sign
    "\u2010-temp",  # hyphen
    "--temp\uff1d1",  # fullwidth equals
    "\ufe63\ufe63temp",  # small hyphen-minus
    "--te\u200bmp",  # zero-width space inside the name
    "\u2014temp",  # em dash
])
def test_lookalikes_in_flag_names_are_refused(flag: str) -> None:
    error = refusal(LLAMA, [flag, "1"])
    assert "look-alike" in error.reason or "invisible" in error.reason


def test_limits() -> None:
    assert len(LLAMA.validate(["-r", "x"] * MAX_FLAGS)) == 2 * MAX_FLAGS
    assert refusal(LLAMA, ["-r", "x"] * MAX_FLAGS + ["-r", "x"]).reason == "more than 128 elements"
    too_many = ["--jinja", *["-r", "x"] * (MAX_FLAGS - 1), "--special"]
    assert refusal(LLAMA, too_many).reason == f"more than {MAX_FLAGS} flags"
    long_value = "x" * (MAX_ELEMENT_BYTES + 1)
    assert refusal(LLAMA, ["-r", long_value]).reason == f"longer than {MAX_ELEMENT_BYTES} bytes"
    assert LLAMA.validate(["-r", "x" * MAX_ELEMENT_BYTES])[1] == "x" * MAX_ELEMENT_BYTES


def test_wrong_shapes_are_refused() -> None:
    assert refusal(LLAMA, "--temp 1").reason == "runtime flags must be a list of strings"  # type: ignore[arg-type]
    assert refusal(LLAMA, ["--temp", 1]).reason == "every element must be a string"  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# raw_runtime_flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("", []),
    ("--temp 0.5 -r 'User: '", ["--temp", "0.5", "-r", "User: "]),
    ('--temp 0.5\n--top-k\t40', ["--temp", "0.5", "--top-k", "40"]),
    ('-r "a b" -r a\\ b', ["-r", "a b", "-r", "a b"]),
    ("-r '$HOME' -r `id`", ["-r", "$HOME", "-r", "`id`"]),  # nothing is expanded or run
    ("--temp 1 # comment", ["--temp", "1", "#", "comment"]),  # no comment syntax either
])
def test_raw_flags_split_like_a_posix_shell(raw: str, expected: list[str]) -> None:
    assert split_raw_flags(raw) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("--temp '0.5", "cannot be split like a shell command line: no closing quotation"),
    ('-r "abc', "cannot be split like a shell command line: no closing quotation"),
    ("-r abc\\", "cannot be split like a shell command line: no escaped character"),
    ("--temp\x000.5", "contains a NUL character"),
    ("--temp 1\r\n", "contains a line break"),
    ("--temp\u00a01", None),  # a no-break space is not a separator: one (unknown) flag
])
def test_raw_flags_with_unbalanced_quotes_or_control_characters_are_refused(raw: str, reason: str | None) -> None:
    if reason is None:
        with pytest.raises(FlagError):
            LLAMA.validate(split_raw_flags(raw))
        return
    with pytest.raises(FlagError) as caught:
        split_raw_flags(raw)
    assert caught.value.reason == reason
    assert str(caught.value).startswith("raw_runtime_flags ")


def test_raw_flags_are_validated_after_splitting() -> None:
    assert LLAMA.validate(split_raw_flags("-ctk q8_0 --temp=-0.5")) == ["--cache-type-k", "q8_0", "--temp", "-0.5"]
    with pytest.raises(FlagError, match="set by runnerd"):
        LLAMA.validate(split_raw_flags("--temp 1 --host '/tmp/x.sock'"))
    with pytest.raises(FlagError, match="bare value"):
        LLAMA.validate(split_raw_flags("--temp 1 ; rm -rf ~"))


# ---------------------------------------------------------------------------------------------
# HF overrides
# ---------------------------------------------------------------------------------------------


def test_hf_overrides_serialise_compactly() -> None:
    overrides = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "layers": [1, {"a_b": None}], "x": True}
    compact = validate_hf_overrides(overrides)
    assert compact == '{"rope_scaling":{"rope_type":"yarn","factor":4.0},"layers":[1,{"a_b":null}],"x":true}'
    assert json.loads(compact) == overrides
    assert validate_hf_overrides('{"num_layers": 2}') == '{"num_layers":2}'
    assert validate_hf_overrides({"name": "Ärger"}) == '{"name":"\\u00c4rger"}'


@pytest.mark.parametrize(("overrides", "element", "reason"), [
    ({"a-b": 1}, "a-b", "keys must be identifiers"),
    ({"": 1}, "", "keys must be identifiers"),
    ({"1a": 1}, "1a", "keys must be identifiers"),
    ({"a": {"b c": 1}}, "a.b c", "keys must be identifiers"),
    ({"a": [0, {"x-y": 1}]}, "a[1].x-y", "keys must be identifiers"),
    ({1: 2}, "1", "keys must be identifiers"),
    ({"a": {"auto_map": {}}}, "a.auto_map", "this key only serves remote code"),
    ({"a": float("nan")}, "a", "numbers must be finite"),
    ({"a": float("inf")}, "a", "numbers must be finite"),
    ({"a": 2**64}, "a", "integer out of the 64-bit range"),
    ({"a": (1, 2)}, "a", "tuple is not a JSON value"),
    ({"a": {1, 2}}, "a", "set is not a JSON value"),
    ({"a": b"x"}, "a", "bytes is not a JSON value"),
    ({"a": "/etc/passwd"}, "a", "names a path"),
    ({"a": ["ok", "http://x"]}, "a[1]", "names a URL"),
    ({"a": "x\ny"}, "a", "contains a line break"),
    ({"a": "x" * 5000}, "a", "string longer than"),
    ([], "hf_overrides", "must be a JSON object"),
    (None, "hf_overrides", "must be a JSON object"),
    ('{"a": NaN}', '{"a": NaN}', "not valid JSON"),
    ('{"a": 1, "a": 2}', '{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": "\\u002fetc"}', "a", "names a path"),
])
def test_hf_overrides_refusals_name_the_key_path(overrides: object, element: str, reason: str) -> None:
    with pytest.raises(FlagError) as caught:
        validate_hf_overrides(overrides)
    assert caught.value.element == element
    assert reason in caught.value.reason
    assert str(caught.value).startswith("hf_overrides ")


def test_hf_overrides_depth_and_size_are_bounded() -> None:
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(20):
        deep = {"a": deep}
    with pytest.raises(FlagError, match="nested deeper than 16"):
        validate_hf_overrides(deep)
    with pytest.raises(FlagError, match="serialised, longer than"):
        validate_hf_overrides({f"k{i}": "x" * 100 for i in range(50)})


@pytest.mark.parametrize(("overrides", "element"), [
    # vLLM 0.32 walked overrides into the config with getattr/setattr: `__class__`, `__dict__`, `__init__`
    # led out of the config object into a module's globals.
    ({"__class__": {"__init__": {"__globals__": {}}}}, "__class__"),
    ({"text_config": {"__dict__": {"x": 1}}}, "text_config.__dict__"),
    ({"a": [0, {"_private": 1}]}, "a[1]._private"),
    ({"ok": 1, "_": 2}, "_"),
    ('{"__init__": {"__globals__": {}}}', "__init__"),
])
def test_hf_overrides_refuse_keys_starting_with_an_underscore(overrides: object, element: str) -> None:
    with pytest.raises(FlagError) as caught:
        validate_hf_overrides(overrides)
    assert caught.value.element == element
    assert caught.value.reason.startswith("keys starting with '_' are refused")
    assert str(caught.value).startswith(f"hf_overrides {element!a} refused: ")
    # The shared JSON rules still allow them elsewhere (a JSON-valued runtime flag): the rule is vLLM's overrides'.
    assert validate_hf_overrides({"a_b": {"c_": 1}}) == '{"a_b":{"c_":1}}'


# ---------------------------------------------------------------------------------------------
# The tables themselves
# ---------------------------------------------------------------------------------------------


def test_the_daemon_owned_sets_cover_the_daemon_contract() -> None:
    assert {"--model", "-m", "--host", "--port", "--ctx-size", "-c", "--embeddings", "--embedding",
            "--pooling", "--reranking", "--rerank", "--alias", "--api-key", "--api-prefix", "--metrics",
            "--fit", "--no-webui", "--spec-draft-model", "--spec-draft-n-max"} <= LLAMACPP_DAEMON_FLAGS
    assert {"--model", "--served-model-name", "--uds", "--host", "--port", "--max-model-len",
            "--gpu-memory-utilization", "--hf-overrides", "--runner", "--task", "--convert",
            "--speculative-config", "--api-key"} <= VLLM_DAEMON_FLAGS


@pytest.mark.parametrize("table", [LLAMACPP_FLAGS, VLLM_FLAGS], ids=lambda t: t.backend)
def test_allowlisted_words_are_safe_text(table: FlagTable) -> None:
    # Enum values and INT words go to argv as they are: they must pass the free-text rules too.
    for spec in table.flags:
        for word in spec.choices:
            assert table.validate([spec.name, word])[-1].endswith(word)
        assert spec.name.isascii() and spec.name.startswith("--")


def test_a_table_refuses_a_spelling_declared_twice() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        FlagTable(backend="t", value_style="separate",
                  flags=(integer("--a", "-x"), integer("--b", "-x")), refusals=())


def test_the_flag_library_imports_no_engine() -> None:
    """backends/flags.py is the engine-free library the engines' tables are built with: importing it
    must not import an engine package (which imports it back) or the daemon."""
    code = ("import sys, backends.flags; print(' '.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('backends', 'runnerd'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["backends", "backends.flags"]


def test_flag_table_lookup() -> None:
    assert (LLAMACPP_FLAGS.backend, VLLM_FLAGS.backend) == ("llama.cpp", "vllm")
    spec = LLAMACPP_FLAGS.lookup("-ctk")
    assert isinstance(spec, tuple) and isinstance(spec[0], FlagSpec) and spec[0].kind is ValueKind.ENUM


# ---------------------------------------------------------------------------------------------
# Regressions: inputs that once broke something
# ---------------------------------------------------------------------------------------------

REGRESSIONS = [
    # A real llama.cpp flag name holds a dot; the table refused to build until dots were allowed in
    # spellings (dotted vLLM options stay refused).
    (LLAMA, ["--fim-qwen-1.5b-default"], "it fetches or connects over the network; the preset downloads a model"),
    # `--` would end argparse's options, turning the rest into positionals (the model).
    (VLLM, ["--", "--seed", "1"], "malformed flag name"),
    # Tiny floats pass Python but make llama.cpp's std::stof throw out_of_range.
    (LLAMA, ["--min-p", "5e-324"], "too close to zero"),
    # Passed the type check, then hung llama-server in argument parsing while it built 2^31 regex
    # strings (one per "layer"): magnitudes that become allocations are capped.
    (LLAMA, ["--n-cpu-moe", "2147483647"], "must be between 0 and 1024"),
    # Found by the real-engine test: the engine refuses negatives here, the table said -1.
    (LLAMA, ["--repeat-last-n", "-1"], "must be between 0"),
    (VLLM, ["--max-num-batched-tokens", "1T"], "must be between 1 and 1048576"),
    (VLLM, ["--kv-cache-memory-bytes", "1.5G"], "must be an integer (suffixes"),
    # Found by fuzzing: a drive letter glued to a digit slipped past a word-boundary rule.
    (LLAMA, ["-r", "0C:"], "names a path (drive letter)"),
    # Found by fuzzing: Python's re and int() accept other scripts' digits; the engines do not.
    (LLAMA, ["--cpu-range", "0-\u0660"], "is not in the accepted format"),
    (LLAMA, ["--top-k", "\u0663"], "must be an integer"),
    (VLLM, ["--max-num-seqs=\uff18"], "must be an integer"),
]


def test_caller_text_in_a_reason_is_escaped() -> None:
    # A bad JSON key is echoed in the reason: escaped, so it cannot forge a log line.
    error = refusal(LLAMA, ["--chat-template-kwargs", '{"a\\nb": 1}'])
    assert "\n" not in str(error) and "\\n" in str(error)


@pytest.mark.parametrize(("backend", "flags", "reason"), REGRESSIONS)
def test_regressions(backend: FlagTable, flags: list[str], reason: str) -> None:
    assert reason in refusal(backend, flags).reason


# ---------------------------------------------------------------------------------------------
# Against the real engine: every canonical spelling parses in the pinned llama-server
# ---------------------------------------------------------------------------------------------

_SAMPLE_TEXT = {
    "--cpu-mask": "0x3", "--cpu-mask-batch": "3", "--cpu-range": "0-1", "--cpu-range-batch": "0-1",
    "--device": "none", "--spec-draft-device": "none", "--samplers": "top_k;temperature",
    "--sampler-seq": "kt", "--logit-bias": "15043+1", "--dry-sequence-breaker": "none",
    "--reverse-prompt": "User:", "--reasoning-budget-message": "Enough thinking",
    "--spec-draft-cpu-mask": "0x3", "--spec-draft-cpu-mask-batch": "3", "--spec-draft-cpu-range": "0-1",
    # Typed from the build's own help (backends/llamacpp/flags.py, version_flags).
    "--grammar": 'root ::= "a"', "--json-schema": '{"type": "object"}', "--spec-synth-len": "2",
    "--spec-synth-rates": "0.5,0.5",
}


def _sample_value(spec: FlagSpec) -> str:
    if spec.kind is ValueKind.ENUM:
        return spec.choices[-1]
    if spec.kind is ValueKind.INT:
        return str(int(spec.minimum)) if spec.minimum is not None else "1"
    if spec.kind is ValueKind.FLOAT:
        return "0.5"
    if spec.kind is ValueKind.JSON_OBJECT:
        return '{"enable_thinking": false}'
    return _SAMPLE_TEXT[spec.name]


@pytest.mark.engine
def test_every_canonical_llamacpp_flag_parses_in_the_real_engine(llama_server: Path) -> None:
    """Every flag the installed build's allowlist accepts (typed by hand or from its --help)."""
    from backends.llamacpp.argv import build_env
    from backends.llamacpp.flags import version_flags
    from backends.llamacpp.help import help_options

    build = version_flags(help_options(llama_server, build_env(llama_server)))
    specs = build.flags
    # The typed table's entries this build does not list are the older builds' spellings only.
    assert {spec.name for spec in LLAMACPP_FLAGS.flags} - {spec.name for spec in specs} == {"--mmap", "--mlock"}
    batches: list[list[str]] = []
    for start in range(0, len(specs), MAX_FLAGS):
        positive: list[str] = []
        for spec in specs[start:start + MAX_FLAGS]:
            alias = spec.aliases[-1] if spec.aliases else spec.name
            positive += [alias, _sample_value(spec)] if spec.takes_value else [alias]
        batches.append(positive)
    batches.append([spelling for spec in specs for spelling in spec.negative_spellings[-1:]])
    for flags in batches:
        argv = [str(llama_server), *build.validate(flags), "--version"]
        # --version exits during parsing, after every earlier argument went through its handler.
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={"LD_LIBRARY_PATH": str(llama_server.parent), "HOME": "/nonexistent"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "error" not in done.stderr.lower(), done.stderr[-2000:]
