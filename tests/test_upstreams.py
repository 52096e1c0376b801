"""External endpoints behind one door: a second runnerd daemon (its own token, a real llama-server) and
bare llama-servers on loopback ports are upstreams of a first daemon, whose listings show the union and
whose OpenAI and Ollama routes reach them with failover before the first byte. Stand-ins
(tests/standin_upstream.py) play the upstreams that fail in ways a real engine cannot be made to."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import ollama
import openai
import pytest

from backends.external import KINDS
from backends.llamacpp.argv import build_env
from runnerd.config import ConfigError, load_settings
from runnerd.tokens import hash_text
from tests.api_daemons import anthropic_client
from tests.conftest import Daemon
from tests.standin_upstream import PARTIAL, StandinUpstream

CHAT = [{"role": "user", "content": "hello world"}]
SECOND_TOKEN = "second-daemon-token-7f3a9c"
SCOPED_TOKEN = "rd_shared-only-user-token-0123456789abcdef"
ANSWER = {"max_tokens": 6, "temperature": 0, "seed": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BareLlamaServer:
    """A real llama-server that runnerd did not start, on a loopback port, serving one model as `alias`."""

    def __init__(self, binary: Path, model: Path, alias: str, log: Path, extra: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--alias", alias,
             "--ctx-size", "256", "--threads", "1", "--n-gpu-layers", "0", "--no-webui", *extra],
            env=build_env(binary), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text(errors="replace")
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"llama-server did not get ready:\n{log.read_text(errors='replace')}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class World:
    front: Daemon
    second: Daemon
    bare: BareLlamaServer
    bare_embed: BareLlamaServer
    standins: dict[str, StandinUpstream]
    front_port: int


def _front_config(root: Path, second: Daemon, second_port: int, bare: BareLlamaServer, bare_embed: BareLlamaServer,
                  dead: BareLlamaServer, standins: dict[str, StandinUpstream]) -> Path:
    (root / "second.token").write_text(SECOND_TOKEN + "\n")

    def upstream(name: str, kind: str, url: str, priority: int, extra: str = "") -> str:
        return f'[[upstreams]]\nname = "{name}"\nkind = "{kind}"\nbase_url = "{url}"\npriority = {priority}\n{extra}\n'

    def via(first: str) -> str:
        return f'[{{source = "{first}", model = "shared"}}, {{source = "bare", model = "shared"}}]'

    text = "\n".join([
        # Discovery once, at start: a stopped upstream stays listed, so requests must fail over past it.
        "[routing]\ndiscovery_interval = 3600\n",
        upstream("second", "runnerd", f"http://127.0.0.1:{second_port}", 10,
                 f'token_file = "{root / "second.token"}"'),
        upstream("dead", "llamacpp", dead.base_url, 20, "first_byte_timeout = 30"),
        # The same daemon over its unix socket (the socket's file mode is the gate: no token), as kind
        # ollama: runnerd serves Ollama's API, so its model list is read from /api/tags.
        upstream("second-unix", "ollama", f"unix:{second.socket}", 30),
        upstream("bare", "llamacpp", bare.base_url, 50),
        upstream("bare-embed", "llamacpp", bare_embed.base_url, 51),
        upstream("failing", "openai", standins["failing"].base_url, 60),
        upstream("cut", "vllm", standins["cut"].base_url, 61),
        upstream("half", "sglang", standins["half"].base_url, 62),
        # TGI without tools (a per-endpoint override): neither tools nor embeddings may reach it.
        upstream("tgi", "tgi", standins["tgi"].base_url, 63, "capabilities = {tools = false}"),
        upstream("slow", "lmstudio", standins["slow"].base_url, 64, "first_byte_timeout = 1"),
        "[aliases]",
        f"via-500 = {via('failing')}",
        f"via-cut = {via('cut')}",
        f"via-half = {via('half')}",
        f"via-slow = {via('slow')}",
        f"local-first = {via('local').replace('shared', 'tiny', 1)}",
        f"ghost-first = {via('local').replace('shared', 'ghost', 1)}",
        'via-unix = [{source = "second-unix", model = "remote-tiny"}]',
        'nowhere = [{source = "dead", model = "shared"}, {source = "failing", model = "shared"}]',
    ])
    path = root / "front.toml"
    path.write_text(text)
    return path


def _wait_discovered(front: Daemon, names: set[str]) -> None:
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = front.http.get("/engines/status", params={"upstreams": "1"}).json()["upstreams"]
        if all(status[n]["healthy"] and status[n]["models"] for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"upstreams not discovered: {status}\n{front.output()}")


@pytest.fixture(scope="module")
def world(llama_server: Path, tiny_model: Path) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="rdu-", dir="/tmp"))
    started: list[Any] = []
    try:
        (root / "token").write_text(SECOND_TOKEN)
        (root / "second").mkdir()
        second = Daemon(root / "second", llama_server, {"remote-tiny": tiny_model},
                        {"RUNNERD_HTTP__LISTEN": "127.0.0.1:0", "RUNNERD_HTTP__TOKEN_FILE": str(root / "token")}, [])
        started.append(second)
        found = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", second.output())
        assert found, second.output()
        bare = BareLlamaServer(llama_server, tiny_model, "shared", root / "bare.log")
        started.append(bare)
        bare_embed = BareLlamaServer(llama_server, tiny_model, "shared-embed", root / "bare-embed.log",
                                     ("--embeddings", "--pooling", "mean"))
        started.append(bare_embed)
        dead = BareLlamaServer(llama_server, tiny_model, "shared", root / "dead.log")
        started.append(dead)
        standins = {"failing": StandinUpstream("failing", "500", ["standin-failing"]),
                    "cut": StandinUpstream("cut", "cut", ["standin-cut"]),
                    "half": StandinUpstream("half", "half", ["standin-half"]),
                    "tgi": StandinUpstream("tgi", "plain", ["tgi-model"]),
                    "slow": StandinUpstream("slow", "slow", ["standin-slow"])}
        started.extend(standins.values())
        (root / "front").mkdir()
        config = _front_config(root, second, int(found.group(1)), bare, bare_embed, dead, standins)
        (root / "tokens.toml").write_text(
            f'[[tokens]]\nname = "shared-only"\nrole = "user"\nhash = "{hash_text(SCOPED_TOKEN)}"\n'
            'models = ["shared*"]\n')
        front = Daemon(root / "front", llama_server, {"tiny": tiny_model},
                       {"RUNNERD_HTTP__LISTEN": "127.0.0.1:0", "RUNNERD_HTTP__TOKENS_FILE": str(root / "tokens.toml")},
                       ["--config", str(config)])
        started.append(front)
        front_port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", front.output())
        assert front_port, front.output()
        _wait_discovered(front, {"second", "second-unix", "dead", "bare", "bare-embed", "tgi"})
        dead.stop()  # still listed by the front daemon: its requests must fail over to `bare`
        yield World(front, second, bare, bare_embed, standins, int(front_port.group(1)))
    finally:
        for thing in reversed(started):
            thing.stop() if not isinstance(thing, StandinUpstream) else thing.close()
        shutil.rmtree(root, ignore_errors=True)


def _ids(response: httpx2.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


def _direct(world: World, model: str = "shared", **extra: Any) -> str:
    """The bare llama-server's own answer, for comparison with what came through the front daemon."""
    out = world.bare.openai().chat.completions.create(model=model, messages=CHAT, **ANSWER, **extra)  # type: ignore
    return out.choices[0].message.content or ""


def _direct_stream(world: World) -> str:
    """The bare llama-server's own streamed answer (a tiny model's bytes split differently when streamed)."""
    return _streamed(world.bare.openai().chat.completions.create(model="shared", messages=CHAT, stream=True,
                                                                  **ANSWER))  # type: ignore[call-overload]


def _streamed(stream: Any) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


# ---------------------------------------------------------------- one namespace


def test_lists_show_the_union_each_model_once(world: World) -> None:
    expected = {"tiny:latest", "remote-tiny:latest", "shared", "shared-embed", "tgi-model", "standin-failing",
                "standin-cut", "standin-half", "standin-slow", "via-500", "via-cut", "via-half", "via-slow",
                "local-first", "ghost-first", "via-unix", "nowhere"}
    for path in ("/v1/models", "/engines/v1/models"):
        ids = _ids(world.front.http.get(path))
        assert set(ids) == expected
        assert len(ids) == len(set(ids)), ids  # "shared" is on two upstreams: listed once
    # A backend's own listing shows its local models only.
    assert _ids(world.front.http.get("/engines/llama.cpp/v1/models")) == ["tiny:latest"]
    owner = {m["id"]: m["owned_by"] for m in world.front.http.get("/v1/models").json()["data"]}
    assert owner["shared"] == "dead"  # the first by priority that hosted it when polled
    assert owner["remote-tiny:latest"] == "second"
    assert world.front.http.get("/v1/models/remote-tiny:latest").json()["owned_by"] == "second"

    client = ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(world.front.socket)),
                           timeout=60)
    names = [m.model for m in client.list().models]
    assert set(names) == expected and len(names) == len(set(names))


def test_status_shows_each_upstream(world: World) -> None:
    flat = world.front.http.get("/engines/status").json()
    assert flat["second"].startswith("Running (upstream runnerd")
    assert flat["dead"].startswith("Running")  # as last polled
    detail = world.front.http.get("/engines/status", params={"upstreams": "1"}).json()["upstreams"]
    assert detail["second"]["models"] == ["remote-tiny:latest"]
    assert detail["second-unix"]["models"] == ["remote-tiny:latest"]  # from /api/tags
    assert detail["second-unix"]["kind"] == "ollama"
    assert "embeddings" not in detail["tgi"]["capabilities"]
    cli = subprocess.run([*_cli(), "status", "--socket", str(world.front.socket)], capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "upstream llamacpp" in cli.stdout and "second" in cli.stdout


def _cli() -> list[str]:
    return [sys.executable, "-m", "runnerd.cli"]


def test_openai_client_chats_to_both_upstreams(world: World) -> None:
    client = world.front.openai("/v1")
    raw = client.chat.completions.with_raw_response.create(model="remote-tiny", messages=CHAT, **ANSWER)
    assert raw.headers["x-runnerd-source"] == "second"
    via_front = raw.parse().choices[0].message.content
    direct = world.second.openai("/v1").chat.completions.create(model="remote-tiny", messages=CHAT, **ANSWER)
    assert via_front and via_front == direct.choices[0].message.content
    # Nothing was loaded on the front daemon (the tests before this one load nothing here): the second ran it.
    assert world.front.ps() == []
    assert [r["model"] for r in world.second.ps()] == ["remote-tiny:latest"]

    raw = client.chat.completions.with_raw_response.create(model="via-unix", messages=CHAT, **ANSWER)
    assert raw.headers["x-runnerd-source"] == "second-unix"
    assert raw.parse().choices[0].message.content == via_front

    raw = client.chat.completions.with_raw_response.create(model="shared", messages=CHAT, **ANSWER)
    assert raw.headers["x-runnerd-source"] == "bare"  # "dead" comes first by priority, and is stopped
    assert raw.parse().choices[0].message.content == _direct(world)


def test_ollama_client_chats_to_both_upstreams(world: World) -> None:
    client = ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(world.front.socket)),
                           timeout=60)
    options = {"num_predict": ANSWER["max_tokens"], "temperature": 0, "seed": 1}
    second = world.second.openai("/v1")
    expected = {
        "remote-tiny": (second.chat.completions.create(model="remote-tiny", messages=CHAT, **ANSWER)
                        .choices[0].message.content,
                        _streamed(second.chat.completions.create(model="remote-tiny", messages=CHAT, stream=True,
                                                                 **ANSWER))),
        "shared": (_direct(world), _direct_stream(world)),
    }
    for model, (whole_text, streamed_text) in expected.items():
        whole = client.chat(model=model, messages=CHAT, options=options, stream=False)
        parts = "".join(p.message.content or "" for p in client.chat(model=model, messages=CHAT, options=options,
                                                                      stream=True))
        assert whole.model == model
        assert whole.message.content and whole.message.content == whole_text
        assert parts == streamed_text
    generated = client.generate(model="remote-tiny", prompt="hello", options=options, stream=False)
    assert generated.response and generated.done


# ---------------------------------------------------------------- failover


def test_a_stopped_upstream_fails_over_stream_and_whole(world: World) -> None:
    client = world.front.openai("/v1")
    with client.chat.completions.with_streaming_response.create(model="shared", messages=CHAT, stream=True,
                                                                **ANSWER) as resp:
        assert resp.status_code == 200 and resp.headers["x-runnerd-source"] == "bare"
        text = _streamed(resp.parse())
    assert text == _direct_stream(world)


def test_a_500_fails_over(world: World) -> None:
    failing = world.standins["failing"]
    before = len(failing.inference_requests())
    raw = world.front.openai("/v1").chat.completions.with_raw_response.create(model="via-500", messages=CHAT,
                                                                               **ANSWER)
    assert raw.status_code == 200 and raw.headers["x-runnerd-source"] == "bare"
    assert raw.parse().choices[0].message.content == _direct(world)
    assert failing.inference_requests()[before:] == ["/v1/chat/completions"]  # it was tried first


def test_a_timeout_before_the_first_byte_fails_over(world: World) -> None:
    slow = world.standins["slow"]
    before = len(slow.inference_requests())
    with world.front.openai("/v1").chat.completions.with_streaming_response.create(
            model="via-slow", messages=CHAT, stream=True, **ANSWER) as resp:
        assert resp.status_code == 200 and resp.headers["x-runnerd-source"] == "bare"
        text = _streamed(resp.parse())
    assert text == _direct_stream(world)
    assert len(slow.inference_requests()) == before + 1


def test_a_stream_is_held_until_its_first_chunk(world: World) -> None:
    """The `cut` stand-in sends a 200 event-stream status line and hangs up before its first byte: the
    client gets the next source's whole stream, not that status line."""
    cut = world.standins["cut"]
    before = len(cut.inference_requests())
    with world.front.openai("/v1").chat.completions.with_streaming_response.create(
            model="via-cut", messages=CHAT, stream=True, **ANSWER) as resp:
        assert resp.headers["x-runnerd-source"] == "bare"
        text = _streamed(resp.parse())
    assert text == _direct_stream(world)
    assert len(cut.inference_requests()) == before + 1


def test_no_failover_after_the_first_byte(world: World) -> None:
    """The `half` stand-in sends one chunk then hangs up: the stream ends with an error event, and nothing
    from another source follows the stand-in's chunk."""
    seen: list[str] = []
    stream = world.front.openai("/v1").chat.completions.create(model="via-half", messages=CHAT, stream=True, **ANSWER)
    with pytest.raises(openai.APIError, match="half"):
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert seen == [PARTIAL]


def test_no_source_left_is_a_clean_502(world: World) -> None:
    front = world.front
    for stream in (False, True):
        resp = front.post("/v1/chat/completions", {"model": "nowhere", "messages": CHAT, "stream": stream})
        assert resp.status_code == 502, resp.text
        error = resp.json()["error"]
        assert error["code"] == "upstream_unavailable"
        assert "dead" in error["message"] and "failing" in error["message"]
    resp = front.post("/api/chat", {"model": "nowhere", "messages": CHAT, "stream": True})
    assert resp.status_code == 502
    assert isinstance(resp.json()["error"], str) and "no source could serve" in resp.json()["error"]
    with pytest.raises(openai.InternalServerError) as refused:
        front.openai("/v1").chat.completions.create(model="nowhere", messages=CHAT, stream=True, **ANSWER)
    assert refused.value.status_code == 502


# ---------------------------------------------------------------- capabilities and unknown models


def test_a_capability_the_kind_lacks_is_501_before_any_traffic(world: World) -> None:
    tgi = world.standins["tgi"]
    before = list(tgi.seen)
    resp = world.front.post("/v1/embeddings", {"model": "tgi-model", "input": "hello"})
    assert resp.status_code == 501, resp.text
    assert resp.json()["error"]["code"] == "capability_not_supported"
    assert "embeddings" in resp.json()["error"]["message"] and "tgi" in resp.json()["error"]["message"]
    assert tgi.seen == before  # nothing reached the endpoint
    # The endpoint itself answers what its kind serves.
    chat = world.front.post("/v1/chat/completions", {"model": "tgi-model", "messages": CHAT})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "tgi"


def test_a_model_no_source_hosts_answers_as_today(world: World) -> None:
    """The second daemon has no upstreams: its answer is today's answer for an unknown model."""
    body = {"model": "nope", "messages": CHAT, "max_tokens": 4, "input": "hi"}
    for path in ("/v1/chat/completions", "/api/chat", "/v1/messages", "/v1/responses", "/api/show"):
        here, today = world.front.post(path, body), world.second.post(path, body)
        assert (here.status_code, here.json()) == (today.status_code, today.json())
        assert here.status_code == 404


def test_a_token_sees_and_reaches_only_its_models_whatever_their_source(world: World) -> None:
    """A user token limited to `shared*`: the union it is shown holds only those names, and an upstream's
    model outside its patterns is answered exactly as a model that exists nowhere."""
    with httpx2.Client(base_url=f"http://127.0.0.1:{world.front_port}", timeout=120,
                       headers={"Authorization": f"Bearer {SCOPED_TOKEN}"}) as tcp:
        assert set(_ids(tcp.get("/v1/models"))) == {"shared", "shared-embed"}
        assert {m["name"] for m in tcp.get("/api/tags").json()["models"]} == {"shared", "shared-embed"}
        resp = tcp.post("/v1/chat/completions", json={"model": "shared", "messages": CHAT, **ANSWER})
        assert resp.status_code == 200, resp.text
        for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/api/chat", {"messages": CHAT}),
                           ("/v1/messages", {"messages": CHAT, "max_tokens": 4}), ("/v1/responses", {"input": "hi"}),
                           ("/api/embed", {"input": "hi"}), ("/api/show", {})):
            hidden = tcp.post(path, json={"model": "remote-tiny", **body})  # on the second daemon
            absent = tcp.post(path, json={"model": "remote-none", **body})  # nowhere, same length
            assert hidden.status_code == absent.status_code == 404, (hidden.text, absent.text)
            assert hidden.content.replace(b"remote-tiny", b"remote-none") == absent.content


def test_a_request_from_another_daemon_sees_local_models_only(world: World) -> None:
    """Two daemons that are each other's upstreams must not pass a request back and forth: what one
    daemon sends its upstreams is answered from the receiver's own models."""
    via = {"X-Runnerd-Upstream": "1"}
    assert _ids(world.front.http.get("/v1/models", headers=via)) == ["tiny:latest"]
    assert [m["name"] for m in world.front.http.get("/api/tags", headers=via).json()["models"]] == ["tiny:latest"]
    resp = world.front.post("/v1/chat/completions", {"model": "shared", "messages": CHAT}, headers=via)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    for path, body in (("/v1/messages", {"model": "shared", "max_tokens": 4, "messages": CHAT}),
                       ("/v1/responses", {"model": "shared", "input": "hi"}),
                       ("/api/embed", {"model": "shared-embed", "input": "hi"}),
                       ("/api/show", {"model": "remote-tiny"})):
        assert world.front.post(path, body, headers=via).status_code == 404, path


def test_aliases_try_their_candidates_in_order(world: World) -> None:
    client = world.front.openai("/v1")
    # The local model first: served here (no upstream named as the source), by a runner of this daemon.
    raw = client.chat.completions.with_raw_response.create(model="local-first", messages=CHAT, **ANSWER)
    assert raw.status_code == 200 and "x-runnerd-source" not in raw.headers
    assert [r["model"] for r in world.front.ps()] == ["tiny:latest"]
    # A local target that is not stored is passed over.
    raw = client.chat.completions.with_raw_response.create(model="ghost-first", messages=CHAT, **ANSWER)
    assert raw.headers["x-runnerd-source"] == "bare"
    assert raw.parse().choices[0].message.content == _direct(world)
    # A preload never reaches an upstream: only local models load.
    preload = world.front.post("/v1/chat/completions", {"model": "shared", "messages": CHAT},
                               headers={"X-Preload-Only": "true"})
    assert preload.status_code == 404


# ---------------------------------------------------------------- hostile settings


@pytest.mark.parametrize(("table", "fragment"), [
    ('[[upstreams]]\nname = "a"\nkind = "triton"\nbase_url = "http://127.0.0.1:1"', "unknown kind 'triton'"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "ftp://host/x"', "expected http(s)://"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "http://user:pw@host"', "no credentials"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "unix:relative.sock"', "absolute path"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "http://h:99999"', "http://h:99999"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "http://h"\n'
     '[[upstreams]]\nname = "a"\nkind = "tgi"\nbase_url = "http://g"', "two upstreams are named 'a'"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "http://h"\npriority = 5000', "priority"),
    ('[[upstreams]]\nname = "local"\nkind = "vllm"\nbase_url = "http://h"', "'local' is reserved"),
    ('[[upstreams]]\nname = "A b"\nkind = "vllm"\nbase_url = "http://h"', "not a valid upstream name"),
    ('[[upstreams]]\nname = "a"\nkind = "vllm"\nbase_url = "http://h"\ncapabilities = {telepathy = true}',
     "capabilities"),
    ('[aliases]\nx = [{source = "ghost", model = "m"}]', "aliases.x: unknown source 'ghost'"),
    ('[aliases]\nx = []', "at least one"),
])
def test_hostile_upstream_settings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str,
                                               fragment: str) -> None:
    monkeypatch.delenv("RUNNERD_CONFIG", raising=False)
    path = tmp_path / "runnerd.toml"
    path.write_text(table + "\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    assert fragment in str(refused.value)


def test_a_daemon_with_an_unreadable_upstream_token_refuses_to_start(make_daemon: Any, tmp_path: Path) -> None:
    config = tmp_path / "runnerd.toml"
    config.write_text(f'[[upstreams]]\nname = "a"\nkind = "runnerd"\nbase_url = "http://127.0.0.1:1"\n'
                      f'token_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(RuntimeError, match="upstream a: cannot read token file"):
        make_daemon(args=["--config", str(config)])


def test_the_readme_example_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### External endpoints"):]
    example = section[section.index("```toml") + len("```toml"):section.index("```\n", section.index("```toml") + 7)]
    monkeypatch.delenv("RUNNERD_CONFIG", raising=False)
    path = tmp_path / "runnerd.toml"
    path.write_text(example)
    path.chmod(0o600)
    settings = load_settings(path)
    assert [u.name for u in settings.upstreams] == ["gpu-box", "ollama"]
    assert settings.aliases["chat"][1].source == "local"
    # The kind table says what the profiles say.
    order = ["chat", "completions", "embeddings", "rerank", "streaming", "tools"]
    for kind, profile in KINDS.items():
        caps = ", ".join(c for c in order if c in profile.capabilities)
        relayed = ", ".join(sorted(profile.native_apis)) or "-"
        assert f"| `{kind}` | `{profile.health_path}` | `{profile.models_path}` | {caps} | {relayed} |" in section, kind


# ---------------------------------------------------------------- Messages and Responses


# This SDK's create() takes no temperature: it goes in the body as an extra field, which the route reads.
GREEDY = {"temperature": 0}


def _claude(world: World) -> anthropic.Anthropic:
    return anthropic_client(world.front)


def _message_text(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def _answered(d: Daemon, route: str) -> float:
    """How many requests the daemon answered on `route`, by its own /metrics."""
    text = d.http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("runnerd_requests_total{") and f'route="{route}"' in line)


def test_messages_reach_both_upstreams(world: World) -> None:
    claude = _claude(world)
    second = world.second.openai("/v1")
    # Both kinds serve Messages themselves: the request reaches the second daemon's /v1/messages (which
    # relays it to its llama-server's), not its chat completions.
    before = {route: _answered(world.second, route) for route in ("/v1/messages", "/v1/chat/completions")}
    raw = claude.messages.with_raw_response.create(model="remote-tiny", max_tokens=6, messages=CHAT,
                                                   extra_body=GREEDY)
    with claude.messages.stream(model="remote-tiny", max_tokens=6, messages=CHAT, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
    assert raw.headers["x-runnerd-source"] == "second" and raw.parse().model == "remote-tiny"
    assert _answered(world.second, "/v1/messages") == before["/v1/messages"] + 2
    assert _answered(world.second, "/v1/chat/completions") == before["/v1/chat/completions"]
    # What the second daemon answers its own clients, streamed and not.
    direct = anthropic_client(world.second)
    assert _message_text(raw.parse()) == _message_text(direct.messages.create(
        model="remote-tiny", max_tokens=6, messages=CHAT, extra_body=GREEDY))  # type: ignore[arg-type]
    with direct.messages.stream(model="remote-tiny", max_tokens=6, messages=CHAT, extra_body=GREEDY) as stream:
        assert streamed == "".join(stream.text_stream)
    for model, source, direct in (
            ("remote-tiny", "second", second.chat.completions.create(model="remote-tiny", messages=CHAT, **ANSWER)
             .choices[0].message.content),
            ("shared", "bare", _direct(world))):
        raw = claude.messages.with_raw_response.create(model=model, max_tokens=6, messages=CHAT, extra_body=GREEDY)
        assert raw.headers["x-runnerd-source"] == source
        message = raw.parse()
        assert message.model == model and message.stop_reason == "max_tokens"
        assert _message_text(message) and _message_text(message) == direct
    # Streamed, the first upstream ("dead") is stopped: the events come whole from "bare".
    with claude.messages.with_streaming_response.create(model="shared", max_tokens=6, messages=CHAT, stream=True,
                                                        extra_body=GREEDY) as resp:
        assert resp.headers["x-runnerd-source"] == "bare"
        events = list(resp.parse())
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text == _direct_stream(world)


def test_messages_fail_over_and_end_in_their_own_shape(world: World) -> None:
    claude = _claude(world)
    cut = world.standins["cut"]
    before = len(cut.inference_requests())
    with claude.messages.stream(model="via-cut", max_tokens=6, messages=CHAT, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
    assert text == _direct_stream(world) and len(cut.inference_requests()) == before + 1
    # After the first chunk there is no failover: Anthropic's error event ends the stream.
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError, match="half"), \
            claude.messages.stream(model="via-half", max_tokens=6, messages=CHAT) as stream:
        seen.extend(stream.text_stream)
    assert seen == [PARTIAL]
    for stream_it in (False, True):
        resp = world.front.post("/v1/messages", {"model": "nowhere", "max_tokens": 6, "messages": CHAT,
                                                 "stream": stream_it})
        assert resp.status_code == 502, resp.text
        body = resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert "dead" in body["error"]["message"] and "failing" in body["error"]["message"]


def test_a_capability_the_kind_lacks_is_501_on_every_route(world: World) -> None:
    tgi = world.standins["tgi"]
    before = list(tgi.seen)
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {}}}
    with pytest.raises(anthropic.APIStatusError) as refused:
        _claude(world).messages.create(model="tgi-model", max_tokens=6, messages=CHAT, tools=[tool])  # type: ignore
    assert refused.value.status_code == 501 and "tools" in str(refused.value)
    with pytest.raises(openai.APIStatusError) as refused_too:
        world.front.openai("/v1").responses.create(model="tgi-model", input="hi", tools=[
            {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}])
    assert refused_too.value.status_code == 501
    embed = world.front.post("/api/embed", {"model": "tgi-model", "input": "hello"})
    assert embed.status_code == 501 and "embeddings" in embed.json()["error"]
    assert tgi.seen == before  # nothing reached the endpoint
    # Without tools the endpoint answers.
    message = _claude(world).messages.create(model="tgi-model", max_tokens=6, messages=CHAT)  # type: ignore
    assert _message_text(message) == "tgi"


def test_responses_reach_upstreams_and_are_stored(world: World) -> None:
    client = world.front.openai("/v1")
    raw = client.responses.with_raw_response.create(model="remote-tiny", input="hello world", max_output_tokens=6,
                                                    temperature=0)
    assert raw.headers["x-runnerd-source"] == "second"
    first = raw.parse()
    second = world.second.openai("/v1").chat.completions.create(model="remote-tiny", messages=CHAT, **ANSWER)
    assert first.output_text and first.output_text == second.choices[0].message.content
    # Stored here, as for a local engine: it can be read back and continued, on another upstream too.
    assert client.responses.retrieve(first.id).output_text == first.output_text
    with client.responses.with_streaming_response.create(model="shared", input="and then", max_output_tokens=6,
                                                         temperature=0, previous_response_id=first.id,
                                                         stream=True) as resp:
        assert resp.headers["x-runnerd-source"] == "bare"
        events = list(resp.parse())
    done = events[-1]
    assert done.type == "response.incomplete"  # at max_output_tokens; stored all the same
    direct = world.bare.openai().chat.completions.create(
        model="shared", messages=[*CHAT, {"role": "assistant", "content": first.output_text},
                                  {"role": "user", "content": "and then"}], stream=True, **ANSWER)
    assert done.response.output_text == _streamed(direct)
    items = client.responses.input_items.list(done.response.id)
    assert [i.content[0].text for i in items.data if i.type == "message"] == ["and then"]  # type: ignore[union-attr]
    resp = world.front.post("/v1/responses", {"model": "nowhere", "input": "hi"})
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_unavailable"


# ---------------------------------------------------------------- Ollama's other routes


def _ollama(world: World) -> ollama.Client:
    return ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(world.front.socket)), timeout=60)


def test_ollama_embed_reaches_both_upstreams(world: World) -> None:
    client = _ollama(world)
    via_second = client.embed(model="remote-tiny", input=["hello", "the world"])
    direct = ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(world.second.socket)),
                           timeout=60).embed(model="remote-tiny", input=["hello", "the world"])
    assert len(via_second.embeddings) == 2 and via_second.embeddings == direct.embeddings
    via_bare = client.embed(model="shared-embed", input="hello")
    own = httpx2.post(f"{world.bare_embed.base_url}/v1/embeddings", json={"model": "shared-embed", "input": "hello"},
                      timeout=60).json()
    assert via_bare.model == "shared-embed" and via_bare.embeddings == [own["data"][0]["embedding"]]
    older = world.front.post("/api/embeddings", {"model": "shared-embed", "prompt": "hello"})
    assert older.status_code == 200 and older.json()["embedding"] == own["data"][0]["embedding"]


def test_ollama_show_relays_or_says_what_discovery_knows(world: World) -> None:
    client = _ollama(world)
    relayed = world.front.post("/api/show", {"model": "remote-tiny"})
    assert relayed.status_code == 200 and relayed.headers["x-runnerd-source"] == "second"
    assert relayed.json() == world.second.post("/api/show", {"model": "remote-tiny"}).json()
    assert client.show("remote-tiny").modelinfo  # the second daemon read the file's header
    minimal = client.show("tgi-model")  # a kind without Ollama's API: what its profile says
    assert minimal.capabilities == ["completion"] and minimal.modelinfo == {}
    assert world.front.post("/api/show", {"model": "nope"}).status_code == 404


def test_ollama_load_of_an_upstream_model_sends_nothing(world: World) -> None:
    tgi = world.standins["tgi"]
    before = list(tgi.seen)
    client = _ollama(world)
    loaded = client.chat(model="tgi-model", messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    unloaded = client.generate(model="tgi-model", prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert client.embed(model="tgi-model", input=[]).embeddings == []
    assert tgi.seen == before


def test_ollama_ps_shows_models_loaded_on_upstreams(world: World) -> None:
    client = _ollama(world)
    client.chat(model="remote-tiny", messages=CHAT, options={"num_predict": 2})
    names = [m.model for m in client.ps().models]
    assert "remote-tiny:latest" in [r["model"] for r in world.second.ps()]
    assert names.count("remote-tiny:latest") == 1  # loaded on "second", seen through it and "second-unix"
    via = world.front.http.get("/api/ps", headers={"X-Runnerd-Upstream": "1"}).json()["models"]
    assert "remote-tiny:latest" not in [m["name"] for m in via]


# ---------------------------------------------------------------- discovery as it happens


@dataclass
class Late:
    front: Daemon
    upstream: StandinUpstream


@pytest.fixture(scope="module")
def late(llama_server: Path, tiny_model: Path) -> Iterator[Late]:
    """A daemon whose only upstream is slow to answer its first model list, polled every second, and whose
    local engine cannot start (its llama-server does not exist)."""
    root = Path(tempfile.mkdtemp(prefix="rdl-", dir="/tmp"))
    upstream = StandinUpstream("plain", "plain", ["early", "twin"], first_listing_delay=2)
    front: Daemon | None = None
    try:
        config = root / "late.toml"
        config.write_text(f'[routing]\ndiscovery_interval = 1\n[[upstreams]]\nname = "plain"\nkind = "openai"\n'
                          f'base_url = "{upstream.base_url}"\n')
        (root / "front").mkdir()
        front = Daemon(root / "front", llama_server, {"twin": tiny_model},
                       {"RUNNERD_LLAMA_SERVER": str(root / "no-such-llama-server")}, ["--config", str(config)])
        yield Late(front, upstream)
    finally:
        if front is not None:
            front.stop()
        upstream.close()
        shutil.rmtree(root, ignore_errors=True)


def test_requests_and_lists_wait_for_the_first_poll(late: Late) -> None:
    """Right after start the first poll is still waiting for the model list: a request for the upstream's
    model and a listing wait for it instead of answering not-found."""
    with ThreadPoolExecutor(2) as pool:
        listing = pool.submit(late.front.http.get, "/v1/models")
        chat = pool.submit(late.front.post, "/v1/chat/completions", {"model": "early", "messages": CHAT})
        assert chat.result().status_code == 200, chat.result().text
        assert chat.result().json()["choices"][0]["message"]["content"] == "plain"
        assert "early" in _ids(listing.result())


def test_a_model_added_upstream_appears_on_a_later_poll(late: Late) -> None:
    _ids(late.front.http.get("/v1/models"))  # after the first poll
    late.upstream.models.append("later")
    deadline = time.monotonic() + 30
    while "later" not in _ids(late.front.http.get("/v1/models")):
        assert time.monotonic() < deadline, "the added model never showed"
        time.sleep(0.2)
    message = anthropic_client(late.front).messages.create(model="later", max_tokens=6, messages=CHAT)
    assert _message_text(message) == "plain"


def test_a_local_engine_that_cannot_start_fails_over_to_an_upstream(late: Late) -> None:
    """`twin` is stored here and hosted upstream; local first, its engine cannot start (503 before any
    answer): every route answers from the upstream (Ollama's too, the stand-in answering whole JSON)."""
    # A model stored here does not wait for the first poll: until it ends, its upstreams are unknown.
    assert "twin:latest" in _ids(late.front.http.get("/v1/models"))
    before = len(late.upstream.inference_requests())
    chat = late.front.post("/v1/chat/completions", {"model": "twin", "messages": CHAT})
    assert chat.status_code == 200 and chat.headers["x-runnerd-source"] == "plain", chat.text
    message = anthropic_client(late.front).messages.with_raw_response.create(model="twin", max_tokens=6,
                                                                             messages=CHAT)
    assert message.headers["x-runnerd-source"] == "plain" and _message_text(message.parse()) == "plain"
    response = late.front.openai("/v1").responses.create(model="twin", input="hi")
    assert response.output_text == "plain"
    ollama_chat = late.front.post("/api/chat", {"model": "twin", "messages": CHAT, "stream": False})
    assert ollama_chat.status_code == 200 and ollama_chat.json()["message"]["content"] == "plain", ollama_chat.text
    assert len(late.upstream.inference_requests()) == before + 4
