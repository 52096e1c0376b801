"""Header-only GGUF reader for untrusted files.

Reads metadata and tensor infos without touching tensor data. Every count and length is checked
against what is left of the file before anything is allocated, so memory stays bounded by the
header's own size, and every failure is a GGUFParseError naming the byte offset. Large arrays
(tokenizer vocabularies) are skipped and kept as a count with their contents loadable on demand.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8
# Arrays at most this long are materialised; longer ones are kept as a LazyArray.
INLINE_ARRAY_ITEMS = 4096
_CHUNK = 1 << 20

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFParseError(Exception):
    """The file is not a GGUF model this reader accepts; says where and why."""

    def __init__(self, path: Path | str, offset: int | None, what: str) -> None:
        self.path = Path(path)
        self.offset = offset
        self.what = what
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}{where}: {what}")


@dataclass(frozen=True)
class LazyArray:
    """A metadata array too long to keep in memory: its length, and its contents on demand."""

    path: Path
    element_type: GGUFValueType
    count: int
    offset: int  # file offset of the first element
    big_endian: bool = False

    def __len__(self) -> int:
        return self.count

    def load(self) -> list[Any]:
        with _open_regular(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            reader = _Reader(f, self.path, size, self.big_endian)
            reader.pos = self.offset
            return [reader.value(self.element_type, 1) for _ in range(self.count)]


@dataclass(frozen=True)
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
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    path: Path
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_size: int
    shards: list[Path] = field(default_factory=list)

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


class _open_regular:
    """Open a path for reading only if it is a regular file (never blocks on a FIFO)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except IsADirectoryError as exc:
            raise GGUFParseError(path, None, "is a directory, not a file") from exc
        except OSError as exc:
            raise GGUFParseError(path, None, f"cannot open: {exc.strerror}") from exc
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise GGUFParseError(path, None, "is not a regular file")
        self.file = os.fdopen(fd, "rb", buffering=0)

    def __enter__(self) -> Any:
        return self.file

    def __exit__(self, *exc: object) -> None:
        self.file.close()


class _Reader:
    """A cursor over the file that reads ahead in chunks and never past the end."""

    def __init__(self, file: Any, path: Path, size: int, big_endian: bool = False) -> None:
        self.file = file
        self.path = path
        self.size = size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0
        self.endian = ">" if big_endian else "<"

    def fail(self, what: str, offset: int | None = None) -> GGUFParseError:
        return GGUFParseError(self.path, self.pos if offset is None else offset, what)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def ensure(self, n: int) -> int:
        """Make bytes [pos, pos+n) available; returns their index in buf."""
        if n > self.remaining:
            raise self.fail(f"file ends here: {n} more bytes needed, {max(self.remaining, 0)} left")
        start = self.pos - self.base
        if start < 0 or start + n > len(self.buf):
            want = min(max(n, _CHUNK), self.size - self.pos)
            self.file.seek(self.pos)
            data = self.file.read(want)
            if len(data) < n:
                raise self.fail("file is shorter than its size says (truncated while reading)")
            self.buf, self.base, start = data, self.pos, 0
        return start

    def unpack(self, fmt: str, n: int) -> Any:
        i = self.ensure(n)
        value = struct.unpack_from(self.endian + fmt, self.buf, i)[0]
        self.pos += n
        return value

    def u32(self) -> int:
        return int(self.unpack("I", 4))

    def u64(self) -> int:
        return int(self.unpack("Q", 8))

    def string(self, what: str) -> str:
        start = self.pos
        length = self.u64()
        if length > self.remaining:
            raise self.fail(f"{what} length {length} exceeds the {self.remaining} bytes left", start)
        i = self.ensure(length)
        raw = self.buf[i:i + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8", start) from exc

    def value_type(self) -> GGUFValueType:
        start = self.pos
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown metadata value type {raw}", start) from None

    def value(self, vtype: GGUFValueType, depth: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string("string value")
        if vtype == GGUFValueType.ARRAY:
            return self.array(depth)
        fmt = _SCALARS[vtype]
        return self.unpack(fmt, struct.calcsize(fmt))

    def array(self, depth: int) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = self.value_type()
        count_at = self.pos
        count = self.u64()
        min_size = 8 if etype in (GGUFValueType.STRING, GGUFValueType.ARRAY) else struct.calcsize(_SCALARS[etype])
        if count * min_size > self.remaining:
            raise self.fail(f"array of {count} elements cannot fit in the {self.remaining} bytes left", count_at)
        start = self.pos
        if count <= INLINE_ARRAY_ITEMS:
            return [self.value(etype, depth + 1) for _ in range(count)]
        if etype == GGUFValueType.STRING:
            self.skip_strings(count)
        elif etype == GGUFValueType.ARRAY:
            for _ in range(count):
                self.array(depth + 1)
        else:
            self.ensure(0)
            self.pos += count * min_size
        return LazyArray(self.path, etype, count, start, self.endian == ">")

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings. Vocabularies hold 100k-260k of them, so the common
        case (every string shorter than 256 bytes) is walked with numpy; see _skip_short_strings."""
        done = 0
        while done < count:
            if self.endian == "<":
                done += self._skip_short_strings(count - done)
            if done < count:  # a string the fast path could not place: take a few steps one by one
                for _ in range(min(64, count - done)):
                    length_at = self.pos
                    length = self.u64()
                    if length > self.remaining:
                        raise self.fail(f"string length {length} exceeds the {self.remaining} bytes left",
                                        length_at)
                    self.pos += length
                    done += 1

    def _skip_short_strings(self, limit: int) -> int:
        """Skip up to `limit` strings in a window, returns how many.

        A string shorter than 256 bytes starts with a little-endian u64 length whose upper seven
        bytes are zero, so every string start is among the positions p where v(p) < 256, v being the
        u64 read at p. Taking those candidates in order, c[0] = pos is a true start, and whenever
        c[i] + 8 + v(c[i]) == c[i+1] the next one is too: the longest such prefix is exactly the
        chain a one-by-one walk would follow, found with a few vectorised passes.
        """
        window = min(self.remaining, max(_CHUNK, limit * 18))
        if window < 8:
            return 0
        i = self.ensure(window)
        data = np.frombuffer(self.buf, dtype=np.uint8, count=window, offset=i)
        # p is a candidate when bytes p+1..p+7 are all zero: runs of 2, 4, then 7 zeros by shifted ANDs.
        zero = data == 0
        z2 = zero[:-1] & zero[1:]
        z4 = z2[:-2] & z2[2:]
        z7 = z4[:-3] & z4[3:]
        cand = np.flatnonzero(z7[1:])
        if len(cand) == 0 or cand[0] != 0:
            return 0
        nxt = cand + 8 + data[cand].astype(np.int64)
        breaks = np.flatnonzero(nxt[:-1] != cand[1:])
        chain = int(breaks[0]) + 1 if len(breaks) else len(cand)
        chain = min(chain, limit)
        end = int(nxt[chain - 1])
        if end > window:
            # The last string runs past the window: stop before it and let the next window decide.
            chain -= 1
            if chain == 0:
                return 0
            end = int(nxt[chain - 1])
        self.pos += end
        return chain


def _read_one(path: Path) -> GGUFHeader:
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, path, size)
        if size < 24:
            raise r.fail(f"file is {size} bytes, too small for a GGUF header", 0)
        i = r.ensure(4)
        magic = r.buf[i:i + 4]
        if magic != GGUF_MAGIC:
            raise r.fail(f"not a GGUF file (magic {magic!r})", 0)
        r.pos = 4
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                r.endian, version = ">", swapped
            else:
                raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
        tensor_count_at = r.pos
        tensor_count = r.u64()
        kv_count_at = r.pos
        kv_count = r.u64()
        # Smallest possible entries: a KV is 8+4+1 bytes, a tensor info 8+4+8+4+8.
        if kv_count * 13 > r.remaining:
            raise r.fail(f"{kv_count} metadata entries cannot fit in the file", kv_count_at)
        if tensor_count * 32 > r.remaining:
            raise r.fail(f"{tensor_count} tensors cannot fit in the file", tensor_count_at)
        metadata = _read_metadata(r, kv_count)
        alignment = _alignment(r, metadata)
        tensors = _read_tensor_infos(r, tensor_count)
        data_offset = -(-r.pos // alignment) * alignment
        checked = _check_tensor_data(r, tensors, data_offset, alignment)
        return GGUFHeader(path=path, version=version, alignment=alignment, data_offset=data_offset,
                          metadata=metadata, tensors=checked, file_size=size, shards=[path])


def _read_metadata(r: _Reader, kv_count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key_at = r.pos
        key = r.string("metadata key")
        if key in metadata:
            raise r.fail(f"duplicate metadata key {key!r}", key_at)
        metadata[key] = r.value(r.value_type(), 1)
    return metadata


def _alignment(r: _Reader, metadata: Mapping[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or \
            alignment & (alignment - 1) or alignment > 1 << 20:
        raise r.fail(f"general.alignment {alignment!r} is not a power of two up to 1 MiB")
    return alignment


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
    for _ in range(count):
        at = r.pos
        name = r.string("tensor name")
        if name in names:
            raise r.fail(f"duplicate tensor {name!r}", at)
        names.add(name)
        n_dims = r.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", at)
        shape = tuple(r.u64() for _ in range(n_dims))
        type_at = r.pos
        raw_type = r.u32()
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise r.fail(f"tensor {name!r} has unknown ggml type {raw_type}", type_at) from None
        if ggml_type not in GGML_QUANT_SIZES:
            raise r.fail(f"tensor {name!r} has ggml type {ggml_type.name} of unknown size", type_at)
        offset = r.u64()
        if any(d == 0 for d in shape) or _product(shape) > r.size * 64:
            raise r.fail(f"tensor {name!r} has an impossible shape {list(shape)}", at)
        n_bytes = tensor_nbytes(shape, ggml_type)
        if n_bytes is None:
            raise r.fail(f"tensor {name!r}: first dimension {shape[0]} is not a whole number of "
                         f"{ggml_type.name} blocks", at)
        tensors.append(TensorInfo(name=name, shape=shape, ggml_type=ggml_type, offset=offset, n_bytes=n_bytes))
    return tensors


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_tensor_data(r: _Reader, tensors: list[TensorInfo], data_offset: int,
                       alignment: int) -> list[TensorInfo]:
    for t in tensors:
        if t.offset % alignment:
            raise r.fail(f"tensor {t.name!r} data offset {t.offset} is not aligned to {alignment}")
        if data_offset + t.offset + t.n_bytes > r.size:
            raise r.fail(f"tensor {t.name!r} data ({t.n_bytes} bytes at {data_offset + t.offset}) "
                         f"extends past the end of the file ({r.size} bytes)")
    return tensors


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model given any shard's path (just [path] when not split)."""
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    if count < 1 or int(m.group("no")) > count:
        raise GGUFParseError(path, None, f"shard number {m.group('no')} of {count} is impossible")
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_header(path: Path | str) -> GGUFHeader:
    """Read a GGUF model's header (all shards of a split model, as one model)."""
    path = Path(path)
    shards = shard_paths(path)
    first = _read_one(shards[0]) if shards[0] != path or len(shards) == 1 else _read_one(path)
    if len(shards) == 1:
        return first
    declared = first.metadata.get("split.count")
    if declared is not None and declared != len(shards):
        raise GGUFParseError(shards[0], None, f"split.count is {declared} but the name says {len(shards)}")
    tensors = list(first.tensors)
    size = first.file_size
    for i, shard in enumerate(shards[1:], start=1):
        if not shard.exists():
            raise GGUFParseError(shard, None, f"shard {i + 1} of {len(shards)} is missing")
        part = _read_one(shard)
        tensors += [TensorInfo(name=t.name, shape=t.shape, ggml_type=t.ggml_type, offset=t.offset,
                               n_bytes=t.n_bytes, shard=i) for t in part.tensors]
        size += part.file_size
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFParseError(shards[0], None, "the same tensor appears in more than one shard")
    first.tensors = tensors
    first.file_size = size
    first.shards = shards
    return first


def iter_scalars(header: GGUFHeader) -> Iterator[tuple[str, Any]]:
    """Metadata entries that are not large arrays (what a human wants to see)."""
    for key, value in header.metadata.items():
        if not isinstance(value, LazyArray):
            yield key, value
