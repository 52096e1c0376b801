"""Discovery of one external endpoint against small servers on loopback ports (stand-ins: each answers
its model list in one way a real runtime could, well or badly)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from backends.base import Capability
from backends.external import ExternalEndpoint, UpstreamSpec
from tests.conftest import app_on_loopback

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    async with app_on_loopback(app) as port:
        yield f"http://127.0.0.1:{port}"


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def answer(body: bytes, status: int = 200) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")
    return handler


def endpoint(url: str, kind: str = "vllm", token: str | None = None, **extra: object) -> ExternalEndpoint:
    return ExternalEndpoint(UpstreamSpec.model_validate({"name": "e", "kind": kind, "base_url": url, **extra}), token)


async def test_models_are_listed_once_each_with_the_token_sent() -> None:
    seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"data": [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": 7}, {"nope": 1}, "x"]})

    async with serving({"/health": ok, "/v1/models": models}) as url:
        e = endpoint(url, token="s3cret")
        found = await e.poll()
        await e.close()
    assert found.healthy and found.error is None and found.models == ("a", "b")
    assert seen == ["Bearer s3cret"]


async def test_an_ollama_kind_lists_from_api_tags() -> None:
    tags = answer(json.dumps({"models": [{"name": "llama3:8b"}, {"name": "qwen"}]}).encode())
    async with serving({"/api/version": ok, "/api/tags": tags}) as url:
        e = endpoint(url, kind="ollama")
        found = await e.poll()
        await e.close()
    assert found.models == ("llama3:8b", "qwen")


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"<html>", 200, "did not answer JSON"),
    (b'{"object": "list"}', 200, "'data' missing"),
    (b'{"error": "no"}', 401, "answered 401"),
    (b'{"data": [' + b'{"id": "m"},' * 400_000 + b'{"id": "m"}]}', 200, "more than"),
])
async def test_a_bad_model_list_leaves_the_endpoint_unhealthy_with_the_reason(body: bytes, status: int,
                                                                              fragment: str) -> None:
    async with serving({"/health": ok, "/v1/models": answer(body, status)}) as url:
        e = endpoint(url)
        found = await e.poll()
        await e.close()
    assert not found.healthy and found.models == () and found.error is not None and fragment in found.error


async def test_a_failed_health_check_lists_nothing() -> None:
    async with serving({"/health": answer(b"{}", 503), "/v1/models": answer(b'{"data": [{"id": "m"}]}')}) as url:
        e = endpoint(url)
        found = await e.poll()
        await e.close()
    assert not found.healthy and found.models == () and "health" in (found.error or "")


async def test_an_endpoint_that_is_not_there() -> None:
    e = endpoint("http://127.0.0.1:9", discovery_timeout=2)
    found = await e.poll()
    await e.close()
    assert not found.healthy and found.models == ()


def test_capability_overrides() -> None:
    spec = UpstreamSpec(name="t", kind="tgi", base_url="http://h",
                        capabilities={Capability.EMBEDDINGS: True, Capability.TOOLS: False})
    assert Capability.EMBEDDINGS in spec.effective_capabilities()
    assert Capability.TOOLS not in spec.effective_capabilities()
    assert Capability.RERANK not in spec.effective_capabilities()
