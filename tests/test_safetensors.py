"""tinygpt.formats.safetensors against the reference `safetensors` package, corrupt files, the fixture."""
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinygpt.formats.safetensors import load_safetensors, read_header, save_safetensors

st_numpy = pytest.importorskip("safetensors.numpy")

FIXTURE = "fixtures/gpt2-tiny-hf/model.safetensors"
# shapes from fixtures/gpt2-tiny-hf/README.md: V=50257, T=128, C=64, 2 layers
V, T, C, N_LAYER = 50257, 128, 64, 2


def gpt2_tiny_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(N_LAYER):
        p = f"h.{i}."
        shapes |= {p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
                   p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                   p + "attn.bias": (1, 1, T, T),
                   p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
                   p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                   p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
                   p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)}
    return shapes


# --- round trips against the reference implementation ---------------------------------------------

DTYPES = [np.float32, np.float16, np.float64, np.int64]
names = st.text(alphabet="abcxyz0123456789._é", min_size=1, max_size=10)


@st.composite
def tensor_dicts(draw) -> dict[str, np.ndarray]:
    keys = draw(st.lists(names, max_size=6, unique=True))
    out = {}
    for key in keys:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        out[key] = draw(hnp.arrays(dtype, shape))      # any values: nan, inf, -0.0, extremes
    return out


metadatas = st.none() | st.dictionaries(names, st.text(max_size=8), min_size=1, max_size=3)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Exact equality (nan == nan); F16 from the reference is compared after widening to float32."""
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        if w.dtype == np.float16:
            w = w.astype(np.float32)
        assert got[name].dtype == w.dtype, name
        assert got[name].shape == w.shape, name
        np.testing.assert_array_equal(got[name], w, err_msg=name)


@given(tensor_dicts(), metadatas)
def test_our_writer_matches_reference_bytes_and_reader(tmp_path_factory, tensors, metadata):
    d = tmp_path_factory.mktemp("st")
    save_safetensors(tensors, d / "ours.safetensors", metadata)
    st_numpy.save_file(tensors, str(d / "ref.safetensors"), metadata=metadata)
    ours, ref = (d / "ours.safetensors").read_bytes(), (d / "ref.safetensors").read_bytes()
    if metadata is not None and len(metadata) > 1:
        # the reference keeps metadata in a hash map, so its key order varies from run to run
        header = read_header(d / "ours.safetensors")
        assert header == read_header(d / "ref.safetensors")
        assert ours[header.data_start:] == ref[header.data_start:]
    else:  # same tensor order and header padding as the reference writer, so the same bytes
        assert ours == ref
    ref_loaded = st_numpy.load_file(str(d / "ours.safetensors"))
    for name, arr in tensors.items():
        assert ref_loaded[name].dtype == arr.dtype
        np.testing.assert_array_equal(ref_loaded[name], arr)


@given(tensor_dicts(), metadatas, st.booleans())
def test_we_read_what_the_reference_writes(tmp_path_factory, tensors, metadata, mmap):
    path = tmp_path_factory.mktemp("st") / "ref.safetensors"
    st_numpy.save_file(tensors, str(path), metadata=metadata)
    assert_same(load_safetensors(path, mmap=mmap), tensors)
    assert read_header(path).metadata == (metadata or {})


def test_other_dtypes_and_byte_orders_round_trip(tmp_path):
    tensors = {"i32": np.arange(-3, 3, dtype=np.int32), "u8": np.arange(5, dtype=np.uint8),
               "bool": np.array([[True, False]]), "big": np.arange(4, dtype=">f4"),
               "strided": np.arange(12.0).reshape(3, 4)[:, ::2]}
    save_safetensors(tensors, tmp_path / "x.safetensors")
    for mmap in (True, False):
        got = load_safetensors(tmp_path / "x.safetensors", mmap=mmap)
        for name, arr in tensors.items():
            assert got[name].dtype == arr.dtype.newbyteorder("=")
            np.testing.assert_array_equal(got[name], arr)
    assert st_numpy.load_file(str(tmp_path / "x.safetensors"))["big"].dtype == np.float32


def _bf16_value(bits: int) -> float:
    """bfloat16 decoded from its definition: 1 sign bit, 8 exponent bits (bias 127), 7 mantissa."""
    sign = -1.0 if bits >> 15 else 1.0
    exponent, mantissa = (bits >> 7) & 0xFF, bits & 0x7F
    if exponent == 0xFF:
        return sign * np.inf if mantissa == 0 else np.nan
    if exponent == 0:                                 # subnormal
        return sign * 2.0**-126 * (mantissa / 128)
    return sign * 2.0 ** (exponent - 127) * (1 + mantissa / 128)


def test_bf16_is_widened_exactly_for_all_65536_values(tmp_path):
    bits = np.arange(2**16, dtype="<u2").reshape(256, 256)
    raw = json.dumps({"x": {"dtype": "BF16", "shape": [256, 256],
                            "data_offsets": [0, bits.nbytes]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bits.tobytes())
    want = np.array([_bf16_value(b) for b in range(2**16)]).reshape(256, 256)
    for mmap in (True, False):
        got = load_safetensors(path, mmap=mmap)["x"]
        assert got.dtype == np.float32 and got.shape == (256, 256)
        np.testing.assert_array_equal(got.astype(np.float64), want)   # exact, nan where nan
        assert np.array_equal(np.signbit(got), bits >= 0x8000)         # -0.0 and signed nan too


# --- memory map -----------------------------------------------------------------------------------

def _memmap_base(arr: np.ndarray) -> np.memmap | None:
    base = arr
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    return base


def test_mmap_returns_views_into_the_file_not_copies(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": np.zeros((4, 8), np.float32), "h": np.zeros(3, np.float16)}, path)
    got = load_safetensors(path, mmap=True)
    w = got["w"]
    base = _memmap_base(w)
    assert base is not None and np.shares_memory(w, base)
    assert not w.flags.writeable and not w.flags.owndata
    assert _memmap_base(got["h"]) is None            # F16 is converted: a new float32 array
    # the view reads through to the file: patch the bytes on disk and look again
    offset = read_header(path).data_start + read_header(path).tensors["w"].begin
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.float32(7.5).tobytes())
    assert w[0, 0] == 7.5
    copied = load_safetensors(path, mmap=False)["w"]
    assert copied.flags.writeable and copied.flags.aligned and _memmap_base(copied) is None


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": np.ones(3, np.float32)}, path)
    old = path.read_bytes()

    class Boom(Exception):
        pass

    def fail(*args):
        raise Boom

    monkeypatch.setattr("tinygpt.formats.safetensors.os.fsync", fail)
    with pytest.raises(Boom):
        save_safetensors({"a": np.zeros(1000, np.float32)}, path)
    assert path.read_bytes() == old                   # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="complex128"):
        save_safetensors({"z": np.zeros(2, complex)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="__metadata__"):
        save_safetensors({"__metadata__": np.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors({"a": np.zeros(2)}, tmp_path / "x.safetensors", metadata={"k": 1})
    assert list(tmp_path.iterdir()) == []


# --- malformed files ------------------------------------------------------------------------------

def _write(path: Path, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    raw = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = [  # (header object, data bytes, message fragment)
    ([1, 2], b"", "must be a JSON object"),
    ({"a": _entry(), "__metadata__": {"k": 1}}, bytes(8), r"__metadata__\['k'\] must be a string"),
    ({"__metadata__": ["k"]}, b"", "__metadata__ must be an object"),
    ({"a": 5}, b"", "tensor 'a': entry must be an object"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "tensor 'a': entry has no 'data_offsets'"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor 'a': entry has no 'dtype'"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "tensor 'a': entry has no 'shape'"),
    ({"a": _entry(dtype="Q4")}, bytes(8), "tensor 'a': unknown dtype 'Q4'"),
    ({"a": _entry(shape=(-2,))}, bytes(8), "tensor 'a': shape must be a list of non-negative"),
    ({"a": _entry(shape=(2.0,))}, bytes(8), "tensor 'a': shape must be"),
    ({"a": _entry(shape=(True,), offsets=(0, 4))}, bytes(4), "tensor 'a': shape must be"),
    ({"a": _entry(offsets=(0,))}, bytes(8), r"tensor 'a': data_offsets must be \[begin, end\]"),
    ({"a": _entry(offsets=(-1, 7))}, bytes(8), "tensor 'a': data_offsets must be"),
    ({"a": _entry(offsets=(8, 0))}, bytes(8), "tensor 'a': data_offsets begin 8 > end 0"),
    ({"a": _entry(offsets=(0, 16))}, bytes(8), "tensor 'a': data_offsets end 16 is past the 8"),
    ({"a": _entry(offsets=(0, 4))}, bytes(4), "tensor 'a': data_offsets span 4 bytes but F32"),
    ({"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12), "tensor 'b'.*overlaps tensor 'a'"),
    ({"a": _entry(offsets=(4, 12))}, bytes(12), "tensor 'a': 4 unused bytes .* at the start"),
    ({"a": _entry(), "b": _entry(offsets=(12, 20))}, bytes(20),
     "tensor 'b': 4 unused bytes in the data section after tensor 'a'"),
    ({"a": _entry()}, bytes(12), "4 bytes after the last tensor 'a' that no tensor covers"),
]


@pytest.mark.parametrize("header, data, message", BAD_HEADERS)
def test_malformed_header_is_a_clear_error(tmp_path, header, data, message):
    path = _write(tmp_path / "bad.safetensors", header, data)
    for mmap in (True, False):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
            load_safetensors(path, mmap=mmap)


@pytest.mark.parametrize("raw, message", [
    (b'{"a": ', "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b'{"a": {}, "a": {}}', "duplicate key 'a'"),
])
def test_header_that_is_not_json_is_a_clear_error(tmp_path, raw, message):
    path = _write(tmp_path / "bad.safetensors", None, raw=raw)
    with pytest.raises(ValueError, match=message):
        load_safetensors(path)


def test_short_and_truncated_files_are_clear_errors(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="3 bytes, shorter than the 8-byte header length"):
        load_safetensors(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="exceeds the 100000000-byte limit"):
        load_safetensors(huge)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="header length 100 bytes runs past the end of the 10-"):
        load_safetensors(cut)
    full = tmp_path / "full.safetensors"
    save_safetensors({"w": np.ones((8, 8), np.float32)}, full)
    (tmp_path / "half.safetensors").write_bytes(full.read_bytes()[:-100])
    with pytest.raises(ValueError, match="tensor 'w': data_offsets end 256 is past"):
        load_safetensors(tmp_path / "half.safetensors")


def test_empty_file_and_zero_size_tensors(tmp_path):
    save_safetensors({}, tmp_path / "empty.safetensors")
    assert load_safetensors(tmp_path / "empty.safetensors") == {}
    # zero-size tensors may sit anywhere a tensor boundary is, including the very end
    header = {"a": _entry(), "z0": _entry(shape=(0, 3), offsets=(0, 0)),
              "z1": _entry(shape=(0,), offsets=(8, 8))}
    got = load_safetensors(_write(tmp_path / "z.safetensors", header, bytes(8)))
    assert got["z0"].shape == (0, 3) and got["z1"].shape == (0,)


# --- the GPT-2-layout fixture ---------------------------------------------------------------------

@pytest.mark.parametrize("mmap", [True, False])
def test_fixture_has_readme_names_and_matches_reference(shared, mmap):
    path = shared / FIXTURE
    got = load_safetensors(path, mmap=mmap)
    assert {name: arr.shape for name, arr in got.items()} == gpt2_tiny_shapes()
    assert all(arr.dtype == np.float32 for arr in got.values())
    assert_same(got, st_numpy.load_file(str(path)))
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert header.data_start % 8 != 0                 # README: the HF header is not padded
    if mmap:
        assert not got["wte.weight"].flags.aligned    # so float32 views are unaligned
