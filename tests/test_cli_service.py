"""`runnerd backends ls|install|rm` and `runnerd node` against a real daemon."""

from __future__ import annotations

import json
import socket

import pytest

from tests.test_cli import cli

pytestmark = pytest.mark.engine


def test_backends_ls(daemon):
    out = cli("backends", "ls", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["BACKEND", "STATUS", "VERSIONS", "DISK", "CAPABILITIES"]
    assert [r.split()[0] for r in rows] == ["llama.cpp", "vllm"]
    assert "Running: llama.cpp" in rows[0]
    listed = json.loads(cli("backends", "ls", "--json", socket=daemon.socket).stdout)
    assert listed[0]["name"] == "llama.cpp" and listed[0]["installed"] is True


def test_installing_an_installed_backend_is_a_no_op(daemon):
    out = cli("backends", "install", "llama.cpp", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("already installed: Running: llama.cpp")
    out = cli("backends", "install", "nope", socket=daemon.socket)
    assert out.returncode == 1 and "HTTP 404" in out.stderr and "unknown backend" in out.stderr


def test_backend_in_use_is_not_removed(daemon):
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    out = cli("backends", "rm", "llama.cpp", socket=daemon.socket)
    assert out.returncode == 1 and "HTTP 409" in out.stderr and "tiny:latest" in out.stderr
    assert daemon.http.get("/engines/status").json()["llama.cpp"].startswith("Running")


def test_node(daemon):
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    out = cli("node", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"host      {socket.gethostname()} (runnerd ")
    assert "tiny:latest" in out.stdout and "backend   llama.cpp: Running" in out.stdout
    node = json.loads(cli("node", "--json", socket=daemon.socket).stdout)
    assert node["runners"][0]["model"] == "tiny:latest" and node["runners"][0]["rss_bytes"] > 0
    assert isinstance(node["gpus"], list)  # [] here; a real list on a GPU host
