"""GPT-2's tanh-GELU, elementwise, forward and backward.

    python -m pytest tests/test_kernels.py -q
"""
import math

import numpy as np
from numba import prange

from tinygpt.kernels.base import fast_exp, jit_rows, pick


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + c x^3)))
GELU_C = 0.044715  # cubic coefficient of the tanh fit (Hendrycks & Gimpel, 2016)


def gelu_forward_ref(x: np.ndarray) -> np.ndarray:
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise.   x: (N,) -> y: (N,)"""
    t = np.tanh(SQRT_2_OVER_PI * (x + GELU_C * x ** 3))
    return 0.5 * x * (1.0 + t)


def gelu_backward_ref(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx), t = tanh(u).   x, dy: (N,) -> dx: (N,)"""
    t = np.tanh(SQRT_2_OVER_PI * (x + GELU_C * x ** 3))
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
    # 1 - t^2 written as (1 - t)(1 + t): exact factors, no cancellation when |t| -> 1
    return dy * (0.5 * (1.0 + t) + 0.5 * x * ((1.0 - t) * (1.0 + t)) * du)



# tanh-GELU with one exp: 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) = sigmoid(2u), so
#   y = x * sigmoid(2u),   dy/dx = s + x s (1 - s) 2 du/dx  with s = sigmoid(2u),
# using tanh' = 1 - tanh^2 = 4 s (1 - s). sigmoid form has no cancellation for large |x|.
# Constants are cast to x's dtype so float32 math stays float32 (8 lanes of AVX, not 4).

@jit_rows
def gelu_forward_numba(x: np.ndarray) -> np.ndarray:
    """y = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).   x: (N,) -> y: (N,)"""
    k, c = x.dtype.type(SQRT_2_OVER_PI), x.dtype.type(GELU_C)
    one, two = x.dtype.type(1.0), x.dtype.type(2.0)
    y = np.empty_like(x)
    for i in prange(x.shape[0]):
        xi = x[i]
        u = k * (xi + c * xi * xi * xi)
        y[i] = xi / (one + fast_exp(-two * u))
    return y


@jit_rows
def gelu_backward_numba(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy * s * (1 + 2 x (1 - s) du/dx), s = sigmoid(2u).   x, dy: (N,) -> dx: (N,)"""
    k, c = x.dtype.type(SQRT_2_OVER_PI), x.dtype.type(GELU_C)
    one, two, three = x.dtype.type(1.0), x.dtype.type(2.0), x.dtype.type(3.0)
    dx = np.empty_like(x)
    for i in prange(x.shape[0]):
        xi = x[i]
        u = k * (xi + c * xi * xi * xi)
        du = k * (one + three * c * xi * xi)
        s = one / (one + fast_exp(-two * u))
        dx[i] = dy[i] * s * (one + two * xi * (one - s) * du)
    return dx


gelu_forward = pick(gelu_forward_numba, gelu_forward_ref)
gelu_backward = pick(gelu_backward_numba, gelu_backward_ref)
