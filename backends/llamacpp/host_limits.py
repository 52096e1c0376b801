"""Bounds on llama-server's settings that depend on the host or on the rest of the configuration.

The flag table (flags.py) checks each value against ranges that hold on any host. These rules add what
only this host, or the whole configuration, decides, for values the engine cannot survive or the host
cannot carry:

- thread counts (``--threads``, ``--threads-batch``, ``--threads-http`` and the draft's two): at most
  twice the CPUs the daemon may run on (its affinity mask, which the engine inherits), or ``-1`` for
  llama.cpp's own choice. Twice, not once: a little oversubscription is a legitimate tuning choice,
  hundreds of threads on a few cores are not;
- CPU placement (``--cpu-range``, ``--cpu-mask`` and their ``-batch`` twins): only CPUs the host has
  (ids below its CPU count, ``os.cpu_count()``), and at least one of them;
- slots (``--parallel``): at most ``MAX_SLOTS``, llama.cpp's LLAMA_MAX_SEQ (with more the engine refuses
  to start), and each slot needs ``MIN_SLOT_CELLS`` cells of the context: ``parallel`` times that may
  not exceed the context size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backends.flags import FlagError, FlagTable

MAX_SLOTS = 256  # src/llama-cparams.h, LLAMA_MAX_SEQ
MIN_SLOT_CELLS = 128
THREADS_PER_CPU = 2

_THREAD_FLAGS = ("--threads", "--threads-batch", "--threads-http", "--spec-draft-threads",
                 "--spec-draft-threads-batch")
_RANGE_FLAGS = ("--cpu-range", "--cpu-range-batch")
_MASK_FLAGS = ("--cpu-mask", "--cpu-mask-batch")


@dataclass(frozen=True)
class HostLimits:
    """What the host offers an engine: how many CPUs it may run on, and the CPU ids the host has (more
    than that count when the daemon's affinity mask leaves some out)."""

    cpus: int
    cpu_ids: int

    @classmethod
    def of_host(cls, cpus: int) -> HostLimits:
        return cls(cpus=cpus, cpu_ids=max(cpus, os.cpu_count() or 1))

    @property
    def max_threads(self) -> int:
        return THREADS_PER_CPU * self.cpus


def check_host_flags(table: FlagTable, flags: Sequence[str], limits: HostLimits) -> None:
    """FlagError naming the first validated flag (canonical form) that this host cannot honour."""
    values = table.values(flags)
    for name, reason in _problems(values, limits):
        raise FlagError(f"{name} {values[name]}", reason)


def _problems(values: Mapping[str, str | bool], limits: HostLimits) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name in _THREAD_FLAGS:
        value = values.get(name)
        if isinstance(value, str) and int(value) > limits.max_threads:
            found.append((name, f"at most {limits.max_threads} threads on this host ({limits.cpus} CPUs, "
                                f"{THREADS_PER_CPU} threads per CPU at most), or -1 for llama.cpp's choice"))
    for name in _RANGE_FLAGS:
        value = values.get(name)
        if isinstance(value, str):
            low, _, high = value.partition("-")
            if int(low) > int(high):
                found.append((name, "the range must go from a lower to a higher CPU number"))
            elif int(high) >= limits.cpu_ids:
                found.append((name, f"this host has CPUs 0-{limits.cpu_ids - 1}"))
    for name in _MASK_FLAGS:
        value = values.get(name)
        if isinstance(value, str):
            mask = int(value.removeprefix("0x").removeprefix("0X"), 16)
            if mask == 0:
                found.append((name, "the mask selects no CPU"))
            elif mask.bit_length() > limits.cpu_ids:
                found.append((name, f"the mask selects CPU {mask.bit_length() - 1}; this host has CPUs "
                                    f"0-{limits.cpu_ids - 1}"))
    parallel = values.get("--parallel")
    if isinstance(parallel, str) and int(parallel) > MAX_SLOTS:
        found.append(("--parallel", f"llama-server runs at most {MAX_SLOTS} slots"))
    return found


def slots_problem(values: Mapping[str, str | bool], context_size: int) -> str | None:
    """Why the configured slots cannot share this context, or None."""
    parallel = values.get("--parallel")
    if not isinstance(parallel, str) or int(parallel) < 1:
        return None  # unset or -1: llama-server's automatic slots share one cache
    slots = int(parallel)
    if slots * MIN_SLOT_CELLS > context_size:
        most = max(1, context_size // MIN_SLOT_CELLS)
        return (f"--parallel {slots} needs a context of at least {slots * MIN_SLOT_CELLS} tokens "
                f"({MIN_SLOT_CELLS} per slot); the context is {context_size}: use --parallel {most} at most "
                f"or a larger context_size")
    return None
