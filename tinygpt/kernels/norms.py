"""LayerNorm (GPT-2) and RMSNorm (Llama) over the last axis, forward and backward.

    python -m pytest tests/test_kernels.py -q
"""
import math

import numpy as np
from numba import prange

from tinygpt.kernels.base import jit_rows, pick


def layer_norm_forward_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps), biased variance per row.

    x: (R, C), w, b: (C,) -> y: (R, C), mean: (R,), rstd: (R,)
    """
    mean = x.mean(axis=-1)                                   # (R,)
    xc = x - mean[:, None]                                   # (R, C)
    rstd = (1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)).astype(x.dtype, copy=False)  # (R,)
    return xc * rstd[:, None] * w + b, mean, rstd


def layer_norm_backward_ref(dy: np.ndarray, x: np.ndarray, w: np.ndarray, mean: np.ndarray,
                            rstd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of LayerNorm.   dy, x: (R, C), w: (C,), mean, rstd: (R,) -> dx (R, C), dw, db (C,)

    With xhat = (x - mean) * rstd and g = dy * w, differentiating through mean and rstd gives
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per row; dw = sum_rows(dy * xhat), db = sum_rows(dy).
    """
    xhat = (x - mean[:, None]) * rstd[:, None]               # (R, C)
    g = dy * w                                               # (R, C)
    dx = rstd[:, None] * (g - g.mean(axis=-1, keepdims=True)
                          - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


@jit_rows
def layer_norm_forward_numba(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = (x - mean) * rstd * w + b per row (two passes: mean, then variance about the mean).

    x: (R, C), w, b: (C,) -> y: (R, C), mean: (R,), rstd: (R,)
    """
    R, C = x.shape
    y = np.empty_like(x)
    mean = np.empty(R, x.dtype)
    rstd = np.empty(R, x.dtype)
    for row in prange(R):
        s = 0.0
        for c in range(C):
            s += x[row, c]
        m = s / C
        v = 0.0
        for c in range(C):
            v += (x[row, c] - m) ** 2
        rs = 1.0 / math.sqrt(v / C + eps)
        for c in range(C):
            y[row, c] = (x[row, c] - m) * rs * w[c] + b[c]
        mean[row] = m
        rstd[row] = rs
    return y, mean, rstd


LN_BLOCK = 32  # rows per partial sum of dw, db: fixed, so results don't depend on thread count


@jit_rows
def layer_norm_backward_numba(dy: np.ndarray, x: np.ndarray, w: np.ndarray, mean: np.ndarray,
                              rstd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of LayerNorm (math in layer_norm_backward_ref).

    dx is per row. dw, db sum over rows, so each block of LN_BLOCK rows writes its own partial
    row (no two threads touch one accumulator) and the partials are summed at the end.
    dy, x: (R, C), w: (C,), mean, rstd: (R,) -> dx: (R, C), dw: (C,), db: (C,)
    """
    R, C = x.shape
    n_blocks = (R + LN_BLOCK - 1) // LN_BLOCK
    dx = np.empty_like(x)
    dw_part = np.zeros((n_blocks, C), x.dtype)
    db_part = np.zeros((n_blocks, C), x.dtype)
    for blk in prange(n_blocks):
        for row in range(blk * LN_BLOCK, min(R, (blk + 1) * LN_BLOCK)):
            m, rs = mean[row], rstd[row]
            g_mean = 0.0                                    # mean(g), g = dy * w
            gx_mean = 0.0                                   # mean(g * xhat)
            for c in range(C):
                xhat = (x[row, c] - m) * rs
                g = dy[row, c] * w[c]
                g_mean += g
                gx_mean += g * xhat
                dw_part[blk, c] += dy[row, c] * xhat
                db_part[blk, c] += dy[row, c]
            g_mean /= C
            gx_mean /= C
            for c in range(C):
                xhat = (x[row, c] - m) * rs
                dx[row, c] = rs * (dy[row, c] * w[c] - g_mean - xhat * gx_mean)
    return dx, dw_part.sum(axis=0), db_part.sum(axis=0)


layer_norm_forward = pick(layer_norm_forward_numba, layer_norm_forward_ref)
layer_norm_backward = pick(layer_norm_backward_numba, layer_norm_backward_ref)


def rms_norm_forward_ref(x: np.ndarray, w: np.ndarray, eps: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row (Llama's RMSNorm: no mean, no bias).

    x: (R, C), w: (C,) -> y: (R, C), rstd: (R,)
    """
    rstd = (1.0 / np.sqrt((x * x).mean(axis=-1) + eps)).astype(x.dtype, copy=False)   # (R,)
    return x * rstd[:, None] * w, rstd


def rms_norm_backward_ref(dy: np.ndarray, x: np.ndarray, w: np.ndarray, rstd: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of RMSNorm.   dy, x: (R, C), w: (C,), rstd: (R,) -> dx: (R, C), dw: (C,)

    With xhat = x * rstd and g = dy * w, d rstd / dx = -rstd^3 x / C gives
    dx = rstd * (g - xhat * mean(g * xhat)) per row (LayerNorm's formula without the mean term).
    """
    xhat = x * rstd[:, None]                                 # (R, C)
    g = dy * w                                               # (R, C)
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0)


@jit_rows
def rms_norm_forward_numba(x: np.ndarray, w: np.ndarray, eps: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """y = x * rstd * w per row, rstd = 1 / sqrt(mean(x^2) + eps).   x: (R, C) -> y, rstd: (R,)"""
    R, C = x.shape
    y = np.empty_like(x)
    rstd = np.empty(R, x.dtype)
    for row in prange(R):
        ss = 0.0
        for c in range(C):
            ss += x[row, c] * x[row, c]
        rs = 1.0 / math.sqrt(ss / C + eps)
        for c in range(C):
            y[row, c] = x[row, c] * rs * w[c]
        rstd[row] = rs
    return y, rstd


@jit_rows
def rms_norm_backward_numba(dy: np.ndarray, x: np.ndarray, w: np.ndarray, rstd: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of RMSNorm (math in rms_norm_backward_ref); dw in LN_BLOCK-row partials as in
    layer_norm_backward_numba.   dy, x: (R, C), w: (C,), rstd: (R,) -> dx: (R, C), dw: (C,)"""
    R, C = x.shape
    n_blocks = (R + LN_BLOCK - 1) // LN_BLOCK
    dx = np.empty_like(x)
    dw_part = np.zeros((n_blocks, C), x.dtype)
    for blk in prange(n_blocks):
        for row in range(blk * LN_BLOCK, min(R, (blk + 1) * LN_BLOCK)):
            rs = rstd[row]
            gx_mean = 0.0                                   # mean(g * xhat), g = dy * w
            for c in range(C):
                xhat = x[row, c] * rs
                gx_mean += dy[row, c] * w[c] * xhat
                dw_part[blk, c] += dy[row, c] * xhat
            gx_mean /= C
            for c in range(C):
                dx[row, c] = rs * (dy[row, c] * w[c] - x[row, c] * rs * gx_mean)
    return dx, dw_part.sum(axis=0)


rms_norm_forward = pick(rms_norm_forward_numba, rms_norm_forward_ref)
rms_norm_backward = pick(rms_norm_backward_numba, rms_norm_backward_ref)
