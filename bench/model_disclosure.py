"""Whether a token can tell, by the time an answer takes, something hidden from it from something that does
not exist: a model outside its patterns, a hidden model's runner logs, another token's stored response.

Starts a real daemon (with the real llama-server) with a TCP listener and a tokens file in which `gem`
(user) and `ops` (operator, for /logs) may use `gemma*` only and `other` (user) every model, with the tiny
model registered as `tiny` and as `gemma-small`. `other` first makes one stored response with `tiny`, which
starts its runner and so writes its runner log. Then, over one keep-alive connection per token, it sends N
rounds, in a random order within each round, of:

- chat requests as `gem` for `tiny` (exists, not allowed), `nope` (does not exist) and, for contrast,
  `gemma-nop` (allowed by the pattern, does not exist: the store is asked);
- `GET /logs?runner=` as `ops` for `tiny` (has runner logs, not allowed) and `nope` (has none);
- `GET /v1/responses/<id>` as `gem` for `other`'s response and for an id of the same shape never stored.

Each answer is a 404; the script prints each probe's median, p90 and mean in microseconds, and for each
pair (hidden vs missing) a permutation test of the difference in medians.

    .venv/bin/python bench/model_disclosure.py [-n 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.llamacpp import LlamaCppBackend  # noqa: E402
from runnerd.config import load_settings  # noqa: E402
from runnerd.tokens import hash_text  # noqa: E402
from tests.tinymodels import write_tiny_llama  # noqa: E402

TOKENS = {"gem": ("user", "gemma*"), "ops": ("operator", "gemma*"), "other": ("user", "*")}
PAIRS = {"chat": ("tiny", "nope"), "logs": ("logs tiny", "logs nope"),
         "responses": ("resp other", "resp never")}


def token(name: str) -> str:
    return f"rd_bench-{name}-token-0123456789abcdefghijklmnop"


def llama_server() -> Path:
    """The cached llama-server build (what the tests use); RUNNERD_LLAMA_SERVER overrides it."""
    explicit = os.environ.get("RUNNERD_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    backend = LlamaCppBackend(cache_dir=load_settings().cache_dir)
    if backend.locate() is None:
        raise SystemExit("no llama-server build: run `make test` once, or set RUNNERD_LLAMA_SERVER")
    return backend.binary()


def start(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    model = write_tiny_llama(root / "tiny.gguf")
    (root / "tokens.toml").write_text("".join(
        f'[[tokens]]\nname = "{name}"\nrole = "{role}"\nhash = "{hash_text(token(name))}"\nmodels = ["{pattern}"]\n'
        for name, (role, pattern) in TOKENS.items()))
    env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(root / "run"), "RUNNERD_DATA_DIR": str(root / "data"),
           "RUNNERD_CACHE_DIR": str(root / "cache"), "RUNNERD_LLAMA_SERVER": str(llama_server()),
           "RUNNERD_LLAMACPP__THREADS": "1", "RUNNERD_DEFAULT_CONTEXT_SIZE": "512",
           "RUNNERD_HTTP__TOKENS_FILE": str(root / "tokens.toml"), "RUNNERD_LOG_LEVEL": "info"}
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "runnerd.cli", "serve", "--listen", "127.0.0.1:0",
                             "--model", f"tiny={model}", "--model", f"gemma-small={model}"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", (root / "daemon.log").read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"runnerd exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("runnerd did not start")


def permutation_p(a: list[float], b: list[float], rounds: int = 2000) -> float:
    observed = abs(statistics.median(a) - statistics.median(b))
    pooled = a + b
    rng = random.Random(1)
    hits = 0
    for _ in range(rounds):
        rng.shuffle(pooled)
        if abs(statistics.median(pooled[:len(a)]) - statistics.median(pooled[len(a):])) >= observed:
            hits += 1
    return (hits + 1) / (rounds + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="rounds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rd-bench-", dir="/tmp"))
    proc, port = start(root)
    try:
        clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                      headers={"Authorization": f"Bearer {token(name)}"}) for name in TOKENS}
        try:
            times = measure(clients, args.n)
        finally:
            for client in clients.values():
                client.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    report = {n: {"median_us": round(statistics.median(t), 1),
                  "p90_us": round(sorted(t)[int(0.9 * len(t))], 1),
                  "mean_us": round(statistics.fmean(t), 1)} for n, t in times.items()}
    ps = {pair: permutation_p(times[hidden], times[missing]) for pair, (hidden, missing) in PAIRS.items()}
    if args.json:
        print(json.dumps({"rounds": args.n, "probes": report, "hidden_vs_missing_p": ps}))
        return
    for name, r in report.items():
        print(f"{name:11} median {r['median_us']:8.1f} us   p90 {r['p90_us']:8.1f} us   mean {r['mean_us']:8.1f} us")
    for pair, (hidden, missing) in PAIRS.items():
        print(f"{pair:9}: {hidden} vs {missing}: difference of medians "
              f"{report[hidden]['median_us'] - report[missing]['median_us']:+.1f} us, permutation p = {ps[pair]:.3f} "
              f"({args.n} rounds)")


def measure(clients: dict[str, httpx.Client], rounds: int) -> dict[str, list[float]]:
    """Each probe's times in microseconds, after 100 rounds that warm up caches and connections."""
    made = clients["other"].post("/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 4})
    assert made.status_code == 200, made.text
    theirs = made.json()["id"]
    # An id of the same shape and length as a stored one, never stored.
    never = theirs[:theirs.index("_") + 1] + "".join(random.Random(2).choice("0123456789abcdef")
                                                    for _ in theirs[theirs.index("_") + 1:])
    assert clients["other"].get(f"/v1/responses/{theirs}").status_code == 200  # its owner still finds it
    chat = [{"role": "user", "content": "hi"}]
    probes: dict[str, tuple[str, str, str, dict[str, Any] | None]] = {
        "tiny": ("gem", "POST", "/v1/chat/completions", {"model": "tiny", "messages": chat}),
        "nope": ("gem", "POST", "/v1/chat/completions", {"model": "nope", "messages": chat}),
        "gemma-nop": ("gem", "POST", "/v1/chat/completions", {"model": "gemma-nop", "messages": chat}),
        "logs tiny": ("ops", "GET", "/logs?runner=tiny", None),
        "logs nope": ("ops", "GET", "/logs?runner=nope", None),
        "resp other": ("gem", "GET", f"/v1/responses/{theirs}", None),
        "resp never": ("gem", "GET", f"/v1/responses/{never}", None),
    }
    times: dict[str, list[float]] = {n: [] for n in probes}
    rng = random.Random(0)
    for i in range(rounds + 100):
        order = list(probes)
        rng.shuffle(order)
        for name in order:
            who, method, path, body = probes[name]
            began = time.perf_counter()
            resp = clients[who].request(method, path, json=body)
            took = (time.perf_counter() - began) * 1e6
            assert resp.status_code == 404, (name, resp.status_code, resp.text)
            if i >= 100:
                times[name].append(took)
    return times


if __name__ == "__main__":
    main()
