"""How long the daemon's event loop stalls while it is asked what it holds, as fast as clients can ask.

Starts a real daemon with 3 tiny models loaded on the real llama-server, then for T seconds C clients
poll `/metrics` and `/engines/ps` (alternately, as fast as each answer comes back) while a separate
process sends `GET /health` every 10 ms on a fresh connection and times each answer: /health does
nothing, so its latency is how long the event loop was busy with something else. Where the daemon
exports `runnerd_event_loop_lag_seconds` (its own 50 ms ticker), the largest lag it recorded during
the window is printed as well. An idle window of the same length comes first, for comparison.

    .venv/bin/python bench/loop_stall.py [-c 4] [-t 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.llamacpp import LlamaCppBackend  # noqa: E402
from runnerd.config import load_settings  # noqa: E402
from tests.tinymodels import write_tiny_llama  # noqa: E402

MODELS = ("m1", "m2", "m3")
HEALTH_PERIOD = 0.01
LAG = "runnerd_event_loop_lag_seconds"
LAG_MAX = "runnerd_event_loop_lag_max_seconds"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def health_ms(sock: str) -> float | None:
    """One GET /health on a new connection, in ms; None if it failed."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    start = time.perf_counter()
    try:
        s.connect(sock)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            return None
        return (time.perf_counter() - start) * 1000
    except OSError:
        return None
    finally:
        s.close()


def health_prober(sock: str, seconds: float, out: Any) -> None:
    """In its own process, so the pollers' client work does not delay its own clock."""
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ms = health_ms(sock)
        if ms is None:
            failures += 1
        else:
            latencies.append(ms)
        time.sleep(HEALTH_PERIOD)
    out.put((latencies, failures))


def start_daemon(root: Path, models: dict[str, Path], llama_server: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(root / "run"), "RUNNERD_DATA_DIR": str(root / "data"),
           "RUNNERD_LLAMA_SERVER": str(llama_server), "RUNNERD_LLAMACPP__THREADS": "1",
           "RUNNERD_DEFAULT_CONTEXT_SIZE": "512", "RUNNERD_KEEP_ALIVE": "-1", "RUNNERD_LOG_LEVEL": "warning"}
    argv = [sys.executable, "-m", "runnerd.cli", "serve"]
    for name, path in models.items():
        argv += ["--model", f"{name}={path}"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    sock = str(root / "run" / "runnerd.sock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if health_ms(sock) is not None:
            return proc, sock
        if proc.poll() is not None:
            raise RuntimeError(f"runnerd exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("runnerd did not start")


def lag_view(text: str) -> tuple[dict[float, float], float | None]:
    """The lag histogram's cumulative bucket counts and the max gauge, if the daemon exports them."""
    buckets: dict[float, float] = {}
    peak: float | None = None
    for line in text.splitlines():
        if line.startswith(f"{LAG}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{LAG_MAX} ") or line.startswith(f"{LAG_MAX}{{"):
            peak = float(line.rsplit(" ", 1)[1])
    return buckets, peak


def worst_bucket(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The upper bound of the highest bucket that gained samples between two scrapes: the worst lag
    recorded in between is at most this (and above the bucket below it)."""
    worst = None
    previous_gain = 0.0
    for bound in sorted(after):
        gain = after[bound] - before.get(bound, 0.0)
        if gain > previous_gain:
            worst = bound
        previous_gain = gain
    return worst


async def poller(session: aiohttp.ClientSession, deadline: float, counts: dict[str, int],
                 times: dict[str, list[float]], first: int) -> None:
    paths = ("/metrics", "/engines/ps")
    i = first
    while time.monotonic() < deadline:
        path = paths[i % 2]
        i += 1
        start = time.perf_counter()
        async with session.get(f"http://runnerd{path}") as resp:
            await resp.read()
            if resp.status != 200:
                counts["errors"] += 1
                continue
        times[path].append((time.perf_counter() - start) * 1000)
        counts[path] += 1


async def poll(sock: str, clients: int, seconds: float) -> tuple[dict[str, int], dict[str, list[float]]]:
    counts = {"/metrics": 0, "/engines/ps": 0, "errors": 0}
    times: dict[str, list[float]] = {"/metrics": [], "/engines/ps": []}
    connector = aiohttp.UnixConnector(path=sock, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(poller(session, deadline, counts, times, i) for i in range(clients)))
    return counts, times


def probe_window(sock: str, seconds: float, clients: int) -> dict[str, Any]:
    """/health latencies over `seconds`, with `clients` pollers running meanwhile (none: idle)."""
    queue: Any = multiprocessing.Queue()
    prober = multiprocessing.Process(target=health_prober, args=(sock, seconds, queue))
    prober.start()
    counts: dict[str, int] = {}
    times: dict[str, list[float]] = {}
    if clients:
        counts, times = asyncio.run(poll(sock, clients, seconds))
    latencies, failures = queue.get()
    prober.join()
    return {"health_n": len(latencies), "health_failures": failures,
            "health_p50_ms": statistics.median(latencies), "health_p99_ms": percentile(latencies, 99),
            "health_max_ms": max(latencies), "counts": counts,
            "poll_p50_ms": {p: statistics.median(t) for p, t in times.items() if t},
            "poll_max_ms": {p: max(t) for p, t in times.items() if t}}


def scrape(sock: str) -> str:
    import httpx2 as httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://runnerd", timeout=60) as c:
        return c.get("/metrics").text


def load_models(sock: str) -> None:
    import httpx2 as httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://runnerd", timeout=120) as c:
        for name in MODELS:
            c.post("/engines/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1}).raise_for_status()
        runners = c.get("/engines/ps").json()
        if sorted(r["model"].split(":")[0] for r in runners) != list(MODELS):
            raise RuntimeError(f"expected {MODELS} loaded, got {runners}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", "--clients", type=int, default=4)
    parser.add_argument("-t", "--seconds", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle comparison window")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    llama_server = Path(os.environ.get("RUNNERD_LLAMA_SERVER")
                        or LlamaCppBackend(cache_dir=load_settings().cache_dir).binary())
    root = Path(tempfile.mkdtemp(prefix="rdls-", dir="/tmp"))
    models = {name: write_tiny_llama(root / f"{name}.gguf", seed=i) for i, name in enumerate(MODELS)}
    proc, sock = start_daemon(root, models, llama_server)
    try:
        load_models(sock)
        idle = probe_window(sock, args.idle, 0)
        before_buckets, before_max = lag_view(scrape(sock))
        busy = probe_window(sock, args.seconds, args.clients)
        after_buckets, after_max = lag_view(scrape(sock))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    lag: dict[str, Any] = {"exported": bool(after_buckets)}
    if after_buckets:
        lag["worst_bucket_s"] = worst_bucket(before_buckets, after_buckets)
        lag["max_gauge_before_s"] = before_max
        lag["max_gauge_after_s"] = after_max
    result = {"clients": args.clients, "seconds": args.seconds, "idle": idle, "busy": busy, "event_loop_lag": lag}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    counts = busy["counts"]
    print(f"3 tiny models loaded; {args.clients} clients polling /metrics and /engines/ps for {args.seconds:g} s: "
          f"{counts.get('/metrics', 0)} + {counts.get('/engines/ps', 0)} answers "
          f"({(counts.get('/metrics', 0) + counts.get('/engines/ps', 0)) / args.seconds:.0f}/s), "
          f"{counts.get('errors', 0)} errors")
    for path, p50 in busy["poll_p50_ms"].items():
        print(f"  {path:<12} p50 {p50:8.2f} ms   max {busy['poll_max_ms'][path]:8.2f} ms")
    print(f"{'GET /health every 10 ms':<26}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, w in (("idle", idle), ("while polling", busy)):
        print(f"{name:<26}{w['health_n']:>6}{w['health_p50_ms']:>10.2f}{w['health_p99_ms']:>10.2f}"
              f"{w['health_max_ms']:>10.2f}")
    if lag["exported"]:
        print(f"daemon's own loop lag during polling: worst histogram bucket <= {lag['worst_bucket_s']} s; "
              f"max gauge {lag['max_gauge_before_s']} s before, {lag['max_gauge_after_s']} s after")
    else:
        print("daemon's own loop lag: not exported by this version")


if __name__ == "__main__":
    main()
