"""Configuration and request fields the engine cannot survive, or the host cannot carry, are refused at
the door of a real daemon: before anything is stored, with a 400 naming what was wrong, and nothing
stored changes."""

from __future__ import annotations

import os

import pytest

from tests.conftest import Daemon
from tests.tinymodels import write_tiny_llama

HUGE_CTX = 1 << 24


def configurations(d: Daemon) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = d.http.get("/engines/_configure").json()["configurations"]
    return listed


# ------------------------------------------------------------------ Ollama's num_ctx


@pytest.mark.engine
def test_a_num_ctx_that_cannot_fit_is_refused_and_leaves_the_model_serving(make_daemon, llama_server, tiny_model,
                                                                          tmp_path):
    # A model trained for 16M tokens: its whole context is a few GiB of KV cache, over the 1 GiB runners may hold.
    big = write_tiny_llama(tmp_path / "big.gguf", n_ctx_train=HUGE_CTX)
    models = {"big": big, "tiny": tiny_model}
    env = {"RUNNERD_MEMORY__RAM_LIMIT": "1GiB"}
    d = make_daemon(models, env=env)
    hello = {"prompt": "hi", "stream": False, "options": {"num_predict": 2}}

    resp = d.post("/api/generate", {**hello, "model": "big", "options": {"num_ctx": HUGE_CTX, "num_predict": 2}})
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]
    assert f"context size {HUGE_CTX}" in message and "never fit" in message and "nothing was stored" in message
    assert configurations(d) == []

    # The next request, without num_ctx, is served with the configuration as it was.
    assert d.post("/api/generate", {**hello, "model": "big"}).status_code == 200

    # A num_ctx above the training context is capped at it, as Ollama caps it: stored, it fits and serves.
    resp = d.post("/api/generate", {**hello, "model": "tiny", "options": {"num_ctx": HUGE_CTX, "num_predict": 2}})
    assert resp.status_code == 200, resp.text
    assert [(c["model"], c["config"]) for c in configurations(d)] == [("tiny:latest", {"context_size": 4096})]

    # A restarted daemon reads what was stored and serves both models.
    d.stop()
    again = Daemon(d.root, llama_server, models, env, [])
    try:
        assert [c["config"] for c in configurations(again)] == [{"context_size": 4096}]
        for name in ("big", "tiny"):
            assert again.post("/api/generate", {**hello, "model": name}).status_code == 200
    finally:
        again.stop()


# ------------------------------------------------------------------ POST /engines/_configure


@pytest.mark.engine
def test_configure_refuses_what_the_engine_or_host_cannot_take(daemon):
    cpus = len(os.sched_getaffinity(0))
    cases = [
        # llama-server reads it with std::stoi and exits at startup (2^70 is refused as JSON at the door).
        ({"llamacpp": {"reasoning_budget": 2**40}}, "llamacpp.reasoning_budget", "less than or equal to 2147483647"),
        ({"runtime_flags": ["--cpu-range", "0-999"]}, "runtime_flags", f"this host has CPUs 0-{os.cpu_count() - 1}"),
        ({"runtime_flags": ["--cpu-mask", "0x" + "f" * 64]}, "runtime_flags", "the mask selects CPU 255"),
        ({"raw_runtime_flags": "--cpu-range-batch 3-1"}, "raw_runtime_flags", "from a lower to a higher"),
        ({"runtime_flags": ["--parallel", "1024"]}, "runtime_flags", "at most 256 slots"),
        ({"runtime_flags": ["--threads", str(2 * cpus + 1)]}, "runtime_flags", f"at most {2 * cpus} threads"),
        ({"runtime_flags": ["-tb", "256"]}, "runtime_flags", "--threads-batch 256"),
        ({"runtime_flags": ["--threads-http", "1000"]}, "runtime_flags", "--threads-http 1000"),
        # Each slot needs cells of the context: 8 slots do not share 512 tokens.
        ({"context_size": 512, "runtime_flags": ["--parallel", "8"]}, "context_size", "--parallel 4 at most"),
        # A prompt cache of 1 TiB is counted, and no host here holds it.
        ({"runtime_flags": ["--cache-ram", str(1 << 20)]}, "runtime_flags", "can never fit on this host"),
    ]
    for body, param, fragment in cases:
        resp = daemon.post("/engines/_configure", {"model": "tiny", **body})
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and fragment in error["message"], (body, error)
    assert configurations(daemon) == []

    # What the host can carry is still taken.
    resp = daemon.post("/engines/_configure", {"model": "tiny", "context_size": 512,
                                               "runtime_flags": ["--threads", "1", "--parallel", "4"]})
    assert resp.status_code == 202, resp.text
    assert daemon.http.delete("/engines/_configure", params={"model": "tiny"}).status_code == 200


# ------------------------------------------------------------------ request fields that multiply the answer


@pytest.mark.engine
def test_fields_that_multiply_the_answer_are_bounded(daemon):
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 8}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    refused = [
        ("/engines/v1/completions", {**completion, "n_probs": 10**9}, "n_probs must be a whole number from 0 to 100"),
        ("/engines/v1/completions", {**completion, "n_probs": 5.5}, "n_probs"),
        ("/engines/v1/completions", {**completion, "logprobs": 1000}, "logprobs"),
        ("/engines/v1/completions", {**completion, "best_of": 500}, "best_of"),
        ("/engines/v1/completions", {**completion, "max_tokens": 2**40}, "max_tokens"),
        ("/engines/v1/completions", {"model": "tiny", "prompt": "hi", "n_predict": 2**31}, "n_predict"),
        ("/engines/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
        ("/engines/v1/chat/completions", {**chat, "n": 1000}, "n must be"),
        ("/engines/v1/chat/completions", {**chat, "max_completion_tokens": 10**12}, "max_completion_tokens"),
    ]
    for path, body, fragment in refused:
        resp = daemon.post(path, body)
        assert resp.status_code == 400, (body, resp.text[:300])
        assert fragment in resp.json()["error"]["message"], (body, resp.json())

    # Within the bounds the engine answers, probabilities included.
    resp = daemon.post("/engines/v1/completions", {**completion, "max_tokens": 2, "n_probs": 3})
    assert resp.status_code == 200, resp.text
    resp = daemon.post("/engines/v1/chat/completions", {**chat, "max_tokens": 2, "logprobs": True, "top_logprobs": 3})
    assert resp.status_code == 200, resp.text

    # Ollama's options reach the engine through the same bounds, in Ollama's words where they are its own.
    resp = daemon.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                         "options": {"num_predict": 2**40}})
    assert resp.status_code == 400 and "options.num_predict" in resp.json()["error"], resp.text
    assert configurations(daemon) == []


@pytest.mark.engine
def test_unloading_a_model_while_configure_preloads_it_leaves_the_daemon_serving(make_daemon, tiny_model):
    # Each configure preloads in the background; an unload that lands while the engine loads stops it.
    # That stop must fail the load alone, never the scheduler's background work as a whole.
    d = make_daemon({"tiny": tiny_model})
    for size in (512, 768, 1024, 1280, 1536):
        resp = d.post("/engines/_configure", {"model": "tiny", "context_size": size})
        # 409 when the previous preload's engine is still loading: it counts as a request being served.
        assert resp.status_code in (202, 409), resp.text
        assert d.post("/engines/unload", {"all": True}).status_code == 200
    resp = d.post("/engines/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    d.wait_for(lambda: [r["state"] for r in d.ps()] == ["idle"], what="an idle runner")
    assert d.post("/engines/_configure", {"model": "tiny", "context_size": 512}).status_code == 202
    assert "scheduler is not running" not in d.output()
