"""Which catalog variants this host can run, best first: the "meta" resolution of an engine version to the
build for this host's hardware."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from backends.catalog.model import CatalogVersion, Recipe, Variant


def host_variants(cuda_versions: Iterable[str | None], *, platform: str = sys.platform,
                  rocm_device: Path = Path("/dev/kfd"), vulkan: bool = False) -> list[Variant]:
    """From the inventory `/node` reports: each NVIDIA GPU's driver CUDA version (a CUDA 13 driver also runs
    CUDA 12 builds), an AMD compute device, macOS. The CPU variant always comes last. Vulkan is never
    guessed: an operator says so (a loader without a working driver fails at run time)."""
    found: list[Variant] = []
    majors = {int(v.split(".")[0]) for v in cuda_versions if v and v.split(".")[0].isdigit()}
    if any(m >= 13 for m in majors):
        found += [Variant.CUDA13, Variant.CUDA12]
    elif 12 in majors:
        found.append(Variant.CUDA12)
    if rocm_device.exists():
        found.append(Variant.ROCM)
    if platform == "darwin":
        found.append(Variant.METAL)
    if vulkan:
        found.append(Variant.VULKAN)
    return [*found, Variant.CPU]


def resolve(version: CatalogVersion, preferred: Sequence[Variant]) -> tuple[Variant, Recipe] | None:
    """The recipe of the best variant this host runs; None when the version offers none of them."""
    for variant in preferred:
        recipe = version.variants.get(variant)
        if recipe is not None:
            return variant, recipe
    return None
