"""Which of the host's GPUs an engine process sees (CUDA's rules), for backends that place work on them."""

from __future__ import annotations

from collections.abc import Sequence

from backends.base import HostGpu


def cuda_visible(gpus: Sequence[HostGpu], spec: str | None) -> list[HostGpu]:
    """The GPUs a CUDA process sees, in its order: CUDA_VISIBLE_DEVICES (passed on to engines) lists
    NVML indices or UUID prefixes; unset means all of them. An entry that names no GPU ends the list,
    as in CUDA."""
    if spec is None:
        return list(gpus)
    found: list[HostGpu] = []
    for entry in (e.strip() for e in spec.split(",")):
        match = next((g for g in gpus if (entry.isdigit() and g.index == int(entry))
                      or (entry.startswith("GPU-") and g.uuid.startswith(entry))), None)
        if match is None:
            break
        found.append(match)
    return found
