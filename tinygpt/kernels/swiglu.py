"""Llama's SwiGLU gate, elementwise, forward and backward: y = silu(a) * b = a sigmoid(a) b.

One op instead of SiLU then a product: a training step keeps the two inputs only (not sigmoid(a),
silu(a) and the product as well), and the backward makes its two gradients in one pass.

    python -m pytest tests/test_kernels.py -q
"""
import numpy as np
from numba import prange

from tinygpt.kernels.base import fast_exp, jit_rows, pick


def swiglu_forward_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = a sigmoid(a) b.   a, b: (N,) -> y: (N,)"""
    return a / (1.0 + np.exp(-a)) * b


def swiglu_backward_ref(a: np.ndarray, b: np.ndarray, dy: np.ndarray) -> tuple:
    """da = dy b s (1 + a (1 - s)), db = dy a s, s = sigmoid(a).   a, b, dy: (N,) -> (da, db)"""
    s = 1.0 / (1.0 + np.exp(-a))
    return dy * b * s * (1.0 + a * (1.0 - s)), dy * a * s


@jit_rows
def swiglu_forward_numba(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = a sigmoid(a) b.   a, b: (N,) -> y: (N,)"""
    one = a.dtype.type(1.0)
    y = np.empty_like(a)
    for i in prange(a.shape[0]):
        y[i] = a[i] / (one + fast_exp(-a[i])) * b[i]
    return y


@jit_rows
def swiglu_backward_numba(a: np.ndarray, b: np.ndarray, dy: np.ndarray) -> tuple:
    """da = dy b s (1 + a (1 - s)), db = dy a s, s = sigmoid(a).   a, b, dy: (N,) -> (da, db)"""
    one = a.dtype.type(1.0)
    da, db = np.empty_like(a), np.empty_like(a)
    for i in prange(a.shape[0]):
        ai = a[i]
        s = one / (one + fast_exp(-ai))
        da[i] = dy[i] * b[i] * s * (one + ai * (one - s))
        db[i] = dy[i] * ai * s
    return da, db


swiglu_forward = pick(swiglu_forward_numba, swiglu_forward_ref)
swiglu_backward = pick(swiglu_backward_numba, swiglu_backward_ref)
