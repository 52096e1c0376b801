"""An operator catalog from a URL (`catalog_url`), through a real daemon and the tests' local HTTP file
server: fetched at start and on its interval, refused when invalid, oversized, hostile or too slow (the
last good one stays in force and the failure is shown), kept in the data directory and used by a daemon
that starts while the URL fails."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.catalog import MAX_CATALOG_BYTES
from runnerd.catalog_feed import KEPT_NAME
from tests.conftest import Daemon, app_on_loopback
from tests.fileserver import FileServer

PATH = "/runnerd/catalog.yaml"


def catalog(version: str, padding: int = 0) -> bytes:
    """A valid catalog offering `feedy` at `version` (an existing binary, so it counts as installed),
    padded with a YAML comment to `padding` bytes."""
    text = f"""engines:
  - name: feedy
    description: from the operator's URL
    versions:
      "{version}":
        variants:
          cpu: {{kind: binary, path: /bin/true}}
"""
    return (text + "#" + "x" * max(0, padding - len(text) - 2) + "\n").encode() if padding else text.encode()


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer().start()
    yield s
    s.stop()


def listing(d: Daemon) -> dict[str, Any]:
    answer: dict[str, Any] = d.http.get("/engines/backends/catalog").json()
    return answer


def feedy(d: Daemon) -> list[str]:
    return sorted(i["version"] for i in listing(d)["items"] if i["engine"] == "feedy")


def wait_feed(d: Daemon, predicate: Any, what: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def check() -> bool:
        seen.update(listing(d))
        return bool(predicate(seen["catalog_url"]))

    d.wait_for(check, timeout=20, what=what)
    return seen


def start(make_daemon: Any, server: FileServer, prepare: Any = None) -> Daemon:
    d: Daemon = make_daemon(env={"RUNNERD_CATALOG_URL": server.url(PATH), "RUNNERD_CATALOG_REFRESH": "1",
                                 "RUNNERD_CATALOG_FETCH_TIMEOUT": "1"}, prepare=prepare)
    return d


def test_a_catalog_url_is_fetched_refreshed_and_only_a_good_one_taken(make_daemon, server):
    server.add(PATH, catalog("1.0"))
    d = start(make_daemon, server)
    seen = wait_feed(d, lambda f: f["state"] == "fetched", "the first fetch")
    assert seen["catalog_url"]["error"] is None and seen["catalog_url"]["url"] == server.url(PATH)
    assert feedy(d) == ["1.0"]
    assert {"llama.cpp"} <= {i["engine"] for i in seen["items"]}  # on top of the shipped catalog
    kept_path = d.root / "data" / KEPT_NAME
    kept = json.loads(kept_path.read_text())
    assert kept["url"] == server.url(PATH) and kept["text"] == catalog("1.0").decode()
    installed = d.post("/engines/backends/catalog/install", {"engine": "feedy"})
    assert installed.status_code == 200 and "already installed" in installed.json()["message"]

    alias_bomb = b'a: &a ["x", "x"]\nb: &b [*a, *a]\nengines: [*b]\n'
    slow = catalog("6.0", padding=300 * 1024)  # valid, but sent in 64 KiB pieces 2 s apart
    hostile = [
        ("an invalid field", catalog("2.0").replace(b"kind: binary", b"kind: shell"),
         f"{PATH}: engines.0.versions.2.0.variants.cpu: Input tag 'shell'"),
        ("a URL in a pip plan", catalog("3.0").replace(b"{kind: binary, path: /bin/true}",
                                                      b'{kind: pip, packages: ["x @ https://evil.example/x.whl"]}'),
         "packages"),
        ("an oversized body", catalog("4.0", padding=MAX_CATALOG_BYTES + 1),
         f"a catalog is at most {MAX_CATALOG_BYTES}"),
        ("YAML aliases", alias_bomb, "YAML aliases"),
        ("not UTF-8", catalog("5.0") + b"\xff\xfe", "not UTF-8"),
        ("a slow server", slow, "no complete answer within 1 s"),
    ]
    for case, body, fragment in hostile:
        server.files[PATH].data = body
        server.delay = 2.0 if case == "a slow server" else 0.0
        asked = listing(d)["catalog_url"]["checked_at"]
        seen = wait_feed(d, lambda f, asked=asked, fragment=fragment: f["checked_at"] != asked and f["error"]
                         and fragment in f["error"], case)
        assert seen["catalog_url"]["state"] == "fetched", case
        assert feedy(d) == ["1.0"], case  # the last good catalog stays in force
        assert json.loads(kept_path.read_text()) == kept, case  # and stays kept
    server.delay = 0.0

    server.status[PATH] = 500
    wait_feed(d, lambda f: f["error"] == "HTTP 500 Internal Server Error", "a server error shown")
    assert feedy(d) == ["1.0"]
    del server.status[PATH]

    server.files[PATH].data = catalog("7.0")
    seen = wait_feed(d, lambda f: f["error"] is None and f["fetched_at"] != kept["fetched_at"], "the refresh")
    assert feedy(d) == ["7.0"]
    assert json.loads(kept_path.read_text())["text"] == catalog("7.0").decode()


def test_the_kept_copy_serves_while_the_url_fails_at_start(make_daemon, server, tmp_path):
    server.add(PATH, catalog("1.0"))
    first = start(make_daemon, server)
    wait_feed(first, lambda f: f["state"] == "fetched", "the first fetch")
    kept = tmp_path / KEPT_NAME
    shutil.copy(first.root / "data" / KEPT_NAME, kept)
    first.stop()

    server.status[PATH] = 503

    def keep(root: Path) -> None:
        (root / "data").mkdir(parents=True)
        shutil.copy(kept, root / "data" / KEPT_NAME)

    second = start(make_daemon, server, prepare=keep)
    seen = wait_feed(second, lambda f: f["error"] is not None, "the failed fetch")
    assert seen["catalog_url"]["state"] == "kept" and "HTTP 503" in seen["catalog_url"]["error"]
    assert feedy(second) == ["1.0"]

    # A copy kept for another URL is not used.
    moved = json.loads(kept.read_text())
    moved["url"] = server.url("/elsewhere.yaml")
    kept.write_text(json.dumps(moved))
    third = start(make_daemon, server, prepare=keep)
    seen = wait_feed(third, lambda f: f["error"] is not None, "the failed fetch")
    assert seen["catalog_url"]["state"] == "none" and feedy(third) == []


@pytest.mark.anyio
async def test_a_body_without_a_length_is_cut_at_the_cap():
    """Chunked bodies announce no size: the cap holds while reading, and for compressed ones it counts the
    bytes after decompression (a small gzip body that inflates past it is refused)."""
    import gzip

    from aiohttp import web

    from runnerd.catalog_feed import FetchError, fetch_text

    huge = catalog("1.0", padding=MAX_CATALOG_BYTES + 10)

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(huge), 100_000):
            await resp.write(huge[i:i + 100_000])
        await resp.write_eof()
        return resp

    async def bomb(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(huge), headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/bomb", bomb)
    async with app_on_loopback(app) as port:
        for path in ("/chunked", "/bomb"):
            with pytest.raises(FetchError, match=f"larger than {MAX_CATALOG_BYTES} bytes"):
                await fetch_text(f"http://127.0.0.1:{port}{path}", timeout=10)


def test_an_admin_refreshes_the_catalog_url_now(make_daemon, server, tmp_path):
    """POST /engines/backends/catalog/refresh fetches at once (the timer here would wait an hour), answers
    with the feed's status block, and is an admin's to ask for; the CLI's `catalog --refresh` too."""
    import re
    import subprocess
    import sys

    import httpx2 as httpx

    from tests.conftest import ROOT
    from tests.test_scopes import tokens_toml

    server.add(PATH, catalog("1.0"))
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_toml({"root": ("refresh-admin-token-0123456789", "admin", {}),
                                   "ops": ("refresh-operator-token-0123456", "operator", {})}))
    d: Daemon = make_daemon(env={"RUNNERD_CATALOG_URL": server.url(PATH), "RUNNERD_CATALOG_REFRESH": "3600",
                                 "RUNNERD_HTTP__TOKENS_FILE": str(tokens)}, args=["--listen", "127.0.0.1:0"])
    first = wait_feed(d, lambda f: f["state"] == "fetched", "the first fetch")["catalog_url"]
    assert feedy(d) == ["1.0"]

    server.files[PATH].data = catalog("2.0")
    refreshed = d.post("/engines/backends/catalog/refresh")
    assert refreshed.status_code == 200, refreshed.text
    block = refreshed.json()["catalog_url"]
    assert block == listing(d)["catalog_url"]  # the same block as the listing's
    assert block["state"] == "fetched" and block["error"] is None and block["fetched_at"] > first["fetched_at"]
    assert feedy(d) == ["2.0"]

    # A fetch that fails is told in the block; the catalog in force stays.
    server.status[PATH] = 500
    failed = d.post("/engines/backends/catalog/refresh").json()["catalog_url"]
    assert failed["error"] == "HTTP 500 Internal Server Error" and failed["checked_at"] > block["checked_at"]
    assert feedy(d) == ["2.0"]

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runnerd.cli", "backends", "catalog", "--refresh", "--socket",
                               str(d.socket)], capture_output=True, text=True, timeout=60, cwd=ROOT)

    refused = cli()
    assert refused.returncode != 0 and "HTTP 500" in refused.stderr and "the catalog in force stays" in refused.stderr
    del server.status[PATH]
    server.files[PATH].data = catalog("3.0")
    listed = cli()
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"feedy\s+3\.0", listed.stdout), listed.stdout

    # Over TCP only an admin token may ask for a fetch.
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    with httpx.Client(base_url=f"http://127.0.0.1:{port.group(1)}", timeout=30) as tcp:
        operator = tcp.post("/engines/backends/catalog/refresh",
                            headers={"Authorization": "Bearer refresh-operator-token-0123456"})
        assert operator.status_code == 403 and "needs the 'admin' role" in operator.text, operator.text
        admin = tcp.post("/engines/backends/catalog/refresh",
                         headers={"Authorization": "Bearer refresh-admin-token-0123456789"})
        assert admin.status_code == 200 and admin.json()["catalog_url"]["error"] is None, admin.text
