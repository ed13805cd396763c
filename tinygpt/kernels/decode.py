"""Kernels for generation, where each token reads every weight once: memory-bound loops.

Training multiplies many tokens by each weight, so BLAS on the (in, out) layout wins. Decoding one
token is a matrix-vector product per layer, and its speed is how fast the weights stream from
memory. These loops read a *row-per-output* layout, W: (out, in), so each output is one contiguous
dot product (`prange` over rows, `kernels.base.FASTMATH` so the dot vectorises); weights may be smaller:

    float32          y[m, o] = sum_i W[o, i] x[m, i]
    int8 groups      y[m, o] = sum_g s[o, g] sum_{i in g} q[o, i] x[m, i]      (group 32 or a row)
    4-bit (Q4_1)     w = d * code + mn per group of 32 (codes packed two per byte, GGUF's order)

and the attention of the newest query over the KV cache, read in place (no slice copies, key/value
heads shared by query groups). M (the rows of x) is small in decoding (1) and prefill (the prompt):
each weight row is loaded once and used for all M rows. Every kernel has a NumPy twin `*_ref`, and
`TINYGPT_NUMBA=0` uses the twins, as in every kernel module (`kernels/base.py`).

    python -m pytest tests/test_decode.py -q
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from tinygpt.kernels.base import FASTMATH, pick

GROUP = 32                           # weights per quantization group (GGUF's block size)


# --- NumPy twins ----------------------------------------------------------------------------------

def matvec_f32_ref(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """w: (O, I) float32, x: (M, I) -> (M, O)."""
    return (x @ w.T).astype(np.float32, copy=False)


def matvec_i8_ref(q: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    """q: (O, I) int8, scale: (O, I // G) float32 (G = I for one scale per row), x: (M, I)."""
    O, I = q.shape
    G = I // scale.shape[1]
    w = (q.reshape(O, -1, G).astype(np.float32) * scale[:, :, None]).reshape(O, I)
    return x @ w.T


def matvec_q4_ref(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, x: np.ndarray) -> np.ndarray:
    """codes: (O, I // 2) uint8, two 4-bit codes per byte in GGUF's Q4_1 order (byte j of a group
    holds weight j in its low nibble and weight j + 16 in its high one); d, mn: (O, I // 32)."""
    O = codes.shape[0]
    c = codes.reshape(O, -1, GROUP // 2)
    q = np.concatenate([c & 0x0F, c >> 4], axis=-1).astype(np.float32)       # (O, I/32, 32)
    w = (q * d[:, :, None] + mn[:, :, None]).reshape(O, -1)
    return x @ w.T


def attend_one_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int) -> np.ndarray:
    """The newest query over the cache.   q: (B, NH, HS), k, v: (B, KV, capacity, HS) of which the
    first `length` positions are filled -> (B, NH, HS); query head h reads key/value head
    h // (NH / KV). No mask is needed: every cached position is in the query's past."""
    B, NH, HS = q.shape
    group = NH // k.shape[1]
    kk = np.repeat(k[:, :, :length], group, axis=1)                        # (B, NH, L, HS)
    vv = np.repeat(v[:, :, :length], group, axis=1)
    s = np.einsum("bhd,bhld->bhl", q, kk) / math.sqrt(HS)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhl,bhld->bhd", p, vv).astype(q.dtype, copy=False)


# --- numba kernels --------------------------------------------------------------------------------

# NOTE: each loop reads one weight row through a 1-D view (`w[o]`) and counts from 0 inside a
# group. Indexing `q[o, i]` over `range(g * G, (g + 1) * G)` computes the same sums but LLVM then
# does not vectorise the int8 loop: 6.6 ms instead of 53 us for a (1536, 576) product, measured.

@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_f32_numba(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    O, I = w.shape
    M = x.shape[0]
    y = np.empty((M, O), np.float32)
    for o in prange(O):
        row = w[o]
        for m in range(M):
            xm = x[m]
            acc = np.float32(0.0)
            for i in range(I):
                acc += row[i] * xm[i]
            y[m, o] = acc
    return y


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_i8_numba(q: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    O, I = q.shape
    n_groups = scale.shape[1]
    G = I // n_groups
    M = x.shape[0]
    y = np.empty((M, O), np.float32)
    for o in prange(O):
        row, s = q[o], scale[o]
        for m in range(M):
            xm = x[m]
            total = np.float32(0.0)
            for g in range(n_groups):
                base = g * G
                acc = np.float32(0.0)
                for i in range(G):
                    acc += np.float32(row[base + i]) * xm[base + i]
                total += acc * s[g]
            y[m, o] = total
    return y


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q4_numba(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, x: np.ndarray) -> np.ndarray:
    O = codes.shape[0]
    n_groups = d.shape[1]
    M = x.shape[0]
    half = GROUP // 2
    y = np.empty((M, O), np.float32)
    for o in prange(O):
        row, d_o, mn_o = codes[o], d[o], mn[o]
        for m in range(M):
            xm = x[m]
            total = np.float32(0.0)
            for g in range(n_groups):
                cb, xb = g * half, g * GROUP
                acc = np.float32(0.0)               # sum code * x over the group
                xs = np.float32(0.0)                # sum x over the group (for the offset mn)
                for j in range(half):
                    byte = row[cb + j]
                    x_lo, x_hi = xm[xb + j], xm[xb + half + j]
                    acc += np.float32(byte & 0x0F) * x_lo + np.float32(byte >> 4) * x_hi
                    xs += x_lo + x_hi
                total += d_o[g] * acc + mn_o[g] * xs
            y[m, o] = total
    return y


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def attend_one_numba(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int) -> np.ndarray:
    B, NH, HS = q.shape
    KV = k.shape[1]
    group = NH // KV
    scale = np.float32(1.0 / math.sqrt(HS))
    y = np.empty_like(q)
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        kv = h // group
        s = np.empty(length, np.float32)
        best = np.float32(-np.inf)
        for j in range(length):
            acc = np.float32(0.0)
            for c in range(HS):
                acc += q[b, h, c] * k[b, kv, j, c]
            s[j] = acc * scale
            best = max(best, s[j])
        total = np.float32(0.0)
        for j in range(length):
            s[j] = np.exp(s[j] - best)
            total += s[j]
        for c in range(HS):
            y[b, h, c] = 0.0
        for j in range(length):
            p = s[j] / total
            for c in range(HS):
                y[b, h, c] += p * v[b, kv, j, c]
    return y


matvec_f32 = pick(matvec_f32_numba, matvec_f32_ref)
matvec_i8 = pick(matvec_i8_numba, matvec_i8_ref)
matvec_q4 = pick(matvec_q4_numba, matvec_q4_ref)
attend_one = pick(attend_one_numba, attend_one_ref)


# --- quantizing a float32 (in, out) weight into a packed (out, in) one ------------------------------

def quantize_int8(w_out_in: np.ndarray, group: int | None = None,
                  rows_at_a_time: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per row (group=None) or per `group` weights:
    scale = max |w| / 127 over the group, q = round(w / scale).   (O, I) -> q (O, I), scale.

    Rows are quantized a block at a time, so the float temporaries stay small beside the
    weights (the 154 MB GPT-2 embedding would otherwise need ~600 MB of them at once)."""
    O, I = w_out_in.shape
    G = I if group is None else group
    if I % G:
        raise ValueError(f"quantize_int8: row length {I} is not a multiple of the group {G}")
    q = np.empty((O, I), np.int8)                      # C order: the kernels stream rows
    scale = np.empty((O, I // G), np.float32)
    for start in range(0, O, rows_at_a_time):
        rows = np.asarray(w_out_in[start:start + rows_at_a_time], np.float32)
        g = rows.reshape(len(rows), I // G, G)
        s = np.abs(g).max(axis=-1) / np.float32(127.0)                    # (rows, I/G)
        safe = np.where(s > 0, s, np.float32(1.0))
        q[start:start + len(rows)] = np.clip(np.rint(g / safe[:, :, None]), -127, 127
                                             ).reshape(len(rows), I)
        scale[start:start + len(rows)] = s
    return q, scale
