"""Soak: 5,000 requests through a real daemon to two real llama-server engines (tiny models), streamed
and not, with every runner let go by a zero keep-alive after each 500 and loaded again by the next.
Whatever a request, a stream or a runner's life leaves behind in the daemon shows as file descriptors
or memory that grow with the count: after the run both are within 5 % of what they were after the
first 500 requests."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.tinymodels import write_tiny_llama

TOTAL = 5000
BATCH = 500
CLIENTS = 8
MODELS = ("sa", "sb")


@pytest.fixture(scope="module")
def soak_daemon(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import Daemon

    models = tmp_path_factory.mktemp("soak-models")
    paths = {name: write_tiny_llama(models / f"{name}.gguf", seed=i) for i, name in enumerate(MODELS)}
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    d = Daemon(root, llama_server, paths, {"RUNNERD_DEFAULT_CONTEXT_SIZE": "1024", "RUNNERD_LOG_LEVEL": "warning"},
               [])
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


async def _one(session: aiohttp.ClientSession, n: int) -> None:
    stream = n % 2 == 0
    body = {"model": MODELS[n // 2 % 2], "prompt": "the", "max_tokens": 3, "stream": stream, "ignore_eos": True}
    async with session.post("http://runnerd/engines/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        assert ("data: [DONE]" in text) if stream else ('"choices"' in text), text


async def _batch(d: Any, first: int) -> None:
    connector = aiohttp.UnixConnector(path=str(d.socket), limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        numbers = iter(range(first, first + BATCH))

        async def client() -> None:
            for n in numbers:
                await _one(session, n)

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        # Let every runner go: a zero keep-alive stops it once this request ends.
        for model in MODELS:
            async with session.post("http://runnerd/engines/v1/completions",
                                    json={"model": model, "prompt": "x", "max_tokens": 1, "keep_alive": 0}) as resp:
                assert resp.status == 200, await resp.text()


def _footprint(proc: psutil.Process) -> tuple[int, int]:
    return proc.num_fds(), proc.memory_info().rss


def test_fds_and_memory_stay_flat_over_5000_requests(soak_daemon: Any) -> None:
    d = soak_daemon
    proc = psutil.Process(d.proc.pid)
    after_first: tuple[int, int] | None = None
    for first in range(0, TOTAL, BATCH):
        asyncio.run(_batch(d, first))
        d.wait_for(lambda: not d.ps(), timeout=30, what="the runners to stop after a zero keep-alive")
        if after_first is None:
            after_first = _footprint(proc)
    assert after_first is not None
    fds, rss = _footprint(proc)
    assert fds <= after_first[0] * 1.05, (after_first, (fds, rss))
    assert rss <= after_first[1] * 1.05, (after_first, (fds, rss))
