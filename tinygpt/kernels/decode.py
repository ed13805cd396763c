"""Kernels for generation, where each token reads every weight once: memory-bound loops.

Training multiplies many tokens by each weight, so BLAS on the (in, out) layout wins. Decoding one
token is a matrix-vector product per layer, and its speed is how fast the weights stream from
memory. These loops read a *row-per-output* layout, W: (out, in), so each output is one contiguous
dot product (`prange` over rows, `kernels.base.FASTMATH` so the dot vectorises); weights may be smaller:

    float32          y[m, o] = sum_i W[o, i] x[m, i]
    int8 groups      y[m, o] = sum_g s[o, g] sum_{i in g} q[o, i] x[m, i]      (group 32 or a row)
    4-bit (Q4_1)     w = d * code + mn per group of 32 (codes packed two per byte, GGUF's order)

With int8 activations (llama.cpp's way) the input row is first quantized to Q8_0 blocks of 32,
x[m, i] = xs[m, b] xq[m, i] with xq int8, and the weights' int8 (or 4-bit) codes meet it in
int32 dot products, one per block of 32, scaled once per block:

    int8 x int8      y[m, o] = sum_g s[o, g] sum_{b in g} xs[m, b] sum_{i in b} q[o, i] xq[m, i]
    4-bit x int8     y[m, o] = sum_b xs[m, b] (d[o, b] sum_{i in b} code[o, i] xq[m, i]
                                               + mn[o, b] sum_{i in b} xq[m, i])

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
from tinygpt.kernels.quant import _nibbles_ref      # GGUF's 4-bit order, low nibbles first

GROUP = 32                           # weights per quantization group (GGUF's block size)
INV_127 = np.float32(1.0 / 127.0)    # Q8_0's step is max |x| * this (a product, in both twins)


# --- NumPy twins ----------------------------------------------------------------------------------

def matvec_f32_ref(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """w: (O, I) float32, x: (M, I) -> (M, O)."""
    return (x @ w.T).astype(np.float32, copy=False)


def matvec_i8_ref(q: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    """q: (O, I) int8, scale: (O, I // G) float32 (G = I for one scale per row), x: (M, I)."""
    return x @ dequantize_i8_ref(q, scale).T


def dequantize_i8_ref(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weights (O, I) of int8 rows q with a scale per G weights."""
    O, I = q.shape
    G = I // scale.shape[1]
    return (q.reshape(O, -1, G).astype(np.float32) * scale[:, :, None]).reshape(O, I)


def matvec_q4_ref(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, x: np.ndarray) -> np.ndarray:
    """codes: (O, I // 2) uint8, two 4-bit codes per byte in GGUF's Q4_1 order (byte j of a group
    holds weight j in its low nibble and weight j + 16 in its high one); d, mn: (O, I // 32)."""
    return x @ dequantize_q4_ref(codes, d, mn).T


def dequantize_q4_ref(codes: np.ndarray, d: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The float32 weights (O, I) of 4-bit codes: w = d * code + mn per group of 32."""
    q = _nibbles_ref(codes.reshape(codes.shape[0], -1, GROUP // 2))          # (O, I/32, 32)
    return (q * d[:, :, None] + mn[:, :, None]).reshape(codes.shape[0], -1)


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


def rope_append_ref(qkv: np.ndarray, n_head: int, n_kv_head: int, cos: np.ndarray,
                    sin: np.ndarray, pos: int, k_cache: np.ndarray, v_cache: np.ndarray,
                    rotate: bool) -> np.ndarray:
    """One token's fused projection qkv (B, (NH + 2 KV) HS) -> its query (B, NH, HS); its key and
    value are written into the caches (B, KV, capacity, HS) at `pos`. With `rotate`, q and k turn
    by RoPE at `pos` (cos, sin: (positions, HS)), x cos + rotate_half(x) sin, rounded as
    `autograd.fused._rotate` rounds it."""
    B = qkv.shape[0]
    HS = k_cache.shape[3]
    q = qkv[:, :n_head * HS].reshape(B, n_head, HS)
    k = qkv[:, n_head * HS:(n_head + n_kv_head) * HS].reshape(B, n_kv_head, HS)
    v = qkv[:, (n_head + n_kv_head) * HS:].reshape(B, n_kv_head, HS)
    if rotate:
        c, s, half = cos[pos], sin[pos], HS // 2
        q, k = (x * c + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * s
                for x in (q, k))
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    return np.ascontiguousarray(q, dtype=np.float32)


def quantize_q8_0_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_0 activations: x (M, I) float32 -> xq (M, I) int8, xs (M, I / 32) float32 with
    xs = max |x| / 127 over each block of 32 and xq = rint(x * (1 / xs)), and xsum (M, I / 32) int32,
    the sum of each block's xq (the 4-bit kernels' offset term needs it)."""
    M, I = x.shape
    g = x.reshape(M, I // GROUP, GROUP).astype(np.float32, copy=False)
    xs = np.abs(g).max(axis=-1) * INV_127
    inv = np.where(xs > 0, np.float32(1.0) / np.where(xs > 0, xs, 1), np.float32(0.0))
    xq = np.rint(g * inv[:, :, None].astype(np.float32)).astype(np.int8)
    return xq.reshape(M, I), xs.astype(np.float32), xq.astype(np.int32).sum(axis=-1, dtype=np.int32)


def _block_dots_ref(codes: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """sum over each block of 32 of codes[o, i] xq[m, i], exactly.   -> (M, O, I / 32) int64"""
    O, I = codes.shape
    c = codes.reshape(O, I // GROUP, GROUP).astype(np.int64)
    x = xq.reshape(xq.shape[0], I // GROUP, GROUP).astype(np.int64)
    return np.einsum("obi,mbi->mob", c, x)


def matvec_i8_q8_ref(q: np.ndarray, scale: np.ndarray, xq: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """int8 weights (q, scale as in matvec_i8_ref, G a multiple of 32) times Q8_0 activations."""
    O, I = q.shape
    per_group = (I // scale.shape[1]) // GROUP                     # blocks of 32 per scale
    blocks = _block_dots_ref(q, xq) * xs[:, None, :].astype(np.float64)          # (M, O, I/32)
    groups = blocks.reshape(xq.shape[0], O, -1, per_group).sum(axis=-1)
    return (groups * scale[None]).sum(axis=-1).astype(np.float32)


def matvec_q4_q8_ref(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, xq: np.ndarray,
                     xs: np.ndarray, xsum: np.ndarray) -> np.ndarray:
    """Q4_1 codes (as matvec_q4_ref) times Q8_0 activations: w = d code + mn per block."""
    O = codes.shape[0]
    unpacked = _nibbles_ref(codes.reshape(O, -1, GROUP // 2)).reshape(O, -1)    # (O, I) 0..15
    dots = _block_dots_ref(unpacked, xq)                                         # (M, O, I/32)
    y = d[None] * dots + mn[None] * xsum[:, None, :].astype(np.float64)
    return (y * xs[:, None, :]).sum(axis=-1).astype(np.float32)


# --- numba kernels --------------------------------------------------------------------------------

# NOTE: each loop reads one weight row through a 1-D view (`w[o]`) and counts from 0 inside a
# group. Indexing `q[o, i]` over `range(g * G, (g + 1) * G)` computes the same sums but LLVM then
# does not vectorise the int8 loop: 6.6 ms instead of 53 us for a (1536, 576) product, measured.

@njit(cache=True, fastmath=FASTMATH, inline="always")
def _decode_q4_row(row: np.ndarray, d_o: np.ndarray, mn_o: np.ndarray, out: np.ndarray) -> None:
    """One row of 4-bit codes -> its float32 weights in `out` (low nibbles, then high ones)."""
    half = GROUP // 2
    for g in range(d_o.shape[0]):
        dg, mg, cb, wb = d_o[g], mn_o[g], g * half, g * GROUP
        for j in range(half):                        # low nibbles: weights 0..15
            out[wb + j] = np.float32(row[cb + j] & 0x0F) * dg + mg
        for j in range(half):                        # high nibbles: weights 16..31
            out[wb + half + j] = np.float32(row[cb + j] >> 4) * dg + mg


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_f32_numba(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    O, I = w.shape
    M = x.shape[0]
    y = np.empty((M, O), np.float32)
    for o in prange(O):
        row = w[o]
        for m in range(M):
            y[m, o] = _dot(row, x[m])
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


ROWS_PER_TASK = 16                   # weight rows one prange task decodes into its scratch tile


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dots_4x4(w: np.ndarray, r: int, x: np.ndarray, m: int, y: np.ndarray, o: int) -> None:
    """y[m + b, o + a] = w[r + a] . x[m + b] for a, b < 4: sixteen dot products in one pass, so
    each loaded element of a weight row meets four input rows (and each input element four
    weight rows) while in a register. 1.4x the one-dot-at-a-time loop at 16 rows (Zen 4)."""
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for i in range(w.shape[1]):
        p0, p1, p2, p3 = w0[i], w1[i], w2[i], w3[i]
        q0, q1, q2, q3 = x0[i], x1[i], x2[i], x3[i]
        a00 += p0 * q0; a01 += p0 * q1; a02 += p0 * q2; a03 += p0 * q3   # noqa: E702
        a10 += p1 * q0; a11 += p1 * q1; a12 += p1 * q2; a13 += p1 * q3   # noqa: E702
        a20 += p2 * q0; a21 += p2 * q1; a22 += p2 * q2; a23 += p2 * q3   # noqa: E702
        a30 += p3 * q0; a31 += p3 * q1; a32 += p3 * q2; a33 += p3 * q3   # noqa: E702
    y[m, o], y[m + 1, o], y[m + 2, o], y[m + 3, o] = a00, a01, a02, a03
    y[m, o + 1], y[m + 1, o + 1], y[m + 2, o + 1], y[m + 3, o + 1] = a10, a11, a12, a13
    y[m, o + 2], y[m + 1, o + 2], y[m + 2, o + 2], y[m + 3, o + 2] = a20, a21, a22, a23
    y[m, o + 3], y[m + 1, o + 3], y[m + 2, o + 3], y[m + 3, o + 3] = a30, a31, a32, a33


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec_q4_rows(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A prompt's product: each task decodes ROWS_PER_TASK weight rows once into a float32 tile,
    then multiplies the tile by every row of x, four by four (`_dots_4x4`), the edges one by one."""
    O = d.shape[0]
    M, I = x.shape
    y = np.empty((M, O), np.float32)
    for task in prange((O + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        w = np.empty((ROWS_PER_TASK, I), np.float32)
        o0 = task * ROWS_PER_TASK
        n = min(O, o0 + ROWS_PER_TASK) - o0
        for r in range(n):
            _decode_q4_row(codes[o0 + r], d[o0 + r], mn[o0 + r], w[r])
        n4, M4 = n - n % 4, M - M % 4                  # what the 4 x 4 blocks cover
        for r in range(0, n4, 4):
            for m in range(0, M4, 4):
                _dots_4x4(w, r, x, m, y, o0 + r)
        for a in range(n4):                            # the last rows of x
            for m in range(M4, M):
                y[m, o0 + a] = _dot(w[a], x[m])
        for a in range(n4, n):                         # the last weight rows, every row of x
            for m in range(M):
                y[m, o0 + a] = _dot(w[a], x[m])
    return y


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q4_numba(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, x: np.ndarray) -> np.ndarray:
    O = codes.shape[0]
    n_groups = d.shape[1]
    M = x.shape[0]
    if M > 1:                        # a prompt: decode each row once, then M float dot products
        return _matvec_q4_rows(codes, d, mn, x)
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


@njit(cache=True)                # no fastmath: no fused multiply-add, so it rounds as NumPy does
def rope_append_numba(qkv: np.ndarray, n_head: int, n_kv_head: int, cos: np.ndarray,
                      sin: np.ndarray, pos: int, k_cache: np.ndarray, v_cache: np.ndarray,
                      rotate: bool) -> np.ndarray:
    B = qkv.shape[0]
    HS = k_cache.shape[3]
    half = HS // 2
    q = np.empty((B, n_head, HS), np.float32)
    for b in range(B):
        row = qkv[b]
        for h in range(n_head + n_kv_head):
            x = row[h * HS:(h + 1) * HS]
            out = q[b, h] if h < n_head else k_cache[b, h - n_head, pos]
            if rotate:
                for i in range(half):
                    out[i] = x[i] * cos[pos, i] + (-x[i + half]) * sin[pos, i]
                    out[i + half] = x[i + half] * cos[pos, i + half] + x[i] * sin[pos, i + half]
            else:
                for i in range(HS):
                    out[i] = x[i]
        for h in range(n_kv_head):
            x = row[(n_head + n_kv_head + h) * HS:(n_head + n_kv_head + h + 1) * HS]
            for i in range(HS):
                v_cache[b, h, pos, i] = x[i]
    return q


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


# NOTE: in the int8 x int8 loops the block length B is read from the arrays' shapes, not the
# constant 32: with a constant trip count of 32, LLVM unrolls the loop before it can vectorise
# it and the sums stay scalar (6.6 GB/s of int8 instead of 13.8 for a (2304, 768) product, Zen 4).
# np.int32(...) around each sum keeps it 32 bits wide (numba widens integer arithmetic to 64).

@njit(cache=True, parallel=True, fastmath=FASTMATH)
def quantize_q8_0_numba(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    M, I = x.shape
    nb = I // GROUP
    xq = np.empty((M, I), np.int8)
    xs = np.empty((M, nb), np.float32)
    xsum = np.empty((M, nb), np.int32)
    for mb in prange(M * nb):
        m, b = mb // nb, mb % nb
        xm = x[m]
        amax = np.float32(0.0)
        for i in range(b * GROUP, (b + 1) * GROUP):
            amax = max(amax, abs(xm[i]))
        s = amax * INV_127
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        total = 0
        for i in range(b * GROUP, (b + 1) * GROUP):
            v = np.int8(np.rint(xm[i] * inv))
            xq[m, i] = v
            total += v
        xs[m, b] = s
        xsum[m, b] = total
    return xq, xs, xsum


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_i8_q8_numba(q: np.ndarray, scale: np.ndarray, xq: np.ndarray,
                       xs: np.ndarray) -> np.ndarray:
    O, I = q.shape
    M, nb = xs.shape
    B = I // nb                                       # 32, but not a compile-time constant
    per_group = nb // scale.shape[1]                  # blocks of 32 per weight scale
    y = np.empty((M, O), np.float32)
    for o in prange(O):
        row, s = q[o], scale[o]
        for m in range(M):
            xm, sm = xq[m], xs[m]
            total = np.float32(0.0)
            for b in range(nb):
                base = b * B
                acc = np.int32(0)
                for i in range(B):
                    acc = np.int32(acc + np.int32(row[base + i]) * np.int32(xm[base + i]))
                total += np.float32(acc) * (sm[b] * s[b // per_group])
            y[m, o] = total
    return y


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q4_q8_numba(codes: np.ndarray, d: np.ndarray, mn: np.ndarray, xq: np.ndarray,
                       xs: np.ndarray, xsum: np.ndarray) -> np.ndarray:
    O = codes.shape[0]
    M, nb = xs.shape
    H = codes.shape[1] // nb                          # 16 bytes of codes per block
    y = np.empty((M, O), np.float32)
    for o in prange(O):
        row, d_o, mn_o = codes[o], d[o], mn[o]
        for m in range(M):
            xm, sm, sum_m = xq[m], xs[m], xsum[m]
            total = np.float32(0.0)
            for b in range(nb):
                cb, xb = b * H, 2 * b * H
                acc = np.int32(0)                    # low nibbles: weights 0..15 of the block
                for j in range(H):
                    acc = np.int32(acc + np.int32(row[cb + j] & 0x0F) * np.int32(xm[xb + j]))
                for j in range(H):                   # high nibbles: weights 16..31
                    acc = np.int32(acc + np.int32(row[cb + j] >> 4) * np.int32(xm[xb + H + j]))
                total += sm[b] * (d_o[b] * np.float32(acc) + mn_o[b] * np.float32(sum_m[b]))
            y[m, o] = total
    return y


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def dequantize_i8_numba(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    O, I = q.shape
    n_groups = scale.shape[1]
    G = I // n_groups
    w = np.empty((O, I), np.float32)
    for o in prange(O):
        row, out = q[o], w[o]
        for g in range(n_groups):
            s = scale[o, g]
            for i in range(g * G, (g + 1) * G):
                out[i] = np.float32(row[i]) * s
    return w


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def dequantize_q4_numba(codes: np.ndarray, d: np.ndarray, mn: np.ndarray) -> np.ndarray:
    O, nb = d.shape
    w = np.empty((O, nb * GROUP), np.float32)
    for o in prange(O):
        _decode_q4_row(codes[o], d[o], mn[o], w[o])
    return w


matvec_f32 = pick(matvec_f32_numba, matvec_f32_ref)
matvec_i8 = pick(matvec_i8_numba, matvec_i8_ref)
matvec_q4 = pick(matvec_q4_numba, matvec_q4_ref)
attend_one = pick(attend_one_numba, attend_one_ref)
rope_append = pick(rope_append_numba, rope_append_ref)
dequantize_i8 = pick(dequantize_i8_numba, dequantize_i8_ref)
dequantize_q4 = pick(dequantize_q4_numba, dequantize_q4_ref)
quantize_q8_0 = pick(quantize_q8_0_numba, quantize_q8_0_ref)
matvec_i8_q8 = pick(matvec_i8_q8_numba, matvec_i8_q8_ref)
matvec_q4_q8 = pick(matvec_q4_q8_numba, matvec_q4_q8_ref)


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
