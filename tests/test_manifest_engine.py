"""Engines defined by a manifest, through a real daemon: llama-server run from a manifest (not the
built-in backend) on a loopback TCP port from its template, serving chat and streaming to the openai
client; hostile manifests refused with nothing stored; manifests loaded from engines/ at start; the
CLI; deleting an engine that is in use."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import pytest

from tests.conftest import ROOT, Daemon

pytestmark = pytest.mark.engine

TOKEN = "manifest-test-token-0123456789"


def llama_manifest(binary: Path, name: str = "llama-server-custom", listen: str = "tcp") -> str:
    where = '--port, "{port}"' if listen == "tcp" else '--host, "{socket}"'
    host = '--host, "{host}", ' if listen == "tcp" else ""
    return f"""\
name: {name}
description: llama.cpp's llama-server, run from a manifest
model_formats: [gguf]
modes: [completion, embedding]
capabilities: [chat, completions, embeddings, streaming]
versions:
  pinned:
    command: ["{binary}", --model, "{{model_path}}", {host}{where}, --alias, "{{model_name}}",
              --ctx-size, "{{ctx}}", --threads, "1", --n-gpu-layers, "0", --fit, "off", --cache-ram, "0",
              --no-webui]
    environment: {{LD_LIBRARY_PATH: "{binary.parent}", XDG_CONFIG_HOME: "{binary.parent}/no-user-config"}}
    listen: {listen}
    readiness: {{path: /health, timeout: 60}}
    mode_args: {{embedding: [--embeddings, --pooling, mean]}}
default_args: [--parallel, "1"]
flags:
  policy: allowlist
  allow:
    - {{name: --temp, type: number, min: 0, max: 2}}
    - {{name: --top-k, type: integer, min: 0}}
memory: {{kind: gguf}}
"""


@pytest.fixture(scope="module")
def mdaemon(llama_server: Path, tiny_model: Path) -> Iterator[tuple[Daemon, httpx.Client]]:
    """One daemon for the module: the tiny model, a TCP listener with a token."""
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    (root / "token").write_text(TOKEN)
    d = Daemon(root, llama_server, {"tiny": tiny_model}, {},
               ["--listen", "127.0.0.1:0", "--token-file", str(root / "token")])
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    tcp = httpx.Client(base_url=f"http://127.0.0.1:{port.group(1)}", timeout=30)
    yield d, tcp
    tcp.close()
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def stored(d: Daemon) -> set[str]:
    directory = d.root / "data" / "engines"
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def engine_names(d: Daemon) -> set[str]:
    return {b["name"] for b in d.http.get("/engines/backends").json()}


def define(d: Daemon, text: str, **kw: Any) -> httpx.Response:
    return d.http.post("/engines/backends", content=text.encode(), headers={"Content-Type": "application/yaml"},
                       **kw)


def engine_process(d: Daemon, marker: str) -> psutil.Process:
    children = psutil.Process(d.proc.pid).children(recursive=True)
    found = [c for c in children if "llama-server" in c.name() and marker in " ".join(c.cmdline())]
    assert len(found) == 1, [c.cmdline() for c in children]
    return found[0]


def test_llama_server_from_a_manifest_serves_chat_and_streams(mdaemon, llama_server):
    d, _ = mdaemon
    resp = define(d, llama_manifest(llama_server))
    assert resp.status_code == 201, resp.text
    view = resp.json()
    assert view["name"] == "llama-server-custom" and view["installed"] and view["version"] == "pinned"
    assert view["defined_by"] == "manifest" and view["versions"] == ["pinned"]
    assert stored(d) == {"llama-server-custom.yaml"}
    # The engine's own flags are checked by its manifest's allowlist when configured.
    ok = d.post("/engines/llama-server-custom/_configure", {"model": "tiny", "runtime_flags": ["--temp", "0.5"]})
    assert ok.status_code == 202, ok.text
    refused = d.post("/engines/llama-server-custom/_configure", {"model": "tiny", "runtime_flags": ["--port", "1"]})
    assert refused.status_code == 400 and "--port" in refused.text

    client = d.openai("/engines/llama-server-custom/v1")
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert answer.choices[0].message.content and answer.model == "tiny:latest"
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True))
    assert len(chunks) >= 2 and any(c.choices and c.choices[0].delta.content for c in chunks)

    runners = [r for r in d.ps() if r["model"] == "tiny:latest"]
    assert [r["backend"] for r in runners] == ["llama-server-custom"]  # not the built-in llama.cpp
    # Routes that name no engine follow the model's configuration to it, as /estimate does.
    generic = d.openai("/v1").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=4)
    assert generic.choices[0].message.content
    ollama = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 4}})
    assert ollama.status_code == 200, ollama.text
    assert [r["backend"] for r in d.ps() if r["model"] == "tiny:latest"] == ["llama-server-custom"]
    engine = engine_process(d, "--port")
    argv = engine.cmdline()
    port = int(argv[argv.index("--port") + 1])
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[-2:] == ["--temp", "0.5"]
    listening = [c.laddr for c in engine.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    d.post("/engines/unload", {"all": True})
    assert d.http.request("DELETE", "/engines/_configure", params={"model": "tiny"}).status_code == 200


HOSTILE = [
    ("unknown placeholder", lambda t: t.replace('"{model_path}"', '"{model_file}"'), 400,
     "versions.pinned.command[2] (line 8): unknown placeholder {model_file}"),
    ("relative executable", lambda t: re.sub(r'command: \["[^"]+"', 'command: ["llama-server"', t), 400,
     "versions.pinned.command[0] (line 8): 'llama-server' is not an absolute path"),
    ("shadows a built-in", lambda t: t.replace("name: hostile-custom", "name: llama.cpp"), 400,
     "name (line 1): 'llama.cpp' shadows the engine 'llama.cpp'"),
    ("version with a slash", lambda t: t.replace("  pinned:", "  'a/b':"), 400,
     "versions.a/b (line 7): version name 'a/b'"),
    ("version with dots", lambda t: t.replace("  pinned:", "  '..':"), 400, "versions... (line 7)"),
    ("daemon-owned flag", lambda t: t.replace("--no-webui]", "--no-webui, --api-key, secret]"), 400,
     "--api-key is the daemon's"),
    ("listen elsewhere", lambda t: t.replace('--host, "{host}"', "--host, 0.0.0.0"), 400,
     "--host is the daemon's: its value must be"),
]


@pytest.mark.parametrize(("case", "change", "status", "fragment"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_manifests_are_refused_and_nothing_is_stored(mdaemon, llama_server, case, change, status, fragment):
    d, _ = mdaemon
    before, names = stored(d), engine_names(d)
    resp = define(d, change(llama_manifest(llama_server, name="hostile-custom")))
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_manifest" and fragment in error["message"], error
    assert stored(d) == before and engine_names(d) == names


def test_a_duplicate_name_is_refused_and_the_first_kept(mdaemon, llama_server):
    d, _ = mdaemon
    first = llama_manifest(llama_server, name="twin-custom")
    assert define(d, first).status_code == 201
    kept = (d.root / "data" / "engines" / "twin-custom.yaml").read_bytes()
    again = d.post("/engines/backends", {"manifest": first.replace("description: ", "description: other "),
                                         "format": "yaml"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "backend_exists"
    assert (d.root / "data" / "engines" / "twin-custom.yaml").read_bytes() == kept
    assert d.http.delete("/engines/backends/twin-custom").status_code == 200
    assert "twin-custom" not in engine_names(d) and "twin-custom.yaml" not in stored(d)


def test_over_tcp_only_an_admin_token_defines_an_engine(mdaemon, llama_server):
    """The single token of [http] token_file is an admin token; a user token is refused (tests/test_scopes.py)."""
    d, tcp = mdaemon
    before = stored(d)
    text = llama_manifest(llama_server, name="remote-custom")
    no_token = tcp.post("/engines/backends", json={"manifest": text})
    assert no_token.status_code == 401
    assert stored(d) == before and "remote-custom" not in engine_names(d)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with_token = tcp.post("/engines/backends", json={"manifest": text}, headers=admin)
    assert with_token.status_code == 201, with_token.text
    assert stored(d) == before | {"remote-custom.yaml"} and "remote-custom" in engine_names(d)
    deleting = tcp.delete("/engines/backends/remote-custom", headers=admin)
    assert deleting.status_code == 200, deleting.text
    assert stored(d) == before and "remote-custom" not in engine_names(d)


def test_an_engine_in_use_is_deleted_only_with_force(mdaemon, llama_server):
    """A unix-socket manifest engine, configured for a model and running it."""
    d, _ = mdaemon
    assert define(d, llama_manifest(llama_server, name="doomed-custom", listen="unix")).status_code == 201
    assert d.post("/engines/doomed-custom/_configure", {"model": "tiny", "context_size": 256}).status_code == 202
    done = d.post("/engines/doomed-custom/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text
    engine_process(d, "doomed")  # listening on its unix socket under the runtime directory
    refused = d.http.delete("/engines/backends/doomed-custom")
    assert refused.status_code == 409
    message = refused.json()["error"]["message"]
    assert re.search(r"configured for tiny\S* \(completion\); running tiny\S* \(completion\)", message), message
    forced = d.http.delete("/engines/backends/doomed-custom", params={"force": "true"})
    assert forced.status_code == 200 and forced.json()["unloaded"] == 1, forced.text
    assert not [r for r in d.ps() if r["backend"] == "doomed-custom"]
    assert "doomed-custom" not in engine_names(d) and "doomed-custom.yaml" not in stored(d)
    d.http.request("DELETE", "/engines/_configure", params={"model": "tiny"})
    builtin = d.http.delete("/engines/backends/llama.cpp")
    assert builtin.status_code == 400 and builtin.json()["error"]["code"] == "backend_built_in"


def test_no_runner_starts_on_an_engine_being_deleted(make_daemon, llama_server, tiny_model):
    """A forced delete waits for its engine's runner to stop, held open here by a SIGSTOPped engine (its stop
    waits out the stop grace). Meanwhile another model configured on the engine is refused, 503 naming the
    delete, rather than started on an engine about to go; once it is gone that model is served by the engine
    for its format."""
    d = make_daemon({"tiny": tiny_model, "other": tiny_model}, env={"RUNNERD_STOP_GRACE": "20"})
    assert define(d, llama_manifest(llama_server, name="doomed2-custom", listen="unix")).status_code == 201
    for model in ("tiny", "other"):
        configured = d.post("/engines/doomed2-custom/_configure", {"model": model, "context_size": 256})
        assert configured.status_code == 202, configured.text
    # Configuring preloads both; "other" is unloaded, to be asked for during the delete.
    d.wait_for(lambda: len([r for r in d.ps() if r["state"] in ("ready", "idle")]) == 2, timeout=60,
               what="both preloaded")
    assert d.post("/engines/unload", {"models": ["other"], "timeout": 0}).status_code == 200
    d.wait_for(lambda: [r["model"] for r in d.ps() if r["state"] != "exited"] == ["tiny:latest"], what="one runner")
    victim = engine_process(d, "doomed2")
    victim.suspend()
    try:
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(d.http.delete, "/engines/backends/doomed2-custom", params={"force": "true"})
            d.wait_for(lambda: [r["state"] for r in d.ps() if r["model"] == "tiny:latest"] == ["stopping"],
                       timeout=30, what="the delete stopping the runner")
            refused = d.post("/engines/v1/completions", {"model": "other", "prompt": "a", "max_tokens": 2})
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "backend_removing" and "doomed2-custom is being deleted" in error["message"]
            assert victim.status() == psutil.STATUS_STOPPED  # all of that inside the delete's window
            victim.resume()
            deleted = deleting.result(timeout=60)
    finally:
        if victim.is_running():
            victim.resume()
    assert deleted.status_code == 200 and deleted.json()["unloaded"] == 1, deleted.text
    served = d.post("/engines/v1/completions", {"model": "other", "prompt": "a", "max_tokens": 2})
    assert served.status_code == 200, served.text
    assert {r["backend"] for r in d.ps() if r["state"] != "exited"} == {"llama.cpp"}


def test_manifests_in_engines_load_at_start_and_the_cli_adds_them(make_daemon, llama_server, tmp_path):
    def prepare(root: Path) -> None:
        engines = root / "data" / "engines"
        engines.mkdir(parents=True)
        (engines / "kept-custom.yaml").write_text(llama_manifest(llama_server, name="kept-custom"))
        (engines / "broken-custom.yaml").write_text("name: broken-custom\nversions: {}\n")

    d = make_daemon(prepare=prepare)
    assert {"kept-custom", "llama.cpp", "vllm"} <= engine_names(d) and "broken-custom" not in engine_names(d)
    assert "broken-custom.yaml ignored" in d.output()
    cli = [sys.executable, "-m", "runnerd.cli", "backends"]
    manifest = tmp_path / "added-custom.yaml"
    manifest.write_text(llama_manifest(llama_server, name="added-custom"))
    run = subprocess.run([*cli, "add", str(manifest), "--socket", str(d.socket)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=False)
    assert run.returncode == 0 and "defined added-custom" in run.stdout, run.stderr
    bad = tmp_path / "bad-custom.yaml"
    bad.write_text(llama_manifest(llama_server, name="bad-custom").replace("{ctx}", "{context}"))
    refused = subprocess.run([*cli, "add", str(bad), "--socket", str(d.socket)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60, check=False)
    assert refused.returncode == 1 and "unknown placeholder {context}" in refused.stderr
    listed = subprocess.run([*cli, "list", "--json", "--socket", str(d.socket)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=True)
    views = {b["name"]: b for b in json.loads(listed.stdout)}
    assert {"added-custom", "kept-custom"} <= set(views)
    assert (views["llama.cpp"]["defined_by"], views["kept-custom"]["defined_by"]) == ("built-in", "manifest")
    removed = subprocess.run([*cli, "rm", "added-custom", "--socket", str(d.socket)], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, check=False)
    assert removed.returncode == 0 and "deleted added-custom" in removed.stdout, removed.stderr
    assert sorted(p.name for p in (d.root / "data" / "engines").iterdir()) == ["broken-custom.yaml",
                                                                               "kept-custom.yaml"]


def test_a_configuration_pins_a_version(mdaemon, llama_server):
    d, _ = mdaemon
    text = llama_manifest(llama_server, name="twover-custom", listen="unix")
    block = text[text.index("  pinned:\n"):text.index("default_args")]
    second = block.replace("  pinned:", "  second:").replace("--no-webui]", '--no-webui, --threads-http, "3"]')
    text = text.replace(block, block + second).replace("default_args", "default_version: pinned\ndefault_args")
    assert define(d, text).status_code == 201
    wrong = d.post("/engines/twover-custom/_configure", {"model": "tiny", "options": {"backend_version": "third"}})
    assert wrong.status_code == 400 and "backend_version" in wrong.text
    pinned = d.post("/engines/twover-custom/_configure", {"model": "tiny", "options": {"backend_version": "second"}})
    assert pinned.status_code == 202, pinned.text
    done = d.post("/engines/twover-custom/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text
    argv = engine_process(d, "twover").cmdline()
    assert argv[argv.index("--threads-http") + 1] == "3"  # the pinned version's command, not the default's
    assert d.http.delete("/engines/backends/twover-custom", params={"force": "true"}).json()["unloaded"] == 1
    d.http.request("DELETE", "/engines/_configure", params={"model": "tiny"})


def test_versions_listen_and_get_ready_each_their_own_way(mdaemon, llama_server, tiny_model):
    """One manifest, a unix-socket version and a loopback-TCP version (with another readiness path): two
    models pinned one to each answer at once; a version whose readiness path never answers fails its load
    within its own timeout, not the default version's."""
    d, _ = mdaemon
    text = llama_manifest(llama_server, name="twokinds-custom", listen="unix")
    sock = text[text.index("  pinned:\n"):text.index("default_args")]
    port = llama_manifest(llama_server, listen="tcp")
    port = port[port.index("  pinned:\n"):port.index("default_args")].replace("  pinned:", "  port:").replace(
        "{path: /health, timeout: 60}", "{path: /v1/models, timeout: 50}")
    stuck = sock.replace("  pinned:", "  stuck:").replace("{path: /health, timeout: 60}",
                                                           "{path: /never-ready, timeout: 1.5}")
    text = text.replace(sock, sock.replace("  pinned:", "  sock:") + port + stuck).replace(
        "default_args", "default_version: sock\ndefault_args")
    defined = define(d, text)
    assert defined.status_code == 201, defined.text
    assert d.post("/models", {"name": "tiny2", "path": str(tiny_model)}).status_code in (200, 201)
    try:
        for model, version in (("tiny", "sock"), ("tiny2", "port")):
            pinned = d.post("/engines/twokinds-custom/_configure",
                            {"model": model, "options": {"backend_version": version}})
            assert pinned.status_code == 202, pinned.text

        def chat(model: str) -> str:
            answer = d.openai("/engines/twokinds-custom/v1").chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert answer.choices[0].message.content
            return answer.model

        with ThreadPoolExecutor(2) as pool:
            assert sorted(pool.map(chat, ["tiny", "tiny2"])) == ["tiny2:latest", "tiny:latest"]
        runners = {r["model"]: r for r in d.ps() if r["backend"] == "twokinds-custom"}
        # Both loaded at once (a lease may be handed back a moment after its answer: ready or idle).
        assert set(runners) == {"tiny:latest", "tiny2:latest"}, runners
        assert all(r["state"] in ("ready", "idle") for r in runners.values()), runners
        assert runners["tiny:latest"]["endpoint"]["kind"] == "unix" and runners["tiny:latest"]["socket"]
        assert runners["tiny2:latest"]["endpoint"]["kind"] == "tcp"
        port_number = runners["tiny2:latest"]["endpoint"]["port"]
        engine = psutil.Process(runners["tiny2:latest"]["pid"])
        assert [(c.laddr.ip, c.laddr.port) for c in engine.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN] == [("127.0.0.1", port_number)]
        assert not [c for c in psutil.Process(runners["tiny:latest"]["pid"]).net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]

        d.post("/engines/unload", {"models": ["tiny2"]})
        assert d.post("/engines/twokinds-custom/_configure",
                      {"model": "tiny2", "options": {"backend_version": "stuck"}}).status_code == 202
        failed = d.post("/engines/twokinds-custom/v1/completions", {"model": "tiny2", "prompt": "a", "max_tokens": 2})
        assert failed.status_code >= 500 and "did not become ready within 1.5 s" in failed.text, failed.text
    finally:
        d.http.delete("/engines/backends/twokinds-custom", params={"force": "true"})
        for model in ("tiny", "tiny2"):
            d.http.request("DELETE", "/engines/_configure", params={"model": model})
        d.http.delete("/models/tiny2")


def test_an_engine_of_unknown_size_is_admitted_and_measured(mdaemon, llama_server):
    d, _ = mdaemon
    text = llama_manifest(llama_server, name="unsized-custom").replace("{kind: gguf}", "{kind: unknown}")
    assert define(d, text).status_code == 201
    assert d.post("/engines/unsized-custom/_configure", {"model": "tiny", "context_size": 512}).status_code == 202
    done = d.post("/engines/unsized-custom/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text
    runner = next(r for r in d.ps() if r["backend"] == "unsized-custom")
    assert runner["memory"]["known"] is False
    assert "measured once it has loaded" in runner["memory"]["notes"][0]
    # The estimate answers for the engine the model is configured for, as ps does, not the built-in.
    estimate = d.http.get("/models/tiny/estimate").json()
    assert (estimate["backend"], estimate["known"], estimate["context_size"]) == ("unsized-custom", False, 512)
    assert estimate["notes"] == runner["memory"]["notes"]
    assert d.http.get("/models/tiny").json()["estimate"]["backend"] == "unsized-custom"
    d.wait_for(lambda: any(r["measured_ram_bytes"] > 0 for r in d.ps() if r["backend"] == "unsized-custom"),
               what="the runner's memory measured")
    assert d.http.delete("/engines/backends/unsized-custom", params={"force": "true"}).status_code == 200
    d.http.request("DELETE", "/engines/_configure", params={"model": "tiny"})
    builtin = d.http.get("/models/tiny/estimate").json()
    assert (builtin["backend"], builtin["known"]) == ("llama.cpp", True) and builtin["ram_bytes"] > 0


def test_on_the_socket_only_the_daemons_user_may_define_an_engine(mdaemon, llama_server):
    """Another user who can open the socket (the runnerd group, in system mode) may use the daemon but not
    define engines. The test runs as root, as CI does here, and lends the socket to `nobody` for one call."""
    d, _ = mdaemon
    modes = {path: path.stat().st_mode & 0o7777 for path in (d.root, d.socket.parent, d.socket)}
    before = stored(d)
    try:
        d.root.chmod(0o711)
        d.socket.parent.chmod(0o711)
        d.socket.chmod(0o666)
        curl = ["curl", "-s", "--max-time", "30", "--unix-socket", str(d.socket)]
        health = subprocess.run([*curl, "http://runnerd/engines/backends"], user=65534, capture_output=True,
                                text=True, timeout=60, check=True)
        assert "llama.cpp" in health.stdout  # the daemon serves this user
        posted = subprocess.run([*curl, "-H", "Content-Type: application/yaml", "--data-binary", "@-",
                                 "http://runnerd/engines/backends"], user=65534, capture_output=True, text=True,
                                timeout=60, check=True, input=llama_manifest(llama_server, name="guest-custom"))
        assert json.loads(posted.stdout)["error"]["code"] == "not_socket_owner", posted.stdout
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert stored(d) == before and "guest-custom" not in engine_names(d)
