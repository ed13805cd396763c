"""Quantized weight formats: ggml's block layouts (llama.cpp, GGUF files) and their decoding.

This module owns how a quantized tensor is laid out in bytes and how those bytes become float32
weights again. It knows nothing about files: `gguf.py` finds each tensor's bytes and its format
name and calls `dequantize`. Kernels that compute directly with quantized weights belong here too.

A format cuts a tensor, in memory order (GGUF's ne0 is the fastest axis), into blocks of
`block_size` consecutive weights and stores each block in `block_bytes` bytes. Every float16 is
little-endian; codes are unsigned, lo4 and hi4 being a byte's low and high 4 bits.

    format  weights  bytes  block layout                 weight j of the block
    F32     1        4      the float32 itself
    F16     1        2      the float16 itself
    Q8_0    32       34     f16 d, 32 int8 q             d * q[j]
    Q4_0    32       18     f16 d, 16 bytes of codes     d * (lo4(byte j) - 8), j < 16
                                                         d * (hi4(byte j - 16) - 8), j >= 16
    Q4_1    32       20     f16 d, f16 m, 16 bytes       d * lo4(byte j) + m, j < 16
                                                         d * hi4(byte j - 16) + m, j >= 16
    Q6_K    256      210    128 bytes ql (low 4 bits),   d * scale[j // 16] * (q[j] - 32),
                            64 bytes qh (high 2 bits),   q[j] 6 bits (dequantize_q6_k_ref
                            16 int8 scales, f16 d        says which bits)

Arithmetic is float32 in the order ggml's reference C code uses (`d * q + m`, `(d * scale) * q`),
and no fused multiply-adds, so the numba kernels and their NumPy twins agree bit for bit.

Every block kernel has a NumPy twin `X_ref` (short, vectorised: the readable definition) and a
numba kernel `X_numba` (a loop over blocks, parallel with prange). The public names are bound to
the numba kernels, or to the twins when the environment has `TINYGPT_NUMBA=0` (`kernels.base.USE_NUMBA`).
Kernels take `blocks: (n_blocks, block_bytes) uint8` and return `(n_blocks, block_size) float32`.

Tests: `pytest tests/test_quant.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from tinygpt.kernels.base import pick


@dataclass(frozen=True)
class BlockFormat:
    """One ggml format: `block_size` consecutive weights stored in `block_bytes` bytes."""

    name: str
    block_size: int
    block_bytes: int


FORMATS: dict[str, BlockFormat] = {f.name: f for f in [
    BlockFormat("F32", 1, 4),
    BlockFormat("F16", 1, 2),
    BlockFormat("Q4_0", 32, 2 + 16),
    BlockFormat("Q4_1", 32, 2 + 2 + 16),
    BlockFormat("Q8_0", 32, 2 + 32),
    BlockFormat("Q6_K", 256, 128 + 64 + 16 + 2),
]}


def nbytes(fmt: str, n: int) -> int:
    """Bytes that `n` weights take in format `fmt`; `n` must be a whole number of blocks."""
    f = _format(fmt)
    if n % f.block_size:
        raise ValueError(f"{n} weights are not a whole number of {fmt} blocks of {f.block_size}")
    return n // f.block_size * f.block_bytes


def dequantize(raw: np.ndarray, fmt: str) -> np.ndarray:
    """Decode whole blocks of format `fmt`.   raw: (nbytes,) uint8 -> (n,) float32, a new array"""
    f = _format(fmt)
    if raw.ndim != 1 or raw.dtype != np.uint8:
        raise ValueError(f"{fmt} bytes must be a 1-d uint8 array, got {raw.dtype} {raw.shape}")
    if raw.size % f.block_bytes:
        raise ValueError(f"{raw.size} bytes are not a whole number of {fmt} blocks of "
                         f"{f.block_bytes} bytes")
    if fmt == "F32":        # no kernel to write: the bytes are the weights, copied out once
        return raw.view("<f4").astype(np.float32)
    with np.errstate(invalid="ignore"):     # an inf scale times code 0 is nan, as in ggml
        return _DEQUANTIZE[fmt](raw.reshape(-1, f.block_bytes)).reshape(-1)


def _format(fmt: str) -> BlockFormat:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})")
    return FORMATS[fmt]


# ---------------------------------------------------------------------------------------------
# NumPy twins: the readable definition of each format.
# ---------------------------------------------------------------------------------------------

def _f16_ref(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32.   blocks: (n, B) -> (n, 1)"""
    return blocks[:, at:at + 2].view("<f2").astype(np.float32)


def _nibbles_ref(codes: np.ndarray) -> np.ndarray:
    """Low nibbles first, then high nibbles, as float32.   codes: (..., 16) uint8 -> (..., 32)"""
    return np.concatenate([codes & 0x0F, codes >> 4], axis=-1).astype(np.float32)


def dequantize_f16_ref(blocks: np.ndarray) -> np.ndarray:
    """w = the float16 itself.   blocks: (n, 2) uint8 -> (n, 1) float32"""
    return _f16_ref(blocks, 0)


def dequantize_q8_0_ref(blocks: np.ndarray) -> np.ndarray:
    """w = d * q.   blocks: (n, 34) uint8 -> (n, 32) float32"""
    return _f16_ref(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def dequantize_q4_0_ref(blocks: np.ndarray) -> np.ndarray:
    """w = d * (code - 8).   blocks: (n, 18) uint8 -> (n, 32) float32"""
    return _f16_ref(blocks, 0) * (_nibbles_ref(blocks[:, 2:]) - 8)


def dequantize_q4_1_ref(blocks: np.ndarray) -> np.ndarray:
    """w = d * code + m.   blocks: (n, 20) uint8 -> (n, 32) float32"""
    return _f16_ref(blocks, 0) * _nibbles_ref(blocks[:, 4:]) + _f16_ref(blocks, 2)


def dequantize_q6_k_ref(blocks: np.ndarray) -> np.ndarray:
    """w[i] = d * scale[i // 16] * (q[i] - 32), q 6 bits.   blocks: (n, 210) -> (n, 256) float32

    The 256 weights are two halves of 128. In half h, weight 32 * k + l (k < 4, l < 32) takes its
    low 4 bits from ql[64 h + l + 32 (k % 2)] (low nibble for k < 2, high for k >= 2) and its high
    2 bits from bits 2k, 2k + 1 of qh[32 h + l].
    """
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)                           # (n, half, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)                     # (n, half, 1, l)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)     # (n, 16)
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)               # (n, half, 128)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3       # (n, half, k, l)
    q = (lo | (hi.reshape(n, 2, 128) << 4)).reshape(n, 256)          # (n, 256) in 0..63
    ds = _f16_ref(blocks, 208) * scales                              # (n, 16) d * scale
    return np.repeat(ds, 16, axis=1) * (q.astype(np.float32) - 32)


# ---------------------------------------------------------------------------------------------
# numba kernels: one iteration per block, blocks in parallel (no block writes another's weights).
# ---------------------------------------------------------------------------------------------

_TWO_POW_M24 = np.float32(2.0 ** -24)  # value of the smallest float16 subnormal


@njit(cache=True)
def _f16(lo, hi):
    """The float16 stored little-endian in bytes (lo, hi), widened exactly to float32.

    float16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits. float32 has 8 exponent
    bits (bias 127) and 23 mantissa bits, so a normal half moves its exponent by 127 - 15 = 112
    and its mantissa up by 13 bits. Subnormal halves, mantissa * 2^-24, are normal floats.
    """
    h = np.int64(lo) | (np.int64(hi) << 8)
    sign = (h >> 15) << 31
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0x1F:                          # inf or nan: the float32 exponent is all ones
        return np.uint32(sign | 0x7F800000 | (mantissa << 13)).view(np.float32)
    if exponent > 0:
        return np.uint32(sign | ((exponent + 112) << 23) | (mantissa << 13)).view(np.float32)
    v = np.float32(mantissa) * _TWO_POW_M24       # zero or subnormal; exact
    return -v if sign else v


@njit(cache=True)
def _i8(byte):
    """A uint8 byte read as a two's-complement int8 (the same 8 bits: 255 is -1), as float32."""
    return np.float32(np.int8(byte))


@njit(cache=True, parallel=True)
def dequantize_f16_numba(blocks: np.ndarray) -> np.ndarray:
    """dequantize_f16_ref in a loop.   blocks: (n, 2) uint8 -> (n, 1) float32"""
    w = np.empty((blocks.shape[0], 1), np.float32)
    for b in prange(blocks.shape[0]):
        w[b, 0] = _f16(blocks[b, 0], blocks[b, 1])
    return w


@njit(cache=True, parallel=True)
def dequantize_q8_0_numba(blocks: np.ndarray) -> np.ndarray:
    """dequantize_q8_0_ref in a loop.   blocks: (n, 34) uint8 -> (n, 32) float32"""
    w = np.empty((blocks.shape[0], 32), np.float32)
    for b in prange(blocks.shape[0]):
        d = _f16(blocks[b, 0], blocks[b, 1])
        for j in range(32):
            w[b, j] = d * _i8(blocks[b, 2 + j])
    return w


@njit(cache=True, parallel=True)
def dequantize_q4_0_numba(blocks: np.ndarray) -> np.ndarray:
    """dequantize_q4_0_ref in a loop.   blocks: (n, 18) uint8 -> (n, 32) float32"""
    w = np.empty((blocks.shape[0], 32), np.float32)
    for b in prange(blocks.shape[0]):
        d = _f16(blocks[b, 0], blocks[b, 1])
        for j in range(16):
            byte = np.int64(blocks[b, 2 + j])
            w[b, j] = d * np.float32((byte & 0x0F) - 8)
            w[b, j + 16] = d * np.float32((byte >> 4) - 8)
    return w


@njit(cache=True, parallel=True)
def dequantize_q4_1_numba(blocks: np.ndarray) -> np.ndarray:
    """dequantize_q4_1_ref in a loop.   blocks: (n, 20) uint8 -> (n, 32) float32"""
    w = np.empty((blocks.shape[0], 32), np.float32)
    for b in prange(blocks.shape[0]):
        d = _f16(blocks[b, 0], blocks[b, 1])
        m = _f16(blocks[b, 2], blocks[b, 3])
        for j in range(16):
            byte = blocks[b, 4 + j]
            w[b, j] = d * np.float32(byte & 0x0F) + m
            w[b, j + 16] = d * np.float32(byte >> 4) + m
    return w


@njit(cache=True, parallel=True)
def dequantize_q6_k_numba(blocks: np.ndarray) -> np.ndarray:
    """dequantize_q6_k_ref in a loop (the bit layout is in its docstring).

    blocks: (n, 210) uint8 -> (n, 256) float32
    """
    w = np.empty((blocks.shape[0], 256), np.float32)
    for b in prange(blocks.shape[0]):
        d = _f16(blocks[b, 208], blocks[b, 209])
        for half in range(2):
            ql, qh, sc, out = 64 * half, 128 + 32 * half, 192 + 8 * half, 128 * half
            for l in range(32):
                lo0, lo1 = np.int64(blocks[b, ql + l]), np.int64(blocks[b, ql + 32 + l])
                h = np.int64(blocks[b, qh + l])
                q1 = (lo0 & 0x0F) | ((h & 3) << 4)
                q2 = (lo1 & 0x0F) | (((h >> 2) & 3) << 4)
                q3 = (lo0 >> 4) | (((h >> 4) & 3) << 4)
                q4 = (lo1 >> 4) | (((h >> 6) & 3) << 4)
                s = sc + l // 16                    # scale of weights l, 32+l, 64+l, 96+l
                w[b, out + l] = (d * _i8(blocks[b, s])) * np.float32(q1 - 32)
                w[b, out + 32 + l] = (d * _i8(blocks[b, s + 2])) * np.float32(q2 - 32)
                w[b, out + 64 + l] = (d * _i8(blocks[b, s + 4])) * np.float32(q3 - 32)
                w[b, out + 96 + l] = (d * _i8(blocks[b, s + 6])) * np.float32(q4 - 32)
    return w


# ---------------------------------------------------------------------------------------------
# Public names: the numba kernels unless TINYGPT_NUMBA=0.
# ---------------------------------------------------------------------------------------------

dequantize_f16 = pick(dequantize_f16_numba, dequantize_f16_ref)
dequantize_q8_0 = pick(dequantize_q8_0_numba, dequantize_q8_0_ref)
dequantize_q4_0 = pick(dequantize_q4_0_numba, dequantize_q4_0_ref)
dequantize_q4_1 = pick(dequantize_q4_1_numba, dequantize_q4_1_ref)
dequantize_q6_k = pick(dequantize_q6_k_numba, dequantize_q6_k_ref)

_DEQUANTIZE = {"F16": dequantize_f16, "Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0,
               "Q4_1": dequantize_q4_1, "Q6_K": dequantize_q6_k}
