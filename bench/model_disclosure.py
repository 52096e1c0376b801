"""Whether a token can tell, by the time an answer takes, a model outside its patterns from one that does
not exist.

Starts a real daemon with a TCP listener and a tokens file in which `gem` may use `gemma*` only, with the
tiny model registered as `tiny` and as `gemma-small`. Then, over one keep-alive connection, it sends N
rounds of chat requests as `gem`, in a random order within each round, for `tiny` (exists, not allowed),
`nope` (does not exist) and, for contrast, `gemma-nop` (allowed by the pattern, does not exist: the store
is asked). Each answer is a 404; the script prints each name's median, p90 and mean in microseconds,
and a permutation test of the difference in medians between `tiny` and `nope`.

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

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runnerd.tokens import hash_text  # noqa: E402
from tests.tinymodels import write_tiny_llama  # noqa: E402

TOKEN = "rd_bench-gem-token-0123456789abcdefghijklmnop"
NAMES = ("tiny", "nope", "gemma-nop")


def start(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    model = write_tiny_llama(root / "tiny.gguf")
    (root / "tokens.toml").write_text(f'[[tokens]]\nname = "gem"\nrole = "user"\nhash = "{hash_text(TOKEN)}"\n'
                                      'models = ["gemma*"]\n')
    env = {**os.environ, "RUNNERD_RUNTIME_DIR": str(root / "run"), "RUNNERD_DATA_DIR": str(root / "data"),
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
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            rng = random.Random(0)
            for i in range(args.n + 100):
                order = list(NAMES)
                rng.shuffle(order)
                for name in order:
                    body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
                    began = time.perf_counter()
                    resp = client.post("/v1/chat/completions", json=body)
                    took = (time.perf_counter() - began) * 1e6
                    assert resp.status_code == 404, resp.text
                    if i >= 100:  # the first rounds warm up caches and the connection
                        times[name].append(took)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    report = {n: {"median_us": round(statistics.median(t), 1),
                  "p90_us": round(sorted(t)[int(0.9 * len(t))], 1),
                  "mean_us": round(statistics.fmean(t), 1)} for n, t in times.items()}
    p = permutation_p(times["tiny"], times["nope"])
    if args.json:
        print(json.dumps({"rounds": args.n, "names": report, "tiny_vs_nope_p": p}))
        return
    for name, r in report.items():
        print(f"{name:10} median {r['median_us']:8.1f} us   p90 {r['p90_us']:8.1f} us   mean {r['mean_us']:8.1f} us")
    print(f"tiny vs nope: difference of medians {report['tiny']['median_us'] - report['nope']['median_us']:+.1f} us, "
          f"permutation p = {p:.3f} ({args.n} rounds)")


if __name__ == "__main__":
    main()
