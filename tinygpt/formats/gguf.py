"""Read GGUF files (llama.cpp's format) with NumPy alone: strict checks, memory-mapped tensors.

This module owns the container: the header, the metadata, the tensor directory, and where each
tensor's bytes are. How quantized bytes become float32 weights is `quant.py`'s job; which tensor
is which Llama weight is the model loader's.

The format, version 3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    "GGUF" | u32 version = 3 | u64 n_tensors | u64 n_kv
    n_kv      x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    zero padding up to a multiple of general.alignment (32 when the key is absent)
    tensor data: tensor i starts at data_start + offset_i, and each offset is aligned too

A string is a u64 byte count and UTF-8 bytes (no terminator). An array is a u32 element type, a
u64 count and the elements; its elements may be arrays. Dimensions are listed fastest first (ne0
is the length of a row), so a NumPy shape is ne reversed: `token_embd.weight` with ne [576, 49152]
is a row-major (49152, 576) array.

Strict: every count and length is checked against the bytes left in the file before anything is
allocated, and every tensor must be aligned, inside the file and apart from the others. Each
problem is one `GGUFError` line naming the file and the key or tensor.

NOTE: tensors are views of the file's pages (opening is fast, nothing is copied until
`dequantize`). If the file is cut short while they are alive, touching them kills the process
with SIGBUS: replace model files by renaming a new file over them, never by rewriting in place.

Run its tests: `pytest tests/test_gguf.py`.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinygpt.kernels import quant

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4        # ggml tensors have at most 4 dimensions
MAX_NESTING = 8     # arrays of arrays: deeper is surely corrupt, and would exhaust the stack

# Metadata value types: code -> (name, struct format of one scalar, NumPy dtype of an array).
# STRING and ARRAY are variable-sized and handled apart.
VALUE_TYPES: dict[int, tuple[str, str, str]] = {
    0: ("UINT8", "B", "u1"), 1: ("INT8", "b", "i1"), 2: ("UINT16", "H", "<u2"),
    3: ("INT16", "h", "<i2"), 4: ("UINT32", "I", "<u4"), 5: ("INT32", "i", "<i4"),
    6: ("FLOAT32", "f", "<f4"), 7: ("BOOL", "B", "u1"), 8: ("STRING", "", ""),
    9: ("ARRAY", "", ""), 10: ("UINT64", "Q", "<u8"), 11: ("INT64", "q", "<i8"),
    12: ("FLOAT64", "d", "<f8"),
}
UINT32, BOOL, STRING, ARRAY = 4, 7, 8, 9

# ggml's tensor type codes (ggml.h), so that an unsupported type is named in the error. The ones
# this reader decodes are those with a layout in quant.FORMATS.
GGML_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
SUPPORTED_TYPES = [f"{name} ({code})" for code, name in GGML_TYPES.items()
                   if name in quant.FORMATS]

# The fewest bytes one entry can take, to bound a count by the bytes left before reading it:
_MIN_KV_BYTES = 8 + 4 + 1             # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dimension, type, offset


class GGUFError(ValueError):
    """A file that is not a valid GGUF v3 file this reader supports; one line, naming the file."""


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor: its format, its NumPy shape (ne reversed), and its raw bytes in the file."""

    name: str
    ggml_type: str                  # a key of quant.FORMATS, e.g. "Q8_0"
    shape: tuple[int, ...]          # row-major; shape[-1] is GGUF's ne0
    offset: int                     # absolute byte offset in the file
    data: np.ndarray = field(repr=False)    # (nbytes,) uint8, a read-only view of the map

    @property
    def size(self) -> int:
        """Number of weights."""
        return math.prod(self.shape)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, object], dict[str, GGUFTensor]]:
    """Open a GGUF v3 file: its metadata and its tensors, both in file order.

    Metadata values are Python ints, floats, bools and strs; a numeric or bool array is a new
    NumPy array of its exact type, an array of strings a list of str, an array of arrays a list.
    Tensor bytes stay in the file until `dequantize`.
    """
    path = Path(path)
    file_size = path.stat().st_size
    if file_size < len(MAGIC):
        raise GGUFError(f"{path}: not a GGUF file: {file_size} bytes")
    data = np.memmap(path, dtype=np.uint8, mode="r")   # read-only, shared with the page cache
    cur = _Cursor(memoryview(data), path)
    _check_magic_and_version(cur)
    n_tensors = cur.count("tensor count", _MIN_TENSOR_INFO_BYTES)
    n_kv = cur.count("metadata count", _MIN_KV_BYTES)
    metadata = _read_metadata(cur, n_kv)
    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = _alignment(metadata, path)
    data_start = -(-cur.pos // alignment) * alignment              # round up to the alignment
    tensors = _place_tensors(infos, data, data_start, alignment, path)
    return metadata, tensors


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """The tensor's weights as a new float32 array of its shape, in one pass over its bytes.

    Each call decodes again: a loader calls it once per tensor and keeps the result.
    """
    return quant.dequantize(tensor.data, tensor.ggml_type).reshape(tensor.shape)


# --- the header, field by field -------------------------------------------------------------------

class _Cursor:
    """Reads little-endian fields in order, checking each length against the bytes left."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def error(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise self.error(f"{what}: needs {n} bytes at offset {self.pos}, but the file has "
                             f"{self.left()} left (truncated file?)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, fmt: str, what: str) -> int | float:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"{what}: string length")
        raw = self.take(n, f"{what}: string of {n} bytes")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what}: string is not valid UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items that take at least `min_item_bytes` each, bounded by the file."""
        n = self.scalar("Q", what)
        if n * min_item_bytes > self.left():
            raise self.error(f"{what} {n} needs at least {n * min_item_bytes} bytes, but the file "
                             f"has {self.left()} left after offset {self.pos} (corrupt or "
                             "truncated file?)")
        return n


def _check_magic_and_version(cur: _Cursor) -> None:
    magic = bytes(cur.take(4, "magic"))
    if magic != MAGIC:
        raise cur.error(f"not a GGUF file: starts with {magic!r}, not {MAGIC!r}")
    version = cur.scalar("I", "version")
    if version != VERSION:
        hint = " (a big-endian file?)" if version == VERSION << 24 else ""
        raise cur.error(f"GGUF version {version} is not supported{hint}; this reader reads "
                        f"version {VERSION}")


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        where = f"metadata {key!r}"
        if key in metadata:
            raise cur.error(f"{where}: duplicate key")
        vtype = _value_type(cur, where)
        if key == "general.alignment" and vtype != UINT32:
            raise cur.error(f"{where}: must be UINT32, got {VALUE_TYPES[vtype][0]}")
        metadata[key] = _read_value(cur, vtype, where, depth=0)
    return metadata


def _value_type(cur: _Cursor, where: str) -> int:
    vtype = cur.scalar("I", f"{where}: value type")
    if vtype not in VALUE_TYPES:
        known = ", ".join(f"{name} ({code})" for code, (name, _, _) in VALUE_TYPES.items())
        raise cur.error(f"{where}: unknown value type {vtype} (known: {known})")
    return vtype


def _read_value(cur: _Cursor, vtype: int, where: str, depth: int) -> object:
    if vtype == STRING:
        return cur.string(where)
    if vtype == ARRAY:
        return _read_array(cur, where, depth)
    name, fmt, _ = VALUE_TYPES[vtype]
    value = cur.scalar(fmt, f"{where}: {name} value")
    if vtype == BOOL:
        if value > 1:
            raise cur.error(f"{where}: BOOL value must be 0 or 1, got {value}")
        return bool(value)
    return value


def _read_array(cur: _Cursor, where: str, depth: int) -> np.ndarray | list:
    if depth >= MAX_NESTING:
        raise cur.error(f"{where}: arrays nested more than {MAX_NESTING} deep")
    etype = _value_type(cur, f"{where}: array element")
    name, _, dtype = VALUE_TYPES[etype]
    min_bytes = {STRING: 8, ARRAY: 4 + 8}.get(etype) or np.dtype(dtype).itemsize
    n = cur.count(f"{where}: array of {name}, count", min_bytes)
    if etype == STRING:
        return [cur.string(where) for _ in range(n)]
    if etype == ARRAY:
        return [_read_array(cur, where, depth + 1) for _ in range(n)]
    values = np.frombuffer(cur.take(n * min_bytes, f"{where}: {n} {name} values"), dtype)
    if etype == BOOL:
        if (values > 1).any():
            raise cur.error(f"{where}: BOOL values must be 0 or 1, got {values.max()}")
        return values.astype(bool)
    return values.astype(values.dtype.newbyteorder("="))           # a copy, off the map


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ggml_type: str
    ne: tuple[int, ...]     # GGUF order, fastest first
    offset: int             # relative to the data section


def _read_tensor_info(cur: _Cursor, i: int) -> _TensorInfo:
    name = cur.string(f"tensor #{i} name")
    where = f"tensor {name!r}"
    n_dims = cur.scalar("I", f"{where}: n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.error(f"{where}: n_dims is {n_dims}, must be 1 to {MAX_DIMS}")
    ne = tuple(cur.scalar("Q", f"{where}: dimension {j}") for j in range(n_dims))
    if 0 in ne:     # a nonzero shape is bounded by the file's size (below); an empty one is not
        raise cur.error(f"{where}: dimensions {list(ne)} include 0; empty tensors are not "
                        "supported")
    code = cur.scalar("I", f"{where}: type")
    offset = cur.scalar("Q", f"{where}: offset")
    if GGML_TYPES.get(code) not in quant.FORMATS:
        known = f"ggml type {code} ({GGML_TYPES[code]})" if code in GGML_TYPES else \
            f"unknown ggml type {code}"
        raise cur.error(f"{where}: {known} is not supported (supported: "
                        f"{', '.join(SUPPORTED_TYPES)})")
    return _TensorInfo(name, GGML_TYPES[code], ne, offset)


def _alignment(metadata: dict[str, object], path: Path) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: metadata 'general.alignment': {alignment} is not a power of 2")
    return alignment


def _place_tensors(infos: list[_TensorInfo], data: np.memmap, data_start: int, alignment: int,
                   path: Path) -> dict[str, GGUFTensor]:
    """Check each tensor's span against the file and the others; view its bytes."""
    file_size = data.shape[0]
    tensors: dict[str, GGUFTensor] = {}
    spans = []
    for info in infos:
        where = f"{path}: tensor {info.name!r}"
        if info.name in tensors:
            raise GGUFError(f"{where}: duplicate tensor name")
        fmt = quant.FORMATS[info.ggml_type]
        if info.ne[0] % fmt.block_size:
            raise GGUFError(f"{where}: row length ne0 = {info.ne[0]} is not a multiple of "
                            f"{info.ggml_type}'s block of {fmt.block_size}")
        if info.offset % alignment:
            raise GGUFError(f"{where}: offset {info.offset} is not a multiple of the "
                            f"alignment {alignment}")
        nbytes = math.prod(info.ne) // fmt.block_size * fmt.block_bytes
        begin = data_start + info.offset
        if begin + nbytes > file_size:
            raise GGUFError(f"{where}: {info.ggml_type} {list(info.ne)} needs bytes {begin}.."
                            f"{begin + nbytes}, past the end of the {file_size}-byte file "
                            "(truncated file?)")
        view = data[begin:begin + nbytes].view(np.ndarray)
        tensors[info.name] = GGUFTensor(info.name, info.ggml_type, info.ne[::-1], begin, view)
        spans.append((begin, begin + nbytes, info.name))
    prev_end, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < prev_end:
            raise GGUFError(f"{path}: tensor {name!r} (bytes {begin}..{end}) overlaps tensor "
                            f"{prev!r} (ends at byte {prev_end})")
        prev_end, prev = end, name
    return tensors
