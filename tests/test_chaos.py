"""Engines killed under load: 32 clients stream from two models on the real llama-server (tiny models)
while one engine is SIGKILLed at a random moment, five times over.

What must hold each time: every stream on the killed engine that had not finished ends cleanly, either
with an error event as its last event (the status line was sent) or with an error status and a JSON
error body (it was not); no killed stream ends later than KILLED_STREAM_BOUND after the kill (the daemon
waits at most 2 s for the engine's exit to be noticed before it answers); every stream of the other
model completes with `[DONE]`; and the next request for the killed model is served by a fresh runner.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.tinymodels import write_tiny_llama

CLIENTS = 32
ROUNDS = 5
# The longest a stream on a killed engine may run on after the kill.
KILLED_STREAM_BOUND = 10.0


@dataclass
class Stream:
    model: str
    status: int = 0
    events: int = 0
    done: bool = False
    error: str | None = None
    first_event: float | None = None
    ended: float = 0.0


@pytest.fixture(scope="module")
def chaos_daemon(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import Daemon

    models = tmp_path_factory.mktemp("chaos-models")
    paths = {name: write_tiny_llama(models / f"{name}.gguf", seed=i) for i, name in enumerate(("ca", "cb"))}
    root = Path(__import__("tempfile").mkdtemp(prefix="rd-", dir="/tmp"))
    d = Daemon(root, llama_server, paths, {"RUNNERD_DEFAULT_CONTEXT_SIZE": "4096", "RUNNERD_CRASH_BACKOFF": "0.1",
                                           "RUNNERD_QUEUE_TIMEOUT": "60"}, [])
    yield d
    d.stop()
    __import__("shutil").rmtree(root, ignore_errors=True)


async def _stream(session: aiohttp.ClientSession, s: Stream) -> Stream:
    body = {"model": s.model, "prompt": "the", "max_tokens": 900, "stream": True, "ignore_eos": True}
    try:
        async with session.post("http://runnerd/engines/v1/completions", json=body) as resp:
            s.status = resp.status
            if resp.status != 200:
                s.error = (await resp.json())["error"]["message"]
                return s
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if s.done or s.error is not None:
                    s.error = f"data after the end of the stream: {line!r}"
                    return s
                if line.strip() == b"data: [DONE]":
                    s.done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = event["error"]["message"]
                    continue
                s.events += 1
                s.first_event = s.first_event or time.monotonic()
    finally:
        s.ended = time.monotonic()
    return s


def _runner_pid(d: Any, model: str) -> int | None:
    return next((r["pid"] for r in d.ps() if r["model"] == f"{model}:latest" and r["state"] in ("idle", "busy")), None)


async def _round(d: Any, victim: str, rng: random.Random) -> tuple[list[Stream], float, int]:
    pid = _runner_pid(d, victim)
    assert pid is not None, f"{victim} has no runner: {d.ps()}"
    connector = aiohttp.UnixConnector(path=str(d.socket), limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=120, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        streams = [Stream(("ca", "cb")[i % 2]) for i in range(CLIENTS)]
        tasks = [asyncio.create_task(_stream(session, s)) for s in streams]
        # Strike once a stream of the victim flows, a random moment later.
        while not any(s.first_event for s in streams if s.model == victim):
            assert not all(t.done() for t in tasks), streams
            await asyncio.sleep(0.005)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(*tasks)
        return streams, killed_at, pid


def test_killed_engines_end_their_streams_cleanly_and_others_complete(chaos_daemon: Any) -> None:
    d = chaos_daemon
    rng = random.Random(17)
    for model in ("ca", "cb"):  # both loaded before the first strike
        assert d.post("/engines/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}).status_code == 200
    cut = 0
    for n in range(ROUNDS):
        victim = rng.choice(("ca", "cb"))
        streams, killed_at, pid = asyncio.run(_round(d, victim, rng))
        for s in streams:
            where = f"round {n}, victim {victim}: {s}"
            if s.model != victim:
                assert s.status == 200 and s.done and s.error is None and s.events > 0, where
                continue
            if s.done and s.ended <= killed_at:
                continue  # finished before the strike
            cut += 1
            assert not s.done, where
            assert s.error is not None and "failed" in s.error, where
            assert s.status == 200 or s.status >= 500, where
            assert s.ended - killed_at <= KILLED_STREAM_BOUND, where
        answer = d.post("/engines/v1/completions", {"model": victim, "prompt": "x", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        fresh = _runner_pid(d, victim)
        assert fresh is not None and fresh != pid
    assert cut > 0, "no stream was ever cut: the strikes came too late to test anything"
