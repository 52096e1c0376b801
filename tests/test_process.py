"""Process supervision with real processes: the real llama-server, and small Python children for the
signal-handling corners llama-server does not exhibit on its own."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from backends.base import BackendConfiguration, Mode, ModelRef, RunnerError, RunnerOutput
from backends.endpoint import Endpoint
from backends.llamacpp import LaunchOptions, LlamaCppBackend
from backends.llamacpp.argv import build_env
from backends.llamacpp.errors import LLAMACPP_EXIT_PATTERNS
from backends.process import run_process, translate_exit, wait_until_ready


@pytest.fixture
def sock(tmp_path_factory):
    d = Path("/tmp") / f"rdp-{time.monotonic_ns()}"
    d.mkdir()
    yield d / "r.sock"
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.mark.engine
@pytest.mark.anyio
async def test_llama_server_runs_becomes_ready_and_stops_cleanly(llama_server, tiny_model, sock, tmp_path):
    backend = LlamaCppBackend(cache_dir=tmp_path, binary=llama_server, launch=LaunchOptions(threads=1))
    model = ModelRef(name="tiny", path=tiny_model)
    output = RunnerOutput(tmp_path / "runner.log")

    task = asyncio.create_task(backend.run(Endpoint.unix(sock), model, Mode.COMPLETION,
                                           BackendConfiguration(context_size=256), output))
    started = time.monotonic()
    await wait_until_ready(Endpoint.unix(sock), output, task, timeout=30)
    ready_after = time.monotonic() - started
    assert psutil.Process(output.pid).is_running()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert ready_after < 10
    assert not psutil.pid_exists(output.pid) or psutil.Process(output.pid).status() == psutil.STATUS_ZOMBIE
    assert not sock.exists()
    log = (tmp_path / "runner.log").read_text()
    assert "llama" in log and output.tail


@pytest.mark.engine
@pytest.mark.anyio
async def test_unvalidated_flag_never_reaches_the_engine(llama_server, tiny_model, sock, tmp_path):
    backend = LlamaCppBackend(cache_dir=tmp_path, binary=llama_server)
    output = RunnerOutput()

    with pytest.raises(RunnerError) as info:
        await backend.run(Endpoint.unix(sock), ModelRef(name="tiny", path=tiny_model), Mode.COMPLETION,
                          BackendConfiguration(runtime_flags=["--model", "/etc/passwd"]), output)
    assert info.value.reason == "bad_flag" and "--model" in str(info.value)
    assert output.pid is None


@pytest.mark.engine
@pytest.mark.anyio
async def test_engine_refusing_a_flag_is_translated(llama_server, tiny_model, sock):
    argv = [str(llama_server), "--model", str(tiny_model), "--host", str(sock), "--no-such-flag"]

    with pytest.raises(RunnerError) as info:
        await run_process(argv, env=build_env(llama_server), endpoint=Endpoint.unix(sock), output=RunnerOutput(),
                          exit_patterns=LLAMACPP_EXIT_PATTERNS)
    assert info.value.reason == "bad_flag"
    assert any("--no-such-flag" in line for line in info.value.tail)


CHILD_IGNORING_SIGTERM = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(grandchild.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.anyio
async def test_stop_escalates_to_sigkill_and_takes_the_whole_group(sock):
    output = RunnerOutput()

    task = asyncio.create_task(run_process([sys.executable, "-c", CHILD_IGNORING_SIGTERM], env={},
                                           endpoint=Endpoint.unix(sock), output=output, grace=0.3))
    while not output.tail:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    took = time.monotonic() - started

    grandchild = int(output.tail[0])
    assert 0.25 < took < 3
    assert output.exit_code == -9
    deadline = time.monotonic() + 2
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "grandchild outlived the stop"
        await asyncio.sleep(0.02)


@pytest.mark.anyio
async def test_unexpected_exit_raises_with_the_last_output(sock):
    output = RunnerOutput()
    script = "import sys; print('loading'); print('error loading model: bad tensor'); sys.exit(3)"

    with pytest.raises(RunnerError) as info:
        await run_process([sys.executable, "-c", script], env={}, endpoint=Endpoint.unix(sock), output=output)
    assert info.value.reason == "model_load_failed" and info.value.exit_code == 3
    assert "error loading model: bad tensor" in str(info.value)


@pytest.mark.anyio
async def test_spawn_failure_is_a_runner_error(sock):
    with pytest.raises(RunnerError, match="cannot start /nonexistent/engine"):
        await run_process(["/nonexistent/engine"], env={}, endpoint=Endpoint.unix(sock), output=RunnerOutput())


@pytest.mark.parametrize(("code", "lines", "reason"), [
    (1, ["ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer"], "out_of_memory"),
    (1, ["error: invalid argument: --frobnicate"], "bad_flag"),
    (1, ["llama_model_load: error loading model: unknown model architecture: 'x'"], "model_load_failed"),
    (-9, ["decoding"], "killed"),
    (-11, ["decoding"], "crashed"),
    (0, ["bye"], "exited"),
])
def test_exit_translation(code, lines, reason):
    err = translate_exit(code, lines)
    assert err.reason == reason and err.tail == lines and err.exit_code == code


# Binds the socket as vLLM does: it fails with "Address already in use" on a leftover file.
CHILD_BINDING = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
print('bound', flush=True)
time.sleep(60)
"""


@pytest.mark.anyio
async def test_a_stale_socket_is_removed_before_the_engine_binds(sock):
    stale = socket.socket(socket.AF_UNIX)  # what a killed engine leaves behind: nobody listens on it
    stale.bind(str(sock))
    stale.close()
    output = RunnerOutput()

    task = asyncio.create_task(run_process([sys.executable, "-c", CHILD_BINDING, str(sock)], env={},
                                           endpoint=Endpoint.unix(sock), output=output, grace=0.3))
    while "bound" not in output.tail and not task.done():
        await asyncio.sleep(0.01)
    assert not task.done(), list(output.tail)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not sock.exists()


@pytest.mark.anyio
async def test_a_regular_file_at_the_socket_path_is_never_removed(sock):
    sock.write_text("not a socket")
    with pytest.raises(RunnerError):
        await run_process([sys.executable, "-c", CHILD_BINDING, str(sock)], env={}, endpoint=Endpoint.unix(sock),
                          output=RunnerOutput())
    assert sock.read_text() == "not a socket"
