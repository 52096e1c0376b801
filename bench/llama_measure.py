"""Run the real llama-server with runnerd's command line and measure what it holds in memory.

Shared by bench/memory.py (estimate against measurement) and tests/test_memory_estimate.py (the
re-measuring test). One measurement: spawn llama-server on a private unix socket, wait for
`/health`, send one warm-up chat request, then read the process's resident memory (VmRSS, with its
anonymous and file-backed parts) and the buffer sizes llama.cpp logs, and stop it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

from backends.base import BackendConfiguration, Mode, ModelRef
from backends.llamacpp.argv import LaunchOptions, build_argv, build_env

WARMUP = {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 8, "temperature": 0}
EMBED_WARMUP = {"input": "Hello, how are you?"}
# "CPU_Mapped model buffer size =   235.16 MiB", "CPU KV buffer size = ...", "CPU compute buffer size = ..."
_BUFFER = re.compile(r"(?P<what>[\w.-]+)\s+(?P<kind>model|KV|compute|output|RS) buffer size =\s*(?P<mib>[\d.]+) MiB")


@dataclass
class Measurement:
    argv: list[str]
    rss: int  # VmRSS after the warm-up request, bytes
    rss_anon: int
    rss_file: int
    buffers: dict[str, float] = field(default_factory=dict)  # "<device> <kind>" -> MiB, as logged
    ready_s: float = 0.0


def runtime_flags(ctx: int | None = None, cache_type: str | None = None, parallel: int | None = None,
                  flash_attn: str | None = None) -> list[str]:
    """The caller-tunable flags a row sets, in the canonical spelling runnerd validates."""
    flags: list[str] = []
    if cache_type is not None:
        flags += ["--cache-type-k", cache_type, "--cache-type-v", cache_type]
    if parallel is not None:
        flags += ["--parallel", str(parallel)]
    if flash_attn is not None:
        flags += ["--flash-attn", flash_attn]
    return flags


def command(binary: Path, model: Path, socket_path: Path, *, ctx: int, flags: list[str], mode: Mode = Mode.COMPLETION,
            threads: int | None = None, verbose: bool = True) -> list[str]:
    """Exactly runnerd's argv for this model and configuration (plus a log level that shows buffer sizes)."""
    config = BackendConfiguration(context_size=ctx, runtime_flags=flags)
    argv = build_argv(binary, socket_path, ModelRef(name="bench", path=model), mode, config,
                      LaunchOptions(threads=threads))
    return [*argv, "--log-verbosity", "4"] if verbose else argv


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def embedding_input(client: httpx.Client, n_tokens: int) -> dict[str, str]:
    """An embedding input of at most n_tokens tokens with this model's tokenizer (BOS/EOS included)."""
    def count(words: int) -> int:
        return len(client.post("/tokenize", json={"content": " ".join(["the"] * words)}).json()["tokens"])

    per_word = max(count(10) / 10, 0.1)
    words = max(int((n_tokens - 2) / per_word), 1)
    while words > 1 and count(words) > n_tokens - 2:  # room for BOS/EOS
        words -= 1
    return {"input": " ".join(["the"] * words)}


def measure(binary: Path, model: Path, *, ctx: int, flags: list[str], mode: Mode = Mode.COMPLETION,
            warmup: dict[str, object] | None = None, embed_tokens: int | None = None, timeout: float = 120.0,
            settle_s: float = 0.3) -> Measurement:
    """embed_tokens: in embedding mode, warm up with an input of about that many tokens."""
    tmp = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))  # short: unix socket paths are limited
    sock = tmp / "s.sock"
    argv = command(binary, model, sock, ctx=ctx, flags=flags, mode=mode)
    log_path = tmp / "log"
    start = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=build_env(binary), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x", timeout=timeout)
        _wait_ready(proc, client, start + timeout, log_path)
        ready = time.monotonic() - start
        if mode is Mode.COMPLETION:
            client.post("/v1/chat/completions", json=warmup or WARMUP).raise_for_status()
        else:
            body = warmup or (embedding_input(client, embed_tokens) if embed_tokens else EMBED_WARMUP)
            client.post("/v1/embeddings", json=body).raise_for_status()
        time.sleep(settle_s)
        rss = _status_kib(proc.pid, "VmRSS") * 1024
        anon = _status_kib(proc.pid, "RssAnon") * 1024
        file = _status_kib(proc.pid, "RssFile") * 1024
        client.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    buffers = parse_buffers(log_path.read_text(errors="replace"))
    shutil.rmtree(tmp, ignore_errors=True)
    return Measurement(argv=argv, rss=rss, rss_anon=anon, rss_file=file, buffers=buffers, ready_s=ready)


def parse_buffers(log: str) -> dict[str, float]:
    """Buffer sizes llama.cpp logged, summed per '<buffer type> <kind>' (two KV caches for SWA models)."""
    sizes: dict[str, float] = {}
    for m in _BUFFER.finditer(log):
        key = f"{m.group('what')} {m.group('kind')}"
        sizes[key] = sizes.get(key, 0.0) + float(m.group("mib"))
    return sizes


def _wait_ready(proc: subprocess.Popen[bytes], client: httpx.Client, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            if client.get("/health").status_code == 200:
                return
        time.sleep(0.02)
    raise RuntimeError(f"llama-server not ready in time:\n{log.read_text(errors='replace')[-3000:]}")
