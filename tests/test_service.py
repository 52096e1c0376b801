"""runnerd as a service: sockets handed over the way systemd does, sd_notify messages, and the
token-protected TCP listener, against real `runnerd serve` processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from runnerd.server import bind_unix_socket
from tests.conftest import ROOT

pytestmark = pytest.mark.engine

TOKEN = "test-token-5f2d9c1a77e0"
LAUNCH = [sys.executable, str(ROOT / "tests" / "sd_launch.py")]


@pytest.fixture
def short_dir():
    # unix socket paths must fit in 108 bytes: pytest's tmp_path can be too deep.
    path = Path(tempfile.mkdtemp(prefix="rds-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def receive(sock: socket.socket, seconds: float) -> list[dict[str, str]]:
    """Every notification that arrives within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        out.append(dict(line.split("=", 1) for line in data.split("\n")))
    return out


def assert_unauthorized(resp: httpx.Response, invalid_token: bool) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["type"] == "authentication_error"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid_token


def test_socket_activation_notify_and_tcp_token(make_daemon, short_dir):
    unix_path = short_dir / "api.sock"
    unix, tcp = bind_unix_socket(unix_path), tcp_listener()
    port = tcp.getsockname()[1]
    (short_dir / "token").write_text(f"\n {TOKEN} \n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    env = {"NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "200000",
           "RUNNERD_HTTP__TOKEN_FILE": str(short_dir / "token")}
    launcher = [*LAUNCH, f"runnerd={unix.fileno()}", f"http={tcp.fileno()}", "--"]
    try:
        d = make_daemon(env=env, launcher=launcher, pass_fds=(unix.fileno(), tcp.fileno()), socket=unix_path)
    finally:
        unix.close()
        tcp.close()

    messages = receive(notify, 0.6)
    assert messages[0]["READY"] == "1"
    assert f"unix:{unix_path}" in messages[0]["STATUS"] and f"tcp:127.0.0.1:{port}" in messages[0]["STATUS"]
    assert sum(1 for m in messages if m.get("WATCHDOG") == "1") >= 3  # every 0.1 s
    output = d.output()
    assert f"listening on unix:{unix_path} (passed by systemd as 'runnerd')" in output
    assert f"listening on tcp:127.0.0.1:{port} (passed by systemd as 'http') (bearer token required)" in output
    assert not (d.root / "run" / "runnerd.sock").exists(), "it used the sockets it was given, bound none"

    # Over the unix socket: trusted, no token.
    assert d.http.get("/node").status_code == 200
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as tcp_client:
        assert tcp_client.get("/health").status_code == 200
        assert_unauthorized(tcp_client.get("/node"), invalid_token=False)
        assert_unauthorized(tcp_client.get("/metrics", headers={"Authorization": "Basic dXNlcjpwdw=="}), False)
        assert_unauthorized(tcp_client.get("/node", headers={"Authorization": f"Bearer {TOKEN}x"}), True)
        assert_unauthorized(tcp_client.post("/engines/v1/chat/completions", json={"model": "tiny"}), False)
        authed = {"Authorization": f"Bearer {TOKEN}"}
        node = tcp_client.get("/node", headers=authed)
        assert node.status_code == 200 and node.json()["hostname"] == socket.gethostname()
        assert tcp_client.get("/metrics", headers=authed).status_code == 200
        # Registering a model by path stays local-only, token or not.
        refused = tcp_client.post("/models", json={"name": "x", "path": "/etc/passwd"}, headers=authed)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "local_only"

    assert d.stop() == 0
    stopping = receive(notify, 1.0)
    assert any(m.get("STOPPING") == "1" for m in stopping)
    assert unix_path.is_socket(), "the socket belongs to systemd (RemoveOnStop=): left in place"
    notify.close()


def serve_and_fail(short_dir: Path, *args: str, env: dict[str, str] | None = None,
                   launcher: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(short_dir / "run"), "RUNNERD_DATA_DIR": str(short_dir),
                "RUNNERD_CACHE_DIR": str(short_dir / "cache"), **(env or {})}
    for name in ("RUNNERD_SOCKET", "RUNNERD_CONFIG", "RUNNERD_HTTP__TOKEN_FILE", "RUNNERD_HTTP__LISTEN"):
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run([*(launcher or []), sys.executable, "-m", "runnerd.cli", "serve", *args],
                          capture_output=True, text=True, timeout=60, env=full_env, cwd=ROOT, pass_fds=pass_fds)


def test_tcp_listener_without_a_token_refuses_to_start(short_dir):
    out = serve_and_fail(short_dir, "--listen", "127.0.0.1:0")
    assert out.returncode == 1, out.stderr
    assert "refusing to listen on tcp:127.0.0.1:" in out.stderr and "token_file" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (short_dir / "run" / "runnerd.sock").exists(), "the unix socket is cleaned up too"


def test_socket_passed_by_systemd_needs_a_token_too(short_dir):
    tcp = tcp_listener()
    try:
        out = serve_and_fail(short_dir, launcher=[*LAUNCH, f"http={tcp.fileno()}", "--"], pass_fds=(tcp.fileno(),))
    finally:
        tcp.close()
    assert out.returncode == 1 and "without a bearer token" in out.stderr, out.stderr


def test_an_empty_token_file_is_refused(short_dir):
    (short_dir / "token").write_text("  \n")
    out = serve_and_fail(short_dir, "--listen", "127.0.0.1:0", "--token-file", str(short_dir / "token"))
    assert out.returncode == 1 and "is empty" in out.stderr, out.stderr


def test_listen_and_token_file_from_the_config_file(make_daemon, short_dir):
    probe = tcp_listener()
    port = probe.getsockname()[1]
    probe.close()
    (short_dir / "token").write_text(TOKEN)
    config = short_dir / "runnerd.toml"
    config.write_text(f'[http]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{short_dir / "token"}"\n')
    d = make_daemon(args=["--config", str(config)])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert_unauthorized(client.get("/engines/backends"), invalid_token=False)
        listed = client.get("/engines/backends", headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200 and listed.json()[0]["name"] == "llama.cpp"
    assert d.stop() == 0
