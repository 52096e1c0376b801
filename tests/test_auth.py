"""The bearer-token pieces: reading the token file, comparing tokens in constant time, and the
shape of a refusal."""

from __future__ import annotations

import hmac

import httpx2 as httpx
import pytest

from runnerd.api import auth
from runnerd.api.auth import HTTP_TOKEN, TokenError, bearer_token, load_token, token_matches
from runnerd.config import load_settings
from runnerd.server import create_app
from tests.conftest import app_on_loopback


def test_token_file_is_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n  s3cret-token-value \n\n")
    assert load_token(path) == "s3cret-token-value"


@pytest.mark.parametrize(("content", "fragment"), [
    ("   \n", "is empty"),
    ("two words", "one word"),
    ("tab\there", "one word"),
])
def test_unusable_token_files(tmp_path, content, fragment):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(TokenError, match=fragment):
        load_token(path)


def test_missing_token_file(tmp_path):
    with pytest.raises(TokenError, match="cannot read"):
        load_token(tmp_path / "nope")


def test_compare_is_constant_time(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    expected = "correct-horse-battery-staple"
    cases = {expected: True, expected[:-1]: False, expected + "x": False, "x": False,
             "correct-horse-battery-stapl\u00e9": False, "\udcff": False}
    for presented, outcome in cases.items():
        assert token_matches(presented, expected) is outcome
    # Every comparison went through compare_digest, on inputs of one fixed length whatever the token's
    # length: neither the content nor the length of the token can show in the time taken.
    assert len(calls) == len(cases)
    assert {len(a) for a, b in calls} | {len(b) for a, b in calls} == {32}


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"),
    ("bearer   abc ", "abc"),
    ("Basic abc", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("", None),
    (None, None),
])
def test_bearer_header(header, token):
    assert bearer_token(header) == token


@pytest.mark.anyio
async def test_refusals_over_tcp_take_the_shape_of_the_route(tmp_path):
    """401s (and the CORS 403) are answered before any route handler runs: they too must be
    {"error": "..."} under /api/, where Ollama's clients read a string, and OpenAI's shape elsewhere."""
    settings = load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data")
    app = create_app(settings, backends={})
    app[HTTP_TOKEN] = "s3cret"
    async with app_on_loopback(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        ollama_missing, ollama_wrong, openai_missing, ollama_origin, openai_origin = [
            await c.get("/api/tags"),
            await c.get("/api/tags", headers={"Authorization": "Bearer wrong"}),
            await c.get("/v1/models"),
            await c.get("/api/tags", headers={"Origin": "https://evil.example"}),
            await c.get("/v1/models", headers={"Origin": "https://evil.example"})]

    for resp, fragment in ((ollama_missing, "Authorization: Bearer"), (ollama_wrong, "invalid bearer token")):
        assert resp.status_code == 401
        assert set(resp.json()) == {"error"} and fragment in resp.json()["error"]
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="runnerd"')
    assert 'error="invalid_token"' in ollama_wrong.headers["WWW-Authenticate"]
    assert openai_missing.status_code == 401
    assert openai_missing.json()["error"]["code"] == "invalid_api_key"
    assert ollama_origin.status_code == 403 and "not allowed" in ollama_origin.json()["error"]
    assert openai_origin.status_code == 403 and openai_origin.json()["error"]["code"] == "origin_not_allowed"
