"""The model formats runnerd knows (a leaf module: the Backend protocol and the format readers both use it)."""

from enum import StrEnum


class ModelFormat(StrEnum):
    GGUF = "gguf"
    SAFETENSORS = "safetensors"
