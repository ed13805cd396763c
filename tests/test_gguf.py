"""tinygpt.formats.gguf: round trips through an independent test writer, the real SmolLM2 file, corrupt
files (each a one-line GGUFError), and a fuzz test of random corruptions.

The long fuzz run is behind a marker: `pytest tests/test_gguf.py -m fuzz`.
"""
import itertools
import re
import struct
import time

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from tests.conftest import SHARED
from tests.gguf_writer import (GGML_TYPES, NUMPY_TYPES, Tensor, build_gguf, expected_value,
                               tensor_bytes)
from tests.test_quant import _spec
from tinygpt.formats.gguf import GGUFError, dequantize, read_gguf

_names = itertools.count()


def write(tmp_path_factory, raw: bytes):
    """A new file for every call: a memory map of an older file must never see it rewritten."""
    path = tmp_path_factory.getbasetemp() / f"t{next(_names)}.gguf"
    path.write_bytes(raw)
    return path


def assert_error(path, pattern: str) -> str:
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert re.search(pattern, message), message
    return message


def assert_same_value(got, want) -> None:
    """Exact equality, including the Python type of scalars and the dtype of arrays."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_value(g, w)
    else:
        assert type(got) is type(want) and got == want, (got, want)


# --- a small file with every value type and every tensor type ----------------------------------

EVERY_VALUE = {
    "general.architecture": ("STRING", "llama"),
    "t.u8": ("UINT8", 255), "t.i8": ("INT8", -128), "t.u16": ("UINT16", 65535),
    "t.i16": ("INT16", -32768), "t.u32": ("UINT32", 2**32 - 1), "t.i32": ("INT32", -2**31),
    "t.f32": ("FLOAT32", 0.1), "t.true": ("BOOL", True), "t.false": ("BOOL", False),
    "t.str": ("STRING", "héllo ✓"), "t.empty": ("STRING", ""), "t.u64": ("UINT64", 2**64 - 1),
    "t.i64": ("INT64", -2**63), "t.f64": ("FLOAT64", -1e300),
    **{f"a.{t.lower()}": ("ARRAY", (t, [0, 1, 2])) for t in NUMPY_TYPES if t != "BOOL"},
    "a.bool": ("ARRAY", ("BOOL", [True, False, True])),
    "a.str": ("ARRAY", ("STRING", ["a", "", "ü", "Ġt"])),
    "a.none": ("ARRAY", ("INT32", [])),
    "a.nested": ("ARRAY", ("ARRAY", [("UINT8", [1, 2]), ("STRING", ["x"]),
                                     ("ARRAY", [("FLOAT64", [1.5])])])),
}


def tensors_of_every_type(seed: int = 0) -> list[Tensor]:
    """Random bytes for each supported type, in shapes of 1 to 4 dimensions (ne: fastest first)."""
    rng = np.random.default_rng(seed)
    specs = [("f32", "F32", (3, 2)), ("f16", "F16", (4, 3)), ("q8_0", "Q8_0", (32, 2)),
             ("q4_0", "Q4_0", (64,)), ("q4_1", "Q4_1", (32, 3, 1)), ("q6_k", "Q6_K", (256,)),
             ("f32.4d", "F32", (2, 1, 2, 2))]
    return [Tensor(name, t, ne, rng.integers(0, 256, tensor_bytes(t, ne), np.uint8).tobytes())
            for name, t, ne in specs]


def expected_weights(t: Tensor) -> np.ndarray:
    """float32 weights in NumPy's order, decoded by the per-block references of test_quant."""
    raw = np.frombuffer(t.data, np.uint8)
    if t.ggml_type == "F32":
        w = raw.view("<f4").astype(np.float32)
    else:
        w = _spec(t.ggml_type, raw.reshape(-1, GGML_TYPES[t.ggml_type][2]))
    return w.reshape(t.ne[::-1])


SMALL_META = {k: EVERY_VALUE[k] for k in ["general.architecture", "t.u32", "t.f32", "t.true",
                                          "a.int16", "a.str", "a.nested"]}
SMALL, SMALL_FIELDS = build_gguf(SMALL_META, tensors_of_every_type())


# --- round trips ------------------------------------------------------------------------------

def test_metadata_of_every_type_round_trips(tmp_path_factory):
    metadata, tensors = read_gguf(write(tmp_path_factory, build_gguf(EVERY_VALUE, [])[0]))
    assert list(metadata) == list(EVERY_VALUE) and tensors == {}
    for key, (tname, value) in EVERY_VALUE.items():
        assert_same_value(metadata[key], expected_value(tname, value))


SCALARS = {"UINT8": st.integers(0, 2**8 - 1), "INT8": st.integers(-2**7, 2**7 - 1),
           "UINT16": st.integers(0, 2**16 - 1), "INT16": st.integers(-2**15, 2**15 - 1),
           "UINT32": st.integers(0, 2**32 - 1), "INT32": st.integers(-2**31, 2**31 - 1),
           "UINT64": st.integers(0, 2**64 - 1), "INT64": st.integers(-2**63, 2**63 - 1),
           "FLOAT32": st.floats(width=32, allow_nan=False), "FLOAT64": st.floats(allow_nan=False),
           "BOOL": st.booleans(), "STRING": st.text(max_size=6)}


def arrays(depth: int):
    """(element type, items) pairs; with depth > 0, arrays of such arrays too."""
    flat = st.sampled_from(list(SCALARS)).flatmap(
        lambda t: st.lists(SCALARS[t], max_size=4).map(lambda items: (t, items)))
    if depth == 0:
        return flat
    return flat | st.lists(arrays(depth - 1), max_size=3).map(lambda items: ("ARRAY", items))


typed_values = (st.sampled_from(list(SCALARS)).flatmap(lambda t: SCALARS[t].map(lambda v: (t, v)))
                | arrays(3).map(lambda a: ("ARRAY", a)))


@given(st.dictionaries(st.text(min_size=1, max_size=8), typed_values, max_size=5))
def test_random_metadata_round_trips(tmp_path_factory, meta):
    metadata, _ = read_gguf(write(tmp_path_factory, build_gguf(meta, [])[0]))
    assert list(metadata) == list(meta)
    for key, (tname, value) in meta.items():
        assert_same_value(metadata[key], expected_value(tname, value))


@pytest.mark.parametrize("alignment", [32, 8, 256])
def test_tensors_of_every_type_round_trip(tmp_path_factory, alignment):
    meta = {} if alignment == 32 else {"general.alignment": ("UINT32", alignment)}
    written = tensors_of_every_type(seed=alignment)
    raw, _ = build_gguf(meta, written, alignment, pad_end=True)
    _, tensors = read_gguf(write(tmp_path_factory, raw))
    assert list(tensors) == [t.name for t in written]
    for t in written:
        got = tensors[t.name]
        assert got.ggml_type == t.ggml_type and got.shape == t.ne[::-1]
        assert got.offset % alignment == 0 and got.data.tobytes() == t.data
        assert not got.data.flags.writeable
        w = dequantize(got)
        assert w.dtype == np.float32 and w.flags.writeable and w.flags.c_contiguous
        np.testing.assert_array_equal(w, expected_weights(t))


# --- the real file: SmolLM2-135M-Instruct, facts from its README ------------------------------

FIXTURE = SHARED / "fixtures/smollm2-135m-instruct/model.gguf"
C, FF, KV, V, N_LAYER = 576, 1536, 192, 49152, 30   # width, MLP width, 3 KV heads x 64, vocab
BLOCK_SHAPES = {"attn_q": (C, C), "attn_k": (KV, C), "attn_v": (KV, C), "attn_output": (C, C),
                "ffn_gate": (FF, C), "ffn_up": (FF, C), "ffn_down": (C, FF)}


@pytest.fixture(scope="module")
def smollm2():
    if not FIXTURE.is_file():
        pytest.skip(f"fixture not found at {FIXTURE}")
    return read_gguf(FIXTURE)


def test_smollm2_metadata(smollm2):
    md, _ = smollm2
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == N_LAYER
    assert md["llama.embedding_length"] == C and md["llama.feed_forward_length"] == FF
    assert md["llama.attention.head_count"] == 9 and md["llama.attention.head_count_kv"] == 3
    assert md["llama.rope.freq_base"] == 100000.0 and md["llama.rope.dimension_count"] == 64
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert md["llama.context_length"] == 8192 and md["llama.vocab_size"] == V
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    tokens, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    assert len(tokens) == V and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(merges) > 40_000 and all(isinstance(m, str) and " " in m for m in merges[:100])
    assert md["tokenizer.ggml.eos_token_id"] == 2 and md["tokenizer.ggml.padding_token_id"] == 2
    assert md["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_smollm2_tensors(smollm2):
    _, tensors = smollm2
    assert sum(t.size for t in tensors.values()) == 134_515_008
    assert "output.weight" not in tensors                    # tied to token_embd
    emb = tensors["token_embd.weight"]
    assert (emb.ggml_type, emb.shape) == ("Q8_0", (V, C))
    assert (tensors["output_norm.weight"].ggml_type, tensors["output_norm.weight"].shape) == \
        ("F32", (C,))
    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(N_LAYER):
        for norm in ("attn_norm", "ffn_norm"):
            t = tensors[f"blk.{i}.{norm}.weight"]
            assert (t.ggml_type, t.shape) == ("F32", (C,))
        for name, shape in BLOCK_SHAPES.items():
            t = tensors[f"blk.{i}.{name}.weight"]
            assert (t.ggml_type, t.shape) == ("Q4_1", shape), t
        expected |= {f"blk.{i}.{n}.weight" for n in [*BLOCK_SHAPES, "attn_norm", "ffn_norm"]}
    assert set(tensors) == expected


def test_smollm2_blocks_are_llama_cpp_quantizer_output(smollm2):
    """The bytes sit where we read them: llama.cpp's Q8_0 quantizer sets d = max|x| / 127, so
    every block holds a code of +-127; its Q4_1 quantizer maps the block's min to code 0 and its
    max to code 15. A scale or code read at the wrong byte would break both."""
    _, tensors = smollm2
    q8 = tensors["token_embd.weight"].data.reshape(-1, 34)[:, 2:].view(np.int8)
    assert (np.abs(q8.astype(np.int16)).max(axis=1) == 127).all()
    for name in [f"blk.{i}.{n}" for i in (0, N_LAYER - 1) for n in BLOCK_SHAPES]:
        codes = tensors[name + ".weight"].data.reshape(-1, 20)[:, 4:]
        both = np.concatenate([codes & 0x0F, codes >> 4], axis=1)
        assert (both.min(axis=1) == 0).all() and (both.max(axis=1) == 15).all(), name


def test_smollm2_dequantizes_to_plausible_weights(smollm2):
    _, tensors = smollm2
    names = ["token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight"]
    names += [f"blk.{i}.{n}.weight" for i in (0, N_LAYER - 1) for n in BLOCK_SHAPES]
    for name in names:
        w = dequantize(tensors[name])
        assert w.shape == tensors[name].shape and np.isfinite(w).all(), name
        # trained weights: magnitudes of order 0.01..1, none wild (measured: max |w| <= 6)
        assert np.abs(w).max() < 20 and 1e-3 < w.std() < 2, (name, np.abs(w).max(), w.std())


# --- corrupt files: each one line, naming the file and the key or tensor ----------------------

def patch(raw: bytes, field, value: int) -> bytes:
    """`raw` with one recorded field overwritten (the value wraps to the field's width)."""
    size = struct.calcsize(field.fmt)
    packed = struct.pack("<" + field.fmt.upper(), value % (1 << (8 * size)))
    return raw[:field.pos] + packed + raw[field.pos + size:]


def fields_of(fields, kind: str) -> list:
    return [f for f in fields if f.kind == kind]


def q8_tensor(name: str = "w", offset: int | None = None, code: int | None = None) -> Tensor:
    return Tensor(name, "Q8_0", (32, 2), bytes(range(68)), code=code, offset=offset)


def test_empty_and_tiny_files(tmp_path_factory):
    assert_error(write(tmp_path_factory, b""), r"not a GGUF file: 0 bytes")
    assert_error(write(tmp_path_factory, b"GGU"), r"not a GGUF file: 3 bytes")


def test_truncated_at_every_cut_point(tmp_path_factory):
    _, tensors = read_gguf(write(tmp_path_factory, SMALL))
    data_start = min(t.offset for t in tensors.values())
    # every byte of the header; in the data section one cut in 8 (they all fail the same check)
    for cut in [*range(data_start), *range(data_start, len(SMALL), 8)]:
        assert_error(write(tmp_path_factory, SMALL[:cut]), r"GGUF|truncated")


def test_wrong_magic(tmp_path_factory):
    raw, _ = build_gguf({}, [], magic=b"GGML")
    assert_error(write(tmp_path_factory, raw), r"not a GGUF file: starts with b'GGML'")


@pytest.mark.parametrize("version", [1, 2, 4, 3 << 24])
def test_other_versions(tmp_path_factory, version):
    raw, _ = build_gguf(SMALL_META, [], version=version)
    message = assert_error(write(tmp_path_factory, raw),
                           rf"GGUF version {version} is not supported.*reads version 3$")
    assert ("big-endian" in message) == (version == 3 << 24)


@pytest.mark.parametrize("length", [10**6, 2**63, 2**64 - 1])
def test_string_length_past_the_end(tmp_path_factory, length):
    raw, fields = build_gguf(SMALL_META, [q8_tensor()])
    key_length, *_, name_length = fields_of(fields, "length")
    assert_error(write(tmp_path_factory, patch(raw, key_length, length)),
                 rf"metadata key #0: string of {length} bytes: needs {length} bytes")
    assert_error(write(tmp_path_factory, patch(raw, name_length, length)),
                 rf"tensor #0 name: string of {length} bytes")


@pytest.mark.parametrize("count", [10**6, 2**60, 2**64 - 1])
def test_array_count_past_the_end(tmp_path_factory, count):
    raw, fields = build_gguf({"a": ("ARRAY", ("UINT32", [1, 2, 3]))}, [])
    array_count = fields_of(fields, "count")[2]
    assert_error(write(tmp_path_factory, patch(raw, array_count, count)),
                 rf"metadata 'a': array of UINT32, count {count} needs at least {4 * count} bytes")


def test_tensor_and_metadata_counts_past_the_end(tmp_path_factory):
    raw, fields = build_gguf(SMALL_META, [q8_tensor()])
    n_tensors, n_kv = fields_of(fields, "count")[:2]
    assert_error(write(tmp_path_factory, patch(raw, n_tensors, 2**60)),
                 rf"tensor count {2**60} needs at least")
    assert_error(write(tmp_path_factory, patch(raw, n_kv, 2**60)),
                 rf"metadata count {2**60} needs at least")


@pytest.mark.parametrize("code, pattern", [(99, r"unknown ggml type 99"),
                                           (12, r"ggml type 12 \(Q4_K\)"),
                                           (30, r"ggml type 30 \(BF16\)")])
def test_unsupported_tensor_type(tmp_path_factory, code, pattern):
    raw, _ = build_gguf({}, [q8_tensor(code=code)])
    assert_error(write(tmp_path_factory, raw), rf"tensor 'w': {pattern} is not supported "
                 r"\(supported: F32 \(0\), F16 \(1\), Q4_0 \(2\), Q4_1 \(3\), Q8_0 \(8\), "
                 r"Q6_K \(14\)\)")


def test_misaligned_offset(tmp_path_factory):
    raw, _ = build_gguf({}, [q8_tensor(offset=4)])
    assert_error(write(tmp_path_factory, raw),
                 r"tensor 'w': offset 4 is not a multiple of the alignment 32")
    meta = {"general.alignment": ("UINT32", 64)}
    raw, _ = build_gguf(meta, [q8_tensor(), q8_tensor("v", offset=96)], 64)
    assert_error(write(tmp_path_factory, raw), r"tensor 'v': offset 96 .* alignment 64")


def test_tensor_past_the_end(tmp_path_factory):
    raw, _ = build_gguf({}, [q8_tensor(), q8_tensor("v")])
    assert_error(write(tmp_path_factory, raw[:-1]),
                 r"tensor 'v': Q8_0 \[32, 2\] needs bytes \d+\.\.\d+, past the end")
    raw, fields = build_gguf({}, [q8_tensor(), q8_tensor("v")])
    for offset in (128, 2**63, 2**64 - 32):
        bad = patch(raw, fields_of(fields, "offset")[1], offset)
        assert_error(write(tmp_path_factory, bad), r"tensor 'v': .* past the end")


def test_overlapping_tensors(tmp_path_factory):
    for offset in (0, 32):
        raw, _ = build_gguf({}, [q8_tensor(), q8_tensor("v", offset=offset)])
        assert_error(write(tmp_path_factory, raw), r"tensor '[vw]' \(bytes \d+\.\.\d+\) overlaps "
                     r"tensor '[vw]' \(ends at byte \d+\)")


def test_bad_values_and_infos(tmp_path_factory):
    raw, fields = build_gguf({"a": ("BOOL", True), "b": ("STRING", "ok")}, [q8_tensor()])
    cases = [(patch(raw, fields_of(fields, "type")[0], 13), r"'a': unknown value type 13"),
             (raw.replace(b"a\x07\0\0\0\x01", b"a\x07\0\0\0\x02"), r"'a': BOOL value must be 0"),
             (raw.replace(b"ok", b"\xff\xfe"), r"'b': string is not valid UTF-8"),
             (raw.replace(b"b\x08\0\0\0", b"a\x08\0\0\0"), r"metadata 'a': duplicate key"),
             (patch(raw, fields_of(fields, "n_dims")[0], 0), r"'w': n_dims is 0, must be 1 to 4"),
             (patch(raw, fields_of(fields, "n_dims")[0], 5), r"'w': n_dims is 5"),
             (patch(raw, fields_of(fields, "dim")[1], 0), r"'w': dimensions \[32, 0\] include 0"),
             (patch(raw, fields_of(fields, "dim")[0], 16), r"'w': row length ne0 = 16 is not a "
                                                           r"multiple of Q8_0's block of 32")]
    for bad, pattern in cases:
        assert_error(write(tmp_path_factory, bad), pattern)
    raw, _ = build_gguf({}, [q8_tensor(), q8_tensor("w", offset=96)])
    assert_error(write(tmp_path_factory, raw), r"tensor 'w': duplicate tensor name")


def test_bad_alignment_and_nesting(tmp_path_factory):
    for value, pattern in [(("UINT32", 48), r"48 is not a power of 2"),
                           (("UINT32", 0), r"0 is not a power of 2"),
                           (("UINT64", 32), r"must be UINT32, got UINT64")]:
        raw, _ = build_gguf({"general.alignment": value}, [])
        assert_error(write(tmp_path_factory, raw), rf"metadata 'general.alignment': {pattern}")
    nested = ("INT8", [1])
    for _ in range(8):
        nested = ("ARRAY", [nested])
    raw, _ = build_gguf({"deep": ("ARRAY", nested)}, [])
    assert_error(write(tmp_path_factory, raw), r"'deep': arrays nested more than 8 deep")


# --- fuzz: any corruption of a valid file loads or fails with a GGUFError, quickly -----------

BIG = [0, 1, 2, 3, 31, 32, 255, 2**16, 2**31 - 1, 2**32 - 1, 2**32, 2**60, 2**63, 2**64 - 1]


@st.composite
def corruptions(draw) -> bytes:
    raw = SMALL
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "field", "field", "swap"]))
        if kind == "truncate":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif kind == "flip" and raw:
            pos = draw(st.integers(0, len(raw) - 1))
            raw = raw[:pos] + bytes([raw[pos] ^ draw(st.integers(1, 255))]) + raw[pos + 1:]
        elif kind == "field":           # a length, count, type code, dimension or offset
            field = draw(st.sampled_from(SMALL_FIELDS))
            if field.pos + struct.calcsize(field.fmt) <= len(raw):
                value = draw(st.sampled_from(BIG) | st.integers(0, 2 * len(SMALL))
                             | st.integers(0, 40))
                raw = patch(raw, field, value)
        elif kind == "swap":            # two tensors trade offsets
            a, b = draw(st.permutations(fields_of(SMALL_FIELDS, "offset")))[:2]
            if max(a.pos, b.pos) + 8 <= len(raw):
                va, vb = (raw[f.pos:f.pos + 8] for f in (a, b))
                raw = patch(patch(raw, a, int.from_bytes(vb, "little")), b,
                            int.from_bytes(va, "little"))
    return raw


def check_corrupt_file(tmp_path_factory, raw: bytes) -> None:
    path = write(tmp_path_factory, raw)
    start = time.perf_counter()
    try:
        _, tensors = read_gguf(path)
    except GGUFError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        # which check caught it, numbers and names removed (see --hypothesis-show-statistics)
        event(re.sub(r"\d+|'[^']*'|\(.*", "#", str(e)[len(str(path)) + 2:])[:50])
        return
    finally:
        assert time.perf_counter() - start < 2.0        # every loop is bounded by the file
    event("loads")
    for t in tensors.values():
        w = dequantize(t)
        assert w.dtype == np.float32 and w.shape == t.shape
    path.unlink()


@given(corruptions())
def test_fuzz(tmp_path_factory, raw):
    check_corrupt_file(tmp_path_factory, raw)


@pytest.mark.fuzz
@settings(max_examples=20_000)
@given(corruptions())
def test_fuzz_long(tmp_path_factory, raw):
    check_corrupt_file(tmp_path_factory, raw)
