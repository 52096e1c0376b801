"""The daemon's front door against hostile requests: JSON no engine can take is a 400 at the door, never a
500 from a RecursionError or from the engine; credentials sent twice are refused; the token also works in
`x-api-key`, and refusals on the Anthropic Messages paths take Anthropic's error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runnerd.api.auth import HTTP_TOKEN
from runnerd.api.errors import ApiError
from runnerd.config import load_settings
from runnerd.server import create_app
from tests.conftest import app_on_loopback

TOKEN = "door-token-8c1f"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def raw_post(daemon: Any, path: str, body: bytes) -> httpx.Response:
    return daemon.http.post(path, content=body, headers={"Content-Type": "application/json"})


def assert_refused(resp: httpx.Response, *fragments: str) -> str:
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    for fragment in fragments:
        assert fragment in message, message
    return str(message)


# -- JSON at the door ------------------------------------------------------------------------------------

def test_deep_nesting_is_a_400_not_a_recursion_error(daemon):
    for depth in (200, 1_000, 100_000):
        body = b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"
        assert_refused(raw_post(daemon, "/v1/chat/completions", body), "nested more than 128 levels")
    # The Ollama routes read bodies through the same door, in their own error shape.
    resp = raw_post(daemon, "/api/chat", b'{"model": "tiny", "x": ' + b"{\"a\":" * 5000 + b"1" + b"}" * 5001)
    assert resp.status_code == 400 and "nested" in resp.json()["error"]


def test_the_depth_error_names_where(daemon):
    body = json.dumps({"model": "tiny", "tools": [json.loads("[" * 130 + "]" * 130)]}).encode()
    assert_refused(raw_post(daemon, "/v1/chat/completions", body), "$.tools[0][0]")


@pytest.mark.parametrize(("literal", "fragment"), [
    ("NaN", "NaN is not a JSON number"),
    ("Infinity", "Infinity is not a JSON number"),
    ("-Infinity", "-Infinity is not a JSON number"),
    ("1e999", "1e999 is out of range"),
    ("-1e999", "-1e999 is out of range"),
    ("18446744073709551616", "integer 18446744073709551616 is out of range"),
    ("-9223372036854775809", "out of range"),
    ("9" * 5000, "5000 digits"),
    ('"\\ud800"', "$.temperature holds a lone UTF-16 surrogate"),
    ('"a\\udfffb"', "lone UTF-16 surrogate"),
])
def test_values_no_engine_can_take_are_refused_before_the_engine(daemon, literal, fragment):
    """Each of these reached llama-server, which answered 500 (and the daemon passed that on)."""
    body = json.dumps(CHAT)[:-1] + f', "temperature": {literal}}}'
    assert_refused(raw_post(daemon, "/v1/chat/completions", body.encode()), fragment)


def test_surrogates_in_keys_and_raw_bytes(daemon):
    assert_refused(raw_post(daemon, "/v1/chat/completions", b'{"model": "tiny", "\\udc00": 1}'), "a key in $")
    # UTF-8-encoded surrogates (and any other invalid UTF-8) are not UTF-8 at all.
    encoded = '{"model": "tiny", "x": "\ud800"}'.encode("utf-8", "surrogatepass")
    assert_refused(raw_post(daemon, "/v1/chat/completions", encoded), "not UTF-8")


def test_values_in_range_still_pass(daemon):
    """The door refuses only what no engine can take: 64-bit integers, large finite floats and escaped
    surrogate pairs (one character) reach the engine and it answers."""
    body = {**CHAT, "seed": 2**63 - 1, "logit_bias": {}, "messages": [{"role": "user", "content": "\U0001F600"}],
            "top_p": 1e-300}
    text = json.dumps(body)  # ensure_ascii: the emoji travels as an escaped surrogate pair
    assert "\\ud83d\\ude00" in text
    resp = raw_post(daemon, "/v1/chat/completions", text.encode())
    assert resp.status_code == 200, resp.text


def test_ollama_routes_refuse_the_same_values(daemon):
    resp = raw_post(daemon, "/api/chat", b'{"model": "tiny", "options": {"temperature": NaN}}')
    assert resp.status_code == 400 and resp.json() == {"error": "NaN is not a JSON number; send a finite number "
                                                                "or null"}


def _json_text(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)
# Routes that read a JSON body and act on nothing a random object could name (no path, URL or backend).
FUZZ_ROUTES = st.sampled_from(["/v1/chat/completions", "/engines/llama.cpp/v1/embeddings", "/engines/unload",
                               "/api/chat", "/api/embed", "/api/show", "/v1/rerank"])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(route=FUZZ_ROUTES, body=st.binary(max_size=200))
def test_arbitrary_bytes_never_give_500(daemon, route, body):
    assert raw_post(daemon, route, body).status_code < 500


@FUZZ
@given(route=FUZZ_ROUTES, value=JSON_VALUES, depth=st.integers(0, 1500),
       model=st.sampled_from(["ghost", "", "tiny:x:y"]))
def test_arbitrary_nested_json_never_gives_500(daemon, route, value, depth, model):
    """What the door lets through meets the handlers' own checks; models that do not exist keep it from an
    engine, whose answers to well-formed but wrong requests (llama-server: 500 for `"input": null`) are
    the engine's, not the door's."""
    nested = "[" * depth + _json_text(value) + "]" * depth
    body = f'{{"model": {json.dumps(model)}, "max_tokens": 1, "num_predict": 1, "input": {nested}, "x": {nested}}}'
    assert raw_post(daemon, route, body.encode()).status_code < 500


# -- credentials over TCP --------------------------------------------------------------------------------

@pytest.fixture
async def tcp(tmp_path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data"), backends={})
    app[HTTP_TOKEN] = TOKEN
    async with app_on_loopback(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield client


@pytest.mark.anyio
@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
@pytest.mark.parametrize("second", ["right", "wrong"])
async def test_a_credential_header_sent_twice_is_refused(tcp, header, second):
    value = f"Bearer {TOKEN}" if header == "Authorization" else TOKEN
    other = value if second == "right" else value + "x"
    resp = await tcp.get("/v1/models", headers=[(header, value), (header, other)])
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "duplicate_header" and header in error["message"]


@pytest.mark.anyio
async def test_the_token_in_x_api_key(tcp):
    ok = await tcp.get("/v1/models", headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01",
                                              "anthropic-beta": "tools-2024-04-04"})
    assert ok.status_code == 200, ok.text
    both = await tcp.get("/v1/models", headers={"x-api-key": TOKEN, "Authorization": f"Bearer {TOKEN}"})
    assert both.status_code == 200
    for headers in ({"x-api-key": "wrong"},
                    {"x-api-key": TOKEN, "Authorization": "Bearer wrong"},
                    {"x-api-key": "wrong", "Authorization": f"Bearer {TOKEN}"}):
        resp = await tcp.get("/v1/models", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["code"] == "invalid_api_key"
    # /health stays open, whatever credentials come with it.
    assert (await tcp.get("/health", headers={"x-api-key": "wrong"})).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/engines/v1/messages",
                                  "/engines/llama.cpp/v1/messages", "/anthropic/v1/messages"])
async def test_refusals_on_anthropic_paths_take_anthropics_shape(tcp, path):
    missing = await tcp.post(path, json={})
    wrong = await tcp.post(path, json={}, headers={"x-api-key": "wrong", "anthropic-version": "2023-06-01"})
    twice = await tcp.post(path, json={}, headers=[("x-api-key", TOKEN), ("x-api-key", TOKEN)])
    for resp, status, kind in ((missing, 401, "authentication_error"), (wrong, 401, "authentication_error"),
                               (twice, 400, "invalid_request_error")):
        assert resp.status_code == status
        body = resp.json()
        assert body["type"] == "error" and set(body) == {"type", "error"}
        assert body["error"]["type"] == kind and body["error"]["message"]
    # Elsewhere the shapes are as they were.
    assert set((await tcp.get("/v1/models")).json()["error"]) == {"message", "type", "code", "param"}
    assert set((await tcp.get("/api/tags")).json()) == {"error"}


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (503, "overloaded_error"), (529, "overloaded_error"), (502, "api_error"), (409, "invalid_request_error"),
])
def test_anthropic_error_types(status, kind):
    resp = ApiError(status, "why").anthropic_response()
    assert resp.status == status
    assert json.loads(resp.text or "") == {"type": "error", "error": {"type": kind, "message": "why"}}
