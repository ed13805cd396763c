"""Training checkpoints: model + optimizer arrays in safetensors, everything else in JSON.

A checkpoint in `out_dir` is two files:

    checkpoint.json                  the commit record: step, RNG states, both configs, optimizer
                                     scalars, history, and the name + CRC32s of the tensor file
    ckpt-0000120.safetensors         "model.<param>" and "optim.<buffer>" arrays (float32)

Both are written to a temporary file, fsynced and renamed. The tensor file of step N gets a new
name, and only the JSON rename makes it current, so a crash or a full disk at any moment leaves
the previous checkpoint complete and readable; the old tensor file is deleted after the commit.
Reading checks the JSON, the file's header and size (via `safetensors.py`) and a CRC32 of every
array, so a truncated or corrupted checkpoint is an error that names the file, never bad weights.

    python -m pytest tests/test_train.py -q -k checkpoint
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from tinygpt.fileio import write_json_atomic
from tinygpt.safetensors import load_safetensors, save_safetensors

FORMAT = "tinygpt-checkpoint-1"
RECORD = "checkpoint.json"


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def save_checkpoint(out_dir: Path | str, arrays: dict[str, np.ndarray], record: dict) -> Path:
    """Write `arrays` and `record` (JSON-ready, must hold "step") as the current checkpoint.

    On any error (OSError such as ENOSPC) the previous checkpoint stays current and intact, and
    the error says so.
    """
    out_dir = Path(out_dir)
    name = f"ckpt-{int(record['step']):07d}.safetensors"
    previous = read_record(out_dir) if (out_dir / RECORD).is_file() else None
    try:
        save_safetensors(arrays, out_dir / name)
        crcs = {key: _crc(a) for key, a in arrays.items()}
        write_json_atomic(out_dir / RECORD, {"format": FORMAT, **record, "tensors": name,
                                             "crc32": crcs})
    except OSError as e:
        if not previous or previous.get("tensors") != name:
            (out_dir / name).unlink(missing_ok=True)          # never leave an orphan behind
        kept = (f"the previous checkpoint (step {previous['step']}) is intact" if previous
                else "no earlier checkpoint exists")
        error = OSError(f"cannot write checkpoint step {record['step']} to {out_dir}: "
                        f"{e.strerror or e}; {kept}")
        error.errno = e.errno
        raise error from None
    if previous and previous.get("tensors") != name:
        (out_dir / previous["tensors"]).unlink(missing_ok=True)
    return out_dir / RECORD


def read_record(out_dir: Path | str) -> dict:
    """The JSON record of the checkpoint in `out_dir`, with a clear error if it is unreadable."""
    path = Path(out_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupted checkpoint {path}: not valid JSON ({e})") from None
    missing = [k for k in ("format", "step", "tensors", "crc32") if k not in record]
    if missing or record.get("format") != FORMAT:
        raise ValueError(f"corrupted checkpoint {path}: not a {FORMAT} record "
                         f"(missing {', '.join(missing) or 'format tag'})")
    return record


def load_checkpoint(out_dir: Path | str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, record) of the checkpoint in `out_dir`; every array checked against its CRC32."""
    out_dir = Path(out_dir)
    record = read_record(out_dir)
    path = out_dir / record["tensors"]
    if not path.is_file():
        raise FileNotFoundError(f"corrupted checkpoint: {out_dir / RECORD} names {path}, which "
                                "does not exist")
    try:
        arrays = load_safetensors(path, mmap=False)
    except ValueError as e:                      # the reader's header and length checks
        raise ValueError(f"corrupted or truncated checkpoint: {e}") from None
    if set(arrays) != set(record["crc32"]):
        raise ValueError(f"corrupted checkpoint {path}: its tensors do not match {RECORD}")
    for key, arr in arrays.items():
        if _crc(arr) != record["crc32"][key]:
            raise ValueError(f"corrupted checkpoint {path}: tensor {key!r} fails its CRC32 check")
    return arrays, record
