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


def test_help_lists_each_command_once():
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    assert "{" not in out.stdout  # no {serve,models,...} choice list repeating the commands
    listed = []
    for line in out.stdout.splitlines():
        words = line.split()
        if line.startswith("    ") and not line.startswith("     ") and words:
            listed.append(words[0])
            if len(words) > 1 and words[1].startswith("("):  # "ls (list)": an alias
                listed.append(words[1].strip("()"))
    assert len(listed) == len(set(listed)), listed
    assert {"run", "ls", "list", "tag", "cp", "inspect", "show", "unload", "stop", "ps", "rm", "pull"} <= set(listed)
    assert "    ls (list) " in out.stdout and "    tag (cp) " in out.stdout


def test_ollama_command_habits(daemon):
    """cp = tag, list = ls, show = inspect + stored configuration, stop MODEL = unload MODEL."""
    out = cli("cp", "tiny", "copy", socket=daemon.socket)
    assert out.returncode == 0 and out.stdout == "tagged copy:latest\n", out.stderr
    again = cli("cp", "tiny", "copy", socket=daemon.socket)
    assert again.returncode == 1 and "409" in again.stderr and "--force" not in again.stdout
    forced = cli("cp", "tiny", "copy", "--force", socket=daemon.socket)
    assert forced.returncode == 0 and forced.stdout == "tagged copy:latest\n", forced.stderr
    listed = cli("list", socket=daemon.socket).stdout
    assert listed == cli("ls", socket=daemon.socket).stdout == cli("models", "ls", socket=daemon.socket).stdout
    assert "copy:latest" in listed
    assert json.loads(cli("list", "--json", socket=daemon.socket).stdout) == daemon.http.get("/models").json()

    inspected = cli("inspect", "copy", socket=daemon.socket).stdout
    shown = cli("show", "copy", socket=daemon.socket).stdout
    assert shown.startswith(inspected) and "chat template    the model's own" in shown
    assert "no stored configuration" in shown
    out = cli("configure", "copy", "--keep-alive", "7m", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    shown = cli("show", "copy", socket=daemon.socket).stdout
    assert shown.startswith(inspected)
    assert shown.splitlines()[-2].split() == ["MODEL", "MODE", "BACKEND", "CONFIGURATION"]
    assert shown.splitlines()[-1].split() == ["copy:latest", "completion", "llama.cpp", '{"keep_alive":"7m"}']
    as_json = json.loads(cli("show", "copy", "--json", socket=daemon.socket).stdout)
    assert as_json["summary"] == json.loads(cli("inspect", "copy", "--json", socket=daemon.socket).stdout)
    assert as_json["chat_template"] == "model" and as_json["configurations"][0]["config"] == {"keep_alive": "7m"}

    # configure preloads the model: `stop` unloads that runner, and only it.
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    daemon.wait_for(lambda: {r["model"]: r["state"] for r in daemon.ps()}.get("copy:latest") == "idle", 60,
                    "copy's preloaded runner")
    out = cli("stop", "copy", socket=daemon.socket)
    assert out.returncode == 0 and out.stdout == "unloaded 1 runner(s)\n", out.stderr
    assert [r["model"] for r in daemon.ps()] == ["tiny:latest"]
    assert cli("stop", "copy", socket=daemon.socket).stdout == "unloaded 0 runner(s)\n"
    out = cli("stop", "ghost", socket=daemon.socket)
    assert out.returncode == 1 and "HTTP 404" in out.stderr
    assert cli("rm", "copy", socket=daemon.socket).returncode == 0


def test_install_backend_says_so_when_installed(llama_server):
    """Nothing to do: one line, no progress bar."""
    out = cli("install-backend", "llama.cpp", env={"RUNNERD_LLAMA_SERVER": str(llama_server)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("llama.cpp is already installed: Running: llama.cpp") and out.stdout.count("\n") == 1
    assert "%|" not in out.stderr and "\r" not in out.stderr


def test_pull_progress_is_plain_lines_off_a_terminal(daemon, tiny_model):
    out = cli("pull", str(tiny_model), "--name", "pulled", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pulled pulled:latest")
    lines = out.stderr.splitlines()
    assert lines and all(line.startswith(f"pulling {tiny_model}: ") for line in lines), out.stderr
    assert len(lines) == len(set(lines)) and "\r" not in out.stderr  # a line per phase, no bar redrawn
    assert cli("rm", "pulled", socket=daemon.socket).returncode == 0
