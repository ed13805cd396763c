"""Checks of untrusted input, one helper per kind, so every config, flag and file reader says the
same thing the same way: a one-line error naming the file, flag, field or tensor at fault.

    check_number     a float or int flag/field: finite, and in its range
    check_text       a string that came from argv or a file: valid Unicode (no undecodable bytes)
    check_fields     a config dataclass: every field has its annotated type (int, float, bool, str)
    read_json_object a JSON file that must hold an object: missing, empty, non-UTF-8, invalid
    require_keys     the keys a reader needs from such an object
    check_finite     an array of weights: no NaN or infinity
    json_checksum    CRC32 of a JSON object's canonical form, so a file can carry its own
    short_list       "a, b, c and 12 more", so a message never grows with the input

    python -m pytest tests/test_validate.py tests/test_bad_input.py -q
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SHOWN = 3          # names listed in a message before "and N more"
REPR_CHARS = 40    # longest value quoted in a message


def short_list(items: Iterable[Any], limit: int = SHOWN) -> str:
    """'a, b, c and 12 more': at most `limit` items, so a message stays one short line."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_CHARS else text[:REPR_CHARS - 3] + "..."


def check_number(name: str, value: float, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` unless it is NaN, infinite or outside [lo, hi] (open ends with lo_open/hi_open);
    then a ValueError such as "--lr must be a finite number >= 0, got nan"."""
    if lo is not None and hi is not None:
        bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        bound = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        bound = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        bound = ""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {_short_repr(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' ' if bound else ''}{bound}, got "
                         f"{value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_text(name: str, value: str) -> str:
    """`value` unless it holds a lone surrogate: how Python passes argv bytes that are not UTF-8
    (b"\\xff" arrives as "\\udcff"), which tokenizers would silently turn into U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(value[e.start]) - 0xDC00 if 0xDC80 <= ord(value[e.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"{value[e.start]!r}"
        raise ValueError(f"{name} is not valid UTF-8 text ({what} at character {e.start})") \
            from None
    return value


_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _has_type(value: Any, base: str) -> bool:
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False                     # True is an int to Python, never to a config
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        return isinstance(value, (int, float))
    return isinstance(value, str)


def check_fields(config: Any) -> None:
    """Every field of the dataclass instance `config` holds its annotated type (`int`, `float`,
    `bool`, `str`, or one of them `| None`); floats are finite and strings valid text.

    Raises TypeError/ValueError naming `Class.field`: a config read from JSON may hold "64" or 64.0
    where 64 belongs, and would otherwise fail deep inside NumPy without saying which field."""
    cls = type(config).__name__
    for f in dataclasses.fields(config):
        kind = str(f.type)
        optional = kind.endswith(" | None")
        base = kind.removesuffix(" | None")
        if base not in _TYPES:
            continue
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        if not _has_type(value, base):
            raise TypeError(f"{cls}.{f.name} must be {_TYPES[base]}"
                            f"{' or null' if optional else ''}, got {_short_repr(value)}")
        if base == "float":
            check_number(f"{cls}.{f.name}", value)
        elif base == "str":
            check_text(f"{cls}.{f.name}", value)


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in `path`; a missing, empty, non-UTF-8 or invalid file, or one holding
    anything but an object, is one error that names the file (FileNotFoundError or ValueError).
    `what` says what the file is in the not-found message ("model config", "checkpoint")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a JSON file") from None
    if not raw.strip():
        raise ValueError(f"{path}: empty file, expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def require_keys(obj: dict, keys: Iterable[str], source: str | os.PathLike) -> None:
    """ValueError "SOURCE: missing a, b" unless every key is in the JSON object `obj`."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{source}: missing {short_list(missing)}")


def json_checksum(obj: dict, key: str) -> int:
    """CRC32 of `obj`'s canonical JSON (sorted keys, no spaces) without `obj[key]`, the checksum
    itself: stored under `key`, it catches a bit flip or an edit in a JSON file."""
    body = {k: v for k, v in obj.items() if k != key}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def check_finite(name: str, array: np.ndarray, source: str | os.PathLike) -> None:
    """ValueError naming tensor `name` of `source` if `array` holds a NaN or an infinity: such a
    weight makes every logit NaN, and generation would print one token forever."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{source}: tensor {name} has {bad} NaN or infinite value"
                         f"{'s' if bad > 1 else ''}")
