"""Pulls asked for over TCP, as an attacker holding a token would: no loopback, private, link-local,
unspecified or multicast target (by address or by what a name resolves to, redirects included) unless
the operator allows it, and errors that tell nothing of the source's bytes, sizes, digests,
connection failures or the daemon's paths. The owner on the unix socket still pulls from anywhere."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest

from tests.fileserver import FileServer

TOKEN = "t0ken-for-hostile-pulls"


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer().start()
    yield s
    s.stop()


def tcp_daemon(make_daemon: Any, tmp_path: Any, allowed: list[str] | None = None) -> tuple[Any, httpx.Client, int]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    env = {"RUNNERD_STORE__PULL_ALLOWED_HOSTS": json.dumps(allowed)} if allowed is not None else {}
    d = make_daemon(env=env, args=["--listen", "127.0.0.1:0", "--token-file", str(token)])
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    tcp = httpx.Client(base_url=f"http://127.0.0.1:{port.group(1)}", timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}"})
    return d, tcp, int(port.group(1))


def error_of(resp: httpx.Response) -> str:
    if resp.headers.get("content-type", "").startswith("application/x-ndjson"):
        return str(json.loads(resp.text.splitlines()[-1]).get("error", ""))
    error = resp.json()["error"]
    return error if isinstance(error, str) else str(error["message"])


def test_over_tcp_pulls_refuse_the_hosts_own_network(make_daemon, tmp_path, server, tiny_model):
    d, tcp, own_port = tcp_daemon(make_daemon, tmp_path)
    url = server.add("/tiny.gguf", tiny_model.read_bytes())
    targets = [
        url,
        f"http://localhost:{server.port}/tiny.gguf",  # a name: judged by what it resolves to
        f"http://0.0.0.0:{server.port}/tiny.gguf",
        f"http://[::1]:{server.port}/tiny.gguf",
        f"http://[::ffff:127.0.0.1]:{server.port}/tiny.gguf",
        f"http://[::]:{server.port}/tiny.gguf",
        f"http://127.0.0.1:{own_port}/health",  # the daemon itself
        "http://169.254.169.254/latest/meta-data/x.gguf",
        "http://10.1.2.3/x.gguf",
        "http://192.168.0.1/x.gguf",
        "http://100.64.0.1/x.gguf",
        "http://224.0.0.1/x.gguf",
        "http://[fe80::1]/x.gguf",
        "http://[fd00::1]/x.gguf",
    ]
    with tcp:
        for target in targets:
            created = tcp.post("/models/create", json={"from": target, "name": "ssrf"})
            assert created.status_code == 403, (target, created.text)
            assert created.json()["error"]["code"] == "pull_target_refused", created.text
            pulled = tcp.post("/api/pull", json={"model": target, "stream": False})
            assert pulled.status_code == 403 and "pull_allowed_hosts" in pulled.json()["error"], (target, pulled.text)
        assert tcp.get("/models").json() == []
    assert server.requests == []  # nothing was ever fetched
    # The owner, over the unix socket, may pull from the host's own network.
    mine = d.post("/models/create", {"from": url, "name": "mine"})
    assert mine.status_code == 200 and json.loads(mine.text.splitlines()[-1])["phase"] == "success", mine.text


def test_redirects_are_judged_again_and_the_allowlist_admits_a_mirror(make_daemon, tmp_path, server, tiny_model):
    _, tcp, _ = tcp_daemon(make_daemon, tmp_path, allowed=["localhost"])
    server.add("/tiny.gguf", tiny_model.read_bytes())
    server.redirects["/hop.gguf"] = server.url("/tiny.gguf")  # the mirror sends us to 127.0.0.1
    mirror = f"http://localhost:{server.port}"
    with tcp:
        hopped = tcp.post("/models/create", json={"from": f"{mirror}/hop.gguf", "name": "hop"})
        assert hopped.status_code == 403 and hopped.json()["error"]["code"] == "pull_target_refused", hopped.text
        assert [p for p, _ in server.requests] == ["/hop.gguf"]
        direct = tcp.post("/models/create", json={"from": f"{mirror}/tiny.gguf", "name": "mirrored"})
        assert direct.status_code == 200, direct.text
        assert json.loads(direct.text.splitlines()[-1])["model"]["name"] == "mirrored:latest"


def test_pull_errors_over_tcp_tell_nothing_of_the_source(make_daemon, tmp_path, server, tiny_model):
    d, tcp, _ = tcp_daemon(make_daemon, tmp_path, allowed=["127.0.0.0/8"])
    page = b"<html><body>zorblax internal dashboard " + b"s3cr3t " * 40 + b"</body></html>"
    server.add("/page.gguf", page)
    server.status["/broken.gguf"] = 500  # answered with the text "nope"
    server.add("/tiny.gguf", tiny_model.read_bytes())
    forbidden = ["<html", "zorblax", "s3cr3t", "nope", "Connect call failed", "Errno", str(d.root),
                 hashlib.sha256(page).hexdigest(), hashlib.sha256(tiny_model.read_bytes()).hexdigest(),
                 str(len(page)), "sha256-"]
    cases = [
        ({"from": server.url("/page.gguf"), "name": "page"}, 400,
         "page.gguf is not a usable GGUF model: not a GGUF file"),
        ({"from": server.url("/broken.gguf")}, 502, "(HTTP 500)"),
        ({"from": server.url("/gone.gguf")}, 404, "(HTTP 404)"),
        ({"from": "http://127.0.0.1:9/closed.gguf"}, 502, "could not connect to the pull source"),
        ({"from": server.url("/tiny.gguf"), "sha256": "a" * 64}, 502, "sha256 mismatch"),
    ]
    with tcp:
        for body, status, fragment in cases:
            resp = tcp.post("/models/create", json=body)
            message = error_of(resp)
            assert fragment in message, (body, resp.text)
            expected = resp.status_code if resp.status_code != 200 else json.loads(resp.text.splitlines()[-1])["status"]
            assert expected == status, (body, resp.text)
            assert not [f for f in forbidden if f in message], (body, message)
            assert ":9" not in message and "127.0.0.1" not in message, message
        assert tcp.get("/models").json() == []
