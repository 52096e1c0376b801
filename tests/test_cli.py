"""The `runnerd` command against a real daemon over its socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def cli(*args: str, socket=None, stdin: str | None = None, env: dict[str, str] | None = None):
    full = [sys.executable, "-m", "runnerd.cli", *args]
    if socket is not None:
        full += ["--socket", str(socket)]
    return subprocess.run(full, capture_output=True, text=True, input=stdin, timeout=120,
                          env={**os.environ, **(env or {})})


def test_models_add_list_and_run(daemon, tiny_model):
    out = cli("models", "add", "second", str(tiny_model), "--keep-alive", "0", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert "registered second:latest" in out.stdout
    listed = json.loads(cli("models", "ls", "--json", socket=daemon.socket).stdout)
    assert {m["name"] for m in listed} >= {"tiny:latest", "second:latest"}
    run = cli("run", "tiny", "hello", "world", "--max-tokens", "4", socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert any(r["model"] == "tiny:latest" for r in daemon.ps())


def test_interactive_run_reads_stdin_until_bye(daemon):
    out = cli("run", "tiny", "--max-tokens", "4", socket=daemon.socket, stdin="hello\nthe world\n/bye\nnever sent\n")
    assert out.returncode == 0, out.stderr


def test_ps_status_unload_with_env_socket(daemon):
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    env = {"RUNNERD_SOCKET": str(daemon.socket)}
    ps = json.loads(cli("ps", "--json", env=env).stdout)
    assert [r["model"] for r in ps] == ["tiny:latest"]
    table = cli("ps", env=env).stdout
    header, row = table.splitlines()
    assert header.split()[:3] == ["MODEL", "BACKEND", "MODE"] and "tiny:latest" in table
    # Last use, keep-alive expiry and RAM (estimated/measured) per runner, from the same JSON.
    assert header.split()[6:] == ["UP", "IDLE", "EXPIRES", "RAM", "EST/MEAS"]
    cells = row.split()
    assert cells[3] == "idle" and cells[7] != "-" and cells[8] not in ("-", "never")
    estimated, measured = cells[9].split("/")
    assert estimated.endswith(("Ki", "Mi", "Gi")) and measured != ""
    assert "Running: llama.cpp" in cli("status", env=env).stdout
    assert cli("unload", env=env).stdout.strip() == "unloaded 1 runner(s)"
    assert daemon.ps() == []


def test_errors_are_one_clear_line(daemon, tmp_path):
    out = cli("ps", socket=tmp_path / "nothing.sock")
    assert out.returncode == 1 and "cannot reach runnerd" in out.stderr and "Traceback" not in out.stderr
    out = cli("models", "add", "bad", str(tmp_path / "missing.gguf"), socket=daemon.socket)
    assert out.returncode == 1 and "HTTP 400" in out.stderr and "missing.gguf" in out.stderr
    out = cli("run", "ghost", "hi", socket=daemon.socket)
    assert out.returncode == 1 and "HTTP 404" in out.stderr


def test_serve_refuses_a_bad_config(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("keep_alive = 'whenever'\n")
    out = cli("serve", "--config", str(cfg), "--socket", str(tmp_path / "s.sock"))
    assert out.returncode == 1 and "keep_alive" in out.stderr and "Traceback" not in out.stderr
