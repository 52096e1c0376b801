"""The bearer-token pieces: reading the token file and comparing tokens in constant time."""

from __future__ import annotations

import hmac

import pytest

from runnerd.api import auth
from runnerd.api.auth import TokenError, bearer_token, load_token, token_matches


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
