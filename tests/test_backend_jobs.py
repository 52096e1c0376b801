"""Installing the llama.cpp backend as a job over HTTP: progress from a real cmake build, a shared job,
the no-op reinstall, uninstall, and cancelling a build half-way.

The build is real (cmake, the C compiler, the backend's own build and install code); only the source
is a tiny stand-in project instead of the llama.cpp tree, so that it builds in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import tarfile
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest
from aiohttp import web

from backends.llamacpp import LlamaCppBackend, install
from runnerd.cli.client import DaemonClient
from runnerd.cli.service import follow_job
from runnerd.config import load_settings
from runnerd.server import bind_unix_socket, create_app

pytestmark = pytest.mark.engine

CMAKELISTS = """
cmake_minimum_required(VERSION 3.10)
project(stand_in_llama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_library(common STATIC common.c SLOW_SOURCE)
add_executable(llama-server server.c)
target_link_libraries(llama-server common)
"""
SLOW = """
add_custom_command(OUTPUT ${CMAKE_BINARY_DIR}/slow.c COMMAND sleep 120
                   COMMAND ${CMAKE_COMMAND} -E touch ${CMAKE_BINARY_DIR}/slow.c)
"""
SERVER_C = """
#include <stdio.h>
#include <string.h>
int common(void);
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("version: %d (stand-in build for tests)\\n", common());
        return 0;
    }
    return 1;
}
"""


def stand_in_source(slow: bool):
    """A `fetch_source` that writes an sdist-shaped tarball of a tiny project with a llama-server target."""

    async def fetch(dest: Path, version: str) -> Path:
        cmake = CMAKELISTS.replace("SLOW_SOURCE", "${CMAKE_BINARY_DIR}/slow.c" if slow else "")
        files = {"CMakeLists.txt": (SLOW if slow else "") + cmake, "server.c": SERVER_C,
                 "common.c": "int common(void) { return 4242; }\n"}
        dest.mkdir(parents=True, exist_ok=True)
        tarball = dest / f"llama_cpp_python-{version}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            for name, text in files.items():
                info = tarfile.TarInfo(f"llama_cpp_python-{version}/vendor/llama.cpp/{name}")
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        return tarball

    return fetch


def use_source(monkeypatch, slow: bool) -> None:
    build = partial(install.build_llama_server, fetch_source=stand_in_source(slow), jobs=2)
    monkeypatch.setattr("backends.llamacpp.build_llama_server", build)


@contextlib.asynccontextmanager
async def served(app: web.Application, sock_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, bind_unix_socket(sock_path)).start()
    try:
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock_path)),
                                     base_url="http://runnerd", timeout=120) as client:
            yield client
    finally:
        await runner.cleanup()
        sock_path.unlink(missing_ok=True)


async def follow(client: httpx.AsyncClient, url: str) -> list[dict]:
    async with client.stream("GET", url, params={"follow": "true"}) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) async for line in resp.aiter_lines() if line]


async def wait_for_phase(client: httpx.AsyncClient, url: str, phase: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await client.get(url)).json()
        if job["phase"] == phase or job["state"] != "running":
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job never reached {phase}")


async def wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def build_processes() -> list[str]:
    names = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # exited while we looked
            if proc.name() in ("sleep", "make", "gmake", "cmake"):
                names.append(proc.name())
    return names


@pytest.mark.anyio
async def test_install_job_lifecycle(monkeypatch, tmp_path, capsys):
    cache = tmp_path / "cache"
    sock_path = Path("/tmp") / f"rd-jobs-{os.getpid()}.sock"
    settings = load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data", socket=sock_path)
    app = create_app(settings, backends={"llama.cpp": LlamaCppBackend(cache_dir=cache)})

    async with served(app, sock_path) as client:
        [before] = (await client.get("/engines/backends")).json()
        assert (before["status"], before["installed"], before["installable_version"]) == (
            "Not Installed", False, install.SOURCE_VERSION)
        assert set(before["capabilities"]) >= {"chat", "embeddings"} and before["disk_usage"] == 0

        # Two requests, one job.
        use_source(monkeypatch, slow=False)
        first = await client.post("/engines/install-backend", json={"backend": "llama.cpp"})
        assert first.status_code == 202, first.text
        job = first.json()
        assert first.headers["Location"] == job["status_url"] == f"/jobs/{job['id']}"
        second = await client.post("/engines/install-backend",
                                   json={"backend": "llama.cpp", "version": install.SOURCE_VERSION})
        assert second.status_code == 202 and second.json()["id"] == job["id"]
        [listed] = (await client.get("/engines/backends")).json()
        assert listed["install_job"] == job["id"] and listed["status"].startswith("Installing: ")

        # Two watchers: the raw NDJSON stream, and the CLI's progress (`runnerd backends install`), which is
        # one plain line per phase when stderr is not a terminal (as here and in CI logs).
        async with DaemonClient(sock_path) as cli:
            snapshots, cli_final = await asyncio.gather(follow(client, job["status_url"]),
                                                        follow_job(cli, job, show_progress=True))
        assert cli_final == snapshots[-1]
        lines = capsys.readouterr().err.splitlines()
        assert lines[-1] == "llama.cpp done" and "llama.cpp build" in lines, lines
        assert not any("%|" in line for line in lines), "a progress bar off a terminal"
        final = snapshots[-1]
        assert (final["state"], final["phase"], final["percent"]) == ("succeeded", "done", 100)
        assert final["error"] is None
        assert final["message"] == "Running: llama.cpp 4242 (stand-in build for tests)"
        build = [s["percent"] for s in snapshots if s["phase"] == "build" and s["percent"] is not None]
        assert build and all(0 <= p <= 100 for p in build), snapshots  # cmake's own [ NN%] numbers

        [after] = (await client.get("/engines/backends")).json()
        assert after["installed"] and after["version"] == "4242 (stand-in build for tests)"
        assert after["disk_usage"] > 0 and after["install_job"] is None

        again = await client.post("/engines/install-backend", json={"backend": "llama.cpp"})
        assert again.status_code == 200 and again.json()["state"] == "succeeded"
        assert again.json()["message"].startswith("already installed")
        async with client.stream("POST", "/engines/install-backend", json={"backend": "llama.cpp"},
                                 headers={"Accept": "application/x-ndjson"}) as streamed:
            lines = [json.loads(line) async for line in streamed.aiter_lines() if line]
        assert streamed.status_code == 200 and [j["state"] for j in lines] == ["succeeded"]
        listed_jobs = {j["id"] for j in (await client.get("/jobs")).json()}
        assert listed_jobs == {job["id"], again.json()["id"], lines[0]["id"]}
        finished = await client.delete(job["status_url"])
        assert finished.status_code == 409 and finished.json()["error"]["code"] == "job_finished"

        removed = await client.post("/engines/uninstall-backend", json={"backend": "llama.cpp"})
        assert removed.json() == {"backend": "llama.cpp", "status": "Not Installed"}

        # A build cancelled half-way: its processes die, nothing is installed, nothing is left over.
        use_source(monkeypatch, slow=True)
        slow = (await client.post("/engines/install-backend", json={"backend": "llama.cpp"})).json()
        assert (await wait_for_phase(client, slow["status_url"], "build"))["state"] == "running"
        await wait_until(lambda: "sleep" in build_processes())  # the slow build step runs
        cancelled = await client.delete(slow["status_url"])
        assert cancelled.status_code == 200
        assert (cancelled.json()["state"], cancelled.json()["error"]) == ("cancelled", "cancelled")
        assert (await client.delete(slow["status_url"])).json()["state"] == "cancelled"
        await wait_until(lambda: build_processes() == [], timeout=10)  # the build's process group is gone
        assert (await client.get("/engines/status")).json()["llama.cpp"] == "Not Installed"
        assert list((cache / "llama.cpp").iterdir()) == []

        assert (await client.get("/jobs/nope")).status_code == 404
        bad = await client.post("/engines/install-backend", json={"backend": "llama.cpp", "version": "latest"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "version"
        unknown = await client.post("/engines/install-backend", json={"backend": "nope"})
        assert unknown.status_code == 404
