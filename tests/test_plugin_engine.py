"""An engine runnerd does not know, added through the registry's entry-point group with no edit to
runnerd/: tests/tcp_engine.py (listens on loopback TCP only) and its backend, tests/plugin/."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENTRY_POINTS = "[runnerd.backends]\ntcptest = tests.plugin.tcp_backend:TcpTestBackend\n"


@pytest.fixture
def plugin_daemon(make_daemon, tiny_model, tmp_path):
    site = tmp_path / "site"
    dist = site / "runnerd_tcptest-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: runnerd-tcptest\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    config = tmp_path / "runnerd.toml"
    config.write_text('[engines.tcptest]\ngreeting = "howdy"\n')
    return make_daemon({"tiny": tiny_model}, env={"PYTHONPATH": f"{site}:{ROOT}"}, args=["--config", str(config)])


def test_a_plugged_in_tcp_engine_serves_through_the_daemon(plugin_daemon):
    d = plugin_daemon
    assert d.http.get("/engines/status").json()["tcptest"] == "Running: tcptest 1"
    client = d.openai("/engines/tcptest/v1")
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    # The greeting comes from the [engines.tcptest] table of the settings file.
    assert answer.choices[0].message.content.startswith("howdy #1")
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.startswith("howdy #2")

    [runner] = d.ps()
    assert runner["backend"] == "tcptest" and runner["socket"] is None
    endpoint = runner["endpoint"]
    assert endpoint["kind"] == "tcp" and endpoint["port"] > 0
    with socket.create_connection(("127.0.0.1", endpoint["port"]), timeout=5):
        pass  # the engine listens on the port the daemon allocated
    d.post("/engines/unload", {"all": True})
    d.wait_for(lambda: d.ps() == [], what="the TCP engine to stop")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", endpoint["port"]), timeout=5).close()


def test_a_capability_the_plugged_in_engine_lacks_is_501(plugin_daemon):
    resp = plugin_daemon.post("/engines/tcptest/v1/embeddings", {"model": "tiny", "input": "x"})
    assert resp.status_code == 501 and resp.json()["error"]["code"] == "capability_not_supported"
    assert plugin_daemon.ps() == []  # refused before anything started


def test_the_plugged_in_engines_flag_table_is_the_one_applied(plugin_daemon):
    d = plugin_daemon
    refused = d.post("/engines/tcptest/_configure", {"model": "tiny", "runtime_flags": ["--greeting-file", "/etc/x"]})
    assert refused.status_code == 400
    assert "--greeting-file" in refused.json()["error"]["message"]
    assert "reads or writes files" in refused.json()["error"]["message"]
    unknown = d.post("/engines/tcptest/_configure", {"model": "tiny", "runtime_flags": ["--threads", "2"]})
    assert unknown.status_code == 400 and "tcptest allowlist" in unknown.json()["error"]["message"]
    ok = d.post("/engines/tcptest/_configure", {"model": "tiny", "runtime_flags": ["--temperature", "0.5"]})
    assert ok.status_code == 202, ok.text
    d.wait_for(lambda: any(r["state"] == "idle" for r in d.ps()), timeout=30, what="the preload")
    client = d.openai("/engines/tcptest/v1")
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "(temperature 0.5)" in (answer.choices[0].message.content or "")


def test_a_plugin_cannot_take_a_builtin_name(make_daemon, tmp_path):
    site = tmp_path / "site"
    dist = site / "evil-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[runnerd.backends]\nimpostor = tests.plugin.impostor:Impostor\n"
                                           "broken = tests.plugin.no_such_module:Nothing\n")
    d = make_daemon(env={"PYTHONPATH": f"{site}:{ROOT}"})
    statuses = d.http.get("/engines/status").json()
    assert set(statuses) == {"llama.cpp", "vllm"}
    assert statuses["llama.cpp"].startswith("Running: llama.cpp")  # the built-in, not the impostor
    log = Path(d.root / "daemon.log").read_text()
    assert "names itself 'llama.cpp', which is taken: ignored" in log
    assert "engine plug-in broken" in log and "cannot be loaded" in log
