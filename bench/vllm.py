"""vLLM through runnerd: time to ready, resident memory of the engine's process tree, proxy overhead.

Starts a daemon serving a tiny random Llama in Hugging Face format (tests/hf_tiny.py) on the vLLM
backend (installed first if missing), then:
- ready: the daemon's own load time (spawn to `/health` 200, from its log) and the client-seen time of
  the first completion;
- RSS: the sum over the vLLM process tree after a warm-up request;
- proxy: N sequential `max_tokens: 1` chat completions straight to the runner's socket and through
  runnerd, interleaved; the difference of the medians is runnerd's overhead.

    .venv/bin/python bench/vllm.py [-n 50]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.vllm import VllmBackend  # noqa: E402
from runnerd.config import load_settings  # noqa: E402
from tests.conftest import Daemon  # noqa: E402

BODY = {"model": "tiny:latest", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1,
        "temperature": 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=50)
    args = parser.parse_args()
    settings = load_settings()
    backend = VllmBackend(cache_dir=settings.cache_dir, python=settings.engine("vllm").python)
    if backend.locate() is None:
        asyncio.run(backend.install())
    python = backend.python()
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as tmp:
        root = Path(tmp)
        model = root / "tiny-hf"
        subprocess.run([str(python), str(ROOT / "tests" / "hf_tiny.py"), str(model)], check=True, capture_output=True)
        # Not used: there is no GGUF model here.
        server = settings.engine("llama.cpp").server or Path("/nonexistent/llama-server")
        (root / "d").mkdir()
        d = Daemon(root / "d", server, {}, {"RUNNERD_VLLM": str(python)}, [])
        try:
            d.post("/models/create", {"from": str(model), "name": "tiny"}).raise_for_status()
            started = time.monotonic()
            d.post("/engines/v1/chat/completions", BODY).raise_for_status()
            first = time.monotonic() - started
            load_ms = re.findall(r"runner ready .*load_ms=([0-9.]+)", d.output())
            (runner,) = d.ps()
            tree = [psutil.Process(runner["pid"]), *psutil.Process(runner["pid"]).children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
            direct = httpx.Client(transport=httpx.HTTPTransport(uds=runner["socket"]), base_url="http://runner",
                                  timeout=60)
            via, raw = [], []
            for _ in range(args.n):
                for client, path, sink in ((direct, "/v1/chat/completions", raw),
                                           (d.http, "/engines/v1/chat/completions", via)):
                    t = time.perf_counter()
                    client.post(path, json=BODY).raise_for_status()
                    sink.append((time.perf_counter() - t) * 1000)
            direct.close()
        finally:
            d.stop()
    print(f"processes in the vLLM tree   {len(tree)}")
    print(f"daemon load time (spawn->ready) {float(load_ms[0]) / 1000 if load_ms else float('nan'):.1f} s")
    print(f"first chat completion (client)  {first:.1f} s")
    print(f"RSS of the vLLM tree (warm)     {rss / 2**20:.0f} MiB")
    print(f"{'':24}{'median ms':>10}{'p90 ms':>10}")
    for name, xs in (("direct to vLLM", raw), ("through runnerd", via)):
        print(f"{name:24}{statistics.median(xs):10.2f}{statistics.quantiles(xs, n=10)[-1]:10.2f}")
    print(f"proxy overhead (median)         {statistics.median(via) - statistics.median(raw):.2f} ms")


if __name__ == "__main__":
    main()
