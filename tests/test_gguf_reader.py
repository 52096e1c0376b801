"""backends/formats/gguf.py on headers written by gguf.GGUFWriter, and on hand-built broken ones."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType

import backends.formats.gguf as reader
from backends.formats.gguf import GGUFParseError, LazyArray, iter_scalars, read_header, shard_paths, tensor_nbytes
from backends.formats.gguf_summary import summarize
from tests.gguf_bytes import Builder, Typed, array, text, u32
from tests.memory_models import TinySpec, write_model
from tests.tinymodels import write_tiny_llama

SCALARS = {
    "u8": (GGUFValueType.UINT8, 255), "i8": (GGUFValueType.INT8, -128), "u16": (GGUFValueType.UINT16, 65535),
    "i16": (GGUFValueType.INT16, -32768), "u32": (GGUFValueType.UINT32, 2**32 - 1),
    "i32": (GGUFValueType.INT32, -(2**31)), "f32": (GGUFValueType.FLOAT32, 0.5), "bool": (GGUFValueType.BOOL, True),
    "u64": (GGUFValueType.UINT64, 2**64 - 1), "i64": (GGUFValueType.INT64, -(2**63)),
    "f64": (GGUFValueType.FLOAT64, 1e300), "str": (GGUFValueType.STRING, "héllo ✓"),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fails(path: Path, match: str) -> GGUFParseError:
    with pytest.raises(GGUFParseError, match=match) as info:
        read_header(path)
    return info.value


# --- what GGUFWriter writes -------------------------------------------------------------------------


def test_every_value_type_round_trips(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, (vtype, val) in SCALARS.items():
        w.add_key_value(f"t.{key}", val, vtype)
        w.add_key_value(f"t.{key}_array", [val, val], GGUFValueType.ARRAY, sub_type=vtype)
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("x", np.zeros((4, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    h = read_header(tmp_path / "m.gguf")
    for key, (vtype, val) in SCALARS.items():
        assert h.metadata[f"t.{key}"] == val
        assert h.metadata_types[f"t.{key}"] == vtype
        assert h.metadata[f"t.{key}_array"] == [val, val]
        assert h.metadata_types[f"t.{key}_array"] == GGUFValueType.ARRAY
    assert h.metadata["t.nested"] == [[1, 2], [3]]
    assert h.architecture == "llama" and h.version == 3
    assert h.tensors[0].shape == (32, 4) and h.tensors[0].ggml_type is GGMLQuantizationType.F16


def test_a_262144_token_vocabulary_is_skipped_and_loads_on_demand(tmp_path: Path) -> None:
    tokens = [f"▁tok{i}" if i % 7 else f"{i}✓" for i in range(262144)]
    scores = np.arange(262144, dtype=np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores.tolist())
    w.add_token_types([1] * 262144)
    w.add_uint32("after.vocab", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    h = read_header(tmp_path / "v.gguf")
    vocab = h.metadata["tokenizer.ggml.tokens"]
    assert isinstance(vocab, LazyArray) and len(vocab) == 262144
    assert h.metadata["after.vocab"] == 7  # the skip landed exactly on the next key
    assert vocab.load() == tokens
    assert np.array_equal(h.metadata["tokenizer.ggml.scores"].numpy(), scores)
    assert h.metadata["tokenizer.ggml.token_type"].load() == [1] * 262144
    assert dict(iter_scalars(h)) == {"general.architecture": "llama", "after.vocab": 7}


def test_strings_the_vectorised_skip_cannot_place_are_walked(tmp_path: Path) -> None:
    """Empty strings, NUL bytes, strings of 256 bytes and more, and 64 KiB ones, among short ones."""
    # 65537 and 131073 bytes: a length whose second byte is zero, so it looks like the start of a
    # short string until its third byte is read.
    odd = ["", "\0", "a\0b", "x" * 255, "y" * 256, "z" * 70000, "\0" * 9, "é" * 200, "q" * 65537, "r" * 131073]
    tokens = ["w" * 65537] + [odd[i % len(odd)] if i % 37 == 0 else f"t{i}" for i in range(20000)]
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_token_list(tokens)
    w.add_string("after", "ok")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(tmp_path / "s.gguf")
    assert h.metadata["after"] == "ok"
    assert h.metadata["tokenizer.ggml.tokens"].load() == tokens


def test_tensor_infos_match_gguf_reader(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    ours = read_header(path)
    theirs = gguf.GGUFReader(path)
    assert ours.data_offset == theirs.data_offset
    assert [(t.name, t.ggml_type, t.n_bytes, ours.file_offset(t)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, int(t.n_bytes), int(t.data_offset)) for t in theirs.tensors]
    assert [t.shape for t in ours.tensors] == [tuple(int(d) for d in t.shape) for t in theirs.tensors]
    assert ours.tensor_bytes == sum(int(t.n_bytes) for t in theirs.tensors)


def test_gemma_header(gemma_model: Path) -> None:
    h = read_header(gemma_model)
    assert (h.architecture, h.version, len(h.tensors), h.data_offset) == ("gemma3", 3, 236, 6525120)
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 262144
    assert h.arch_get("attention.sliding_window") == 512
    s = summarize(h)
    assert (s.quantization, s.block_count, s.head_count_kv, s.vocab_size, s.context_length) == \
        ("Q4_K_M", 18, 1, 262144, 32768)
    assert s.parameter_count == 268_098_176 and s.size_bytes == gemma_model.stat().st_size


def test_big_endian_files(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("n", 0x01020304)
    w.add_array("long", list(range(5000)))
    w.add_token_list([f"t{i}" for i in range(5000)])
    w.add_tensor("x", np.ones((2, 32), dtype=np.float32), tensor_endianess=gguf.GGUFEndian.BIG)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(tmp_path / "be.gguf")
    assert h.metadata["n"] == 0x01020304
    assert h.metadata["long"].numpy().tolist() == list(range(5000))
    assert h.metadata["tokenizer.ggml.tokens"].load() == [f"t{i}" for i in range(5000)]
    assert h.tensors[0].shape == (32, 2)


def test_split_models_read_as_one(tmp_path: Path) -> None:
    spec = TinySpec(n_layer=3, n_vocab=300)
    first = write_model(tmp_path / "m.gguf", spec, split_max_tensors=10)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) >= 3 and first == shards[0]
    whole = read_header(write_model(tmp_path / "whole.gguf", spec))
    for name in shards:  # any shard names the whole model
        h = read_header(name)
        assert h.shards == shards
        assert [t.name for t in h.tensors] == [t.name for t in whole.tensors]
        assert h.file_size == sum(p.stat().st_size for p in shards)
        assert h.metadata["general.architecture"] == "llama"
    h = read_header(shards[1])
    for t in h.tensors:  # every tensor located in its own shard, as GGUFReader sees it
        part = gguf.GGUFReader(shards[t.shard])
        assert next(x for x in part.tensors if x.name == t.name).data_offset == h.file_offset(t)
    assert shard_paths(shards[2]) == shards

    shards[-1].unlink()
    fails(shards[0], "cannot open")


def test_split_metadata_must_agree_with_the_file_name(tmp_path: Path) -> None:
    spec = TinySpec(n_layer=2, n_vocab=300)
    write_model(tmp_path / "m.gguf", spec, split_max_tensors=10)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    lonely = tmp_path / "renamed.gguf"
    shards[0].rename(lonely)
    fails(lonely, "does not say which shard")
    wrong = tmp_path / f"x-00001-of-{len(shards) + 1:05d}.gguf"
    lonely.rename(wrong)
    fails(wrong, "file name says")
    with pytest.raises(GGUFParseError, match="impossible"):
        shard_paths(tmp_path / "y-00003-of-00002.gguf")


def test_summary_of_generated_models(tmp_path: Path) -> None:
    spec = TinySpec(arch="deci", n_layer=3, n_head_kv=(1, 2, 2), weight_type="Q8_0", pooling_type=1,
                    sliding_window=64)
    s = summarize(read_header(write_model(tmp_path / "a.gguf", spec, header_only=True)))
    assert (s.architecture, s.quantization, s.head_count, s.head_count_kv, s.pooling_type, s.sliding_window) == \
        ("deci", "Q8_0", 4, [1, 2, 2], "mean", 64)
    b = Builder().add("general.architecture", text("mystery"))
    b.tensor("w", (32, 2), int(GGMLQuantizationType.Q8_0), 0).data = bytes(68)
    s = summarize(read_header(write(tmp_path / "b.gguf", b.build())))
    assert (s.architecture, s.quantization, s.parameter_count, s.block_count) == ("mystery", "Q8_0", 64, None)


def test_tensor_nbytes() -> None:
    assert tensor_nbytes((256, 3), GGMLQuantizationType.Q4_K) == 144 * 3
    assert tensor_nbytes((32, 2, 2), GGMLQuantizationType.Q8_0) == 34 * 4
    assert tensor_nbytes((33,), GGMLQuantizationType.Q8_0) is None


# --- what it refuses -------------------------------------------------------------------------------


def good() -> Builder:
    b = Builder().add("general.architecture", text("llama"))
    b.tensor("a", (32, 2), int(GGMLQuantizationType.F32), 0).tensor("b", (32,), int(GGMLQuantizationType.F16), 256)
    b.data = bytes(256 + 64)
    return b


def test_the_hand_built_baseline_is_accepted(tmp_path: Path) -> None:
    h = read_header(write(tmp_path / "ok.gguf", good().build()))
    assert [(t.name, t.offset, t.n_bytes) for t in h.tensors] == [("a", 0, 256), ("b", 256, 64)]


def _mutate(**changes: object) -> Builder:
    b = good()
    for key, val in changes.items():
        setattr(b, key, val)
    return b


@pytest.mark.parametrize(("builder", "match"), [
    (_mutate(magic=b"GGUX"), "not a GGUF file"),
    (_mutate(version=1), "unsupported GGUF version 1"),
    (_mutate(version=4), "unsupported GGUF version 4"),
    (_mutate(n_kv=2**62), "metadata entries cannot fit"),
    (_mutate(n_tensors=2**64 - 1), "tensors cannot fit"),
    (_mutate(n_kv=2), "tensor name|metadata key|value type|ends here|not valid UTF-8"),
    (_mutate(data=bytes(300)), "extends past the end"),
], ids=["magic", "v1", "v4", "kv-count", "tensor-count", "kv-count-lies", "short-data"])
def test_broken_headers(tmp_path: Path, builder: Builder, match: str) -> None:
    fails(write(tmp_path / "bad.gguf", builder.build()), match)


def _kv_file(tmp_path: Path, entry: bytes) -> Path:
    b = Builder(n_kv=1)
    b.kvs.append(entry)
    return write(tmp_path / "kv.gguf", b.header())


@pytest.mark.parametrize(("entry", "match"), [
    (struct.pack("<Q", 2**63) + b"k" * 8, "metadata key length"),
    (struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 4) + bytes(4), "metadata key is not valid UTF-8"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<I", 13) + bytes(4), "unknown metadata value type 13"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 3) + b"\xc3(x", "string value is not valid UTF-8"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 2**40), "string value length"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**61), "array of .* elements exceeds"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 99, 1), "unknown metadata value type 99"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 12, "nested deeper"),
    (struct.pack("<Q", 1) + b"k" + struct.pack("<I", 4) + b"\x01", "file ends here"),
], ids=["key-length", "key-utf8", "value-type", "value-utf8", "string-length", "array-count", "element-type",
        "depth", "truncated-scalar"])
def test_broken_metadata(tmp_path: Path, entry: bytes, match: str) -> None:
    error = fails(_kv_file(tmp_path, entry), match)
    assert error.offset is not None and error.offset >= 24


def test_duplicate_keys_and_bad_alignment(tmp_path: Path) -> None:
    fails(write(tmp_path / "a.gguf", Builder().add("k", u32(1)).add("k", u32(2)).build()), "duplicate metadata key")
    fails(write(tmp_path / "b.gguf", Builder().add("general.alignment", u32(48)).build()), "power of two")
    fails(write(tmp_path / "c.gguf", Builder().add("general.alignment", text("32")).build()), "power of two")
    h = read_header(write(tmp_path / "d.gguf", Builder(alignment=64).add("general.alignment", u32(64)).build()))
    assert h.alignment == 64 and h.data_offset % 64 == 0


F32 = int(GGMLQuantizationType.F32)


@pytest.mark.parametrize(("name", "shape", "ggml_type", "offset", "match"), [
    ("x" * 64, (32,), F32, 0, "tensor name is 64 bytes"),
    ("t", (), F32, 0, "0 dimensions"),
    ("t", (1, 1, 1, 1, 1), F32, 0, "5 dimensions"),
    ("t", (32,), 4, 0, "unknown ggml type 4"),
    ("t", (32,), 1000, 0, "unknown ggml type 1000"),
    ("t", (33,), int(GGMLQuantizationType.Q8_0), 0, "not a whole number of Q8_0 blocks"),
    ("t", (2**32, 2**32), F32, 0, "impossible shape"),
    ("t", (32,), F32, 32, "data offset is 32, expected 0"),
    ("t", (2**40,), F32, 0, "extends past the end"),
], ids=["long-name", "0-dims", "5-dims", "removed-type", "unknown-type", "blocks", "overflow", "offset", "past-eof"])
def test_broken_tensor_infos(tmp_path: Path, name: str, shape: tuple[int, ...], ggml_type: int, offset: int,
                             match: str) -> None:
    b = Builder().tensor(name, shape, ggml_type, offset)
    b.data = bytes(128)
    fails(write(tmp_path / "t.gguf", b.build()), match)


def test_duplicate_tensors_and_non_utf8_names(tmp_path: Path) -> None:
    b = Builder().tensor("t", (32,), F32, 0).tensor("t", (32,), F32, 128)
    b.data = bytes(256)
    fails(write(tmp_path / "a.gguf", b.build()), "duplicate tensor")
    b = Builder().tensor(b"\xff", (32,), F32, 0)
    b.data = bytes(128)
    fails(write(tmp_path / "b.gguf", b.build()), "tensor name is not valid UTF-8")


def test_not_a_file(tmp_path: Path) -> None:
    fails(tmp_path, "is a directory")
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    fails(fifo, "not a regular file")  # and never blocks waiting for a writer
    fails(tmp_path / "missing.gguf", "cannot open")
    fails(write(tmp_path / "empty.gguf", b""), "too small")
    fails(Path("/dev/null"), "not a regular file")


def test_headers_past_the_size_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "big.gguf", Builder().add("k", text("x" * 5000)).build())
    monkeypatch.setattr(reader, "MAX_HEADER_BYTES", 4096)
    fails(path, "header is larger than")


def test_a_file_changed_under_a_lazy_array_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    b = Builder().add("tokenizer.ggml.tokens", array(GGUFValueType.STRING, [f"t{i}" for i in range(5000)]))
    b.add("scores", array(GGUFValueType.FLOAT32, [0.5] * 5000))
    write(path, b.build())
    h = read_header(path)
    tokens, scores = h.metadata["tokenizer.ggml.tokens"], h.metadata["scores"]
    os.truncate(path, tokens.offset + 100)
    with pytest.raises(GGUFParseError):
        tokens.load()
    with pytest.raises(GGUFParseError):
        scores.numpy()
    with pytest.raises(TypeError):
        tokens.numpy()


def test_empty_arrays(tmp_path: Path) -> None:
    empty = Typed(GGUFValueType.ARRAY, [], GGUFValueType.STRING)
    b = Builder().add("e", empty).add("ee", Typed(GGUFValueType.ARRAY, [empty, empty], GGUFValueType.ARRAY))
    h = read_header(write(tmp_path / "e.gguf", b.build()))
    assert h.metadata == {"e": [], "ee": [[], []]}


def test_nested_lazy_arrays_load(tmp_path: Path) -> None:
    inner = [array(GGUFValueType.UINT8, [i % 256, 1]) for i in range(5000)]
    b = Builder().add("pairs", Typed(GGUFValueType.ARRAY, inner, GGUFValueType.ARRAY)).add("after", u32(3))
    h = read_header(write(tmp_path / "n.gguf", b.build()))
    assert h.metadata["after"] == 3
    assert h.metadata["pairs"].load() == [[i % 256, 1] for i in range(5000)]
