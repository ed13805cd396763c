"""Fuzzing the file readers (GGUF has its own in test_gguf.py): a valid safetensors file, a
checkpoint record and a prepared meta.json, randomly corrupted (truncated, bytes flipped, the
header length, dtypes, shapes and offsets changed). Every outcome is a load of the identical data
or the reader's own one-line ValueError naming the file: never another exception, and quick.

Short runs here; the long ones are behind the marker: `pytest tests/test_fuzz_readers.py -m fuzz`.
"""
import itertools
import json
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygpt.training.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.text.data import pretrain_data, prepare
from tinygpt.formats.safetensors import load_safetensors, save_safetensors

_names = itertools.count()
SECONDS = 2.0                       # far above any honest read of these tiny files

ARRAYS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
          "c": np.ones((3,), np.float16)}
BIG = [0, 1, 7, 8, 255, 2**16, 2**31 - 1, 2**32, 2**53, 2**63 - 1, 2**64 - 1]


def _new_dir(factory):
    d = factory.getbasetemp() / f"f{next(_names)}"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("valid")
    save_safetensors(ARRAYS, root / "x.safetensors")
    (root / "run").mkdir()
    save_checkpoint(root / "run", {"model.w": np.arange(3, dtype=np.float32)},
                    {"step": 5, "tokens_seen": 10, "cursor": {"epoch": 0, "batch": 1}})
    (root / "t.txt").write_text("abcabd\n" * 40)
    prepare(root / "t.txt", root / "prep", tokenizer="char", progress=False)
    return {"st": (root / "x.safetensors").read_bytes(),
            "record": (root / "run" / "checkpoint.json").read_bytes(),
            "run": root / "run", "meta": (root / "prep" / "meta.json").read_bytes(),
            "prep": root / "prep"}


@st.composite
def mutations(draw, raw: bytes, json_from: int = 0) -> bytes:
    """Up to 4 corruptions of `raw`; JSON edits apply to raw[json_from:] (a header or a file)."""
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "length", "json", "json"]))
        if kind == "truncate":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif kind == "flip" and raw:
            pos = draw(st.integers(0, len(raw) - 1))
            raw = raw[:pos] + bytes([raw[pos] ^ draw(st.integers(1, 255))]) + raw[pos + 1:]
        elif kind == "length" and json_from == 8 and len(raw) >= 8:   # safetensors' header size
            raw = struct.pack("<Q", draw(st.sampled_from(BIG) | st.integers(0, 2 * len(raw)))) \
                + raw[8:]
        elif kind == "json":
            raw = raw[:json_from] + _edit_json(draw, raw[json_from:])
    return raw


def _edit_json(draw, raw: bytes) -> bytes:
    """Swap two numbers, replace one with a big or odd value, or rename a dtype."""
    text = raw.decode("utf-8", errors="surrogateescape")
    import re
    numbers = list(re.finditer(r"-?\d+(\.\d+)?", text))
    choice = draw(st.sampled_from(["number", "swap", "dtype"]))
    if choice == "dtype" and '"F32"' in text:
        new = draw(st.sampled_from(['"F16"', '"I64"', '"BF16"', '"Q4"', '7', 'null']))
        text = text.replace('"F32"', new, 1)
    elif choice == "swap" and len(numbers) >= 2:
        a, b = sorted(draw(st.permutations(range(len(numbers))))[:2])
        ma, mb = numbers[a], numbers[b]
        text = (text[:ma.start()] + mb.group() + text[ma.end():mb.start()] + ma.group()
                + text[mb.end():])
    elif numbers:
        m = numbers[draw(st.integers(0, len(numbers) - 1))]
        new = draw(st.sampled_from([str(v) for v in BIG] + ["-1", "1.5", "1e400", "NaN", '"3"',
                                                            "[]", "true"]))
        text = text[:m.start()] + new + text[m.end():]
    return text.encode("utf-8", errors="surrogateescape")


def _timed(fn):
    start = time.perf_counter()
    try:
        return fn()
    finally:
        assert time.perf_counter() - start < SECONDS, "the reader took too long"


def _own_error(e: Exception, path) -> None:
    assert isinstance(e, (ValueError, FileNotFoundError)), repr(e)
    assert "\n" not in str(e) and str(path) in str(e), str(e)
    assert len(str(e)) < 600, str(e)


# --- safetensors ---------------------------------------------------------------------------------

def check_safetensors(factory, raw: bytes) -> None:
    path = _new_dir(factory) / "x.safetensors"
    path.write_bytes(raw)
    for mmap in (True, False):
        try:
            arrays = _timed(lambda: load_safetensors(path, mmap=mmap))
        except Exception as e:                     # noqa: BLE001 - which one is the test
            _own_error(e, path)
            continue
        # safetensors has no checksum, so a flip in the data section loads: what is checked is
        # that a load never holds more than the file (the tensors tile its data section)
        assert sum(a.nbytes for a in arrays.values()) <= 2 * len(raw)
        if raw == VALID_ST:
            assert all(np.array_equal(arrays[k], ARRAYS[k]) for k in ARRAYS)


VALID_ST = b""


@pytest.fixture(autouse=True)
def _valid_st(valid):
    global VALID_ST
    VALID_ST = valid["st"]


@given(st.data())
def test_fuzz_safetensors(tmp_path_factory, valid, data):
    check_safetensors(tmp_path_factory, data.draw(mutations(valid["st"], json_from=8)))


@pytest.mark.fuzz
@settings(max_examples=5_000)
@given(st.data())
def test_fuzz_safetensors_long(tmp_path_factory, valid, data):
    check_safetensors(tmp_path_factory, data.draw(mutations(valid["st"], json_from=8)))


# --- checkpoint record -----------------------------------------------------------------------------

def check_record(factory, valid, raw: bytes) -> None:
    d = _new_dir(factory)
    for f in valid["run"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "checkpoint.json").write_bytes(raw)
    try:
        arrays, record = _timed(lambda: load_checkpoint(d))
    except Exception as e:                         # noqa: BLE001
        _own_error(e, d)
        return
    want_arrays, want = load_checkpoint(valid["run"])
    assert record == want                          # the checksum lets nothing else through
    assert all(np.array_equal(arrays[k], want_arrays[k]) for k in want_arrays)


@given(st.data())
def test_fuzz_checkpoint_record(tmp_path_factory, valid, data):
    check_record(tmp_path_factory, valid, data.draw(mutations(valid["record"])))


@pytest.mark.fuzz
@settings(max_examples=5_000)
@given(st.data())
def test_fuzz_checkpoint_record_long(tmp_path_factory, valid, data):
    check_record(tmp_path_factory, valid, data.draw(mutations(valid["record"])))


# --- prepared meta.json ----------------------------------------------------------------------------

def check_meta(factory, valid, raw: bytes) -> None:
    d = _new_dir(factory)
    for f in valid["prep"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "meta.json").write_bytes(raw)
    try:
        train, val, tok = _timed(lambda: pretrain_data(d, 8, 2, 0))
    except Exception as e:                         # noqa: BLE001
        _own_error(e, d)
        return
    want_train, want_val, want_tok = pretrain_data(valid["prep"], 8, 2, 0)
    assert tok.chars == want_tok.chars
    assert np.array_equal(train.dataset.ids, want_train.dataset.ids)
    assert np.array_equal(val.dataset.ids, want_val.dataset.ids)


@given(st.data())
def test_fuzz_prepared_meta(tmp_path_factory, valid, data):
    check_meta(tmp_path_factory, valid, data.draw(mutations(valid["meta"])))


@pytest.mark.fuzz
@settings(max_examples=5_000)
@given(st.data())
def test_fuzz_prepared_meta_long(tmp_path_factory, valid, data):
    check_meta(tmp_path_factory, valid, data.draw(mutations(valid["meta"])))


def test_the_valid_files_load(tmp_path_factory, valid):
    check_safetensors(tmp_path_factory, valid["st"])
    check_record(tmp_path_factory, valid, valid["record"])
    check_meta(tmp_path_factory, valid, json.dumps(json.loads(valid["meta"])).encode())
