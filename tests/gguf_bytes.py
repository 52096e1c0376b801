"""Hand-built GGUF bytes for reader tests: anything the format can say, including what GGUFWriter
would refuse to write (wrong types, huge counts, misaligned tensors)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from gguf.constants import GGUFValueType

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class Typed:
    """A metadata value with its GGUF type; arrays hold Typed elements of one element type."""

    vtype: GGUFValueType
    value: Any
    element_type: GGUFValueType | None = None  # arrays only

    def plain(self) -> Any:
        """What the reader returns for it (arrays as lists)."""
        if self.vtype == GGUFValueType.ARRAY:
            return [v.plain() for v in self.value]
        return self.value


def string(s: str | bytes, endian: str = "<") -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(endian + "Q", len(raw)) + raw


def value(v: Typed, endian: str = "<") -> bytes:
    if v.vtype == GGUFValueType.STRING:
        return string(v.value, endian)
    if v.vtype == GGUFValueType.ARRAY:
        assert v.element_type is not None
        body = b"".join(value(e, endian) for e in v.value)
        return struct.pack(endian + "IQ", int(v.element_type), len(v.value)) + body
    return struct.pack(endian + SCALAR_FORMATS[v.vtype], v.value)


def kv(key: str | bytes, v: Typed, endian: str = "<") -> bytes:
    return string(key, endian) + struct.pack(endian + "I", int(v.vtype)) + value(v, endian)


def tensor_info(name: str | bytes, shape: tuple[int, ...], ggml_type: int, offset: int, endian: str = "<") -> bytes:
    dims = struct.pack(f"{endian}I{len(shape)}Q", len(shape), *shape)
    return string(name, endian) + dims + struct.pack(endian + "IQ", ggml_type, offset)


@dataclass
class Builder:
    """A GGUF file: header, metadata, tensor infos, padding, data."""

    kvs: list[bytes] = field(default_factory=list)
    infos: list[bytes] = field(default_factory=list)
    data: bytes = b""
    version: int = 3
    alignment: int = 32
    magic: bytes = b"GGUF"
    endian: str = "<"
    n_kv: int | None = None  # override the counts the header declares
    n_tensors: int | None = None

    def add(self, key: str | bytes, v: Typed) -> Builder:
        self.kvs.append(kv(key, v, self.endian))
        return self

    def tensor(self, name: str | bytes, shape: tuple[int, ...], ggml_type: int, offset: int) -> Builder:
        self.infos.append(tensor_info(name, shape, ggml_type, offset, self.endian))
        return self

    def header(self) -> bytes:
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        n_tensors = len(self.infos) if self.n_tensors is None else self.n_tensors
        head = self.magic + struct.pack(self.endian + "IQQ", self.version, n_tensors, n_kv)
        return head + b"".join(self.kvs) + b"".join(self.infos)

    def build(self) -> bytes:
        head = self.header()
        pad = -len(head) % self.alignment
        return head + b"\0" * pad + self.data


def u32(x: int) -> Typed:
    return Typed(GGUFValueType.UINT32, x)


def text(s: str) -> Typed:
    return Typed(GGUFValueType.STRING, s)


def array(element_type: GGUFValueType, items: list[Any]) -> Typed:
    return Typed(GGUFValueType.ARRAY, [i if isinstance(i, Typed) else Typed(element_type, i) for i in items],
                 element_type)
