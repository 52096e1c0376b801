"""backends.formats: the dispatch API by model format, and the pure file-name functions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import pytest

from backends.base import ModelFormat
from backends.formats import ModelSummary, describe, format_of, model_files, parameter_count
from backends.formats.gguf import GGUFParseError, shard_paths
from backends.formats.names import (
    SplitNameError,
    gguf_stem,
    is_model_directory,
    is_model_repo_file,
    parse_split_name,
    split_names,
)
from backends.formats.safetensors import ModelConfigError, SafetensorsError
from tests.tinymodels import write_tiny_llama

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 300,
          "torch_dtype": "bfloat16"}


def _safetensors(tensors: dict[str, tuple[str, list[int], int]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def _model_dir(root: Path, config: dict[str, object] | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    (root / "model-00001-of-00002.safetensors").write_bytes(
        _safetensors({"a": ("F32", [4, 8], 128), "b": ("BF16", [10], 20)}))
    (root / "model-00002-of-00002.safetensors").write_bytes(_safetensors({"c": ("I8", [3, 3], 9)}))
    (root / "tokenizer.json").write_text("{}")
    return root


def test_summary_fields_are_the_json_shape_the_api_shows() -> None:
    # GET /models/{m}, `runnerd inspect` and the Ollama routes show these keys: adding one changes their answers.
    assert list(ModelSummary.model_fields) == [
        "architecture", "parameter_count", "quantization", "context_length", "block_count", "head_count",
        "head_count_kv", "embedding_length", "vocab_size", "pooling_type", "sliding_window", "size_bytes"]


def test_describe_a_gguf(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_ctx_train=2048)
    reference = gguf.GGUFReader(str(path))
    elements = sum(int(t.n_elements) for t in reference.tensors)
    s = describe(path, ModelFormat.GGUF)
    assert s == ModelSummary(architecture="llama", parameter_count=elements, quantization="F32", context_length=2048,
                             block_count=2, head_count=4, head_count_kv=2, embedding_length=64, vocab_size=271,
                             pooling_type=None, sliding_window=None, size_bytes=path.stat().st_size)
    assert parameter_count(path, ModelFormat.GGUF) == elements
    assert format_of(path) is ModelFormat.GGUF
    assert model_files(path, ModelFormat.GGUF) == [path]


def test_describe_a_split_gguf_counts_every_shard(tmp_path: Path) -> None:
    whole = describe(write_tiny_llama(tmp_path / "whole.gguf"), ModelFormat.GGUF)
    write_tiny_llama(tmp_path / "m.gguf", split_max_tensors=8)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 1
    assert model_files(shards[1], ModelFormat.GGUF) == shards
    split = describe(shards[-1], ModelFormat.GGUF)
    assert split.model_copy(update={"size_bytes": 0}) == whole.model_copy(update={"size_bytes": 0})
    assert split.size_bytes == sum(p.stat().st_size for p in shards)
    assert parameter_count(shards[0], ModelFormat.GGUF) == whole.parameter_count


def test_describe_refuses_what_is_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, just text" * 4)
    with pytest.raises(GGUFParseError, match="not a GGUF file"):
        describe(bad, ModelFormat.GGUF)
    with pytest.raises(GGUFParseError, match="impossible"):
        model_files(tmp_path / "x-00003-of-00002.gguf", ModelFormat.GGUF)


def test_describe_a_safetensors_directory(tmp_path: Path) -> None:
    root = _model_dir(tmp_path / "m")
    s = describe(root, ModelFormat.SAFETENSORS)
    assert s == ModelSummary(architecture="LlamaForCausalLM", parameter_count=32 + 10 + 9, quantization="bfloat16",
                             context_length=512, block_count=2, head_count=4, head_count_kv=2, embedding_length=64,
                             vocab_size=300, pooling_type=None, sliding_window=None,
                             size_bytes=sum(p.stat().st_size for p in root.iterdir()))
    assert parameter_count(root, ModelFormat.SAFETENSORS) == 51
    assert format_of(root) is ModelFormat.SAFETENSORS
    (root / ".hidden").write_text("x")
    assert [p.name for p in model_files(root, ModelFormat.SAFETENSORS)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"]


def test_safetensors_summary_from_config_alone(tmp_path: Path) -> None:
    root = tmp_path / "q"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "dtype": "float16",
                                                  "quantization_config": {"quant_method": "awq"}}))
    s = describe(root, ModelFormat.SAFETENSORS)
    assert (s.architecture, s.quantization, s.parameter_count, s.context_length) == ("qwen2", "awq", None, None)
    assert parameter_count(root, ModelFormat.SAFETENSORS) is None


def test_untrusted_safetensors_header_leaves_the_count_out(tmp_path: Path) -> None:
    root = _model_dir(tmp_path / "m")
    (root / "model-00002-of-00002.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert describe(root, ModelFormat.SAFETENSORS).parameter_count is None  # informational: the engine judges
    with pytest.raises(SafetensorsError, match="exceeds"):
        parameter_count(root, ModelFormat.SAFETENSORS)


@pytest.mark.parametrize(("config", "why"), [(None, "No such file"), (b"{", "not valid JSON"),
                                              (b"[1]", "not a JSON object"),
                                              (b" " * (4 * 2**20 + 1), "larger than")])
def test_directory_without_a_usable_config(tmp_path: Path, config: bytes | None, why: str) -> None:
    root = _model_dir(tmp_path / "m")
    if config is None:
        (root / "config.json").unlink()
    else:
        (root / "config.json").write_bytes(config)
    with pytest.raises(ModelConfigError, match=why):
        describe(root, ModelFormat.SAFETENSORS)


def test_split_names() -> None:
    assert split_names("m-00002-of-00003.gguf") == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf",
                                                    "m-00003-of-00003.gguf"]
    assert split_names("model.gguf") == ["model.gguf"]
    assert split_names("m-0001-of-0002.gguf") == ["m-0001-of-0002.gguf"]  # five digits or it is no shard
    split = parse_split_name("a-b-00001-of-00002.gguf")
    assert split is not None and (split.prefix, split.number, split.count) == ("a-b", 1, 2)
    # llama.cpp accepts an empty prefix (`<dir>/-00001-of-00002.gguf`); so does the reader.
    assert split_names("-00001-of-00002.gguf") == ["-00001-of-00002.gguf", "-00002-of-00002.gguf"]
    for impossible in ("m-00000-of-00002.gguf", "m-00003-of-00002.gguf", "m-00001-of-00000.gguf"):
        with pytest.raises(SplitNameError, match="impossible"):
            split_names(impossible)
    assert len(split_names("m-00001-of-00300.gguf")) == 300
    with pytest.raises(SplitNameError) as err:
        split_names("m-00001-of-00300.gguf", max_count=256)
    assert (err.value.number, err.value.count) == (1, 300)
    assert shard_paths(Path("/d/m-00002-of-00002.gguf")) == [Path("/d/m-00001-of-00002.gguf"),
                                                             Path("/d/m-00002-of-00002.gguf")]


def test_gguf_stem() -> None:
    assert gguf_stem("Qwen3-8B-Q4_K_M.gguf") == "Qwen3-8B-Q4_K_M"
    assert gguf_stem("big-00002-of-00004.gguf") == "big"
    assert gguf_stem("big.gguf-00001-of-00002.gguf") == "big"
    assert gguf_stem("MODEL.GGUF") == "MODEL"
    assert gguf_stem("-00001-of-00002.gguf") == "-00001-of-00002"  # no prefix: the name is all there is
    assert gguf_stem("weights.bin") == "weights.bin"


def test_hub_repository_file_selection() -> None:
    wanted = ["config.json", "model-00001-of-00002.safetensors", "sub/dir/model.safetensors", "tokenizer.json",
              "tokenizer.model", "cl100k.tiktoken", "merges.txt", "vocab.txt", "chat_template.jinja",
              "generation_config.json"]
    unwanted = ["README.md", "pytorch_model.bin", "model.gguf", ".gitattributes", "image.png", "config.json.bak",
                "model.safetensors.index"]
    assert all(is_model_repo_file(p) for p in wanted)
    assert not any(is_model_repo_file(p) for p in unwanted)
    assert is_model_directory(["config.json", "model.safetensors"])
    assert is_model_directory(iter(["tokenizer.json", "config.json", "w/model.safetensors"]))
    assert not is_model_directory(["config.json", "tokenizer.json"])
    assert not is_model_directory(["sub/config.json", "model.safetensors"])  # config.json at the top
