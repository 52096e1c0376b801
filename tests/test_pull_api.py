"""The model store through a real daemon: POST /models/create (NDJSON), a pulled GGUF served by the
real llama-server, removal while a runner uses it, tags, df, and the CLI (pull, ls, tag, rm)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fileserver import FileServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[FileServer]:
    s = FileServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hub_daemon(llama_server: Path, server: FileServer) -> Iterator[Any]:
    import shutil
    import tempfile

    from tests.conftest import Daemon

    root = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    d = Daemon(Path(root), llama_server, {}, {"RUNNERD_HUGGINGFACE__BASE_URL": server.base_url,
                                              "RUNNERD_STORE__READ_TIMEOUT": "5"}, [])
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def ndjson(resp: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def test_pull_then_serve_with_the_real_engine(hub_daemon, server, tiny_model):
    data = tiny_model.read_bytes()
    ref = server.add_hf("acme", "tiny-GGUF", "tiny-F32.gguf", data)
    resp = hub_daemon.post("/models/create", {"from": ref, "name": "pulled"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(resp)
    assert lines[0]["phase"] == "download" and lines[0]["total"] == len(data)
    final = lines[-1]
    assert final["phase"] == "success" and final["completed"] == len(data)
    model = final["model"]
    assert model["name"] == "pulled:latest" and model["digest"] == hashlib.sha256(data).hexdigest()
    assert model["architecture"] == "llama" and model["quantization"] == "F32"
    listed = {m["name"]: m for m in hub_daemon.http.get("/models").json()}
    assert listed["pulled:latest"]["size"] == len(data)
    shown = hub_daemon.http.get("/models/pulled").json()
    assert shown["summary"]["architecture"] == "llama"

    out = hub_daemon.post("/engines/v1/completions", {"model": "pulled", "prompt": "hello", "max_tokens": 4})
    assert out.status_code == 200, out.text
    assert out.json()["choices"][0]["text"] is not None
    assert hub_daemon.http.get("/engines/df").json()["models_disk_usage"] >= len(data)

    # In use by a runner: 409 without force; tags share blobs; force stops the runner.
    assert hub_daemon.post("/models/pulled/tag", {"name": "alias:v1"}).status_code == 201
    busy = hub_daemon.http.delete("/models/pulled")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_in_use"
    forced = hub_daemon.http.delete("/models/pulled?force=true")
    assert forced.status_code == 200 and forced.json() == {"deleted": "pulled:latest", "unloaded": 1}
    assert all(r["model"] != "pulled:latest" for r in hub_daemon.ps())
    blob = Path(model["path"])
    assert blob.exists()  # alias:v1 still uses it
    assert hub_daemon.http.delete("/models/alias:v1").status_code == 200
    assert not blob.exists()
    assert hub_daemon.http.get("/models/pulled").status_code == 404


def test_create_errors_have_their_status(hub_daemon, server):
    server.status["/gone.gguf"] = 404
    server.status["/broken.gguf"] = 500
    cases = [
        ({"from": server.url("/gone.gguf")}, 404),
        ({"from": server.url("/broken.gguf")}, 502),
        ({"from": "file:///etc/passwd"}, 400),
        ({"from": "hf://org/../etc"}, 400),
        ({"from": server.url("/x.gguf"), "name": "../bad"}, 400),
        ({"from": server.url("/x.gguf"), "sha256": "nothex"}, 400),
        ({"name": "x"}, 400),
        ({"from": "/etc/passwd", "extra": 1}, 400),
        ({"from": "/nonexistent/model.gguf"}, 400),
    ]
    for body, status in cases:
        resp = hub_daemon.post("/models/create", body)
        assert resp.status_code == status, (body, resp.text)
        assert "error" in resp.json()
    assert hub_daemon.http.get("/models").json() == []


def test_error_after_streaming_started_is_the_last_line(hub_daemon, server, tiny_model):
    server.add("/mismatch.gguf", tiny_model.read_bytes())
    resp = hub_daemon.post("/models/create", {"from": server.url("/mismatch.gguf"), "sha256": "a" * 64})
    assert resp.status_code == 200
    lines = ndjson(resp)
    assert lines[0]["phase"] == "download" and "sha256 mismatch" in lines[-1]["error"]
    assert lines[-1]["status"] == 502
    assert hub_daemon.http.get("/models").json() == []


def test_cli_pull_ls_tag_rm(hub_daemon, server, tiny_model):
    url = server.add("/cli/tiny.gguf", tiny_model.read_bytes())
    env = {**os.environ, "RUNNERD_SOCKET": str(hub_daemon.socket)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runnerd.cli", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    out = cli("pull", url, "--name", "clitiny")
    assert out.returncode == 0, out.stderr
    assert "pulled clitiny:latest" in out.stdout
    assert "clitiny:latest" in cli("ls").stdout
    assert cli("tag", "clitiny", "clitiny:v2").returncode == 0
    listed = json.loads(cli("ls", "--json").stdout)
    assert {"clitiny:latest", "clitiny:v2"} <= {m["name"] for m in listed}
    assert "tiny-llama" not in cli("inspect", "clitiny").stderr
    assert cli("inspect", "clitiny").returncode == 0
    assert cli("rm", "clitiny").returncode == 0
    assert cli("rm", "clitiny:v2").returncode == 0
    bad = cli("pull", server.url("/cli/missing.gguf"))
    assert bad.returncode == 1 and "HTTP 404" in bad.stderr
    assert cli("rm", "clitiny").returncode == 1
    local = cli("pull", str(tiny_model), "--name", "local")
    assert local.returncode == 0, local.stderr
    assert cli("rm", "local").returncode == 0 and tiny_model.exists()


def test_local_path_pull_is_unix_socket_only(make_daemon, tiny_model, tmp_path):
    import re

    import httpx2 as httpx

    token = tmp_path / "token"
    token.write_text("t0ken-for-the-pull-test\n")
    d = make_daemon(args=["--listen", "127.0.0.1:0", "--token-file", str(token)])
    port = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", d.output())
    assert port is not None, d.output()
    with httpx.Client(base_url=f"http://127.0.0.1:{port.group(1)}", timeout=30,
                      headers={"Authorization": "Bearer t0ken-for-the-pull-test"}) as tcp:
        refused = tcp.post("/models/create", json={"from": str(tiny_model)})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "local_only"
        assert tcp.get("/models").json() == []


# --- a Hugging Face-format directory registered in place ----------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_model_directory_is_registered_in_place_and_removing_it_leaves_the_folder(hub_daemon, tmp_path):
    from tests.test_vllm_unit import write_model_dir

    folder = write_model_dir(tmp_path / "tiny-hf")
    before = snapshot(folder)
    resp = hub_daemon.post("/models", {"name": "hfdir", "path": str(folder)})
    assert resp.status_code == 201, resp.text
    out = subprocess.run([sys.executable, "-m", "runnerd.cli", "models", "add", "hfcli", str(folder), "--socket",
                          str(hub_daemon.socket)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {m["name"]: m for m in hub_daemon.http.get("/models").json()}
    for name in ("hfdir:latest", "hfcli:latest"):
        model = listed[name]
        assert (model["format"], model["path"], model["stored"]) == ("safetensors", str(folder), False), model
        assert model["architecture"] == "LlamaForCausalLM" and model["parameter_count"] == 4 * 8 + 10 + 3 * 3
        assert model["size"] == sum(len(data) for data, _ in before.values())
    for name in ("hfdir", "hfcli"):
        assert hub_daemon.http.delete(f"/models/{name}").status_code == 200
    names = {m["name"] for m in hub_daemon.http.get("/models").json()}
    assert not names & {"hfdir:latest", "hfcli:latest"}
    assert snapshot(folder) == before


def test_a_directory_that_is_no_model_is_refused_naming_what_is_missing(hub_daemon, tmp_path):
    from tests.test_vllm_unit import write_model_dir

    no_config = write_model_dir(tmp_path / "no-config")
    (no_config / "config.json").unlink()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    bad_config = write_model_dir(tmp_path / "bad-config")
    (bad_config / "config.json").write_text("[1, 2]")
    bad_header = write_model_dir(tmp_path / "bad-header")
    (bad_header / "model-00002.safetensors").write_bytes(b"\xff" * 16)  # a header length beyond the file
    before = hub_daemon.http.get("/models").json()
    for folder, fragment in [(no_config, "has no config.json"), (no_weights, "has no *.safetensors weights"),
                             (bad_config, "config.json is not a JSON object"),
                             (bad_header, "model-00002.safetensors: header length")]:
        resp = hub_daemon.post("/models", {"name": "nomodel", "path": str(folder)})
        assert resp.status_code == 400, (folder, resp.text)
        error = resp.json()["error"]
        assert error["param"] == "path" and str(folder) in error["message"] and fragment in error["message"], error
    assert hub_daemon.http.get("/models").json() == before
