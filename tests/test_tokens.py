"""The pieces of scoped tokens without a daemon: the tokens file and its refusals, the keyring's matching
and reloading, the per-token limits (on a clock the test moves) and the rotated audit log."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from runnerd.audit import AuditLog
from runnerd.limits import Limiter, LimitHit
from runnerd.tokens import Grant, Keyring, TokenError, digest, hash_text, new_token, read_tokens_file

ALICE = "rd_alice-0123456789abcdefghijklmnopqrstuvwxyz"
BOB = "rd_bob-0123456789abcdefghijklmnopqrstuvwxyz"


def entry(name: str, token: str, role: str = "user", **extra: object) -> str:
    lines = ["[[tokens]]", f'name = "{name}"', f'role = "{role}"', f'hash = "{hash_text(token)}"']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_a_tokens_file_gives_each_token_its_grant(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(entry("alice", ALICE, models=["gemma*", "tiny"], max_concurrent=2)
                    + entry("bob", BOB, "operator", requests_per_minute=10))
    ring = Keyring("legacy-token", path)
    alice, bob, legacy = ring.match(ALICE), ring.match(BOB), ring.match("legacy-token")
    assert alice is not None and alice.name == "alice" and alice.role == "user" and alice.max_concurrent == 2
    assert alice.allows_model(["gemma3:270m"]) and alice.allows_model(["tiny"])
    assert not alice.allows_model(["tiny-2"]) and not alice.allows_model(["Gemma"])
    assert bob is not None and bob.role == "operator" and bob.requests_per_minute == 10 and bob.models == ("*",)
    assert legacy is not None and legacy.role == "admin" and legacy.may("admin")
    assert ring.match(ALICE + "x") is None and ring.match("") is None
    assert bob.may("user") and bob.may("operator") and not bob.may("admin") and not alice.may("operator")


def test_new_tokens_are_long_and_distinct():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 40 for t in tokens)


@pytest.mark.parametrize(("text", "fragment"), [
    ('[[tokens]\nname = "a"', "not valid TOML"),
    (entry("alice", ALICE) + entry("alice", BOB), "names must be unique"),
    (entry("alice", ALICE) + entry("bob", ALICE), "same hash"),
    (entry("alice", ALICE, models=["gemma[0-9"]), "unclosed"),
    (entry("alice", ALICE, models=["gem]ma"]), "never opened"),
    (entry("alice", ALICE, models=[""]), "1 to 256"),
    (entry("alice", ALICE, models=["gemma *"]), "characters no model name has"),
    (entry("alice", ALICE, role="root"), "tokens.0.role ('alice'): Input should be 'admin', 'operator' or 'user'"),
    (f'[[tokens]]\nname = "alice"\nrole = "user"\nhash = "{ALICE}"\n', "never the token itself"),
    (f'[[tokens]]\nname = "alice"\nrole = "user"\nhash = "{digest(ALICE).hex()}"\n', "never the token itself"),
    (entry("alice", ALICE, max_concurrent=0), "max_concurrent"),
    (entry("alice", ALICE, colour="blue"), "colour"),
    (entry("al ice", ALICE), "tokens.0.name"),
    (entry("http-token", ALICE), "[http] token_file"),
    ("tokens = 3\n", "tokens"),
])
def test_hostile_tokens_files_are_refused_naming_the_problem(tmp_path, text, fragment):
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(TokenError) as caught:
        read_tokens_file(path)
    message = str(caught.value)
    assert fragment in message and str(path) in message
    # A token pasted where its hash belongs is never repeated, not even in the refusal.
    assert ALICE not in message and BOB not in message


def test_a_refused_reload_keeps_the_tokens_in_force(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(entry("alice", ALICE))
    ring = Keyring(None, path)
    seen: list[str | None] = []
    ring.on_reload.append(seen.append)
    path.write_text(entry("alice", ALICE, role="superuser"))
    assert ring.changed()
    error = ring.reload()
    assert error is not None and "role" in error and seen == [error]
    assert ring.match(ALICE) is not None and not ring.changed()  # reported once, not at every poll
    path.write_text(entry("bob", BOB))
    assert ring.changed() and ring.reload() is None and seen[-1] is None
    assert ring.match(ALICE) is None and ring.match(BOB) is not None


def test_a_bad_tokens_file_at_start_is_an_error(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(entry("alice", ALICE, role="god"))
    with pytest.raises(TokenError, match="role"):
        Keyring(None, path)
    with pytest.raises(TokenError, match="cannot read"):
        Keyring(None, tmp_path / "missing.toml")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limits_count_per_token():
    clock = Clock()
    limiter = Limiter(clock)
    one = Grant("one", "user", b"1" * 32, max_concurrent=1)
    rpm = Grant("rpm", "user", b"2" * 32, requests_per_minute=2)
    release = limiter.enter(one)
    with pytest.raises(LimitHit) as hit:
        limiter.enter(one)
    assert hit.value.limit == "max_concurrent" and hit.value.retry_after == 1
    limiter.enter(rpm)()  # another token is unaffected
    release()
    release()  # a second call is harmless: the count is not taken twice
    assert limiter.in_flight("one") == 0
    limiter.enter(one)()
    clock.now += 20
    limiter.enter(rpm)()
    with pytest.raises(LimitHit) as hit:
        limiter.enter(rpm)
    # The first request leaves the window 60 s after it was made, 40 s from now.
    assert hit.value.limit == "requests_per_minute" and hit.value.retry_after == 40
    clock.now += 40
    limiter.enter(rpm)()


def test_the_audit_log_rotates_by_size_and_is_owner_only(tmp_path):
    path = tmp_path / "audit" / "audit.log"
    log = AuditLog(path, max_bytes=2000, backups=2)
    log.start()
    for i in range(100):
        log.record(token="alice", remote="127.0.0.1", action="POST /api/pull", target=f"/api/pull model=m{i}",
                   result="forbidden: needs role admin")
    log.stop()
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2"]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert all(f.stat().st_size <= 2000 for f in files) and len(lines) < 100  # the oldest rotated away
    assert set(lines[0]) == {"time", "token", "remote", "action", "target", "result"}
    assert json.loads(path.read_text().splitlines()[-1])["target"] == "/api/pull model=m99"  # the newest file
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)


def test_the_tokens_command_prints_a_token_once_and_stores_its_hash(tmp_path, capsys):
    from runnerd.cli import main

    path = tmp_path / "tokens.toml"
    assert main(["tokens", "add", "ci", "--file", str(path), "--models", "gemma*", "--requests-per-minute", "30"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("rd_") and token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    grant = Keyring(None, path).match(token)
    assert grant is not None and grant.name == "ci" and grant.role == "user" and grant.models == ("gemma*",)
    assert grant.requests_per_minute == 30
    assert main(["tokens", "add", "ci", "--file", str(path)]) == 1
    assert "already" in capsys.readouterr().err
    assert main(["tokens", "add", "ops", "--role", "operator", "--file", str(path)]) == 0
    capsys.readouterr()
    assert main(["tokens", "ls", "--json", "--file", str(path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["role"]) for t in listed] == [("ci", "user"), ("ops", "operator")]
    assert all("hash" not in t for t in listed)
    assert main(["tokens", "rm", "ci", "--file", str(path)]) == 0
    assert Keyring(None, path).match(token) is None and [g.name for g in Keyring(None, path).grants] == ["ops"]
    assert main(["tokens", "rm", "ci", "--file", str(path)]) == 1


def test_the_readme_example_is_a_valid_tokens_file(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("# /etc/runnerd/tokens.toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "tokens.toml"
    path.write_text(block)
    grant = Keyring(None, path).match("test")
    assert grant is not None and grant.name == "ci" and grant.models == ("gemma*", "smollm2")
    assert grant.max_concurrent == 4 and grant.requests_per_minute == 120


def test_every_route_has_the_role_it_should(tmp_path):
    """A user reaches inference and listings only, an operator adds what loads, unloads and watches;
    everything else, and any route added later, needs an admin."""
    from aiohttp import hdrs

    from runnerd.api.scopes import role_for
    from runnerd.config import load_settings
    from runnerd.server import create_app

    app = create_app(load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data"), backends={})
    roles: dict[str, set[str]] = {"user": set(), "operator": set(), "admin": set()}
    for route in app.router.routes():
        if route.method == hdrs.METH_HEAD or route.resource is None:
            continue
        roles[role_for(route.method, route.resource.canonical)].add(f"{route.method} {route.resource.canonical}")
    inference = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/rerank", "/v1/rerank",
                 "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/input_tokens")
    ollama_inference = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
    for entry in roles["user"]:
        method, path = entry.split(" ", 1)
        posts_inference = method == "POST" and (path.endswith(inference) or path in ollama_inference)
        deletes_a_response = method == "DELETE" and "/v1/responses/" in path
        assert posts_inference or method == "GET" or deletes_a_response, entry
    assert roles["operator"] >= {"POST /engines/unload", "POST /node/drain", "POST /node/resume", "GET /engines/ps",
                                 "GET /api/ps", "GET /node", "GET /models/{name}/estimate", "GET /metrics"}
    assert all(e.startswith("GET ") or e in ("POST /engines/unload", "POST /node/drain", "POST /node/resume")
               for e in roles["operator"])
    assert roles["admin"] >= {"POST /api/pull", "DELETE /api/delete", "POST /api/copy", "POST /models",
                              "POST /models/create", "DELETE /models/{name}", "POST /models/{name}/tag",
                              "POST /engines/_configure", "POST /engines/{backend}/_configure",
                              "DELETE /engines/_configure", "POST /engines/install-backend",
                              "POST /engines/uninstall-backend", "POST /engines/backends",
                              "DELETE /engines/backends/{name}", "DELETE /jobs/{id}",
                              "POST /engines/backends/catalog/refresh"}
    assert role_for("POST", "/some/route/added/later") == "admin"
