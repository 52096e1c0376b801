"""The GGUF reader on hostile input: only GGUFParseError ever escapes, quickly, in bounded memory.

Real headers are mutated (truncated at every offset, bit-flipped, counts and lengths replaced by huge
values) and hypothesis builds arbitrary metadata trees and string arrays that the vectorised string
skip must walk exactly as a one-by-one reader would.
"""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from gguf.constants import GGUFValueType
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import backends.formats.gguf as reader
from backends.formats.gguf import GGUFHeader, GGUFParseError, LazyArray, read_header
from tests.gguf_bytes import SCALAR_FORMATS, Builder, Typed, array, text, u32
from tests.memory_models import TinySpec, write_model
from tests.tinymodels import write_tiny_llama

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def small_header(workdir: Path) -> bytes:
    """A real model's header (a 271-token vocabulary, a chat template, 21 tensor infos)."""
    path = write_tiny_llama(workdir / "tiny.gguf")
    return path.read_bytes()[:read_header(path).data_offset]


@pytest.fixture(scope="module")
def lazy_header(workdir: Path) -> bytes:
    """A header with arrays long enough to be skipped (6000-token vocabulary, scores, types)."""
    path = write_model(workdir / "lazy.gguf", TinySpec(n_vocab=6000), header_only=True)
    return path.read_bytes()[:read_header(path).data_offset]


def parse(path: Path, data: bytes, *, trace: bool = True) -> GGUFHeader | GGUFParseError:
    """Parse `data`; anything but a header or a GGUFParseError fails the test, as does a parse that is
    slow or (when traced) takes memory out of proportion to the input."""
    path.write_bytes(data)
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        return read_header(path)
    except GGUFParseError as exc:
        assert exc.offset is None or 0 <= exc.offset <= len(data)
        return exc
    finally:
        elapsed = time.perf_counter() - start
        assert elapsed < 2.0, f"parse took {elapsed:.2f} s"
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 2 * 2**20 + 16 * len(data), f"parse peaked at {peak} bytes for a {len(data)}-byte file"


def test_truncation_at_every_offset(workdir: Path, small_header: bytes) -> None:
    path = workdir / "cut.gguf"
    for n in range(len(small_header)):
        assert isinstance(parse(path, small_header[:n], trace=n % 97 == 0), GGUFParseError), n


def length_fields(header: bytes) -> Iterator[int]:
    """Offsets of every u64 count and length in a well-formed little-endian header."""
    yield 8  # tensor count
    yield 16  # metadata count
    n_tensors, n_kv = struct.unpack_from("<QQ", header, 8)
    pos = 24

    def value(vtype: int) -> Iterator[int]:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            yield pos
            pos += 8 + struct.unpack_from("<Q", header, pos)[0]
        elif vtype == GGUFValueType.ARRAY:
            etype, count = struct.unpack_from("<IQ", header, pos)
            yield pos + 4
            pos += 12
            for _ in range(count):
                yield from value(etype)
        else:
            pos += struct.calcsize(SCALAR_FORMATS[GGUFValueType(vtype)])

    for _ in range(n_kv):
        yield from value(GGUFValueType.STRING)
        vtype = struct.unpack_from("<I", header, pos)[0]
        pos += 4
        yield from value(vtype)
    for _ in range(n_tensors):
        yield from value(GGUFValueType.STRING)
        n_dims = struct.unpack_from("<I", header, pos)[0]
        yield from range(pos + 4, pos + 4 + 8 * n_dims, 8)  # dimensions
        pos += 4 + 8 * n_dims + 4
        yield pos  # data offset
        pos += 8


@pytest.mark.parametrize("fixture", ["small_header", "lazy_header"])
def test_huge_counts_and_lengths(workdir: Path, fixture: str, request: pytest.FixtureRequest) -> None:
    header: bytes = request.getfixturevalue(fixture)
    path = workdir / "huge.gguf"
    fields = list(length_fields(header))
    assert len(fields) > 50
    step = max(1, len(fields) // 400)  # every field of the small header, a spread of the large one
    for at in fields[::step]:
        for huge in (2**64 - 1, 2**63, 2**62 + 1, len(header) + 1):
            mutated = bytearray(header)
            struct.pack_into("<Q", mutated, at, huge)
            assert isinstance(parse(path, bytes(mutated), trace=huge == 2**63), GGUFParseError), (at, huge)


@FUZZ
@given(data=st.data())
def test_bit_flips(workdir: Path, small_header: bytes, lazy_header: bytes, data: st.DataObject) -> None:
    header = data.draw(st.sampled_from([small_header, lazy_header]))
    flips = data.draw(st.lists(st.integers(0, len(header) * 8 - 1), min_size=1, max_size=4))
    mutated = bytearray(header)
    for bit in flips:
        mutated[bit // 8] ^= 1 << (bit % 8)
    parse(workdir / "flip.gguf", bytes(mutated))


@FUZZ
@given(tail=st.binary(max_size=2048), version=st.sampled_from([2, 3, 0x03000000]))
@example(tail=struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 9, 2**40), version=3)
def test_random_bytes_after_the_magic(workdir: Path, tail: bytes, version: int) -> None:
    parse(workdir / "rand.gguf", b"GGUF" + struct.pack("<I", version) + tail)


# --- arbitrary well-formed metadata round-trips ---------------------------------------------------

SCALAR_VALUES: dict[GGUFValueType, st.SearchStrategy[object]] = {
    GGUFValueType.UINT8: st.integers(0, 2**8 - 1), GGUFValueType.INT8: st.integers(-(2**7), 2**7 - 1),
    GGUFValueType.UINT16: st.integers(0, 2**16 - 1), GGUFValueType.INT16: st.integers(-(2**15), 2**15 - 1),
    GGUFValueType.UINT32: st.integers(0, 2**32 - 1), GGUFValueType.INT32: st.integers(-(2**31), 2**31 - 1),
    GGUFValueType.UINT64: st.integers(0, 2**64 - 1), GGUFValueType.INT64: st.integers(-(2**63), 2**63 - 1),
    GGUFValueType.FLOAT32: st.floats(width=32, allow_nan=False), GGUFValueType.FLOAT64: st.floats(allow_nan=False),
    GGUFValueType.BOOL: st.booleans(), GGUFValueType.STRING: st.text(max_size=40),
}


def typed_values(vtype: GGUFValueType, depth: int) -> st.SearchStrategy[Typed]:
    if vtype != GGUFValueType.ARRAY:
        return SCALAR_VALUES[vtype].map(lambda v: Typed(vtype, v))
    element = st.sampled_from(list(SCALAR_VALUES) + ([GGUFValueType.ARRAY] if depth < 3 else []))
    return element.flatmap(lambda et: st.lists(typed_values(et, depth + 1), max_size=6).map(
        lambda items: Typed(GGUFValueType.ARRAY, items, et)))


metadata_trees = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.sampled_from(list(GGUFValueType)).flatmap(lambda t: typed_values(t, 1)),
    max_size=8)


@pytest.mark.parametrize("inline_items", [reader.INLINE_ARRAY_ITEMS, 0], ids=["inline", "lazy"])
@FUZZ
@given(tree=metadata_trees, big_endian=st.booleans())
def test_metadata_round_trips(workdir: Path, tree: dict[str, Typed], big_endian: bool, inline_items: int) -> None:
    builder = Builder(endian=">" if big_endian else "<")
    for key, v in tree.items():
        builder.add(key, v)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "INLINE_ARRAY_ITEMS", inline_items)
        got = parse(workdir / "tree.gguf", builder.build())
    assert isinstance(got, GGUFHeader)
    assert got.metadata_types == {k: v.vtype for k, v in tree.items()}
    for key, v in tree.items():
        value = got.metadata[key]
        assert (value.load() if isinstance(value, LazyArray) else value) == v.plain()


awkward = st.one_of(st.just(""), st.just("\0"), st.text(max_size=20), st.binary(min_size=250, max_size=600).map(
    lambda b: b.decode("latin-1")), st.text(alphabet="\0a", max_size=12),
    # lengths whose second byte is zero: they look like short strings until the third byte
    st.sampled_from([65537, 65541, 131329]).map(lambda n: "q" * n))


@pytest.mark.parametrize("window", [64, 4096, reader._SKIP_WINDOW_MAX], ids=["w64", "w4k", "default"])
@FUZZ
@given(pattern=st.lists(awkward, min_size=1, max_size=30), repeat=st.integers(1, 200))
def test_string_skip_walks_like_a_one_by_one_reader(workdir: Path, pattern: list[str], repeat: int,
                                                    window: int) -> None:
    strings = pattern * min(repeat, max(1, 2_000_000 // (sum(len(p) for p in pattern) + 1)))
    builder = Builder().add("s", array(GGUFValueType.STRING, strings)).add("after", u32(42)).add("end", text("x"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "INLINE_ARRAY_ITEMS", 0)
        mp.setattr(reader, "_SKIP_WINDOW_MAX", window)
        mp.setattr(reader, "_SKIP_WINDOW_MIN", min(window, reader._SKIP_WINDOW_MIN))
        got = parse(workdir / "skip.gguf", builder.build())
    assert isinstance(got, GGUFHeader)
    assert (got.metadata["after"], got.metadata["end"]) == (42, "x")
    assert got.metadata["s"].load() == strings


def test_chain_breaks_cost_no_more_than_a_one_by_one_walk(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vocabulary built to break the vectorised chain every 65 strings (an empty string) must not
    make the skip slower than reading every string one by one: after a break the skip walks 64
    strings itself, and windows shrink to what the last one achieved instead of rescanning 64 KiB."""
    strings = (["a" * 5] * 64 + [""]) * 2000  # 130k strings
    path = workdir / "breaks.gguf"
    path.write_bytes(Builder().add("s", array(GGUFValueType.STRING, strings)).add("after", u32(1)).build())

    def best_of_two() -> float:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            header = read_header(path)
            times.append(time.perf_counter() - start)
            assert header.metadata["after"] == 1 and len(header.metadata["s"]) == len(strings)
        return min(times)

    vectorised = best_of_two()
    monkeypatch.setattr(reader._Reader, "_skip_short_strings", lambda *args: (0, 0, False))
    one_by_one = best_of_two()
    assert vectorised < 3 * one_by_one + 0.05, (vectorised, one_by_one)  # 1.6x measured
    os.unlink(path)
