"""The real daemon serving the real llama-server, driven by the official openai client over the socket."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import psutil
import pytest

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "hello world"}]
# Random weights may emit EOS at once: ignore it so token counts are exact.
EXACT = {"ignore_eos": True}


def test_chat_completion(daemon):
    client = daemon.openai()
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                         extra_body=EXACT)
    assert out.object == "chat.completion"
    assert out.model == "tiny:latest"
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and out.usage.completion_tokens == 6


def test_streaming_chat_arrives_in_chunks(daemon):
    client = daemon.openai()
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, extra_body=EXACT)
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 6
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason == "length" or any(
        c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_completions(daemon):
    out = daemon.openai().completions.create(model="tiny", prompt="the world is", max_tokens=5, temperature=0,
                                             extra_body=EXACT)
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert isinstance(out.choices[0].text, str)


def test_embeddings_use_their_own_runner(daemon):
    client = daemon.openai()
    out = client.embeddings.create(model="tiny", input=["hello", "the world"])
    assert [len(d.embedding) for d in out.data] == [64, 64]
    assert out.data[0].embedding != out.data[1].embedding
    modes = {(r["model"], r["mode"]) for r in daemon.ps()}
    assert ("tiny:latest", "embedding") in modes


def test_v1_alias_and_explicit_backend_routes(daemon):
    for prefix in ("/v1", "/engines/llama.cpp/v1"):
        out = daemon.openai(prefix).chat.completions.create(model="tiny:latest", messages=CHAT, max_tokens=2,
                                                            extra_body=EXACT)
        assert out.usage is not None and out.usage.completion_tokens == 2


def test_models_listing(daemon):
    ids = [m.id for m in daemon.openai().models.list()]
    assert ids == ["tiny:latest"]
    assert daemon.openai().models.retrieve("tiny").id == "tiny:latest"
    registry = daemon.http.get("/models").json()
    assert registry[0]["name"] == "tiny:latest" and registry[0]["architecture"] == "llama"
    with pytest.raises(openai.NotFoundError):
        daemon.openai().models.retrieve("nope")


def test_preload_only_loads_and_returns_empty(daemon):
    daemon.post("/engines/unload", {"all": True})
    assert daemon.ps() == []
    resp = daemon.post("/engines/v1/completions", {"model": "tiny", "prompt": "x"},
                       headers={"X-Preload-Only": "true"})
    assert resp.status_code == 200 and resp.content == b""
    assert [r["state"] for r in daemon.ps()] == ["idle"]


def test_eight_concurrent_requests_to_a_cold_model_start_one_engine(daemon):
    daemon.post("/engines/unload", {"all": True})
    daemon.wait_for(lambda: not daemon.engine_pids(), what="engines to stop")
    client = daemon.openai()
    barrier = threading.Barrier(8)
    starting = "runner starting model=tiny:latest mode=completion"
    starts_before = daemon.output().count(starting)  # the daemon is shared with earlier tests

    def ask(_: int) -> int:
        barrier.wait()
        out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, extra_body=EXACT)
        assert out.usage is not None
        return out.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == [3] * 8
    assert len(daemon.engine_pids()) == 1
    assert daemon.output().count(starting) - starts_before == 1
    assert len(daemon.ps()) == 1


def test_runner_killed_while_idle_is_replaced(daemon):
    client = daemon.openai()
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    (runner,) = [r for r in daemon.ps() if r["mode"] == "completion"]
    os.kill(runner["pid"], signal.SIGKILL)
    daemon.wait_for(lambda: all(r["pid"] != runner["pid"] for r in daemon.ps()), what="dead runner forgotten")
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body=EXACT)
    assert out.usage is not None and out.usage.completion_tokens == 2
    (fresh,) = [r for r in daemon.ps() if r["mode"] == "completion"]
    assert fresh["pid"] != runner["pid"]


def test_runner_killed_mid_stream_gives_a_clean_error(make_daemon, tiny_model):
    # A context long enough that generation is still running when the engine dies.
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_DEFAULT_CONTEXT_SIZE": "4096"})
    client = d.openai()
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    (runner,) = d.ps()
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4000, stream=True,
                                            extra_body=EXACT)
    with pytest.raises(openai.APIError) as info:
        for i, _chunk in enumerate(stream):
            if i == 3:
                os.kill(runner["pid"], signal.SIGKILL)
    assert "terminated by signal SIGKILL" in info.value.message
    assert "last engine output" in info.value.message
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body=EXACT)
    assert out.usage is not None and out.usage.completion_tokens == 2
    assert d.ps()[0]["pid"] != runner["pid"]


def test_unload_by_model_and_backend(daemon):
    daemon.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    resp = daemon.post("/engines/unload", {"models": ["tiny"]})
    assert resp.status_code == 200 and resp.json()["unloaded"] >= 1
    assert daemon.ps() == []
    daemon.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    assert daemon.post("/engines/unload", {"backend": "llama.cpp"}).json()["unloaded"] == 1


def test_status_and_df(daemon):
    status = daemon.http.get("/engines/status").json()
    assert status["llama.cpp"].startswith("Running: llama.cpp ")
    df = daemon.http.get("/engines/df").json()
    assert df["models_disk_usage"] > 0 and df["backends_disk_usage"]["llama.cpp"] > 0


def test_keep_alive_zero_unloads_after_the_request(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_KEEP_ALIVE": "0"})
    d.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    d.wait_for(lambda: d.ps() == [] and not d.engine_pids(), timeout=10, what="keep-alive 0 unload")


def test_keep_alive_expires(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_KEEP_ALIVE": "1s"})
    d.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    assert len(d.ps()) == 1 and d.ps()[0]["expires_at"] is not None
    d.wait_for(lambda: d.ps() == [], timeout=10, what="keep-alive expiry")


def test_request_keep_alive_overrides_and_minus_one_never_expires(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_KEEP_ALIVE": "0"})
    d.post("/engines/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 1, "keep_alive": -1})
    time.sleep(1.0)
    assert [r["keep_alive"] for r in d.ps()] == [None]
    resp = d.post("/engines/v1/chat/completions", {"model": "tiny", "messages": CHAT, "keep_alive": "soon"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "keep_alive"


def test_daemon_sigterm_leaves_no_engine_and_no_socket(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model})
    d.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    (engine,) = d.engine_pids()
    runner_socket = d.ps()[0]["socket"]
    assert d.stop() == 0
    assert not psutil.pid_exists(engine) or psutil.Process(engine).status() == psutil.STATUS_ZOMBIE
    assert not d.socket.exists() and not os.path.exists(runner_socket)


def test_daemon_sigkill_takes_its_engines_with_it(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model})
    d.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    (engine,) = d.engine_pids()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 2  # the bound: gone within 2 s
    while psutil.pid_exists(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not psutil.pid_exists(engine) or psutil.Process(engine).status() == psutil.STATUS_ZOMBIE


def test_gemma_streams_tokens_as_they_are_generated(make_daemon, gemma_model):
    d = make_daemon({"gemma3": gemma_model})
    client = d.openai()
    client.chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    started = time.monotonic()
    arrivals = []
    text = []
    for chunk in client.chat.completions.create(
            model="gemma3", messages=[{"role": "user", "content": "Count from one to forty in words."}],
            max_tokens=48, temperature=0, stream=True, extra_body=EXACT):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text.append(chunk.choices[0].delta.content)
    assert len(arrivals) >= 40
    # Relayed as generated, not buffered until the end.
    assert arrivals[0] < arrivals[-1] / 3
    # The file has no chat template: runnerd supplies Gemma's turn format instead of ChatML.
    assert "<|im_" not in "".join(text)


def test_client_hanging_up_cancels_the_generation(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_DEFAULT_CONTEXT_SIZE": "4096"})
    d.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    (runner,) = d.ps()
    engine = httpx.Client(transport=httpx.HTTPTransport(uds=runner["socket"]), base_url="http://engine")
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4000, "stream": True, **EXACT}
    with d.http.stream("POST", "/engines/v1/chat/completions", json=body) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i == 5:
                # Still reading: the engine is generating for us.
                assert any(s["is_processing"] for s in engine.get("/slots").json())
                break
    # The connection is closed: the daemon cancels its upstream request and the engine stops generating.
    d.wait_for(lambda: not any(s["is_processing"] for s in engine.get("/slots").json()), timeout=2,
               what="engine slot released")
    assert d.ps()[0]["active_requests"] == 0
