"""Concurrent streaming load through runnerd vs the same engines used directly.

N clients stream completions for T seconds on each path, alternating between two models, straight to the
runners' sockets and through runnerd. The two paths take turns in R rounds of T/R seconds each, so that a
host that gets busier or quieter during the run weighs on both alike. Prints requests/s, tokens/s, errors,
p50/p99 time to first token, and runnerd's CPU seconds per 1,000 relayed tokens.

    .venv/bin/python bench/load.py [-c 8] [-t 20] [--rounds 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.llamacpp import LlamaCppBackend  # noqa: E402
from runnerd.config import load_settings  # noqa: E402
from tests.tinymodels import write_tiny_llama  # noqa: E402


@dataclass
class Tally:
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    busy: int = 0  # designed 503s (runnerd's bounded queue was full): counted apart from errors
    ttft: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.errors += other.errors
        self.busy += other.busy
        self.ttft += other.ttft


async def stream_once(session: aiohttp.ClientSession, url: str, body: dict[str, object], tally: Tally) -> None:
    start = time.perf_counter()
    first = True
    try:
        async with session.post(url, json=body) as resp:
            if resp.status == 503 and resp.headers.get("Retry-After"):
                tally.busy += 1
                await resp.read()
                return
            if resp.status != 200:
                tally.errors += 1
                detail = (await resp.read())[:200]
                if tally.errors <= 3:
                    print(f"HTTP {resp.status} from {url}: {detail!r}", file=sys.stderr)
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                if first:
                    tally.ttft.append((time.perf_counter() - start) * 1000)
                    first = False
                if b'"error"' in line:
                    tally.errors += 1
                    if tally.errors <= 3:
                        print(f"error event from {url}: {line[:300]!r}", file=sys.stderr)
                    return
                if b'"text"' in line or b'"content"' in line:
                    tally.tokens += 1
        tally.requests += 1
    except aiohttp.ClientError as exc:
        tally.errors += 1
        if tally.errors <= 3:
            print(f"{type(exc).__name__} from {url}: {exc}", file=sys.stderr)


async def run_load(targets: list[tuple[str, str]], clients: int, seconds: float, max_tokens: int) -> Tally:
    """targets: (unix socket, URL path) per model; client i uses targets[i % len]."""
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        sock, path = targets[i % len(targets)]
        model = "a" if i % 2 == 0 else "b"
        body = {"model": model, "prompt": "the", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        # A connection per request on both paths: a pooled client connection that the server closed while
        # idle would count as an error of the path under test.
        connector = aiohttp.UnixConnector(path=sock, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            while time.monotonic() < deadline:
                await stream_once(session, f"http://x{path}", body, tally)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally


def start_daemon(root: Path, models: dict[str, Path], llama_server: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(root / "run"), "RUNNERD_DATA_DIR": str(root / "data"),
           "RUNNERD_LLAMA_SERVER": str(llama_server), "RUNNERD_LLAMACPP__THREADS": "1",
           "RUNNERD_DEFAULT_CONTEXT_SIZE": "2048", "RUNNERD_LOG_LEVEL": "warning"}
    args = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    return subprocess.Popen([sys.executable, "-m", "runnerd.cli", "serve", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL)


async def prepare(sock: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        for _ in range(1500):
            try:
                async with s.get("http://x/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.02)
        for model in ("a", "b"):
            async with s.post("http://x/engines/v1/completions",
                              json={"model": model, "prompt": "x", "max_tokens": 1, "keep_alive": -1}) as r:
                r.raise_for_status()
        async with s.get("http://x/engines/ps") as r:
            runners: list[dict[str, object]] = await r.json()
            return sorted(runners, key=lambda r: str(r["model"]))


def report(name: str, t: Tally, seconds: float) -> str:
    p50 = statistics.median(t.ttft) if t.ttft else float("nan")
    p99 = sorted(t.ttft)[int(0.99 * (len(t.ttft) - 1))] if t.ttft else float("nan")
    return (f"{name:<8}{t.requests / seconds:>10.1f}{t.tokens / seconds:>10.0f}{t.errors:>8}{t.busy:>6}"
            f"{p50:>11.1f}{p99:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", "--clients", type=int, default=8)
    parser.add_argument("-t", "--seconds", type=float, default=20, help="seconds on each path, all rounds together")
    parser.add_argument("--rounds", type=int, default=4, help="turns each path takes, alternately")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    llama_server = Path(os.environ.get("RUNNERD_LLAMA_SERVER")
                        or LlamaCppBackend(cache_dir=load_settings().cache_dir).binary())
    root = Path(tempfile.mkdtemp(prefix="rdl-", dir="/tmp"))
    models = {name: write_tiny_llama(root / f"{name}.gguf", seed=i) for i, name in enumerate("ab")}
    daemon = start_daemon(root, models, llama_server)
    sock = str(root / "run" / "runnerd.sock")
    try:
        runners = asyncio.run(prepare(sock))
        direct = [(str(r["socket"]), "/v1/completions") for r in runners]
        via = [(sock, "/engines/v1/completions")] * 2
        direct_tally, via_tally, cpu_seconds = Tally(), Tally(), 0.0
        cpu = psutil.Process(daemon.pid)
        turn = args.seconds / max(1, args.rounds)
        for _ in range(max(1, args.rounds)):
            direct_tally.add(asyncio.run(run_load(direct, args.clients, turn, args.max_tokens)))
            before = sum(cpu.cpu_times()[:2])
            via_tally.add(asyncio.run(run_load(via, args.clients, turn, args.max_tokens)))
            cpu_seconds += sum(cpu.cpu_times()[:2]) - before
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.clients} streaming clients x {args.seconds:g} s per path in {max(1, args.rounds)} alternating "
          f"rounds, 2 models, max_tokens={args.max_tokens}")
    print(f"{'path':<8}{'req/s':>10}{'tok/s':>10}{'errors':>8}{'503s':>6}{'ttft p50':>11}{'ttft p99':>11}")
    print(report("direct", direct_tally, args.seconds))
    print(report("runnerd", via_tally, args.seconds))
    per_k = cpu_seconds / max(1, via_tally.tokens) * 1000
    print(f"runnerd CPU: {cpu_seconds:.2f} s for {via_tally.tokens} relayed tokens = {per_k:.3f} s per 1,000 tokens")


if __name__ == "__main__":
    main()
