"""Header-only GGUF reader for untrusted files.

Reads metadata and tensor infos without touching tensor data. Every count and length is checked
against what is left of the header before anything is allocated, so memory stays bounded by the
header's own size (and the header by MAX_HEADER_BYTES), and every failure is a GGUFParseError naming
the byte offset. Large arrays (tokenizer vocabularies) are skipped and kept as a count with their
contents loadable on demand.

The format is the one ggml/src/gguf.cpp reads, and this reader refuses what that reader refuses
(unknown types, misaligned or non-contiguous tensor data, names of 64 bytes or more, ...), so a file
accepted here is one llama.cpp will at least open. `gguf.GGUFReader` is not used: it materialises
every array (15-25 s on a 262,144-token vocabulary).

`cached_header` keeps the last 64 headers read, keyed by path, mtime and size: the estimator, the
API's summaries and the engine's command line ask for the same model's header often.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from backends.formats.names import SplitNameError, split_names

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64, terminating NUL included (gguf.cpp refuses longer names)
MAX_ARRAY_DEPTH = 8
# Real headers are at most a few tens of MiB (the largest vocabularies take ~10 MiB); anything this
# big is an attack or garbage, and refusing it bounds both the time and the memory a header costs.
MAX_HEADER_BYTES = 256 << 20
# Arrays at most this long are materialised; longer ones are kept as a LazyArray.
INLINE_ARRAY_ITEMS = 4096
_INT64_MAX = (1 << 63) - 1
_CHUNK = 1 << 20
# The vectorised string skip works on windows of this many bytes at most: small enough to stay in
# cache and to reuse the same scratch memory (fresh multi-MiB arrays cost more in page faults than
# the arithmetic), large enough that numpy's per-call overhead does not matter.
_SKIP_WINDOW_MAX = 1 << 16
_SKIP_WINDOW_MIN = 1 << 12

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_NUMPY_TYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "u2", GGUFValueType.INT16: "i2",
    GGUFValueType.UINT32: "u4", GGUFValueType.INT32: "i4", GGUFValueType.FLOAT32: "f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "u8", GGUFValueType.INT64: "i8", GGUFValueType.FLOAT64: "f8",
}
# The fewest bytes one element can take: what a count is checked against before anything is read.
_MIN_ELEMENT_BYTES: dict[GGUFValueType, int] = {
    **{t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()},
    GGUFValueType.STRING: 8,  # u64 length, empty string
    GGUFValueType.ARRAY: 12,  # u32 type, u64 count, no elements
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_GGML_TYPES = {int(t): t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


class GGUFParseError(Exception):
    """The file is not a GGUF model this reader accepts; says where and why."""

    def __init__(self, path: Path | str, offset: int | None, what: str) -> None:
        self.path = Path(path)
        self.offset = offset
        self.what = what
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}{where}: {what}")


class _Structs:
    """Compiled struct formats for one byte order."""

    def __init__(self, endian: str) -> None:
        self.endian = endian
        self.u32 = struct.Struct(endian + "I")
        self.u64 = struct.Struct(endian + "Q")
        self.type_and_offset = struct.Struct(endian + "IQ")
        self.dims = [struct.Struct(f"{endian}{n}Q") for n in range(MAX_DIMS + 1)]
        self.scalars = {t: struct.Struct(endian + f) for t, f in _SCALAR_FORMATS.items()}


_LITTLE = _Structs("<")
_BIG = _Structs(">")


@dataclass(frozen=True, slots=True)
class LazyArray:
    """A metadata array too long to keep in memory: its length, and its contents on demand."""

    path: Path
    element_type: GGUFValueType
    count: int
    offset: int  # file offset of the first element
    big_endian: bool = False

    def __len__(self) -> int:
        return self.count

    def numpy(self) -> np.ndarray[Any, Any]:
        """A numeric array's contents as a numpy array (one read, no per-element objects)."""
        dtype = _NUMPY_TYPES.get(self.element_type)
        if dtype is None:
            raise TypeError(f"{self.element_type.name} arrays have no numpy form; use load()")
        dt = np.dtype(dtype).newbyteorder(">" if self.big_endian else "<")
        with _open_regular(self.path) as reader:
            reader.st = _BIG if self.big_endian else _LITTLE
            reader.pos = self.offset
            n = self.count * dt.itemsize
            i = reader.ensure(n)
            return np.frombuffer(reader.buf, dtype=dt, count=self.count, offset=i).copy()

    def load(self) -> list[Any]:
        """The contents as Python values (strings decoded; a file changed since is a GGUFParseError)."""
        if self.element_type in _NUMPY_TYPES:
            values: list[Any] = self.numpy().tolist()
            return values
        with _open_regular(self.path) as reader:
            reader.st = _BIG if self.big_endian else _LITTLE
            reader.pos = self.offset
            if self.element_type == GGUFValueType.STRING:
                return reader.strings(self.count)
            return [reader.array(2) for _ in range(self.count)]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # relative to the data section of its shard
    n_bytes: int
    shard: int = 0

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def n_elements(self) -> int:
        return _product(self.shape)


@dataclass
class GGUFHeader:
    path: Path
    version: int
    alignment: int
    data_offset: int  # where the first shard's tensor data starts
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_size: int  # all shards together
    shards: list[Path] = field(default_factory=list)
    # Per shard: where its tensor data starts and how big the file is.
    shard_data_offsets: list[int] = field(default_factory=list)
    shard_sizes: list[int] = field(default_factory=list)
    metadata_types: dict[str, GGUFValueType] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """`{architecture}.{suffix}`, the form most model keys take."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def total_size(self) -> int:
        return self.file_size

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data, all shards (without alignment padding)."""
        return sum(t.n_bytes for t in self.tensors)

    def file_offset(self, tensor: TensorInfo) -> int:
        """Where a tensor's data starts in its shard's file."""
        return self.shard_data_offsets[tensor.shard] + tensor.offset


class _Reader:
    """A cursor over an open file that reads ahead in chunks and never past the header limit."""

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self.fd = fd
        self.path = path
        self.size = size
        self.end = min(size, MAX_HEADER_BYTES)
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0
        self.st = _LITTLE

    def fail(self, what: str, offset: int | None = None) -> GGUFParseError:
        return GGUFParseError(self.path, self.pos if offset is None else offset, what)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _short(self, n: int) -> GGUFParseError:
        if self.pos + n <= self.size:
            return self._too_big()
        return self.fail(f"file ends here: {n} more bytes needed, {max(self.remaining, 0)} left")

    def _too_big(self, offset: int | None = None) -> GGUFParseError:
        return self.fail(f"header is larger than the {MAX_HEADER_BYTES >> 20} MiB this reader accepts", offset)

    def too_long(self, what: str, need: int, offset: int) -> GGUFParseError:
        """`need` bytes do not fit in what is left: of the file, or of the header's size limit."""
        if self.pos + need <= self.size:
            return self._too_big(offset)
        return self.fail(f"{what} exceeds the {max(self.size - self.pos, 0)} bytes left", offset)

    def read_at(self, offset: int, n: int) -> bytes:
        try:
            data = os.pread(self.fd, n, offset)
        except OSError as exc:
            raise self.fail(f"read failed: {exc.strerror}", offset) from exc
        if len(data) < n:
            raise self.fail("file is shorter than its size says (truncated while reading)", offset)
        return data

    def ensure(self, n: int) -> int:
        """Make bytes [pos, pos+n) available in buf; returns their index there."""
        start = self.pos - self.base
        if start >= 0 and start + n <= len(self.buf):
            return start
        if n > self.remaining:
            raise self._short(n)
        self.buf = self.read_at(self.pos, min(max(n, _CHUNK), self.end - self.pos))
        self.base = self.pos
        return 0

    def u32(self) -> int:
        i = self.ensure(4)
        self.pos += 4
        return int(self.st.u32.unpack_from(self.buf, i)[0])

    def u64(self) -> int:
        i = self.ensure(8)
        self.pos += 8
        return int(self.st.u64.unpack_from(self.buf, i)[0])

    def string(self, what: str) -> str:
        start = self.pos
        length = self.u64()
        if length > self.remaining:
            raise self.too_long(f"{what} length {length}", length, start)
        i = self.ensure(length)
        self.pos += length
        try:
            return self.buf[i:i + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8", start) from exc

    def strings(self, count: int) -> list[str]:
        """`count` strings, read with the buffer held locally (a vocabulary is 100k+ of them)."""
        out: list[str] = []
        unpack = self.st.u64.unpack_from
        buf, p, end = self.buf, self.pos - self.base, len(self.buf)
        for _ in range(count):
            if p < 0 or p + 8 > end or p + 8 + unpack(buf, p)[0] > end:
                self.pos = self.base + p if p >= 0 else self.pos
                out.append(self.string("string value"))  # at a buffer edge: the checked path refills
                buf, p, end = self.buf, self.pos - self.base, len(self.buf)
                continue
            n = unpack(buf, p)[0]
            try:
                out.append(buf[p + 8:p + 8 + n].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise self.fail("string value is not valid UTF-8", self.base + p) from exc
            p += 8 + n
        self.pos = self.base + p
        return out

    def value_type(self) -> GGUFValueType:
        start = self.pos
        raw = self.u32()
        vtype = _VALUE_TYPES.get(raw)
        if vtype is None:
            raise self.fail(f"unknown metadata value type {raw}", start)
        return vtype

    def value(self, vtype: GGUFValueType, depth: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string("string value")
        if vtype == GGUFValueType.ARRAY:
            return self.array(depth)
        s = self.st.scalars[vtype]
        i = self.ensure(s.size)
        self.pos += s.size
        return s.unpack_from(self.buf, i)[0]

    def _array_head(self, depth: int) -> tuple[GGUFValueType, int]:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = self.value_type()
        count_at = self.pos
        count = self.u64()
        need = count * _MIN_ELEMENT_BYTES[etype]
        if need > self.remaining:
            raise self.too_long(f"array of {count} {etype.name} elements", need, count_at)
        return etype, count

    def array(self, depth: int) -> Any:
        etype, count = self._array_head(depth)
        start = self.pos
        if count > INLINE_ARRAY_ITEMS:
            self._skip_elements(etype, count, depth)
            return LazyArray(self.path, etype, count, start, self.st is _BIG)
        fmt = _SCALAR_FORMATS.get(etype)
        if fmt is not None:
            n = count * _MIN_ELEMENT_BYTES[etype]
            i = self.ensure(n)
            self.pos += n
            return list(struct.unpack_from(f"{self.st.endian}{count}{fmt}", self.buf, i))
        return [self.value(etype, depth + 1) for _ in range(count)]

    def _skip_elements(self, etype: GGUFValueType, count: int, depth: int) -> None:
        if etype == GGUFValueType.STRING:
            self.skip_strings(count)
        elif etype == GGUFValueType.ARRAY:
            for _ in range(count):
                inner, n = self._array_head(depth + 1)
                self._skip_elements(inner, n, depth + 1)
        else:
            self.pos += count * _MIN_ELEMENT_BYTES[etype]  # checked against what is left in _array_head

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings. Vocabularies hold 100k-260k of them, so the common
        case (strings shorter than 256 bytes, little-endian) is walked with numpy a window at a time;
        what the fast path cannot place is taken one string at a time."""
        done = 0
        window = _SKIP_WINDOW_MAX
        scratch = _SkipScratch() if self.st is _LITTLE else None
        while done < count:
            if scratch is not None:
                n, advanced, clean = self._skip_short_strings(count - done, window, scratch)
                done += n
                # A window that ended cleanly may grow; one that broke shrinks to what it achieved, so
                # a file built to break the chain every few strings costs time in proportion to its size.
                window = min(_SKIP_WINDOW_MAX, 2 * window if clean else max(_SKIP_WINDOW_MIN, 2 * advanced))
                if clean and n:
                    continue
            for _ in range(min(64, count - done)):
                length_at = self.pos
                length = self.u64()
                if length > self.remaining:
                    raise self.too_long(f"string length {length}", length, length_at)
                self.pos += length
                done += 1

    def _skip_short_strings(self, limit: int, window: int, s: _SkipScratch) -> tuple[int, int, bool]:
        """Skip up to `limit` strings lying wholly in the next `window` bytes.

        Returns (strings skipped, bytes skipped, clean), clean meaning the chain only stopped at the
        window's end. A string shorter than 256 bytes starts with a little-endian u64 length whose
        upper seven bytes are zero, so every such start p is a position where byte p is not zero and
        bytes p+1..p+7 are. Taking those candidates in order, c[0] = pos is a true start, and
        whenever c[i] + 8 + len(c[i]) == c[i+1] the next one is too: the longest such prefix is
        exactly the chain a one-by-one walk would follow, whatever false candidates exist.
        """
        w = min(self.remaining, window)
        if w < 16:
            return 0, 0, False
        d = s.load(self, w)
        n = w - 8  # positions that have a whole 8-byte length after them
        # Zero-run openings: byte p non-zero, byte p+1 zero. One per short string, plus rare others.
        np.equal(d, 0, out=s.zero[:w])
        opening = s.opens
        np.greater(s.zero[1:n + 1], s.zero[:n], out=opening[:n])
        if not opening[0]:
            return 0, 0, False
        opens = _true_positions(opening, s.words, n)
        # The eight bytes at each opening, as one little-endian u64: low byte the length, rest zero.
        heads = s.u64_at(w)[opens]
        short = (heads >> np.uint64(8)) == 0
        if not short[0]:  # the string at pos is 64 KiB or longer: not ours to place
            return 0, 0, False
        cand = opens
        if not short.all():  # rare: an opening that is not a length (a NUL inside a string)
            cand, heads = opens[short], heads[short]
        nxt = cand + 8 + (heads & np.uint64(0xFF)).astype(np.intp)
        broke = not np.array_equal(nxt[:-1], cand[1:])
        chain = int(np.argmin(nxt[:-1] == cand[1:])) + 1 if broke else len(cand)
        chain = min(chain, limit)
        end = int(nxt[chain - 1])
        if end > w:  # the last string runs past the window: leave it to the next one
            chain -= 1
            end = int(nxt[chain - 1]) if chain else 0
        self.pos += end
        return chain, end, not broke and chain < limit


class _SkipScratch:
    """Buffers reused across the windows of one vocabulary skip."""

    def __init__(self) -> None:
        n = _SKIP_WINDOW_MAX + 8
        self.raw = bytearray(n)
        self.bytes = np.frombuffer(self.raw, dtype=np.uint8)
        self.zero = np.empty(n, dtype=bool)
        self.opens = np.zeros(n, dtype=bool)  # n is a multiple of 8: also seen as u64 words
        self.words = self.opens.view(np.uint64)

    def load(self, reader: _Reader, n: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        view = memoryview(self.raw)[:n]
        try:
            got = os.preadv(reader.fd, [view], reader.pos)
        except OSError as exc:
            raise reader.fail(f"read failed: {exc.strerror}") from exc
        if got < n:
            raise reader.fail("file is shorter than its size says (truncated while reading)")
        return self.bytes[:n]

    def u64_at(self, n: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
        """Every byte offset p < n-7 read as the little-endian u64 at p (a strided view, no copy)."""
        return np.ndarray((n - 7,), dtype="<u8", buffer=self.raw, strides=(1,))


_BYTE_INDEX = np.uint64(0x0001020304050607)


def _true_positions(mask: np.ndarray[Any, np.dtype[np.bool_]], words: np.ndarray[Any, np.dtype[np.uint64]],
                    n: int) -> np.ndarray[Any, np.dtype[np.intp]]:
    """np.flatnonzero(mask[:n]), faster when no aligned 8-byte group holds two true values.

    flatnonzero costs a mispredicted branch per true value; on a vocabulary one byte in 16 is an
    opening, so the search runs on 8-byte words instead (an eighth as many), and a word with a single
    true byte 1 << 8k gives k as the top byte of word * 0x0001020304050607.
    """
    nw = (n + 7) // 8
    mask[n:nw * 8] = False
    iw = np.flatnonzero(words[:nw])
    x = words[iw]
    if bool((x & (x - np.uint64(1))).any()):
        return np.flatnonzero(mask[:n])
    return (iw << 3) + (x * _BYTE_INDEX >> np.uint64(56)).astype(np.intp)


class _open_regular:
    """Open a path for reading only if it is a regular file (never blocks on a FIFO)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except IsADirectoryError as exc:
            raise GGUFParseError(path, None, "is a directory, not a file") from exc
        except OSError as exc:
            raise GGUFParseError(path, None, f"cannot open: {exc.strerror}") from exc
        try:
            info = os.fstat(self.fd)
        except OSError as exc:
            os.close(self.fd)
            raise GGUFParseError(path, None, f"cannot stat: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            what = "is a directory, not a file" if stat.S_ISDIR(info.st_mode) else "is not a regular file"
            raise GGUFParseError(path, None, what)
        self.size = info.st_size

    def __enter__(self) -> _Reader:
        return _Reader(self.fd, self.path, self.size)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _read_one(path: Path) -> GGUFHeader:
    with _open_regular(path) as r:
        if r.size < 24:
            raise r.fail(f"file is {r.size} bytes, too small for a GGUF header", 0)
        i = r.ensure(24)
        magic = r.buf[i:i + 4]
        if magic != GGUF_MAGIC:
            raise r.fail("not a GGUF file", 0)
        r.pos = 4
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped not in SUPPORTED_VERSIONS:
                raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
            r.st, version = _BIG, swapped
        tensor_count_at = r.pos
        tensor_count = r.u64()
        kv_count_at = r.pos
        kv_count = r.u64()
        # Smallest possible entries: a KV is 8+4+1 bytes, a tensor info 8+4+8+4+8.
        if kv_count * 13 > r.remaining:
            raise r.fail(f"{kv_count} metadata entries cannot fit in the file", kv_count_at)
        if tensor_count * 32 > r.remaining:
            raise r.fail(f"{tensor_count} tensors cannot fit in the file", tensor_count_at)
        metadata, types = _read_metadata(r, kv_count)
        alignment = _alignment(r, metadata, types)
        tensors = _read_tensor_infos(r, tensor_count)
        data_offset = -(-r.pos // alignment) * alignment
        _check_tensor_data(r, tensors, data_offset, alignment)
        return GGUFHeader(path=path, version=version, alignment=alignment, data_offset=data_offset,
                          metadata=metadata, tensors=tensors, file_size=r.size, shards=[path],
                          shard_data_offsets=[data_offset], shard_sizes=[r.size], metadata_types=types)


def _read_metadata(r: _Reader, kv_count: int) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    for _ in range(kv_count):
        key_at = r.pos
        key = r.string("metadata key")
        if key in metadata:
            raise r.fail(f"duplicate metadata key {key!r}", key_at)
        vtype = r.value_type()
        metadata[key] = r.value(vtype, 1)
        types[key] = vtype
    return metadata, types


def _alignment(r: _Reader, metadata: Mapping[str, Any], types: Mapping[str, GGUFValueType]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    # gguf.cpp wants a u32 power of two; more than 1 MiB would only pad the file with nothing.
    if types["general.alignment"] != GGUFValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1) \
            or alignment > 1 << 20:
        raise r.fail(f"general.alignment {alignment!r} is not a u32 power of two up to 1 MiB")
    return int(alignment)


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int | None:
    """Bytes of a tensor of this shape and type; None if the first dimension splits no whole blocks."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if not shape or shape[0] % block:
        return None
    n = shape[0] // block * type_size
    for d in shape[1:]:
        n *= d
    return n


def _read_tensor_infos(r: _Reader, count: int) -> list[TensorInfo]:
    tensors = []
    names: set[str] = set()
    st = r.st
    for _ in range(count):
        at = r.pos
        i = r.ensure(8)
        name_len = st.u64.unpack_from(r.buf, i)[0]
        if name_len > MAX_NAME_BYTES:
            raise r.fail(f"tensor name is {name_len} bytes long (at most {MAX_NAME_BYTES} allowed)", at)
        i = r.ensure(12 + name_len)
        try:
            name = r.buf[i + 8:i + 8 + name_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise r.fail("tensor name is not valid UTF-8", at) from exc
        if name in names:
            raise r.fail(f"duplicate tensor {name!r}", at)
        names.add(name)
        n_dims = st.u32.unpack_from(r.buf, i + 8 + name_len)[0]
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", at)
        r.pos += 12 + name_len
        i = r.ensure(8 * n_dims + 12)
        shape = st.dims[n_dims].unpack_from(r.buf, i)
        raw_type, offset = st.type_and_offset.unpack_from(r.buf, i + 8 * n_dims)
        r.pos += 8 * n_dims + 12
        ggml_type = _GGML_TYPES.get(raw_type)
        if ggml_type is None:
            raise r.fail(f"tensor {name!r} has unknown ggml type {raw_type}", at)
        if _product(shape) > _INT64_MAX:
            raise r.fail(f"tensor {name!r} has an impossible shape {list(shape)}", at)
        n_bytes = tensor_nbytes(shape, ggml_type)
        if n_bytes is None:
            raise r.fail(f"tensor {name!r}: first dimension {shape[0]} is not a whole number of "
                         f"{ggml_type.name} blocks", at)
        tensors.append(TensorInfo(name, shape, ggml_type, offset, n_bytes))
    return tensors


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_tensor_data(r: _Reader, tensors: list[TensorInfo], data_offset: int, alignment: int) -> None:
    """Tensor data must follow in order, each aligned, without gaps (as gguf.cpp requires), and end
    within the file."""
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise r.fail(f"tensor {t.name!r} data offset is {t.offset}, expected {expected}")
        expected += -(-t.n_bytes // alignment) * alignment
    if tensors:
        last = tensors[-1]
        if data_offset + last.offset + last.n_bytes > r.size:
            raise r.fail(f"tensor data ({last.offset + last.n_bytes} bytes from {data_offset}) extends past the "
                         f"end of the file ({r.size} bytes)")


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model named `<prefix>-0000i-of-0000N.gguf`, given any of them
    (just [path] for any other name)."""
    try:
        names = split_names(path.name)
    except SplitNameError as exc:
        raise GGUFParseError(path, None, f"shard number {exc.number} of {exc.count} is impossible") from exc
    return [path] if names == [path.name] else [path.with_name(n) for n in names]


def _split_int(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GGUFParseError(header.path, None, f"{key} is {value!r}, not a count")
    return value


def read_header(path: Path | str) -> GGUFHeader:
    """Read a GGUF model's header; a split model's shards (any of them named) are read as one model."""
    path = Path(path)
    shards = shard_paths(path)
    first = _read_one(shards[0])
    declared = _split_int(first, Keys.Split.LLM_KV_SPLIT_COUNT)
    if len(shards) == 1:
        if declared is not None and declared > 1:
            raise GGUFParseError(path, None, f"{Keys.Split.LLM_KV_SPLIT_COUNT} is {declared}, but the file "
                                 "name does not say which shard this is (<name>-00001-of-0000N.gguf)")
        return first
    if declared != len(shards):
        raise GGUFParseError(shards[0], None, f"{Keys.Split.LLM_KV_SPLIT_COUNT} is {declared} but the file "
                             f"name says {len(shards)} shards")
    tensors = list(first.tensors)
    for i, shard in enumerate(shards[1:], start=1):
        part = _read_one(shard)
        number = _split_int(part, Keys.Split.LLM_KV_SPLIT_NO)
        if number is not None and number != i:
            raise GGUFParseError(shard, None, f"{Keys.Split.LLM_KV_SPLIT_NO} is {number}, expected {i}")
        tensors += [TensorInfo(t.name, t.shape, t.ggml_type, t.offset, t.n_bytes, i) for t in part.tensors]
        first.shard_data_offsets.append(part.data_offset)
        first.shard_sizes.append(part.file_size)
    names = {t.name for t in tensors}
    if len(names) != len(tensors):
        raise GGUFParseError(shards[0], None, "the same tensor appears in more than one shard")
    total = _split_int(first, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if total is not None and total != len(tensors):
        raise GGUFParseError(shards[0], None, f"{Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT} is {total} but the "
                             f"shards hold {len(tensors)} tensors")
    first.tensors = tensors
    first.file_size = sum(first.shard_sizes)
    first.shards = shards
    return first


@functools.lru_cache(maxsize=64)
def _cached(path: Path, mtime_ns: int, size: int) -> GGUFHeader:
    return read_header(path)


def cached_header(path: Path) -> GGUFHeader:
    """A model's header, read once per version of the file (big vocabularies take tens of ms). Callers
    share the object: never change it."""
    st = path.stat()
    return _cached(path, st.st_mtime_ns, st.st_size)


def iter_scalars(header: GGUFHeader) -> Iterator[tuple[str, Any]]:
    """Metadata entries that are not large arrays (what a human wants to see)."""
    for key, value in header.metadata.items():
        if not isinstance(value, LazyArray):
            yield key, value
