"""Scoped tokens on a real daemon over real TCP: roles (403 in each route's error shape), model patterns
(listings filtered; a model outside them answered exactly as a model that does not exist), per-token
limits (429 and Retry-After), reloading the tokens file on change and on SIGHUP, the single token of
`[http] token_file` as an admin, and the audit log of it all. Inference runs on the real llama-server
with the tiny random-weights model, registered twice: as `tiny` and as `gemma-small`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import ollama
import openai
import pytest

from runnerd.tokens import hash_text
from tests.conftest import Daemon
from tests.standin_upstream import StandinUpstream

LEGACY = "rd_legacy-single-token-0123456789abcdef"
TOKENS = {
    # name: (token, role, extra settings)
    "alice": ("rd_alice-user-token-0123456789abcdefghij", "user", {}),
    "gem": ("rd_gem-user-token-0123456789abcdefghijklm", "user", {"models": ["gemma*"]}),
    "ops": ("rd_ops-operator-token-0123456789abcdefghi", "operator", {}),
    "gemops": ("rd_gemops-operator-token-0123456789abcdef", "operator", {"models": ["gemma*"]}),
    "single": ("rd_single-user-token-0123456789abcdefgh", "user", {"max_concurrent": 1}),
    "rpm": ("rd_rpm-user-token-0123456789abcdefghijklm", "user", {"requests_per_minute": 3}),
    "gemadmin": ("rd_gemadmin-admin-token-0123456789abcdefg", "admin", {"models": ["gemma*"]}),
}
CAROL = "rd_carol-new-token-0123456789abcdefghijklm"
DAVE = "rd_dave-new-token-00123456789abcdefghijklm"  # as long as CAROL: the file keeps its size
WRONG = "rd_wrong-token-0123456789abcdefghijklmnopq"


def tokens_toml(tokens: dict[str, tuple[str, str, dict[str, Any]]]) -> str:
    out = []
    for name, (token, role, extra) in tokens.items():
        out += ["[[tokens]]", f'name = "{name}"', f'role = "{role}"', f'hash = "{hash_text(token)}"']
        out += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        out.append("")
    return "\n".join(out)


def replace(path: Path, text: str) -> None:
    """Atomically, as an editor or `runnerd tokens` does: the daemon never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Tcp:
    def __init__(self, d: Daemon, port: int) -> None:
        self.d = d
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def as_(self, who: str) -> dict[str, str]:
        token = LEGACY if who == "legacy" else TOKENS[who][0] if who in TOKENS else who
        return {"Authorization": f"Bearer {token}"}

    def get(self, path: str, who: str) -> httpx.Response:
        return self.client.get(path, headers=self.as_(who))

    def post(self, path: str, who: str, body: Any = None) -> httpx.Response:
        return self.client.post(path, json=body, headers=self.as_(who))

    def delete(self, path: str, who: str, body: Any = None) -> httpx.Response:
        return self.client.request("DELETE", path, json=body, headers=self.as_(who))

    def audit(self) -> list[dict[str, Any]]:
        directory = self.d.root / "data"
        files = sorted(directory.glob("audit.log*"), reverse=True)  # oldest rotated file first
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]

    def audit_until(self, predicate: Callable[[list[dict[str, Any]]], Any], what: str) -> list[dict[str, Any]]:
        """The audit log once `predicate` holds for it: a thread writes it, a moment after the answer."""
        return wait_for(lambda: predicate(lines := self.audit()) and lines, f"the audit log to show {what}")

    def audit_text(self) -> str:
        return "".join(f.read_text() for f in (self.d.root / "data").glob("audit.log*"))


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def tcp(llama_server: Path, tiny_model: Path) -> Iterator[Tcp]:
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    (root / "token").write_text(LEGACY)
    (root / "tokens.toml").write_text(tokens_toml(TOKENS))
    d = Daemon(root, llama_server, {"tiny": tiny_model, "gemma-small": tiny_model},
               {"RUNNERD_HTTP__TOKENS_FILE": str(root / "tokens.toml"), "RUNNERD_HTTP__TOKENS_POLL_INTERVAL": "0.1"},
               ["--listen", "127.0.0.1:0", "--token-file", str(root / "token")])
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    t = Tcp(d, int(port.group(1)))
    yield t
    t.client.close()
    d.stop()
    # No token, nor anything presented as one, ever reaches the audit log.
    text = t.audit_text()
    for secret in [LEGACY, CAROL, DAVE, WRONG, *(tok for tok, _, _ in TOKENS.values())]:
        assert secret not in text
    shutil.rmtree(root, ignore_errors=True)


def test_a_user_token_cannot_change_the_host(tcp):
    manifest = "name: remote-custom\n"
    refused = {
        "pull": tcp.post("/api/pull", "alice", {"model": "https://example.com/m.gguf"}),
        "ollama delete": tcp.delete("/api/delete", "alice", {"model": "tiny"}),
        "copy": tcp.post("/api/copy", "alice", {"source": "tiny", "destination": "tiny2"}),
        "delete": tcp.delete("/models/tiny", "alice"),
        "configure": tcp.post("/engines/_configure", "alice", {"model": "tiny", "context_size": 256}),
        "install": tcp.post("/engines/install-backend", "alice", {"backend": "llamacpp"}),
        "define": tcp.post("/engines/backends", "alice", {"manifest": manifest}),
        "unload": tcp.post("/engines/unload", "alice", {"all": True}),
        "drain": tcp.post("/node/drain", "alice", {}),
        "ps": tcp.get("/engines/ps", "alice"),
    }
    for what, resp in refused.items():
        assert resp.status_code == 403, (what, resp.text)
        if what in ("pull", "ollama delete", "copy"):
            # Ollama's shape under /api/: its clients read a string under "error".
            assert set(resp.json()) == {"error"} and "needs the 'admin' role" in resp.json()["error"], what
        else:
            error = resp.json()["error"]
            assert error["type"] == "permission_error" and error["code"] == "insufficient_role", what
            assert "'alice' has role 'user'" in error["message"], what
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=tcp.url, headers=tcp.as_("alice"), timeout=30).delete("tiny")
    assert caught.value.status_code == 403
    # Nothing happened: both models are still there, and alice may still infer and list.
    assert {m["name"] for m in tcp.get("/models", "legacy").json()} == {"tiny:latest", "gemma-small:latest"}
    answer = openai.OpenAI(base_url=tcp.url + "/v1", api_key=TOKENS["alice"][0], max_retries=0).chat.completions \
        .create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.model == "tiny:latest" and answer.choices[0].message.content is not None
    # The operator may unload and look at runners, not pull.
    assert tcp.get("/engines/ps", "ops").status_code == 200
    # An operator limited to some models sees only their runners (tiny runs now, for alice).
    assert [r["model"] for r in tcp.get("/engines/ps", "ops").json()] == ["tiny:latest"]
    assert tcp.get("/engines/ps", "gemops").json() == [] and tcp.get("/api/ps", "gemops").json() == {"models": []}
    unloaded = tcp.post("/engines/unload", "ops", {"all": True})
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] >= 1, unloaded.text
    assert tcp.post("/api/pull", "ops", {"model": "https://example.com/m.gguf"}).status_code == 403

    lines = tcp.audit_until(lambda lines: any(x["token"] == "ops" and x["action"] == "POST /engines/unload"
                                              for x in lines), "the unload")
    forbidden = [x for x in lines if x["token"] == "alice" and x["result"].startswith("forbidden")]
    assert {x["action"] for x in forbidden} == {
        "POST /api/pull", "DELETE /api/delete", "POST /api/copy", "DELETE /models/{name}",
        "POST /engines/_configure", "POST /engines/install-backend", "POST /engines/backends",
        "POST /engines/unload", "POST /node/drain", "GET /engines/ps"}
    assert all(x["remote"] == "127.0.0.1" and x["time"] for x in forbidden)
    done = [x for x in lines if x["token"] == "ops" and x["action"] == "POST /engines/unload"]
    assert done and done[-1]["result"] == "200" and done[-1]["target"] == "/engines/unload"


def test_a_token_sees_only_its_models_and_cannot_tell_the_others_exist(tcp):
    """`gem` may use `gemma*`: `tiny` (which exists) and `nope` (which does not) get the same answers,
    in every API's shape, down to the byte once the names (of equal length) are swapped."""
    client = openai.OpenAI(base_url=tcp.url + "/v1", api_key=TOKENS["gem"][0], max_retries=0)
    assert [m.id for m in client.models.list()] == ["gemma-small:latest"]
    assert [m["id"] for m in tcp.get("/engines/v1/models", "gem").json()["data"]] == ["gemma-small:latest"]
    assert [m["id"] for m in tcp.get("/engines/llama.cpp/v1/models", "gem").json()["data"]] == ["gemma-small:latest"]
    assert [m["name"] for m in tcp.get("/models", "gem").json()] == ["gemma-small:latest"]
    ollama_client = ollama.Client(host=tcp.url, headers=tcp.as_("gem"), timeout=60)
    assert [m.model for m in ollama_client.list().models] == ["gemma-small:latest"]
    # alice, with every model, sees both.
    assert {m["name"] for m in tcp.get("/api/tags", "alice").json()["models"]} == {"tiny:latest",
                                                                                  "gemma-small:latest"}
    # gem chats with its model through both clients.
    answer = client.chat.completions.create(model="gemma-small", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4)
    assert answer.model == "gemma-small:latest"
    assert ollama_client.chat(model="gemma-small", messages=[{"role": "user", "content": "hi"}],
                              options={"num_predict": 4}).message is not None

    chat = [{"role": "user", "content": "hi"}]
    probes: list[tuple[str, str, Callable[[str], dict[str, Any] | None]]] = [
        ("POST", "/v1/chat/completions", lambda m: {"model": m, "messages": chat, "max_tokens": 4}),
        ("POST", "/engines/v1/completions", lambda m: {"model": m, "prompt": "hi", "max_tokens": 4}),
        ("POST", "/v1/embeddings", lambda m: {"model": m, "input": "hi"}),
        ("POST", "/api/chat", lambda m: {"model": m, "messages": chat}),
        ("POST", "/api/generate", lambda m: {"model": m, "prompt": "hi"}),
        ("POST", "/api/show", lambda m: {"model": m}),
        ("POST", "/v1/messages", lambda m: {"model": m, "max_tokens": 4, "messages": chat}),
        ("POST", "/v1/responses", lambda m: {"model": m, "input": "hi", "max_output_tokens": 16}),
        ("GET", "/v1/models/{m}", lambda m: None),
        ("GET", "/models/{m}", lambda m: None),
    ]
    for method, path, body in probes:
        answers = {}
        for name in ("tiny", "nope"):
            answers[name] = tcp.client.request(method, path.format(m=name), headers=tcp.as_("gem"),
                                               json=body(name))
        tiny, nope = answers["tiny"], answers["nope"]
        assert tiny.status_code == nope.status_code == 404, (path, tiny.text, nope.text)
        assert tiny.content.replace(b"tiny", b"nope") == nope.content, (path, tiny.text, nope.text)
        assert {k: v for k, v in tiny.headers.items() if k != "date"} == \
               {k: v for k, v in nope.headers.items() if k != "date"}, path
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404 and "not found" in caught.value.error


def hold_request(tcp: Tcp, who: str, body: bytes) -> socket.socket:
    """A chat request whose body is sent all but its last byte: in flight (counted against the token)
    until `release` sends that byte."""
    sock = socket.create_connection(("127.0.0.1", tcp.port), timeout=60)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: runnerd\r\nAuthorization: Bearer {TOKENS[who][0]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    sock.sendall(head.encode() + body[:-1])
    return sock


def release(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(body[-1:])
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def test_the_concurrency_limit_answers_429_for_that_token_only(tcp):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    held = hold_request(tcp, "single", body)
    try:
        # The held request is counted once the daemon has read its headers: until then a second one passes.
        refused = wait_for(lambda: (r := tcp.get("/v1/models", "single")).status_code == 429 and r,
                           "the held request to count")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "1 requests in flight" in error["message"]
        tags = tcp.get("/api/tags", "single")
        assert tags.status_code == 429 and set(tags.json()) == {"error"} and tags.headers["Retry-After"]
        messages = tcp.post("/v1/messages", "single", {"model": "tiny", "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert messages.status_code == 429 and messages.json()["error"]["type"] == "rate_limit_error"
        # Other tokens are not held back: they list and chat while `single` waits.
        assert tcp.get("/v1/models", "alice").status_code == 200
        other = tcp.post("/v1/chat/completions", "alice", {"model": "tiny", "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert other.status_code == 200, other.text
    finally:
        answer = release(held, body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    # The held request's answer was sent after its count was given back.
    assert tcp.get("/v1/models", "single").status_code == 200
    tcp.audit_until(lambda lines: any(x["token"] == "single" and x["result"] == "limited: max_concurrent 1"
                                      for x in lines), "the limit hit")


def test_the_requests_per_minute_limit(tcp):
    for _ in range(3):
        assert tcp.get("/v1/models", "rpm").status_code == 200
    refused = tcp.get("/api/tags", "rpm")
    assert refused.status_code == 429 and "3 requests per minute" in refused.json()["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert tcp.get("/api/tags", "alice").status_code == 200
    limited = [x for x in tcp.audit_until(lambda lines: any(x["token"] == "rpm" for x in lines), "the limit hit")
               if x["token"] == "rpm"]
    assert limited[-1]["result"] == "limited: requests_per_minute 3"
    assert limited[-1]["action"] == "GET /api/tags"


def test_the_single_token_is_an_admin(tcp):
    ps = tcp.get("/engines/ps", "legacy")
    assert ps.status_code == 200
    copied = tcp.post("/api/copy", "legacy", {"source": "tiny", "destination": "tiny-copy"})
    assert copied.status_code == 200, copied.text
    assert tcp.delete("/api/delete", "legacy", {"model": "tiny-copy"}).status_code == 200
    lines = [x for x in tcp.audit_until(lambda lines: lines[-1]["action"] == "DELETE /api/delete", "the delete")
             if x["token"] == "http-token"]
    assert [(x["action"], x["result"]) for x in lines[-2:]] == [("POST /api/copy", "200"),
                                                               ("DELETE /api/delete", "200")]
    assert lines[-2]["target"] == '/api/copy source="tiny" destination="tiny-copy"'
    # The host's own users act through the unix socket: no token, and audited all the same.
    assert tcp.d.post("/api/copy", {"source": "tiny", "destination": "tiny-local"}).status_code == 200
    assert tcp.d.http.request("DELETE", "/api/delete", json={"model": "tiny-local"}).status_code == 200
    local = tcp.audit_until(lambda lines: lines[-1]["target"] == '/api/delete model="tiny-local"', "the delete")
    assert [(x["token"], x["remote"], x["result"]) for x in local[-2:]] == [(None, "unix", "200")] * 2


def test_refused_authentication_is_audited(tcp):
    assert tcp.get("/v1/models", WRONG).status_code == 401
    assert tcp.client.get("/api/tags").status_code == 401
    lines = tcp.audit_until(lambda lines: lines[-1]["action"] == "GET /api/tags", "the refusals")[-2:]
    assert [(x["token"], x["action"], x["result"]) for x in lines] == [
        (None, "GET /v1/models", "unauthenticated: invalid token"),
        (None, "GET /api/tags", "unauthenticated: no token")]


HOSTILE = {
    "bad syntax": "[[tokens]\nname = 1\n",
    "duplicate names": tokens_toml({"alice": TOKENS["alice"], "x": ("rd_x", "user", {})}).replace('"x"', '"alice"'),
    "a bad pattern": tokens_toml({"alice": ("rd_y", "user", {"models": ["gemma[0-9"]})}),
    "a plaintext token": f'[[tokens]]\nname = "alice"\nrole = "user"\nhash = "{CAROL}"\n',
    "an unknown role": tokens_toml({"alice": ("rd_z", "root", {})}),
}


def test_the_tokens_file_is_reloaded_on_change_and_on_sighup(tcp):
    path = tcp.d.root / "tokens.toml"
    original = path.read_text()
    assert tcp.get("/v1/models", CAROL).status_code == 401
    try:
        # A change is picked up by the poll ([http] tokens_poll_interval), no signal needed.
        replace(path, original + tokens_toml({"carol": (CAROL, "user", {})}))
        wait_for(lambda: tcp.get("/v1/models", CAROL).status_code == 200, "carol's token to work")
        tcp.audit_until(lambda lines: lines[-1]["action"] == "reload tokens", "the reload")

        # Hostile files are refused, each with a clear error, and the tokens in force stay in force.
        for what, text in HOSTILE.items():
            before = len(tcp.audit())
            replace(path, text)
            refusal = wait_for(lambda start=before: next((x for x in tcp.audit()[start:]
                                                          if x["action"] == "reload tokens"), None),
                               f"the reload of {what}")
            assert refusal["result"].startswith("refused: ") and str(path) in refusal["result"], what
            assert tcp.get("/v1/models", CAROL).status_code == 200, what
            assert tcp.get("/v1/models", "alice").status_code == 200, what
        assert CAROL not in tcp.d.output()  # the plaintext token is not repeated in the daemon's log either
        assert "not valid TOML" in tcp.d.output() and "names must be unique" in tcp.d.output()
        assert "unclosed" in tcp.d.output() and "never the token itself" in tcp.d.output()

        replace(path, original + tokens_toml({"carol": (CAROL, "user", {})}))
        wait_for(lambda: any(x["action"] == "reload tokens" and x["result"] == "ok" for x in tcp.audit()[-3:]),
                 "the good file to be read again")
        # Carol's hash replaced by Dave's in place: same inode, same size, same modification time. The
        # poll sees nothing; only SIGHUP makes the daemon read the file again.
        info = path.stat()
        with path.open("r+") as f:
            text = f.read()
            f.seek(0)
            f.write(text.replace(hash_text(CAROL), hash_text(DAVE)))
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (info.st_ino, info.st_size, info.st_mtime_ns)
        assert tcp.get("/v1/models", CAROL).status_code == 200
        tcp.d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: tcp.get("/v1/models", DAVE).status_code == 200, "dave's token to work after SIGHUP")
        assert tcp.get("/v1/models", CAROL).status_code == 401
        assert tcp.d.proc.poll() is None  # SIGHUP reloads; it does not stop the daemon
    finally:
        replace(path, original)
        wait_for(lambda: tcp.get("/v1/models", DAVE).status_code == 401, "the original tokens back")


def test_a_daemon_with_an_unusable_tokens_file_does_not_start(llama_server):
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    try:
        (root / "tokens.toml").write_text(HOSTILE["a plaintext token"])
        with pytest.raises(RuntimeError) as caught:
            Daemon(root, llama_server, {}, {"RUNNERD_HTTP__TOKENS_FILE": str(root / "tokens.toml")},
                   ["--listen", "127.0.0.1:0"])
        message = str(caught.value)
        assert "refusing to listen on tcp:127.0.0.1:" in message and "tokens.0.hash" in message
        assert "never the token itself" in message and CAROL not in message
    finally:
        shutil.rmtree(root, ignore_errors=True)


def same_answer(tiny: httpx.Response, nope: httpx.Response, what: str) -> None:
    """`tiny` (hidden) and `nope` (missing) answered alike: status, headers, and body once the names swap."""
    assert tiny.status_code == nope.status_code and tiny.status_code >= 400, (what, tiny.text, nope.text)
    assert tiny.content.replace(b"tiny", b"nope") == nope.content, (what, tiny.text, nope.text)
    assert {k: v for k, v in tiny.headers.items() if k != "date"} == \
           {k: v for k, v in nope.headers.items() if k != "date"}, what


def test_an_operator_limited_to_some_models_sees_nothing_of_the_others(tcp):
    """`gemops` may use `gemma*`: with runners of `tiny` and `gemma-small` up, every route that names
    models or runners shows it `gemma-small` only and answers for `tiny` as for `nope`, which does not
    exist; `ops`, with every model, sees both, so each filtered answer had something to leave out."""
    for name in ("tiny", "gemma-small"):  # stored configurations, and a runner of each (configure preloads)
        configured = tcp.d.post("/engines/_configure", {"model": name, "context_size": 512})
        assert configured.status_code == 202, configured.text
    wait_for(lambda: sorted(r["model"] for r in tcp.d.ps() if r["state"] in ("ready", "idle"))
             == ["gemma-small:latest", "tiny:latest"], "both runners to be ready")
    chat = [{"role": "user", "content": "hi"}]
    for who, model in (("ops", "tiny"), ("gemops", "gemma-small")):
        answer = tcp.post("/v1/chat/completions", who, {"model": model, "messages": chat, "max_tokens": 2})
        assert answer.status_code == 200, answer.text
    both, gem_only = ["gemma-small:latest", "tiny:latest"], ["gemma-small:latest"]

    def runner_models(who: str, path: str) -> list[str]:
        body = tcp.get(path, who).json()
        runners = body["runners"] if path == "/node" else body["models"] if path == "/api/ps" else body
        return sorted(r["model"] for r in runners)

    for path in ("/node", "/engines/ps", "/api/ps"):
        assert runner_models("ops", path) == both and runner_models("gemops", path) == gem_only, path
    # What the host holds stays whole: the operator places models on the same memory.
    assert tcp.get("/node", "gemops").json()["reserved"]["runners"] == 2

    metrics = {who: tcp.get("/metrics", who).text for who in ("ops", "gemops")}
    assert 'model="tiny:latest"' in metrics["ops"] and 'model="tiny:latest"' not in metrics["gemops"]
    assert 'model="gemma-small:latest"' in metrics["gemops"]
    assert re.search(r'^runnerd_runners\{state="ready"\} \d', metrics["gemops"], re.M)  # a host-wide series

    configurations = {who: [c["model"] for c in tcp.get("/engines/_configure", who).json()["configurations"]]
                      for who in ("ops", "gemops")}
    assert sorted(configurations["ops"]) == both and configurations["gemops"] == gem_only

    # The daemon's own log names tiny's runner for ops; gemops gets it without those lines.
    logs = {who: tcp.get("/logs?tail=10000", who).text for who in ("ops", "gemops")}
    assert "model=tiny:latest" in logs["ops"] and "tiny:latest" not in logs["gemops"]
    assert "model=gemma-small:latest" in logs["gemops"]
    assert tcp.get("/logs?runner=tiny", "ops").status_code == 200

    probes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/logs?runner={m}", None),
        ("GET", "/logs?runner={m}&mode=completion&tail=5", None),
        ("GET", "/models/{m}/estimate", None),
        ("GET", "/models/{m}/estimate?ctx=256", None),
        ("GET", "/engines/_configure?model={m}", None),
        ("POST", "/engines/unload", {"models": ["{m}"]}),
    ]
    for method, path, body in probes:
        answers = [tcp.client.request(method, path.format(m=m), headers=tcp.as_("gemops"),
                                      json=json.loads(json.dumps(body).replace("{m}", m)) if body else None)
                   for m in ("tiny", "nope")]
        same_answer(*answers, what=path)

    # "Unload everything" from gemops unloads what gemops may use, and says nothing of the rest.
    unloaded = tcp.post("/engines/unload", "gemops", {"all": True, "timeout": 0})
    assert unloaded.status_code == 200 and [r["model"] for r in unloaded.json()["runners"]] == gem_only
    assert runner_models("ops", "/engines/ps") == ["tiny:latest"]
    assert tcp.post("/engines/unload", "gemops", {"backend": "llama.cpp"}).json()["unloaded"] == 0
    assert runner_models("ops", "/engines/ps") == ["tiny:latest"]
    for name in ("tiny", "gemma-small"):
        assert tcp.d.http.request("DELETE", f"/engines/_configure?model={name}").status_code == 200


def test_the_audit_names_the_target_of_a_large_body(tcp):
    """The target comes from the body the handler read, however large: an unload naming thousands of models
    (none stored: nothing is unloaded) is audited with them."""
    names = ["nope"] * 20_000  # about 160 KB of JSON
    refused = tcp.post("/engines/unload", "ops", {"models": names})
    assert refused.status_code == 404
    line = tcp.audit_until(lambda lines: lines and lines[-1]["action"] == "POST /engines/unload" and
                           (lines[-1]["token"], lines[-1]["result"]) == ("ops", "404"), "the unload")[-1]
    assert line["target"].startswith('/engines/unload models=["nope", "nope", ')
    assert len(line["target"]) == len("/engines/unload models=") + 200
    # A body the handler refused is not parsed again: the path is the target.
    bad = tcp.client.post("/engines/unload", content=b'{"models": [', headers=tcp.as_("ops"))
    assert bad.status_code == 400
    line = tcp.audit_until(lambda lines: lines and lines[-1]["result"] == "400", "the refused unload")[-1]
    assert line["target"] == "/engines/unload"


def test_a_stored_response_is_its_makers(tcp):
    """A TCP token reads, continues and deletes only the responses it made, the unix socket's callers only
    theirs, an admin token any; another caller's id is answered byte for byte as an id never stored."""
    def responses(who: str) -> openai.OpenAI:
        token = LEGACY if who == "legacy" else TOKENS[who][0]
        return openai.OpenAI(base_url=tcp.url + "/v1", api_key=token, max_retries=0)

    ask: dict[str, Any] = {"model": "tiny", "input": "hi", "max_output_tokens": 4}
    alices = responses("alice").responses.create(**ask).id
    socket_made = tcp.d.post("/v1/responses", ask)
    assert socket_made.status_code == 200, socket_made.text
    sockets = socket_made.json()["id"]
    assert len(alices) == len(sockets)
    missing = "resp_" + "0" * (len(alices) - len("resp_"))

    assert responses("alice").responses.retrieve(alices).id == alices
    assert tcp.d.http.get(f"/v1/responses/{sockets}").status_code == 200
    with pytest.raises(openai.NotFoundError):
        responses("ops").responses.retrieve(alices)

    def asked(who: str, method: str, path: str, body: Any = None) -> httpx.Response:
        if who == "socket":
            return tcp.d.http.request(method, path, json=body)
        return tcp.client.request(method, path, headers=tcp.as_(who), json=body)

    for who, theirs in [("ops", alices), ("socket", alices), ("alice", sockets)]:
        for method, path, body in [("GET", "/v1/responses/{id}", None),
                                   ("GET", "/engines/v1/responses/{id}/input_items", None),
                                   ("DELETE", "/v1/responses/{id}", None),
                                   ("POST", "/v1/responses", {**ask, "previous_response_id": "{id}"})]:
            answers = [asked(who, method, path.format(id=i), json.loads(json.dumps(body).replace("{id}", i))
                             if body else None) for i in (theirs, missing)]
            foreign, absent = answers
            what = (who, method, path)
            assert foreign.status_code == absent.status_code == 404, (what, foreign.text)
            assert foreign.content.replace(theirs.encode(), missing.encode()) == absent.content, what
            assert {k: v for k, v in foreign.headers.items() if k != "date"} == \
                   {k: v for k, v in absent.headers.items() if k != "date"}, what
    # Nothing another caller tried to delete is gone; an admin token reads both, and continues alice's.
    assert asked("alice", "GET", f"/v1/responses/{alices}").status_code == 200
    assert asked("socket", "GET", f"/v1/responses/{sockets}").status_code == 200
    admin = responses("legacy").responses
    assert admin.retrieve(alices).id == alices and admin.retrieve(sockets).id == sockets
    continued = admin.create(**ask, previous_response_id=alices)
    assert continued.previous_response_id == alices
    with pytest.raises(openai.NotFoundError):  # the admin's turn is the admin's
        responses("alice").responses.retrieve(continued.id)
    # Its maker deletes it; then it is gone for everyone.
    assert responses("alice").responses.delete(alices) is None
    with pytest.raises(openai.NotFoundError):
        admin.retrieve(alices)


def test_an_upstreams_models_outside_the_patterns_are_hidden_too(llama_server):
    """A daemon whose only models are an upstream's (a stand-in that lists `tiny-remote` and `gemma-remote`):
    `gemops` sees the upstream's status with `gemma-remote` only, and `tiny-remote` is answered as
    `nope-remote`, which no source hosts."""
    upstream = StandinUpstream("up", "plain", ["tiny-remote", "gemma-remote"])
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    d = None
    try:
        (root / "tokens.toml").write_text(tokens_toml(TOKENS))
        (root / "upstreams.toml").write_text(
            f'[[upstreams]]\nname = "up"\nkind = "openai"\nbase_url = "{upstream.base_url}"\n')
        d = Daemon(root, llama_server, {}, {"RUNNERD_HTTP__TOKENS_FILE": str(root / "tokens.toml")},
                   ["--listen", "127.0.0.1:0", "--config", str(root / "upstreams.toml")])
        port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
        assert port is not None, d.output()
        t = Tcp(d, int(port.group(1)))
        wait_for(lambda: d.http.get("/engines/status?upstreams=1").json()["upstreams"]["up"]["healthy"],
                 "the upstream's models to be discovered")

        def status(who: str) -> tuple[list[str], str]:
            full = t.get("/engines/status?upstreams=1", who).json()["upstreams"]["up"]
            return sorted(full["models"]), t.get("/engines/status", who).json()["up"]

        assert status("ops") == (["gemma-remote", "tiny-remote"], f"Running (upstream openai at {upstream.base_url}, "
                                                                  "2 models)")
        assert status("gemops") == (["gemma-remote"], f"Running (upstream openai at {upstream.base_url}, 1 models)")
        assert [m["id"] for m in t.get("/v1/models", "gemops").json()["data"]] == ["gemma-remote"]
        chat = [{"role": "user", "content": "hi"}]
        for method, path, body in [("GET", "/v1/models/{m}-remote", None),
                                   ("POST", "/v1/chat/completions", {"model": "{m}-remote", "messages": chat})]:
            answers = [t.client.request(method, path.format(m=m), headers=t.as_("gemops"),
                                        json=json.loads(json.dumps(body).replace("{m}", m)) if body else None)
                       for m in ("tiny", "nope")]
            same_answer(*answers, what=path)
        assert upstream.inference_requests() == []  # the hidden model's request never left the daemon
        t.client.close()
    finally:
        if d is not None:
            d.stop()
        upstream.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_followed_daemon_log_leaves_out_the_hidden_models_lines(tcp):
    """`gemops` follows the daemon's log while runners of `tiny`, then `gemma-small`, start: it gets the
    second's lines and none of the first's, which came before them."""
    assert tcp.d.post("/engines/unload", {"all": True, "timeout": 0}).status_code == 200
    chat = [{"role": "user", "content": "hi"}]
    seen: list[str] = []
    with tcp.client.stream("GET", "/logs?follow=true&tail=0", headers=tcp.as_("gemops")) as followed:
        assert followed.status_code == 200
        for who, model in (("ops", "tiny"), ("gemops", "gemma-small")):
            answer = tcp.post("/v1/chat/completions", who, {"model": model, "messages": chat, "max_tokens": 2})
            assert answer.status_code == 200, answer.text
        for line in followed.iter_lines():
            seen.append(line)
            if "runner ready model=gemma-small:latest" in line:
                break
    assert not [line for line in seen if "tiny:latest" in line], seen
    assert "runner ready model=tiny:latest" in tcp.get("/logs?tail=10000", "ops").text


def test_an_admin_limited_to_some_models_cannot_touch_the_others(tcp):
    """`gemadmin` may change the host, for `gemma*` only: deleting or tagging `tiny` is answered as for
    `nope`, and a copy or tag may not be named outside its patterns (403, whether the name is taken or
    not); `tiny` is untouched."""
    probes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("DELETE", "/models/{m}", None),
        ("DELETE", "/models/{m}?force=true", None),
        ("POST", "/models/{m}/tag", {"name": "gemma-copy"}),
        ("POST", "/api/copy", {"source": "{m}", "destination": "gemma-copy"}),
        ("DELETE", "/api/delete", {"model": "{m}"}),
        ("POST", "/api/show", {"model": "{m}"}),
    ]
    for method, path, body in probes:
        answers = [tcp.client.request(method, path.format(m=m), headers=tcp.as_("gemadmin"),
                                      json=json.loads(json.dumps(body).replace("{m}", m)) if body else None)
                   for m in ("tiny", "nope")]
        same_answer(*answers, what=f"{method} {path}")
        assert answers[0].status_code == 404, (path, answers[0].text)
    for method, path, body in [("POST", "/models/gemma-small/tag", {"name": "{m}"}),
                               ("POST", "/api/copy", {"source": "gemma-small", "destination": "{m}"})]:
        answers = [tcp.client.request(method, path, headers=tcp.as_("gemadmin"),
                                      json=json.loads(json.dumps(body).replace("{m}", m))) for m in ("tiny", "nope")]
        same_answer(*answers, what=f"{method} {path}")
        assert answers[0].status_code == 403 and "may only name models its patterns match" in answers[0].text
    assert {m["name"] for m in tcp.get("/models", "legacy").json()} == {"tiny:latest", "gemma-small:latest"}
    tiny = tcp.get("/models/tiny", "legacy").json()
    assert tiny["name"] == "tiny:latest"
    # Within its patterns it acts as any admin.
    assert tcp.post("/api/copy", "gemadmin", {"source": "gemma-small", "destination": "gemma-copy"}).status_code == 200
    assert tcp.delete("/models/gemma-copy", "gemadmin").status_code == 200
