"""Header parse time on Gemma 3 270M (262,144-token vocabulary): runnerd's reader vs gguf.GGUFReader.

Both read the same file in one run, in the same process, page cache warm. runnerd's reader
(backends/formats/gguf.py read_header) is timed over --runs calls, gguf.GGUFReader over --reference-runs
(it takes seconds each). Target: runnerd's median <= 20 ms. The load average is printed because the
figures mean little on a busy machine.

    .venv/bin/python bench/gguf_parse.py [--runs 100] [--reference-runs 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf import GGUFReader  # noqa: E402

from backends.formats.gguf import read_header  # noqa: E402

TARGET_MS = 20.0


def timings(fn: Callable[[], Any], runs: int) -> list[float]:
    fn()  # warm the page cache and imports
    out = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def row(name: str, ms: list[float], peak: float) -> str:
    ordered = sorted(ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (f"{name:22} {len(ms):>5} {statistics.median(ms):>10.2f} {ordered[0]:>9.2f} {p90:>9.2f} "
            f"{peak:>12.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--reference-runs", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: Gemma 3 270M)")
    args = parser.parse_args()
    if args.model is None:
        from scripts.gemma_model import gemma_path

        args.model = gemma_path()
    path = args.model
    header = read_header(path)
    print(f"model: {path.name}, {path.stat().st_size / 2**20:.0f} MiB, header {header.data_offset / 2**20:.2f} MiB, "
          f"{len(header.tensors)} tensors, {len(header.metadata)} keys, "
          f"vocabulary {len(header.get('tokenizer.ggml.tokens', []))}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs\n")

    ours = timings(lambda: read_header(path), args.runs)
    ours_peak = peak_mib(lambda: read_header(path))
    theirs = timings(lambda: GGUFReader(path), args.reference_runs)
    theirs_peak = peak_mib(lambda: GGUFReader(path))

    print(f"{'reader':22} {'runs':>5} {'median ms':>10} {'min ms':>9} {'p90 ms':>9} {'peak MiB':>12}")
    print(row("runnerd read_header", ours, ours_peak))
    print(row("gguf.GGUFReader", theirs, theirs_peak))
    speedup = statistics.median(theirs) / statistics.median(ours)
    met = statistics.median(ours) <= TARGET_MS
    print(f"\nrunnerd is {speedup:.0f}x faster; target median <= {TARGET_MS:.0f} ms: {'met' if met else 'NOT met'}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
