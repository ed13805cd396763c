"""Softmax over the last axis, forward and backward.

    python -m pytest tests/test_kernels.py -q
"""
import numpy as np
from numba import prange

from tinygpt.kernels.base import fast_exp, jit_rows, pick


def softmax_forward_ref(x: np.ndarray) -> np.ndarray:
    """y = exp(x - max) / sum(exp(x - max)) per row.   x: (R, N) -> y: (R, N)"""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the row max so exp cannot overflow
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward_ref(y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = y * (dy - sum(dy * y)) per row (Jacobian diag(y) - y y^T).   y, dy: (R, N) -> (R, N)"""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


@jit_rows
def softmax_forward_numba(x: np.ndarray) -> np.ndarray:
    """y = exp(x - max) / sum(exp(x - max)) per row, one pass per row.   x: (R, N) -> y: (R, N)"""
    R, N = x.shape
    y = np.empty_like(x)
    for row in prange(R):
        m = x[row, 0]
        for i in range(1, N):
            m = max(m, x[row, i])
        s = 0.0
        for i in range(N):
            e = fast_exp(x[row, i] - m)                         # <= 1: cannot overflow
            y[row, i] = e
            s += e
        inv = 1.0 / s
        for i in range(N):
            y[row, i] *= inv
    return y


@jit_rows
def softmax_backward_numba(y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = y * (dy - sum(dy * y)) per row.   y, dy: (R, N) -> dx: (R, N)"""
    R, N = y.shape
    dx = np.empty_like(y)
    for row in prange(R):
        d = 0.0
        for i in range(N):
            d += dy[row, i] * y[row, i]
        for i in range(N):
            dx[row, i] = y[row, i] * (dy[row, i] - d)
    return dx


softmax_forward = pick(softmax_forward_numba, softmax_forward_ref)
softmax_backward = pick(softmax_backward_numba, softmax_backward_ref)
