"""Bounds on vLLM's count-taking flags that depend on the host; the flag table's ranges hold on any host.

- ``--tensor-parallel-size`` times ``--pipeline-parallel-size``: one worker per device, so at most the
  GPUs vLLM can see on a GPU host, and at most the CPUs the daemon may run on on a CPU host (each rank
  is a process with its own threads);
- ``--max-num-seqs``: at most ``MAX_SEQS`` sequences in a batch (vLLM's largest default, on the largest
  GPUs), since each one reserves scheduler and sampler state;
- ``--max-parallel-loading-workers``: at most the CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backends.flags import FlagError, FlagTable

MAX_SEQS = 1024


@dataclass(frozen=True)
class VllmHostLimits:
    """What the host offers vLLM: the GPUs it can see (0 on a CPU host) and the CPUs it may run on."""

    gpus: int
    cpus: int

    @property
    def workers(self) -> int:
        return self.gpus if self.gpus > 0 else self.cpus

    def worker_kind(self) -> str:
        return f"{self.gpus} GPU(s) vLLM can see" if self.gpus > 0 else f"{self.cpus} CPUs"


def check_host_flags(table: FlagTable, flags: Sequence[str], limits: VllmHostLimits) -> None:
    """FlagError naming the first validated flag this host cannot honour."""
    values = table.values(flags)

    def number(name: str, default: int) -> int:
        value = values.get(name)
        return int(value) if isinstance(value, str) else default

    tp, pp = number("--tensor-parallel-size", 1), number("--pipeline-parallel-size", 1)
    if tp * pp > limits.workers:
        name = "--tensor-parallel-size" if tp > 1 else "--pipeline-parallel-size"
        raise FlagError(f"{name}={values[name]}", f"tensor x pipeline parallel size {tp * pp} needs one worker "
                                                 f"each; this host has {limits.worker_kind()}")
    seqs = number("--max-num-seqs", 0)
    if seqs > MAX_SEQS:
        raise FlagError(f"--max-num-seqs={seqs}", f"at most {MAX_SEQS} sequences per batch")
    loaders = number("--max-parallel-loading-workers", 0)
    if loaders > limits.cpus:
        raise FlagError(f"--max-parallel-loading-workers={loaders}", f"at most {limits.cpus} (this host's CPUs)")
