"""Every error a client can cause gets the OpenAI error shape and the right status."""

from __future__ import annotations

import logging

import httpx2 as httpx
import pytest
from aiohttp import web

from backends.base import (
    Backend,
    BackendConfiguration,
    BackendState,
    BackendStatus,
    Capability,
    MemoryEstimate,
    Mode,
    ModelFormat,
    ModelRef,
)
from runnerd import server
from runnerd.api import ollama
from tests.conftest import app_on_socket
from tests.tinymodels import write_alien_model

pytestmark = pytest.mark.engine


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_invalid_json(daemon):
    resp = daemon.http.post("/engines/v1/chat/completions", content=b"{not json",
                            headers={"Content-Type": "application/json"})
    assert_openai_error(resp, 400, "invalid_json")
    assert_openai_error(daemon.post("/v1/chat/completions", [1, 2]), 400, "invalid_json")


def test_missing_or_bad_model_field(daemon):
    assert_openai_error(daemon.post("/engines/v1/chat/completions", {"messages": []}), 400, "missing_model", "model")
    assert_openai_error(daemon.post("/engines/v1/embeddings", {"model": 3}), 400, "invalid_model", "model")


def test_unknown_model_and_backend(daemon):
    err = assert_openai_error(daemon.post("/engines/v1/chat/completions", {"model": "ghost", "messages": []}),
                              404, "model_not_found")
    assert "ghost" in err["message"]
    err = assert_openai_error(daemon.post("/engines/nope/v1/chat/completions", {"model": "tiny"}), 404,
                              "backend_not_found")
    assert "nope" in err["message"] and "llama.cpp" in err["message"]
    assert_openai_error(daemon.http.get("/engines/nope/v1/models"), 404, "backend_not_found")


def test_body_too_large(daemon):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    resp = daemon.http.post("/engines/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert_openai_error(resp, 413, "body_too_large")


def test_unknown_route_and_method(daemon):
    assert_openai_error(daemon.http.get("/engines/v1/nothing-here"), 404, "route_not_found")
    assert_openai_error(daemon.http.get("/engines/v1/chat/completions"), 405, "method_not_allowed")


def test_unload_needs_a_target(daemon):
    assert_openai_error(daemon.post("/engines/unload", {}), 400)
    assert_openai_error(daemon.post("/engines/unload", {"models": "tiny"}), 400, param="models")
    assert_openai_error(daemon.post("/engines/unload", {"backend": "vllm2"}), 404, "backend_not_found")


def test_register_rejects_bad_paths_and_names(daemon, tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    cases = [
        ({"name": "x", "path": "relative/model.gguf"}, "must be absolute"),
        ({"name": "x", "path": str(tmp_path / "missing.gguf")}, "cannot read"),
        ({"name": "x", "path": str(tmp_path)}, "has no config.json"),
        ({"name": "x", "path": str(not_gguf)}, "not a usable GGUF"),
        ({"name": "../etc", "path": str(not_gguf)}, "invalid model name"),
        ({"name": "x", "path": "/tmp/a\u0000b"}, "NUL"),
        ({"name": "x"}, "path"),
    ]
    before = daemon.http.get("/models").json()
    for body, fragment in cases:
        resp = daemon.post("/models", body)
        assert resp.status_code == 400, (body, resp.text)
        assert fragment in resp.json()["error"]["message"], (body, resp.text)
    assert daemon.http.get("/models").json() == before


def test_model_the_engine_cannot_load_gives_its_reason(daemon, tmp_path):
    path = write_alien_model(tmp_path / "alien.gguf")
    assert daemon.post("/models", {"name": "alien", "path": str(path)}).status_code == 201
    resp = daemon.post("/engines/v1/completions", {"model": "alien", "prompt": "x"})
    err = assert_openai_error(resp, 500, "runner_model_load_failed")
    assert "nosucharch" in err["message"]
    assert all(r["model"] != "alien:latest" for r in daemon.ps())


class RerankLessBackend(Backend):
    """A backend without rerank support, to exercise the 501 path; it never starts a process
    because the capability check comes first."""

    name = "norerank"
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETIONS})
    model_formats = frozenset({ModelFormat.GGUF})

    async def install(self, progress=None) -> None:
        return None

    async def uninstall(self) -> None:
        return None

    def status(self) -> BackendStatus:
        return BackendStatus(state=BackendState.INSTALLED, version="none")

    def disk_usage(self) -> int:
        return 0

    async def run(self, socket_path, model, mode, config, output) -> None:
        raise AssertionError("never started")

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        return MemoryEstimate.unknown("test backend")


@pytest.mark.anyio
async def test_capability_the_backend_lacks_is_501(tmp_path, tiny_model):
    async with app_on_socket(tmp_path, {"norerank": RerankLessBackend()}, {"tiny": tiny_model}) as client:
        rerank = await client.post("/engines/norerank/rerank", json={"model": "tiny", "query": "q",
                                                                     "documents": ["a"]})
        embeddings = await client.post("/v1/embeddings", json={"model": "tiny", "input": "a"})
        stream = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": [], "stream": True})
    err = assert_openai_error(rerank, 501, "capability_not_supported")
    assert "norerank" in err["message"] and "rerank" in err["message"]
    assert "embeddings" in assert_openai_error(embeddings, 501)["message"]
    assert "streaming" in assert_openai_error(stream, 501)["message"]


@pytest.mark.anyio
async def test_a_bug_in_a_handler_is_a_json_500_in_the_route_shape(tmp_path, monkeypatch, caplog):
    secret = "/secret/path/in/the/message"

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(secret)

    async def broken_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial\n")
        raise RuntimeError(secret)

    # The route tables are built by create_app from these module attributes.
    monkeypatch.setattr(server, "version", broken)
    monkeypatch.setattr(ollama, "version", broken)
    monkeypatch.setattr(ollama, "tags", broken_mid_stream)

    cut: Exception | None = None
    with caplog.at_level(logging.ERROR, logger="runnerd.api"):
        async with app_on_socket(tmp_path, {}) as client:
            openai_shape, ollama_shape = await client.get("/version"), await client.get("/api/version")
            try:
                await client.get("/api/tags")
            except httpx.HTTPError as exc:
                cut = exc
    err = assert_openai_error(openai_shape, 500, "internal_error")
    assert err["type"] == "server_error" and secret not in openai_shape.text
    assert ollama_shape.status_code == 500 and set(ollama_shape.json()) == {"error"}
    assert secret not in ollama_shape.text
    # The traceback is in the daemon's log, with the request it broke.
    logged = [r for r in caplog.records if r.name == "runnerd.api"]
    assert len(logged) == 2 and all(r.exc_info and secret in str(r.exc_info[1]) for r in logged)
    assert "GET /api/version" in logged[1].getMessage()
    # Once a stream has started no second status line can follow: the connection is cut instead.
    assert cut is not None
