"""GET /models/{name}/estimate, GET /models/{name}, `runnerd estimate` and `runnerd inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def cli(*args: str):
    return subprocess.run([sys.executable, "-m", "runnerd.cli", *args], capture_output=True, text=True, timeout=60)


def test_estimate_route_follows_settings_and_validates_them(daemon):
    base = daemon.http.get("/models/tiny/estimate").json()
    assert base["known"] and base["model"] == "tiny:latest" and base["mode"] == "completion"
    assert base["ram_bytes"] == sum(d["bytes"] for d in base["devices"]) and base["vram_bytes"] == 0
    bigger = daemon.http.get("/models/tiny/estimate", params={"ctx": 4096}).json()
    assert bigger["context_size"] == 4096 and bigger["ram_bytes"] > base["ram_bytes"]
    kv = {p: daemon.http.get("/models/tiny/estimate", params={"ctx": 4096, "cache_type_k": t, "cache_type_v": t})
          .json()["devices"][0]["breakdown"]["kv_cache"] for p, t in (("f16", "f16"), ("q8", "q8_0"))}
    assert kv["q8"] < kv["f16"]
    emb = daemon.http.get("/models/tiny/estimate", params={"mode": "embedding"}).json()
    assert emb["mode"] == "embedding"
    for params, param in (({"ctx": "lots"}, "ctx"), ({"cache_type_k": "/etc/x"}, "cache_type_k"),
                          ({"mode": "sing"}, "mode"), ({"parallel": "-3"}, "parallel"), ({"colour": "red"}, "colour")):
        resp = daemon.http.get("/models/tiny/estimate", params=params)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (params, resp.text)
    assert daemon.http.get("/models/ghost/estimate").status_code == 404


def test_a_model_named_like_the_estimate_route_is_still_reachable(daemon, tiny_model):
    resp = daemon.post("/models", {"name": "org/estimate", "path": str(tiny_model)})
    assert resp.status_code in (200, 201), resp.text
    try:
        shown = daemon.http.get("/models/org/estimate").json()
        assert shown["name"] == "org/estimate:latest" and "summary" in shown
        assert daemon.http.get("/models/org/estimate:latest").json()["name"] == "org/estimate:latest"
        # A model that is named by the prefix still gets its estimate.
        assert daemon.http.get("/models/org/estimate/estimate").json()["model"] == "org/estimate:latest"
    finally:
        daemon.http.delete("/models/org/estimate")


def test_show_includes_summary_and_default_estimate(daemon):
    shown = daemon.http.get("/models/tiny").json()
    assert shown["summary"]["architecture"] == "llama" and shown["summary"]["block_count"] == 2
    assert shown["summary"]["vocab_size"] == 271 and shown["summary"]["quantization"] == "F32"
    assert shown["estimate"]["ram_bytes"] == daemon.http.get("/models/tiny/estimate").json()["ram_bytes"]


def test_runner_reports_the_same_estimate(daemon):
    daemon.post("/engines/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}).raise_for_status()
    (runner,) = [r for r in daemon.ps() if r["mode"] == "completion"]
    assert runner["memory"]["ram_bytes"] == daemon.http.get("/models/tiny/estimate").json()["ram_bytes"]
    assert runner["measured_ram_bytes"] > 0


def test_cli_estimate_and_inspect(daemon, tiny_model):
    table = cli("estimate", "tiny", "--ctx", "2048", "--socket", str(daemon.socket))
    assert table.returncode == 0 and "KV CACHE" in table.stdout and "context 2048" in table.stdout, table.stderr
    local = json.loads(cli("estimate", str(tiny_model), "--ctx", "2048", "--json").stdout)
    remote = json.loads(cli("estimate", "tiny", "--ctx", "2048", "--json", "--socket", str(daemon.socket)).stdout)
    assert local["ram_bytes"] == remote["ram_bytes"]
    summary = json.loads(cli("inspect", str(tiny_model), "--json").stdout)
    assert summary["architecture"] == "llama" and summary["embedding_length"] == 64
    shown = cli("inspect", "tiny", "--socket", str(daemon.socket))
    assert "architecture     llama" in shown.stdout
    bad = cli("estimate", str(tiny_model), "--cache-type-k", "q9_9")
    assert bad.returncode == 1 and "q9_9" in bad.stderr
