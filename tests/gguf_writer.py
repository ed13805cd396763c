"""A GGUF v3 writer for the tests only: small files built byte by byte from the format's spec.

It shares no code or tables with tinygpt/formats/gguf.py, so the reader is checked against an independent
reading of the spec. Besides the bytes it records where every length, count, type code, dimension
and offset field sits, so tests can corrupt exactly those fields.

Metadata values are typed pairs: `("UINT32", 7)`, `("STRING", "llama")`, and arrays
`("ARRAY", ("INT16", [1, 2]))`; an array of arrays holds typed pairs: `("ARRAY", ("ARRAY",
[("UINT8", [1]), ("STRING", ["a"])]))`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

# GGUF value types, numbered as in the spec, with their struct format
VALUE_TYPES = {"UINT8": (0, "B"), "INT8": (1, "b"), "UINT16": (2, "H"), "INT16": (3, "h"),
               "UINT32": (4, "I"), "INT32": (5, "i"), "FLOAT32": (6, "f"), "BOOL": (7, "?"),
               "STRING": (8, ""), "ARRAY": (9, ""), "UINT64": (10, "Q"), "INT64": (11, "q"),
               "FLOAT64": (12, "d")}
NUMPY_TYPES = {"UINT8": "u1", "INT8": "i1", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4",
               "INT32": "<i4", "FLOAT32": "<f4", "BOOL": "?", "UINT64": "<u8", "INT64": "<i8",
               "FLOAT64": "<f8"}
# ggml type code, weights per block, bytes per block
GGML_TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
              "Q8_0": (8, 32, 34), "Q6_K": (14, 256, 210)}


@dataclass
class Tensor:
    """A tensor to write. `ne` is GGUF's order (fastest first); `code` overrides the type code;
    `offset` (relative to the data section) overrides the packed layout."""

    name: str
    ggml_type: str
    ne: tuple[int, ...]
    data: bytes
    code: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class Field:
    """Where one fixed-size field sits: byte position, struct format, and what it holds."""

    pos: int
    fmt: str
    kind: str       # version, count, length, type, n_dims, dim, offset


class _Buffer:
    def __init__(self):
        self.buf = bytearray()
        self.fields: list[Field] = []

    def put(self, fmt: str, value, kind: str | None = None) -> None:
        if kind is not None:
            self.fields.append(Field(len(self.buf), fmt, kind))
        self.buf += struct.pack("<" + fmt, value)

    def string(self, s: str | bytes) -> None:
        raw = s.encode("utf-8") if isinstance(s, str) else s
        self.put("Q", len(raw), "length")
        self.buf += raw

    def value(self, tname: str, value) -> None:
        if tname == "STRING":
            self.string(value)
        elif tname == "ARRAY":
            etype, items = value
            self.put("I", VALUE_TYPES[etype][0], "type")
            self.put("Q", len(items), "count")
            for item in items:     # an ARRAY's items are (element type, items) pairs
                self.value(etype, item)
        else:
            self.put(VALUE_TYPES[tname][1], value)


def tensor_bytes(ggml_type: str, ne: tuple[int, ...]) -> int:
    _, block_size, block_bytes = GGML_TYPES[ggml_type]
    return int(np.prod(ne)) // block_size * block_bytes


def build_gguf(metadata: dict[str, tuple[str, object]], tensors: list[Tensor],
               alignment: int = 32, *, version: int = 3, magic: bytes = b"GGUF",
               pad_end: bool = False) -> tuple[bytes, list[Field]]:
    """The bytes of a GGUF file, and its fields. `alignment` places the data; it is written as
    general.alignment only if `metadata` has that key. Tensors without an offset are packed in
    order, each at the next aligned offset; the file ends after the last tensor unless
    `pad_end` pads it to the alignment as llama.cpp does."""
    out = _Buffer()
    out.buf += magic
    out.put("I", version, "version")
    out.put("Q", len(tensors), "count")
    out.put("Q", len(metadata), "count")
    for key, (tname, value) in metadata.items():
        out.string(key)
        out.put("I", VALUE_TYPES[tname][0], "type")
        out.value(tname, value)
    offsets, pos = [], 0
    for t in tensors:
        offset = pos if t.offset is None else t.offset
        offsets.append(offset)
        pos = -(-(offset + len(t.data)) // alignment) * alignment
    for t, offset in zip(tensors, offsets):
        out.string(t.name)
        out.put("I", len(t.ne), "n_dims")
        for n in t.ne:
            out.put("Q", n, "dim")
        out.put("I", GGML_TYPES[t.ggml_type][0] if t.code is None else t.code, "type")
        out.put("Q", offset, "offset")
    out.buf += bytes(-len(out.buf) % alignment)
    data_start = len(out.buf)
    for t, offset in zip(tensors, offsets):
        end = data_start + offset + len(t.data)
        out.buf += bytes(max(0, end - len(out.buf)))
        out.buf[data_start + offset:end] = t.data
    if pad_end:
        out.buf += bytes(-len(out.buf) % alignment)
    return bytes(out.buf), out.fields


def expected_value(tname: str, value):
    """What the reader should return for a typed value (numeric arrays become NumPy arrays)."""
    if tname == "FLOAT32":
        return float(np.float32(value))
    if tname != "ARRAY":
        return value
    etype, items = value
    if etype == "ARRAY":
        return [expected_value("ARRAY", item) for item in items]
    if etype == "STRING":
        return list(items)
    return np.array(items, dtype=NUMPY_TYPES[etype])
