"""Quantized formats: every numba kernel equals its NumPy twin and a per-block reference written
straight from the format's definition, bit for bit, on random blocks with tricky float16 scales.

The per-block references below read one block at a time with `struct` and scalar float32
arithmetic in ggml's order; they share nothing with tinygpt/kernels/quant.py but the formulas.
"""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygpt.kernels import quant

F32 = np.float32


def _half(block: bytes, at: int) -> np.float32:
    return F32(np.frombuffer(block[at:at + 2], "<f2")[0])


def spec_f16(block: bytes) -> list:
    return [_half(block, 0)]


def spec_q8_0(block: bytes) -> list:
    d = _half(block, 0)
    return [d * F32(q) for q in struct.unpack("32b", block[2:])]


def spec_q4_0(block: bytes) -> list:
    d, codes = _half(block, 0), block[2:]
    return [d * F32((codes[j] & 0x0F) - 8) for j in range(16)] + \
           [d * F32((codes[j] >> 4) - 8) for j in range(16)]


def spec_q4_1(block: bytes) -> list:
    d, m, codes = _half(block, 0), _half(block, 2), block[4:]
    return [d * F32(codes[j] & 0x0F) + m for j in range(16)] + \
           [d * F32(codes[j] >> 4) + m for j in range(16)]


def spec_q6_k(block: bytes) -> list:
    """ggml's dequantize_row_q6_K for one block, loop for loop."""
    ql, qh, scales, d = block[:128], block[128:192], struct.unpack("16b", block[192:208]), \
        _half(block, 208)
    w = [None] * 256
    for half in range(2):
        for l in range(32):
            lo0, lo1, h = ql[64 * half + l], ql[64 * half + 32 + l], qh[32 * half + l]
            qs = [(lo0 & 0xF) | ((h & 3) << 4), (lo1 & 0xF) | (((h >> 2) & 3) << 4),
                  (lo0 >> 4) | (((h >> 4) & 3) << 4), (lo1 >> 4) | (((h >> 6) & 3) << 4)]
            for k in range(4):
                scale = F32(scales[8 * half + l // 16 + 2 * k])
                w[128 * half + 32 * k + l] = (d * scale) * F32(qs[k] - 32)
    return w


SPECS = {"F16": spec_f16, "Q8_0": spec_q8_0, "Q4_0": spec_q4_0, "Q4_1": spec_q4_1,
         "Q6_K": spec_q6_k}
HALF_AT = {"F16": [0], "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q6_K": [208]}
KERNELS = {name: (getattr(quant, f"dequantize_{name.lower()}_numba"),
                  getattr(quant, f"dequantize_{name.lower()}_ref")) for name in SPECS}

# float16 bit patterns where conversions go wrong: signed zeros, the subnormal range and its
# edges, the largest finite, infinities, quiet and signalling nans, and ordinary scales
TRICKY_HALVES = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x0401, 0x3C00, 0xBC00, 0x7BFF,
                 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x2E66, 0x1400]
halves = st.sampled_from(TRICKY_HALVES) | st.integers(0, 0xFFFF)


@st.composite
def blocks(draw, fmt: str) -> np.ndarray:
    """(n, block_bytes) uint8: random bytes, with drawn float16 patterns in the scale fields."""
    B = quant.FORMATS[fmt].block_bytes
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        row = bytearray(draw(st.binary(min_size=B, max_size=B)))
        for at in HALF_AT[fmt]:
            row[at:at + 2] = struct.pack("<H", draw(halves))
        rows.append(bytes(row))
    return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), B)


def _spec(fmt: str, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.array([SPECS[fmt](row.tobytes()) for row in b], np.float32)


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Same shape, float32, same values; nan where nan (an inf scale times code 0 is nan)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", list(SPECS))
@given(data=st.data())
def test_kernel_twin_and_spec_agree(fmt, data):
    b = data.draw(blocks(fmt)).copy()
    fast, ref = KERNELS[fmt]
    want = _spec(fmt, b)
    with np.errstate(invalid="ignore"):
        _assert_same(ref(b), want)
    _assert_same(fast(b), want)
    b.flags.writeable = False                   # as the memory map hands them over
    _assert_same(fast(b), want)


@pytest.mark.parametrize("fmt", list(SPECS))
def test_many_blocks_in_parallel(fmt):
    f = quant.FORMATS[fmt]
    raw = np.random.default_rng(0).integers(0, 256, 3000 * f.block_bytes, dtype=np.uint8)
    fast, ref = KERNELS[fmt]
    b = raw.reshape(-1, f.block_bytes)
    with np.errstate(invalid="ignore"):
        want = ref(b)
    _assert_same(fast(b), want)
    _assert_same(quant.dequantize(raw, fmt), want.reshape(-1))


def test_every_float16_pattern():
    bits = np.arange(1 << 16, dtype="<u2")
    want = bits.view("<f2").astype(np.float32)
    got = quant.dequantize_f16_numba(bits.view(np.uint8).reshape(-1, 2))[:, 0]
    finite = ~np.isnan(want)
    # everything but nan converts to exactly the same float32 bits; nan stays nan
    np.testing.assert_array_equal(got[finite].view("<u4"), want[finite].view("<u4"))
    assert np.isnan(got[~finite]).all() and (~finite).sum() == 2 * 1023


def test_f32_is_a_copy_of_its_bytes():
    x = np.array([1.5, -0.0, np.inf, 3e38], np.float32)
    raw = x.view(np.uint8)
    got = quant.dequantize(raw, "F32")
    np.testing.assert_array_equal(got.view("<u4"), x.view("<u4"))
    assert got.flags.writeable and not np.shares_memory(got, raw)


def test_nbytes_and_bad_inputs():
    assert quant.nbytes("Q8_0", 64) == 68 and quant.nbytes("Q6_K", 512) == 420
    assert quant.nbytes("F16", 3) == 6
    with pytest.raises(ValueError, match="whole number of Q4_1 blocks of 32"):
        quant.nbytes("Q4_1", 33)
    with pytest.raises(ValueError, match=r"unknown weight format 'Q5_K' \(known: F32, F16"):
        quant.dequantize(np.zeros(176, np.uint8), "Q5_K")
    with pytest.raises(ValueError, match="35 bytes are not a whole number of Q8_0 blocks of 34"):
        quant.dequantize(np.zeros(35, np.uint8), "Q8_0")
    with pytest.raises(ValueError, match="1-d uint8"):
        quant.dequantize(np.zeros((2, 34), np.uint8), "Q8_0")


def test_numba_switch():
    code = ("from tinygpt.kernels import quant; "
            "assert quant.dequantize_q8_0 is quant.dequantize_q8_0_ref; "
            "assert quant.dequantize_q6_k is quant.dequantize_q6_k_ref")
    env = {**os.environ, "TINYGPT_NUMBA": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    from tinygpt import kernels
    if kernels.USE_NUMBA:
        assert quant.dequantize_q8_0 is quant.dequantize_q8_0_numba
