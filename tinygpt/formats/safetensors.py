"""Read and write the safetensors format with NumPy alone: no pickle, no torch, no Rust.

This module owns the file format: header parsing and strict validation, tensor views into a
read-only memory map, dtype conversion (F16 and BF16 become float32), and atomic writes. It knows
nothing about GPT-2 names or shapes; `hub/gpt2.py` does the lookups and shape checks on top.

The format (https://github.com/huggingface/safetensors), byte by byte:

    [8 bytes: N, unsigned little-endian]  [N bytes: UTF-8 JSON header]  [data section]

The header maps each tensor name to `{"dtype": "F32", "shape": [768, 2304], "data_offsets":
[begin, end]}`, offsets relative to the start of the data section, plus an optional
`"__metadata__": {str: str}`. Tensors are C-order, little-endian, packed without gaps.

Alignment (NOTE): Hugging Face's GPT-2 file does not pad its header, so its data section starts at
byte 8 + N = 2483 in the tiny fixture and float32 tensors sit at odd addresses. NumPy accepts views
on such memory (flags.aligned is False). Measured with NumPy 2.4: `x @ W` with an unaligned float32
`W` (768 x 3072) runs at the same speed as an aligned one because NumPy copies it into an aligned
buffer first, so each call pays for a hidden copy. Our choice: `load_safetensors(mmap=True)` returns
zero-copy, read-only views (fast to open, no second buffer in RAM); code that computes with the
weights copies them once into its own aligned, writable parameter arrays. `mmap=False` reads every
tensor into a fresh aligned, writable array instead.

Run its tests: `pytest tests/test_safetensors.py`.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygpt.core.fileio import atomic_write

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit; GPT-2 XL's header is ~25 kB

# safetensors dtype name -> the little-endian NumPy dtype its bytes are stored as.
# BF16 has no NumPy dtype: its bytes are read as uint16 and widened to float32 (see _bf16_to_f32).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy dtype (native byte order, by kind+size) -> safetensors name, for writing.
_WRITE_NAMES = {dt.newbyteorder("="): name for name, dt in DTYPES.items() if name != "BF16"}
# The reference writer's tensor order: by this dtype rank (its enum order, widest first), then name.
# Wide types come first so every tensor starts at a multiple of its item size; matching it exactly
# makes our files byte-identical to `safetensors.numpy.save_file` (a test checks).
_WRITE_RANK = {name: i for i, name in enumerate(
    ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL"])}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. `begin`/`end` are byte offsets relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order, metadata, and where the data section starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute byte offset of the data section: 8 + header length
    file_size: int


# --- reading --------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file; every problem is a ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 8:
            raise ValueError(f"{path}: not a safetensors file: {file_size} bytes, shorter than "
                             "the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte "
                             "limit (corrupt file?)")
        if 8 + n > file_size:
            raise ValueError(f"{path}: header length {n} bytes runs past the end of the "
                             f"{file_size}-byte file (truncated download?)")
        raw = f.read(n)
    return parse_header(raw, path, file_size)


def parse_header(raw: bytes, path: str | os.PathLike, file_size: int) -> Header:
    """Validate header bytes `raw` of a file of `file_size` bytes (`path` only names errors)."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey) as e:
        raise ValueError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(obj).__name__}")
    metadata = _check_metadata(obj.pop("__metadata__", None), path)
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    tensors = {name: _check_entry(name, entry, data_len, path) for name, entry in obj.items()}
    _check_packed(tensors, data_len, path)
    return Header(tensors, metadata, data_start, file_size)


def load_safetensors(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """Load every tensor of a safetensors file, in file order.

    mmap=True: F32/F64/integer/bool tensors are read-only views into one `np.memmap` of the file
    (no copy; possibly unaligned, see the module docstring). mmap=False: each tensor is read into
    a fresh aligned, writable array. Either way F16 and BF16 are converted to new float32 arrays.
    """
    header = read_header(path)
    if mmap:
        # mode "r": read-only, shared with the page cache; the arrays keep the map alive
        data = np.memmap(path, dtype=np.uint8, mode="r")
        return {name: _view(data, header.data_start, info) for name, info in header.tensors.items()}
    out = {}
    with open(path, "rb") as f:
        for name, info in header.tensors.items():
            stored = np.empty(info.shape, DTYPES[info.dtype])
            f.seek(header.data_start + info.begin)
            if f.readinto(stored.reshape(-1).view(np.uint8)) != info.end - info.begin:
                raise ValueError(f"{path}: tensor {name!r}: file changed while reading")
            out[name] = _to_float32(stored, info.dtype)
    return out


def _view(data: np.memmap, data_start: int, info: TensorInfo) -> np.ndarray:
    """The tensor `info` as an array over the mapped bytes `data` (a view unless F16/BF16)."""
    raw = data[data_start + info.begin: data_start + info.end]      # (nbytes,) uint8
    arr = raw.view(DTYPES[info.dtype]).reshape(info.shape).view(np.ndarray)
    return _to_float32(arr, info.dtype)


def _to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return arr.astype(np.float32)
    if dtype == "BF16":
        return _bf16_to_f32(arr)
    return arr


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits up and reinterpret. Exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --- validation -----------------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_metadata(metadata: object, path: os.PathLike) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ must be an object of strings, "
                         f"got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: __metadata__[{key!r}] must be a string, "
                             f"got {type(value).__name__}")
    return metadata


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(name: str, entry: object, data_len: int, path: os.PathLike) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry must be an object, got {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise ValueError(f"{where}: entry has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise ValueError(f"{where}: data_offsets must be [begin, end], two non-negative "
                         f"integers, got {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets begin {begin} > end {end}")
    if end > data_len:
        raise ValueError(f"{where}: data_offsets end {end} is past the {data_len}-byte data "
                         "section (truncated file?)")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise ValueError(f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} "
                         f"needs {nbytes}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_packed(tensors: dict[str, TensorInfo], data_len: int, path: os.PathLike) -> None:
    """Tensors must tile the data section exactly: no overlaps, no holes, nothing left over."""
    pos, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise ValueError(f"{path}: tensor {name!r} (bytes {info.begin}..{info.end}) overlaps "
                             f"tensor {prev!r} (ends at {pos})")
        if info.begin > pos:
            after = f"after tensor {prev!r}" if prev is not None else "at the start"
            raise ValueError(f"{path}: tensor {name!r}: {info.begin - pos} unused bytes in the "
                             f"data section {after} (bytes {pos}..{info.begin})")
        pos, prev = info.end, name
    if pos != data_len:
        raise ValueError(f"{path}: data section has {data_len - pos} bytes after the last tensor "
                         f"{prev!r} that no tensor covers")


# --- writing --------------------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file, atomically.

    Like the reference writer: wider dtypes first, then by name (so each tensor is aligned to its
    item size), and the JSON header padded with spaces to a multiple of 8 bytes. Data is C-order
    little-endian. The file is written to a temporary name in the same directory, fsynced, then
    renamed over `path`, so `path` is either the old file or the complete new one. (A reader that
    mapped the old file keeps seeing the old bytes: the rename makes a new inode.)
    """
    path = Path(path)
    arrays = _prepare(tensors, metadata, path)
    dtypes = {name: _WRITE_NAMES[arr.dtype.newbyteorder("=")] for name, arr in arrays.items()}
    order = sorted(arrays, key=lambda k: (_WRITE_RANK[dtypes[k]], k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name in order:
        arr = arrays[name]
        header[name] = {"dtype": dtypes[name],
                        "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)                   # pad so the data section starts 8-aligned

    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(arrays[name].reshape(-1).view(np.uint8))


def _prepare(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None,
             path: Path) -> dict[str, np.ndarray]:
    """Check names, dtypes and metadata; return C-contiguous little-endian arrays."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map str to str, got {metadata!r}")
    out = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        arr = np.asarray(arr)
        if arr.dtype.newbyteorder("=") not in _WRITE_NAMES:
            raise ValueError(f"{path}: tensor {name!r}: dtype {arr.dtype} cannot be stored "
                             f"(supported: {', '.join(str(d) for d in _WRITE_NAMES)})")
        # astype, not ascontiguousarray: the latter turns 0-d arrays into shape (1,)
        out[name] = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
    return out
