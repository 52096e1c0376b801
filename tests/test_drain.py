"""Drain and resume (`POST /node/drain`, `/node/resume`, `runnerd drain|resume`) and the readiness probe
(`GET /ready`), against real daemons serving the real llama-server."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import httpx2
import ollama
import openai
import pytest

from backends.llamacpp import LlamaCppBackend
from runnerd.api.ready import ReadinessCheck, _host_reasons
from tests.conftest import ROOT, Daemon, app_on_socket

pytestmark = pytest.mark.engine

# A context long enough for an answer of ~650 KB: more than the socket buffers between the daemon and a
# client that stops reading, so the daemon's relay (and the runner's lease) waits on that client.
LONG = {"RUNNERD_DEFAULT_CONTEXT_SIZE": "4096"}
CHAT = [{"role": "user", "content": "hello"}]
TOKEN = "drain-test-t0ken"


class HeldStream:
    """A long streamed completion whose reader pauses after the first event until `finish()`: the
    runner serving it stays busy meanwhile. `finish()` reads the rest and returns every event."""

    def __init__(self, daemon: Daemon, model: str) -> None:
        self._daemon, self._model = daemon, model
        self._started, self._go = threading.Event(), threading.Event()
        self.events: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read)
        self._thread.start()
        assert self._started.wait(60), "the stream did not start"

    def _read(self) -> None:
        body = {"model": self._model, "prompt": "the", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        try:
            with httpx2.Client(transport=httpx2.HTTPTransport(uds=str(self._daemon.socket)), base_url="http://r",
                               timeout=120) as c, c.stream("POST", "/engines/v1/completions", json=body) as resp:
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    if not self._started.is_set():
                        self._started.set()
                        self._go.wait(120)
                    if line:
                        self.events.append(line)
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def finish(self) -> list[str]:
        self._go.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the stream did not end"
        if self.error is not None:
            raise self.error
        return self.events


@pytest.fixture
def held() -> Iterator[list[HeldStream]]:
    streams: list[HeldStream] = []
    yield streams
    for stream in streams:  # a failed test must not leave a reader waiting
        stream._go.set()


def drain_state(d: Daemon) -> dict[str, Any]:
    state: dict[str, Any] = d.http.get("/node").json()["drain"]
    return state


def test_drain_serves_loaded_runners_refuses_new_loads_and_unloads_each_once_idle(make_daemon, tiny_model, held):
    d = make_daemon({"tiny": tiny_model, "other": tiny_model, "third": tiny_model}, env=LONG)
    assert d.http.get("/ready").json() == {"ready": True}
    assert drain_state(d) == {"draining": False, "since": None, "runners_left": 0, "active_requests": 0,
                              "drained": False}
    # An idle runner (goes at once) and a busy one (goes when its stream ends).
    assert d.post("/engines/v1/completions", {"model": "third", "prompt": "x"},
                  headers={"X-Preload-Only": "true"}).status_code == 200
    stream = HeldStream(d, "tiny")
    held.append(stream)
    busy_pid = next(r["pid"] for r in d.ps() if r["model"] == "tiny:latest")

    before = time.time()
    answer = d.post("/node/drain")
    assert answer.status_code == 200, answer.text
    drain = answer.json()["drain"]
    assert drain["draining"] is True and before - 1 <= drain["since"] <= time.time() + 1
    assert drain["runners_left"] == 2 and drain["active_requests"] == 1 and drain["drained"] is False
    assert d.post("/node/drain").json()["drain"]["since"] == drain["since"], "draining again keeps its start"
    d.wait_for(lambda: [r["model"] for r in d.ps()] == ["tiny:latest"], timeout=30, what="the idle runner to stop")

    # New loads are refused, on the OpenAI routes and on Ollama's, each in its own shape.
    refused = d.post("/engines/v1/chat/completions", {"model": "other", "messages": CHAT, "max_tokens": 2})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "node_draining" and "draining" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    with pytest.raises(openai.APIStatusError) as caught:
        d.openai("/v1").chat.completions.create(model="other", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.status_code == 503 and "draining" in caught.value.message
    refused = d.post("/api/generate", {"model": "other", "prompt": "hi", "stream": False})
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert set(refused.json()) == {"error"} and "draining" in refused.json()["error"]
    client = ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(d.socket)), timeout=60)
    try:
        with pytest.raises(ollama.ResponseError) as ollama_refusal:
            client.chat(model="other", messages=CHAT, stream=False)
        assert ollama_refusal.value.status_code == 503 and "draining" in ollama_refusal.value.error
        # Loading only (Ollama's empty prompt, X-Preload-Only) is refused even for the loaded model.
        with pytest.raises(ollama.ResponseError) as preload:
            client.generate(model="tiny")
        assert preload.value.status_code == 503
    finally:
        client.close()
    preload_only = d.post("/engines/v1/completions", {"model": "tiny", "prompt": "x"},
                          headers={"X-Preload-Only": "true"})
    assert preload_only.status_code == 503 and preload_only.json()["error"]["code"] == "node_draining"

    # The loaded runner keeps serving; the node is not ready while it drains.
    served = d.post("/engines/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert served.status_code == 200, served.text
    not_ready = d.http.get("/ready")
    assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
    assert any(reason.startswith("draining") for reason in not_ready.json()["reasons"])
    state = drain_state(d)
    assert (state["draining"], state["runners_left"], state["active_requests"]) == (True, 1, 1)
    assert [r["model"] for r in d.ps()] == ["tiny:latest"], "a busy runner stays until its stream ends"

    # The stream that was running when the drain began completes; then its runner goes.
    events = stream.finish()
    assert events[-1] == "data: [DONE]" and len(events) > 100
    d.wait_for(lambda: d.ps() == [], timeout=30, what="the drained runner to stop")
    d.wait_for(lambda: busy_pid not in d.engine_pids(), timeout=30, what="its engine to exit")
    assert drain_state(d) == {**drain, "runners_left": 0, "active_requests": 0, "drained": True}
    assert "draining: stopping idle model=tiny:latest" in d.output()

    resumed = d.post("/node/resume")
    assert resumed.status_code == 200 and resumed.json()["drain"]["draining"] is False
    assert d.http.get("/ready").json() == {"ready": True}
    loaded = d.post("/engines/v1/chat/completions", {"model": "other", "messages": CHAT, "max_tokens": 2})
    assert loaded.status_code == 200, loaded.text
    assert [r["model"] for r in d.ps()] == ["other:latest"], "resumed: runners keep their keep-alive again"


def test_resume_while_a_runner_is_busy_keeps_it(make_daemon, tiny_model, held):
    d = make_daemon({"tiny": tiny_model}, env=LONG)
    stream = HeldStream(d, "tiny")
    held.append(stream)
    assert d.post("/node/drain").json()["drain"]["runners_left"] == 1
    assert d.post("/node/resume").json()["drain"] == {"draining": False, "since": None, "runners_left": 1,
                                                      "active_requests": 1, "drained": False}
    assert stream.finish()[-1] == "data: [DONE]"
    time.sleep(1.0)
    assert [r["state"] for r in d.ps()] == ["idle"], "no longer draining: the default keep-alive applies"


def test_a_load_queued_for_room_when_the_drain_begins_is_refused_then(make_daemon, tiny_model, held):
    d = make_daemon({"tiny": tiny_model, "other": tiny_model},
                    env={**LONG, "RUNNERD_MAX_RUNNERS": "1", "RUNNERD_QUEUE_TIMEOUT": "60"})
    held.append(stream := HeldStream(d, "tiny"))
    answers: list[httpx2.Response] = []
    queued = threading.Thread(target=lambda: answers.append(
        d.post("/engines/v1/completions", {"model": "other", "prompt": "x", "max_tokens": 1})))
    started = time.monotonic()
    queued.start()
    time.sleep(1.0)  # it waits for the busy runner to go idle (max_runners 1)
    assert not answers
    d.post("/node/drain")
    queued.join(30)
    (refused,) = answers
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "node_draining", refused.text
    assert time.monotonic() - started < 30, "refused when the drain began, not at the queue timeout"
    assert stream.finish()[-1] == "data: [DONE]"
    d.wait_for(lambda: d.ps() == [], timeout=30, what="the drained runner to stop")


def tcp_daemon(make_daemon: Any, tmp_path: Path, **kw: Any) -> tuple[Daemon, str]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    d = make_daemon(args=["--listen", "127.0.0.1:0", "--token-file", str(token)], **kw)
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    return d, f"http://127.0.0.1:{port.group(1)}"


def test_probes_are_open_over_tcp_and_drain_needs_the_token(make_daemon, tmp_path):
    _, url = tcp_daemon(make_daemon, tmp_path)
    with httpx2.Client(base_url=url, timeout=30) as tcp:
        for path in ("/ready", "/health"):
            assert tcp.get(path).status_code == 200, tcp.get(path).text
            assert tcp.head(path).status_code == 200, path
        assert tcp.get("/ready").json() == {"ready": True}
        for method, path in (("POST", "/node/drain"), ("POST", "/node/resume"), ("GET", "/node")):
            resp = tcp.request(method, path)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
        assert tcp.post("/ready").status_code in (401, 405), "only GET and HEAD are open"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        drained = tcp.post("/node/drain", headers=auth)
        assert drained.status_code == 200 and drained.json()["drain"]["drained"] is True, drained.text
        not_ready = tcp.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["reasons"][0].startswith("draining")
        assert tcp.head("/ready").status_code == 503
        assert tcp.get("/health").status_code == 200, "liveness is not readiness"
        assert tcp.get("/node", headers=auth).json()["drain"]["draining"] is True
        assert tcp.post("/node/resume", headers=auth).status_code == 200
        assert tcp.get("/ready").status_code == 200


def test_not_ready_without_an_installed_engine(make_daemon, tmp_path):
    d = make_daemon(env={"RUNNERD_LLAMA_SERVER": "/nonexistent/llama-server", "RUNNERD_VLLM": "/nonexistent/python"})
    statuses = d.http.get("/engines/status").json()
    assert statuses and not any(s.startswith("Running") for s in statuses.values()), statuses
    resp = d.http.get("/ready")
    assert resp.status_code == 503 and resp.json()["ready"] is False
    (reason,) = resp.json()["reasons"]
    assert reason.startswith("no engine installed") and "llama.cpp" in reason and "/nonexistent" not in reason
    assert d.http.get("/health").status_code == 200


def test_the_store_must_be_readable(tmp_path):
    assert _host_reasons({}, tmp_path, tmp_path / "store") == ["no engine installed (no engine registered)"]
    missing = tmp_path / "not-yet"
    assert _host_reasons({}, missing, missing / "store") == _host_reasons({}, tmp_path, tmp_path / "store"), \
        "a store not created yet is an empty one"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    reasons = _host_reasons({}, not_a_dir, not_a_dir / "store")
    assert reasons[-1] == "model store not readable"


@pytest.mark.anyio
async def test_readiness_checks_the_engines_at_most_once_per_period(tmp_path, llama_server):
    class Counting(LlamaCppBackend):
        calls = 0

        def status(self):  # type: ignore[no-untyped-def]
            Counting.calls += 1
            return super().status()

    backends = {"llama.cpp": Counting(cache_dir=tmp_path, binary=llama_server)}
    async with app_on_socket(tmp_path, backends) as client:
        answers = [await client.get("/ready") for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert Counting.calls == 1


@pytest.mark.anyio
async def test_readiness_check_expires(monkeypatch, tmp_path):
    import anyio

    from runnerd.api import ready

    calls: list[tuple[Any, ...]] = []

    def counted(*args: Any) -> list[str]:
        calls.append(args)
        return _host_reasons(*args)

    monkeypatch.setattr(ready, "_host_reasons", counted)
    check = ReadinessCheck(ttl=0.2)
    daemon: Any = SimpleNamespace(backends={}, settings=SimpleNamespace(data_dir=tmp_path),
                                  store=SimpleNamespace(root=tmp_path / "store"))
    assert await check.reasons(daemon) == await check.reasons(daemon) == ["no engine installed (no engine "
                                                                          "registered)"]
    assert len(calls) == 1
    await anyio.sleep(0.3)
    await check.reasons(daemon)
    assert len(calls) == 2


def cli(d: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runnerd.cli", *args, "--socket", str(d.socket)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_drain_wait_returns_once_the_node_is_empty_and_resume_lifts_it(make_daemon, tiny_model, held):
    d = make_daemon({"tiny": tiny_model}, env=LONG)
    stream = HeldStream(d, "tiny")
    held.append(stream)

    timed_out = cli(d, "drain", "--wait", "--timeout", "1.5")
    assert timed_out.returncode == 1, timed_out
    assert "draining: 1 runner(s) left, 1 request(s) in flight" in timed_out.stdout
    assert "after 1.5 s" in timed_out.stderr and "stays draining" in timed_out.stderr

    waiting = subprocess.Popen([sys.executable, "-m", "runnerd.cli", "drain", "--wait", "--socket", str(d.socket)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert waiting.poll() is None, "the node still has a busy runner"
    assert stream.finish()[-1] == "data: [DONE]"
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert out.splitlines()[-1] == "drained: no runner left"
    assert d.ps() == []

    assert cli(d, "node").stdout.count("drain     drained") == 1
    refused = d.post("/engines/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert refused.status_code == 503
    resumed = cli(d, "resume")
    assert resumed.returncode == 0 and resumed.stdout.startswith("resumed"), resumed
    assert d.post("/engines/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 200
    quick = cli(d, "drain", "--json")
    assert quick.returncode == 0 and '"draining": true' in quick.stdout

