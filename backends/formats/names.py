"""Model file names: the shards of a split GGUF and the files of a Hugging Face-format repository.

Pure functions on names (no file or network I/O): the GGUF reader finds a split model's shards with
them, and the pull (``runnerd.pull``) decides which remote files make a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# `<prefix>-0000i-of-0000N.gguf`, as llama.cpp's llama_split_path writes the shards of one model (and
# llama_split_prefix reads them back: the prefix may be empty).
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Files of a Hugging Face-format repository that a model directory needs (weights, configs, tokenizer,
# chat templates); the rest (README, images, other formats of the same weights) is left upstream.
MODEL_REPO_FILE = re.compile(r"^(?:.*\.safetensors|.*\.json|tokenizer\.model|.*\.tiktoken|merges\.txt|vocab\.txt|"
                             r".*\.jinja)$")


@dataclass(frozen=True)
class SplitName:
    prefix: str
    number: int  # 1-based
    count: int


class SplitNameError(ValueError):
    """A split file name whose shard number cannot be (0, past the count, or a count over the limit)."""

    def __init__(self, file_name: str, number: int, count: int) -> None:
        self.file_name = file_name
        self.number = number
        self.count = count
        super().__init__(f"shard {number} of {count} in {file_name!r} is impossible")


def parse_split_name(file_name: str) -> SplitName | None:
    """The parts of a split shard's name; None for any other name."""
    m = SPLIT_NAME.match(file_name)
    if m is None:
        return None
    return SplitName(prefix=m.group("prefix"), number=int(m.group("no")), count=int(m.group("count")))


def split_names(file_name: str, max_count: int | None = None) -> list[str]:
    """All shard names of a split GGUF, in order, given any shard's name; [file_name] for other names.
    SplitNameError when the shard number is not 1..count, or the count is over `max_count`."""
    split = parse_split_name(file_name)
    if split is None:
        return [file_name]
    if not 1 <= split.number <= split.count or (max_count is not None and split.count > max_count):
        raise SplitNameError(file_name, split.number, split.count)
    return [f"{split.prefix}-{i:05d}-of-{split.count:05d}.gguf" for i in range(1, split.count + 1)]


def gguf_stem(file_name: str) -> str:
    """A GGUF's name without the shard suffix and the `.gguf` extension (`m-00001-of-00002.gguf` -> `m`)."""
    split = parse_split_name(file_name)
    stem = split.prefix if split is not None and split.prefix else file_name
    return stem[:-5] if stem.lower().endswith(".gguf") else stem


def is_model_repo_file(path: str) -> bool:
    """Whether a file of a hub repository (a path inside it) belongs in the model directory."""
    return MODEL_REPO_FILE.match(path.rsplit("/", 1)[-1]) is not None


def is_model_directory(paths: Iterable[str]) -> bool:
    """Whether these files (paths inside the directory) make a Hugging Face-format model: a
    config.json at the top and safetensors weights."""
    names = list(paths)
    return any(p.endswith(".safetensors") for p in names) and "config.json" in names
