"""Ollama's API driven by the official `ollama` client (and the `openai` client for the OpenAI
surface), unmodified, against a real daemon serving the real llama-server."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import ollama
import pytest

from backends.base import Capability, ModelFormat
from runnerd.api.ollama import models as ollama_routes
from runnerd.store import ModelEntry
from tests.conftest import app_on_loopback

pytestmark = pytest.mark.engine

# Random weights may end at once: ignore EOS (a llama-server option runnerd passes through) for exact counts.
EXACT = {"num_predict": 4, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def client(daemon) -> Iterator[ollama.Client]:
    c = ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def file_server(tiny_model: Path, tmp_path_factory) -> Iterator[str]:
    """A local HTTP server holding a copy of the tiny model, to pull from."""
    root = tmp_path_factory.mktemp("served")
    shutil.copy(tiny_model, root / "pulled-tiny.gguf")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def completion_runners(daemon) -> list[dict]:
    return [r for r in daemon.ps() if r["model"] == "tiny:latest" and r["mode"] == "completion"]


def test_version_list_and_show(client):
    assert client._client.get("/api/version").json()["version"]
    listed = client.list()
    tiny = next(m for m in listed.models if m.model == "tiny:latest")
    assert tiny.size and tiny.size > 0
    assert tiny.details is not None and tiny.details.format == "gguf" and tiny.details.family == "llama"
    assert tiny.details.parameter_size and tiny.details.quantization_level == "F32"
    shown = client.show("tiny")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 4096
    assert "num_ctx" in (shown.parameters or "")
    assert shown.capabilities is not None and "completion" in shown.capabilities


def test_chat_not_streamed_has_engine_timings(client):
    out = client.chat(model="tiny", messages=CHAT, stream=False, options=EXACT)
    assert out.message.role == "assistant" and isinstance(out.message.content, str)
    assert out.done is True and out.done_reason == "length"
    assert out.eval_count == 4
    assert out.prompt_eval_count and out.prompt_eval_count > 0
    assert out.eval_duration and out.eval_duration > 0 and out.prompt_eval_duration is not None
    assert out.total_duration and out.total_duration >= out.eval_duration
    assert out.load_duration is not None


def test_chat_streamed(client):
    parts = list(client.chat(model="tiny", messages=CHAT, stream=True, options=EXACT))
    assert parts[-1].done is True and parts[-1].eval_count == 4 and parts[-1].done_reason == "length"
    assert all(p.done is False for p in parts[:-1]) and len(parts) >= 2
    text = "".join(p.message.content or "" for p in parts)
    assert text  # four tokens of something


def test_chat_with_tools_history_and_think_is_accepted(client):
    def weather(city: str) -> str:
        """The weather in a city.

        Args:
          city: the city
        """
        return "12 C"

    history = [*CHAT, {"role": "assistant", "content": "",
                       "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "content": "12 C", "tool_name": "weather"}]
    out = client.chat(model="tiny", messages=history, tools=[weather], think=False, stream=False, options=EXACT)
    assert out.done and out.eval_count == 4


def test_generate_streamed_and_not(client):
    out = client.generate(model="tiny", prompt="the world is", stream=False, options=EXACT)
    assert out.done and out.eval_count == 4 and isinstance(out.response, str)
    parts = list(client.generate(model="tiny", prompt="the world is", stream=True, options=EXACT))
    assert parts[-1].done and parts[-1].eval_count == 4
    raw = client.generate(model="tiny", prompt="the world is", raw=True, stream=False, options=EXACT)
    assert raw.eval_count == 4


def test_raw_generate_refuses_images_instead_of_dropping_them(daemon):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n rest").decode()
    resp = daemon.post("/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "images": [png]})
    assert resp.status_code == 400 and "raw" in resp.json()["error"] and "images" in resp.json()["error"]


def test_embed_and_embeddings(client):
    out = client.embed(model="tiny", input=["hello", "the world"])
    assert [len(v) for v in out.embeddings] == [64, 64]
    assert out.embeddings[0] != out.embeddings[1]
    assert out.prompt_eval_count and out.prompt_eval_count > 0
    single = client.embeddings(model="tiny", prompt="hello")
    assert len(single.embedding) == 64
    short = client.embed(model="tiny", input="hello", dimensions=8)
    assert len(short.embeddings[0]) == 8


def test_empty_embeddings_prompt_loads_but_knows_the_model(client, daemon):
    assert daemon.post("/api/embeddings", {"model": "tiny", "prompt": ""}).json() == {"embedding": []}
    assert any(r["model"] == "tiny:latest" and r["mode"] == "embedding" for r in daemon.ps())
    with pytest.raises(ollama.ResponseError) as err:
        client.embeddings(model="ghost", prompt="")
    assert err.value.status_code == 404 and "not found" in err.value.error


class ChatBackend:
    """Only what /api/show's capability list reads of a backend."""

    name = "chat"
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETIONS, Capability.TOOLS})
    model_formats = frozenset({ModelFormat.GGUF})


@pytest.mark.parametrize(("mmproj", "template", "extra"), [
    (None, "{{ messages }}", []),
    ("/m/mmproj.gguf", "{{ messages }}", ["vision"]),
    (None, "{% if enable_thinking %}<think>{% endif %}", ["thinking"]),
    (None, "{{ '<|start|>system' }}Reasoning: {{ reasoning_effort }}", ["thinking"]),
    ("/m/mmproj.gguf", "{% for tool in tools %}<think>", ["tools", "vision", "thinking"]),
])
def test_show_capabilities_vision_and_thinking(mmproj, template, extra):
    # No stored configuration: the backend is chosen by the model's format.
    d = SimpleNamespace(backends={"chat": ChatBackend()}, configs=SimpleNamespace(get=lambda model, mode: None))
    model = ModelEntry(name="m:latest", path=Path("/m/model.gguf"), size=1,
                       mmproj=Path(mmproj) if mmproj else None)
    assert ollama_routes._capabilities(d, model, template) == ["completion", *extra]  # type: ignore[arg-type]


def test_errors_have_ollama_shape_and_codes(client, daemon):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=CHAT, stream=False)
    assert err.value.status_code == 404 and "not found" in err.value.error
    raw = daemon.http.post("/api/generate", content=b"{not json")
    assert raw.status_code == 400 and isinstance(raw.json()["error"], str)
    bad = daemon.post("/api/chat", {"model": "tiny", "messages": CHAT, "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
    assert daemon.http.get("/api/nothing").json() == {"error": "no such route"}


def test_keep_alive_zero_unloads_and_empty_generate_loads(client, daemon):
    loaded = client.generate(model="tiny", keep_alive="5m")
    assert loaded.done and loaded.done_reason == "load"
    assert completion_runners(daemon)
    running = client.ps()
    assert any(m.model == "tiny:latest" and m.context_length for m in running.models)
    gone = client.generate(model="tiny", keep_alive=0)
    assert gone.done_reason == "unload"
    assert not completion_runners(daemon)
    # keep_alive 0 on a real request: the runner goes once the answer is out.
    client.chat(model="tiny", messages=CHAT, stream=False, options=EXACT, keep_alive=0)
    daemon.wait_for(lambda: not completion_runners(daemon), what="runner unloaded after keep_alive 0")


def test_num_ctx_becomes_the_configured_context(client, daemon):
    client.chat(model="tiny", messages=CHAT, stream=False, options=EXACT)
    assert any(m.model == "tiny:latest" and m.context_length == 512 for m in client.ps().models)
    before = {r["pid"] for r in completion_runners(daemon)}
    client.chat(model="tiny", messages=CHAT, stream=False, options={**EXACT, "num_ctx": 1024})
    assert {r["pid"] for r in completion_runners(daemon)}.isdisjoint(before)  # the idle runner restarted
    ps = client.ps()
    assert any(m.model == "tiny:latest" and m.context_length == 1024 for m in ps.models)
    stored = daemon.http.get("/engines/_configure", params={"model": "tiny"}).json()["configurations"]
    assert stored[0]["config"]["context_size"] == 1024


def test_pull_copy_delete(client, file_server):
    progress = list(client.pull(f"{file_server}/pulled-tiny.gguf", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.completed for p in progress if p.total)
    pulled = next(m for m in client.list().models if m.model == "pulled-tiny:latest")
    assert pulled.digest and len(pulled.digest) == 64
    client.copy("pulled-tiny", "copied-tiny")
    assert client.show("copied-tiny").details is not None
    client.delete("copied-tiny")
    client.delete("pulled-tiny")
    names = {m.model for m in client.list().models}
    assert not names & {"pulled-tiny:latest", "copied-tiny:latest"}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("pulled-tiny")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("library/some-model")
    assert err.value.status_code == 400


def test_browser_origins(daemon):
    pre = daemon.http.options("/api/chat", headers={"Origin": "http://localhost:5173",
                                                    "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "content-type"
    ok = daemon.http.get("/v1/models", headers={"Origin": "http://127.0.0.1:8080"})
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"
    evil = daemon.http.options("/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert evil.status_code == 403 and "Access-Control-Allow-Origin" not in evil.headers
    assert daemon.http.get("/api/tags", headers={"Origin": "http://localhost.evil.example"}).status_code == 403


def test_openai_client_surface(daemon):
    client = daemon.openai("/v1")
    assert "tiny:latest" in {m.id for m in client.models.list()}
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    tokens = client.embeddings.create(model="tiny", input=[[1, 2, 3], [4, 5]])
    assert len(tokens.data) == 2


def test_openai_errors_keep_their_shape(daemon):
    r = daemon.post("/v1/chat/completions", {"model": "nope", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_gemma_chat_through_the_ollama_client(make_daemon, gemma_model):
    """A real model with runnerd's fallback chat template: the answer is text, timings are real."""
    d = make_daemon({"gemma3": gemma_model})
    with ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(d.socket)), timeout=120) as c:
        out = c.chat(model="gemma3", messages=[{"role": "user", "content": "Name a color."}], stream=False,
                     options={"num_predict": 8, "temperature": 0, "seed": 1})
        assert out.message.content and out.message.content.strip()
        assert 0 < (out.eval_count or 0) <= 8 and (out.eval_duration or 0) > 0
        assert c.show("gemma3").details.family == "gemma3"  # type: ignore[union-attr]
        # `format` as a JSON schema reaches the engine's grammar: the answer parses and obeys it.
        schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
                  "required": ["color"]}
        shaped = c.chat(model="gemma3", messages=[{"role": "user", "content": "Pick a color."}], stream=False,
                        format=schema, options={"num_predict": 256, "temperature": 0, "seed": 1})
        assert json.loads(shaped.message.content or "")["color"] in {"red", "green", "blue"}
        # format "json" leaves the object's size open (it may run past num_predict): the grammar shows in
        # an answer to a plain question that opens a JSON object.
        plain_json = c.generate(model="gemma3", prompt="Name a color.", format="json", stream=False,
                                options={"num_predict": 16, "temperature": 0, "seed": 1})
        assert plain_json.response.lstrip().startswith("{"), plain_json.response
    # The same through the OpenAI client's response_format.
    answer = d.openai().chat.completions.create(
        model="gemma3", messages=[{"role": "user", "content": "Pick a color."}], max_tokens=256, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert json.loads(answer.choices[0].message.content or "")["color"] in {"red", "green", "blue"}


@pytest.mark.anyio
async def test_capability_the_backend_lacks_is_501_in_ollama_shape(tmp_path, tiny_model):
    from tests.conftest import app_on_socket
    from tests.test_errors import RerankLessBackend

    async with app_on_socket(tmp_path, {"norerank": RerankLessBackend()}, {"tiny": tiny_model}) as c:
        embed = await c.post("/api/embed", json={"model": "tiny", "input": "a"})
        chat = await c.post("/api/chat", json={"model": "tiny", "messages": CHAT})
    assert embed.status_code == 501 and embed.json() == {"error": "backend norerank does not support embeddings"}
    assert chat.status_code == 501 and "streaming" in chat.json()["error"]


@pytest.mark.anyio
async def test_preflight_over_tcp_needs_no_token_and_origins_are_configurable(tmp_path):
    from runnerd.api.auth import HTTP_TOKEN
    from runnerd.config import load_settings
    from runnerd.server import create_app

    settings = load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data",
                             allowed_origins=["https://chat.example"])
    app = create_app(settings, backends={})
    app[HTTP_TOKEN] = "s3cret"
    async with app_on_loopback(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        preflight_headers = {"Origin": "https://chat.example:444", "Access-Control-Request-Method": "GET"}
        preflight = await c.options("/api/tags", headers=preflight_headers)
        no_token = await c.get("/api/tags", headers={"Origin": "https://chat.example"})
        ok = await c.get("/api/tags", headers={"Origin": "https://chat.example", "Authorization": "Bearer s3cret"})
        localhost = await c.get("/api/tags", headers={"Origin": "http://localhost"})

    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://chat.example:444"
    # The browser may read the 401, so the page can tell the user what is wrong.
    assert no_token.status_code == 401 and no_token.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert ok.status_code == 200 and ok.json() == {"models": []}
    assert localhost.status_code == 403, "the configured list replaces the defaults"


@pytest.mark.anyio
async def test_num_ctx_is_stored_off_the_event_loop(tmp_path, tiny_model, llama_server, monkeypatch):
    """Storing a request's num_ctx syncs the configuration file to disk: in a thread, not on the loop that
    relays every other request."""
    from runnerd import configs
    from runnerd.config import load_settings
    from runnerd.engines import default_backends
    from tests.conftest import app_on_socket

    monkeypatch.setenv("RUNNERD_LLAMA_SERVER", str(llama_server))
    monkeypatch.setenv("RUNNERD_LLAMACPP__THREADS", "1")
    writers: list[int] = []
    write = configs.write_atomically

    def recorded(path: Path, data: bytes) -> None:
        writers.append(threading.get_ident())
        write(path, data)

    monkeypatch.setattr(configs, "write_atomically", recorded)
    backends = default_backends(load_settings(data_dir=tmp_path / "data"))
    async with app_on_socket(tmp_path, backends, {"tiny": tiny_model}, default_context_size=512) as client:
        answer = await client.post("/api/chat", json={"model": "tiny", "messages": CHAT, "stream": False,
                                                      "options": {**EXACT, "num_ctx": 1024}})
        assert answer.status_code == 200, answer.text
        stored = (await client.get("/engines/_configure", params={"model": "tiny"})).json()["configurations"]
    assert stored[0]["config"]["context_size"] == 1024
    assert writers and threading.get_ident() not in writers
