"""Removing a llama.cpp version that runners use, through a real daemon with two real builds: no runner
starts on the version between the removal's check of its users and the removal (a start in that window
is refused, 503 naming the removal, in the route's shape), and a forced removal stops only the runners on
that version, not the same model's runners in other modes on another build; the binary named in the
settings is listed by its own version.

The window is held open for a few seconds by a real, stopped engine: the runner on the version being
removed is sent SIGSTOP, so its stop waits out the daemon's stop grace before killing it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from backends.llamacpp.install import SOURCE_VERSION
from tests.conftest import ROOT, Daemon
from tests.test_llamacpp_versions import _link_build, _versions, other_build  # noqa: F401 (a fixture)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def vdaemon(llama_server: Path, other_build: tuple[str, Path], smollm2_model: Path) -> Iterator[tuple[Daemon, str]]:  # noqa: F811
    """SmolLM2 under two names (the older build's server refuses the tiny model's random bytes); the
    catalog's llama.cpp entries remove builds through a job."""
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    _link_build(root / "cache", SOURCE_VERSION, llama_server)
    _link_build(root / "cache", other_build[0], other_build[1])
    # A long stop grace: the stopped engine holds the removal's window open that long.
    d = Daemon(root, llama_server, {"old": smollm2_model, "also": smollm2_model},
               {"RUNNERD_LLAMACPP__CUDA": "off", "RUNNERD_STOP_GRACE": "20"}, [])
    yield d, other_build[0]
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _live(d: Daemon) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["model"].split(":")[0], r["mode"]): r for r in d.ps() if r["state"] != "exited"}


def _job(d: Daemon, job: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = d.http.get(job["status_url"]).json()
    return found


def _finish(d: Daemon, job: dict[str, Any]) -> dict[str, Any]:
    with d.http.stream("GET", job["status_url"], params={"follow": "true"}) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    return lines[-1]


def test_no_runner_starts_on_a_version_being_removed_and_only_its_runners_stop(vdaemon):
    d, old = vdaemon
    for model in ("old", "also"):
        pinned = d.post("/engines/llama.cpp/_configure", {"model": model, "options": {"backend_version": old}})
        assert pinned.status_code == 202, pinned.text
    # The configure requests preload both on the old build; "also" is then unloaded, to be asked for later.
    d.wait_for(lambda: {("old", "completion"), ("also", "completion")} <= set(_live(d)), timeout=60,
               what="both preloaded")
    assert d.post("/engines/unload", {"models": ["also"], "timeout": 0}).status_code == 200
    # The same model in another mode, unpinned: it runs the default build.
    embedded = d.post("/engines/v1/embeddings", {"model": "old", "input": "hello"})
    assert embedded.status_code == 200, embedded.text
    live = _live(d)
    assert set(live) == {("old", "completion"), ("old", "embedding")}, live
    on_old, on_default = live[("old", "completion")]["pid"], live[("old", "embedding")]["pid"]
    assert psutil.Process(on_old).exe() != psutil.Process(on_default).exe()

    os.kill(on_old, signal.SIGSTOP)  # its stop now lasts the stop grace: the removal's window stays open
    try:
        started = d.post("/engines/backends/catalog/uninstall", {"engine": "llama.cpp", "version": old,
                                                                "force": True})
        assert started.status_code == 202, started.text
        job = started.json()
        d.wait_for(lambda: _job(d, job)["phase"] == "stopping runners", timeout=30, what="the job stopping runners")
        assert psutil.Process(on_old).status() == psutil.STATUS_STOPPED  # still inside the window

        # A model pinned to the version being removed is refused in each route's shape, naming the removal.
        refused = d.post("/engines/v1/chat/completions", {"model": "also", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "backend_removing" and f"llama.cpp {old} is being removed" in error["message"]
        assert refused.headers["Retry-After"]
        ollama = d.post("/api/generate", {"model": "also", "prompt": "a", "stream": False})
        assert ollama.status_code == 503 and f"llama.cpp {old} is being removed" in ollama.json()["error"]
        # Other builds start as usual meanwhile (a model in another mode, unpinned).
        other = d.post("/engines/v1/embeddings", {"model": "also", "input": "hello"})
        assert other.status_code == 200, other.text
        assert psutil.Process(on_old).status() == psutil.STATUS_STOPPED  # all of that inside the window
    finally:
        if psutil.pid_exists(on_old):
            os.kill(on_old, signal.SIGCONT)

    final = _finish(d, job)
    assert final["state"] == "succeeded", final
    assert final["message"] == f"removed llama.cpp {old}; stopped 1 runner(s)"
    assert _versions(d) == [SOURCE_VERSION]
    # Only the runner on the removed version stopped: the same model's embedding runner serves on.
    live = _live(d)
    assert set(live) == {("old", "embedding"), ("also", "embedding")}, live
    assert live[("old", "embedding")]["pid"] == on_default and psutil.pid_exists(on_default)
    again = d.post("/engines/v1/embeddings", {"model": "old", "input": "hello"})
    assert again.status_code == 200, again.text
    # The removal is over: the pinned configuration's start is no longer refused as "being removed".
    gone = d.post("/engines/v1/chat/completions", {"model": "also", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code >= 400 and f"llama.cpp {old} is not installed" in gone.text, gone.text


def test_the_direct_removal_also_stops_only_its_versions_runners(vdaemon, llama_server, other_build):  # noqa: F811
    d, old = vdaemon
    _link_build(d.root / "cache", old, other_build[1])
    assert _versions(d) == sorted([SOURCE_VERSION, old], key=lambda v: tuple(map(int, v.split("."))))
    done = d.post("/engines/v1/chat/completions", {"model": "old", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert done.status_code == 200, done.text
    assert {("old", "completion"), ("old", "embedding")} <= set(_live(d))
    forced = d.post("/engines/uninstall-backend", {"backend": "llama.cpp", "version": old, "force": True})
    assert forced.status_code == 200 and forced.json()["unloaded"] == 1, forced.text
    live = _live(d)
    assert ("old", "completion") not in live and ("old", "embedding") in live, live
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://r", timeout=60) as c:
        assert c.post("/engines/v1/embeddings", json={"model": "old", "input": "x"}).status_code == 200
    for model in ("old", "also"):
        d.http.request("DELETE", "/engines/_configure", params={"model": model})


def test_the_binary_named_in_the_settings_is_listed_by_its_own_version(make_daemon, llama_server, tmp_path):
    """A wrapper script named as the binary counts its `--version` runs: the version is read once per path and
    modification time, however often the engines are listed."""
    count = tmp_path / "version-runs"
    named = tmp_path / "bin" / "llama-server"
    named.parent.mkdir()
    named.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then echo run >> {count}; fi
LD_LIBRARY_PATH={llama_server.resolve().parent} exec {llama_server.resolve()} "$@"
""")
    named.chmod(0o755)
    runs = subprocess.run([str(named), "--version"], capture_output=True, text=True, timeout=60, check=True)
    own = next(ln for ln in (runs.stdout + runs.stderr).splitlines() if ln.startswith("version:"))
    own = own.removeprefix("version:").strip()
    count.unlink()
    d = make_daemon(env={"RUNNERD_LLAMA_SERVER": str(named), "RUNNERD_LLAMACPP__CUDA": "off"})

    def llamacpp() -> dict[str, Any]:
        return next(b for b in d.http.get("/engines/backends").json() if b["name"] == "llama.cpp")

    listed = llamacpp()
    assert listed["versions"] == [own] and listed["named_binary"] == {"path": str(named), "version": own}, listed
    for _ in range(3):
        assert llamacpp()["versions"] == [own]
    assert count.read_text().count("run") == 1
    cli = subprocess.run([sys.executable, "-m", "runnerd.cli", "backends", "ls", "--socket", str(d.socket)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0 and own.split()[0] in cli.stdout, cli.stdout

    os.utime(named, (named.stat().st_atime, named.stat().st_mtime + 10))  # a new binary at the same path
    assert llamacpp()["versions"] == [own]
    assert count.read_text().count("run") == 2

    # Listed, but neither pinned nor removed by runnerd.
    refused = d.post("/engines/uninstall-backend", {"backend": "llama.cpp", "version": own})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_installed_by_runnerd", refused.text
    assert named.is_file()
