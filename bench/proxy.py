"""Proxy and cold-start overhead of runnerd against llama-server used directly, side by side.

Warm: against the SAME running llama-server (runnerd's runner), N sequential one-token requests straight
to its socket and through runnerd, interleaved, for each route llama-server serves itself: chat
completions, Anthropic Messages and OpenAI Responses. Cold: first-token time through runnerd for an
unloaded model, minus llama-server's own spawn-to-ready plus first-token time with the same command line.

    .venv/bin/python bench/proxy.py [--model tiny|gemma] [-n 200] [--cold 5] [--routes chat,messages,responses]
"""

from __future__ import annotations

import argparse
import json
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

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from backends.base import BackendConfiguration, Mode, ModelRef  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402
from backends.llamacpp.argv import LaunchOptions, build_argv, build_env  # noqa: E402
from runnerd.config import load_settings  # noqa: E402
from tests.tinymodels import write_tiny_llama  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1, "temperature": 0, "ignore_eos": True}
STREAM_BODY = {**BODY, "stream": True, "max_tokens": 2}
# route name -> (path on the engine and on runnerd, a one-token request)
ROUTES: dict[str, tuple[str, dict[str, object]]] = {
    "chat": ("/v1/chat/completions", BODY),
    "messages": ("/v1/messages", BODY),
    "responses": ("/v1/responses", {"input": "hello", "max_output_tokens": 1, "temperature": 0, "ignore_eos": True}),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def client(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://x", timeout=120)


def timed_post(c: httpx.Client, path: str, body: dict[str, object]) -> float:
    start = time.perf_counter()
    resp = c.post(path, json=body)
    elapsed = time.perf_counter() - start
    resp.raise_for_status()
    return elapsed * 1000


def first_token_ms(c: httpx.Client, path: str, body: dict[str, object], start: float) -> float:
    with c.stream("POST", path, json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data:"):  # the first event is sent once the first token exists
                return (time.perf_counter() - start) * 1000
    raise RuntimeError("no token arrived")


def start_daemon(root: Path, model: Path, llama_server: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(root / "run"), "RUNNERD_DATA_DIR": str(root / "data"),
           "RUNNERD_LLAMA_SERVER": str(llama_server), "RUNNERD_LLAMACPP__THREADS": "1",
           "RUNNERD_DEFAULT_CONTEXT_SIZE": "2048", "RUNNERD_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "runnerd.cli", "serve", "--model", f"bench={model}"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    sock = str(root / "run" / "runnerd.sock")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with client(sock) as c:
                if c.get("/health").status_code == 200:
                    return proc, sock
        except httpx.TransportError:
            time.sleep(0.02)
    raise RuntimeError("runnerd did not start")


def warm(daemon: httpx.Client, n: int, route: str) -> tuple[list[float], list[float]]:
    path, body = ROUTES[route]
    proxied_body = {**body, "model": "bench"}
    daemon.post(path, json=proxied_body).raise_for_status()
    (runner,) = daemon.get("/engines/ps").json()
    direct_c = client(runner["socket"])
    direct, proxied = [], []
    for _ in range(10):  # warm both connection pools and the engine's caches
        timed_post(direct_c, path, body)
        timed_post(daemon, path, proxied_body)
    for i in range(n):
        pair = [("direct", lambda: timed_post(direct_c, path, body)),
                ("proxied", lambda: timed_post(daemon, path, proxied_body))]
        for name, fn in pair if i % 2 == 0 else reversed(pair):
            (direct if name == "direct" else proxied).append(fn())
    direct_c.close()
    return direct, proxied


def cold_through_runnerd(daemon: httpx.Client) -> float:
    daemon.post("/engines/unload", json={"all": True}).raise_for_status()
    start = time.perf_counter()
    return first_token_ms(daemon, "/engines/v1/chat/completions", {**STREAM_BODY, "model": "bench"}, start)


def raw_health_ok(path: Path) -> bool:
    """GET /health on a bare socket: a refused connection costs microseconds, not an exception chain."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


def cold_direct(argv: list[str], env: dict[str, str], sock: Path) -> float:
    sock.unlink(missing_ok=True)
    # Built before the clock starts: creating an HTTP client costs tens of ms (TLS context setup).
    with client(str(sock)) as c:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while not raw_health_ok(sock):  # the tightest loop a caller could run: a 1 ms poll
                time.sleep(0.001)
            return first_token_ms(c, "/v1/chat/completions", STREAM_BODY, start)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--routes", default=",".join(ROUTES), help="comma-separated: " + ", ".join(ROUTES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    routes = [r for r in args.routes.split(",") if r]
    if unknown := set(routes) - set(ROUTES):
        parser.error(f"unknown route(s): {', '.join(sorted(unknown))}")

    backend = LlamaCppBackend(cache_dir=load_settings().cache_dir)
    llama_server = Path(os.environ.get("RUNNERD_LLAMA_SERVER") or backend.binary())
    root = Path(tempfile.mkdtemp(prefix="rdb-", dir="/tmp"))
    if args.model == "gemma":
        from gemma_model import gemma_path

        model = gemma_path()
    else:
        model = write_tiny_llama(root / "tiny.gguf")
    proc, sock = start_daemon(root, model, llama_server)
    try:
        with client(sock) as daemon:
            timings = {route: warm(daemon, args.n, route) for route in routes}
            cold_runnerd = [cold_through_runnerd(daemon) for _ in range(args.cold)]
        argv = build_argv(llama_server, root / "direct.sock", ModelRef(name="bench", path=model), Mode.COMPLETION,
                          BackendConfiguration(context_size=2048), LaunchOptions(threads=1))
        cold_engine = [cold_direct(argv, build_env(llama_server), root / "direct.sock") for _ in range(args.cold)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    result: dict[str, object] = {"model": args.model, "requests": args.n}
    for route, (direct, proxied) in timings.items():
        med_d, med_p = statistics.median(direct), statistics.median(proxied)
        result[route] = {"direct_median_ms": med_d, "direct_p99_ms": percentile(direct, 99),
                         "runnerd_median_ms": med_p, "runnerd_p99_ms": percentile(proxied, 99),
                         "median_overhead_ms": med_p - med_d, "ratio": med_p / med_d}
    cold = {"cold_runnerd_first_token_ms": statistics.median(cold_runnerd),
            "cold_engine_first_token_ms": statistics.median(cold_engine),
            "cold_overhead_ms": statistics.median(cold_runnerd) - statistics.median(cold_engine)}
    result.update(cold)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"warm: {args.n} sequential one-token requests per route, interleaved, model={args.model}")
    print(f"{'route':<11}{'direct ms':>11}{'p99':>9}{'runnerd ms':>12}{'p99':>9}{'added ms':>10}{'ratio':>8}")
    for route in timings:
        r = result[route]
        assert isinstance(r, dict)
        print(f"{route:<11}{r['direct_median_ms']:>11.3f}{r['direct_p99_ms']:>9.3f}{r['runnerd_median_ms']:>12.3f}"
              f"{r['runnerd_p99_ms']:>9.3f}{r['median_overhead_ms']:>10.3f}{r['ratio']:>8.3f}")
    print("targets: median added <= 1.5 ms, ratio <= 1.05")
    print(f"cold start ({args.cold} runs, medians): runnerd first token {cold['cold_runnerd_first_token_ms']:.1f} ms,"
          f" llama-server spawn-to-ready + first token {cold['cold_engine_first_token_ms']:.1f} ms, "
          f"overhead {cold['cold_overhead_ms']:.1f} ms (target <= 50)")


if __name__ == "__main__":
    main()
