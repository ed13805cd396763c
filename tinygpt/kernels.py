"""Hot loops of tinygpt: each kernel as a NumPy reference twin `X_ref` and a fast `X_numba`.

This module owns the fused, performance-critical pieces of math (softmax, LayerNorm, RMSNorm, tanh-GELU,
cross-entropy from logits, causal attention, the AdamW update), each on plain contiguous arrays. It knows nothing
about `Tensor` or autograd: `fused.py` reshapes its inputs and calls the public names below.

Every public name `X` is bound at import to `X_numba`, or to `X_ref` when the environment has
`TINYGPT_NUMBA=0` (debugging, or no numba). Kernels return new arrays, keep the input dtype
(float32 for training, float64 for gradient checks) and never write into their inputs, except
`adamw_update`, whose whole point is to update the parameters and moments in place.

Benchmark: `python -m tinygpt.bench kernels`.   Tests: `pytest tests/test_kernels.py`.
"""
import functools
import math
import os
import types as types_

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

USE_NUMBA = os.environ.get("TINYGPT_NUMBA", "1") != "0"

# NOTE: numba's parallel loops run on OpenMP (libgomp) where it is installed, with the short spin
# runtime.py sets, and on "workqueue" threads otherwise (TBB last). See runtime.py, point 2,
# for why both the layer and the spin matter. NUMBA_THREADING_LAYER chooses another layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # tanh-GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + c x^3)))
GELU_C = 0.044715  # cubic coefficient of the tanh fit (Hendrycks & Gimpel, 2016)


# ---------------------------------------------------------------------------------------------
# NumPy reference twins: short, vectorised, the readable definition of each kernel.
# ---------------------------------------------------------------------------------------------

def softmax_forward_ref(x: np.ndarray) -> np.ndarray:
    """y = exp(x - max) / sum(exp(x - max)) per row.   x: (R, N) -> y: (R, N)"""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the row max so exp cannot overflow
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward_ref(y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = y * (dy - sum(dy * y)) per row (Jacobian diag(y) - y y^T).   y, dy: (R, N) -> (R, N)"""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


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


def _check_targets(targets: np.ndarray, V: int, ignore_index: int) -> None:
    """Raise ValueError if a target id outside [0, V) is not ignore_index (one vectorised test)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"target id {int(targets[bad][0])} is outside [0, {V}) for vocab size "
                         f"V={V} (and is not ignore_index={ignore_index})")


def _kept_rows(targets: np.ndarray, V: int, ignore_index: int) -> np.ndarray:
    """(R,) bool: rows that contribute to the loss (target in [0, V) and not ignore_index)."""
    return (targets != ignore_index) & (targets >= 0) & (targets < V)


def cross_entropy_forward_ref(logits: np.ndarray, targets: np.ndarray, ignore_index: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """losses[r] = lse[r] - logits[r, targets[r]] (0 where ignored), lse = logsumexp of row r.

    logits: (R, V), targets: (R,) int -> losses: (R,), lse: (R,)
    """
    R, V = logits.shape
    _check_targets(targets, V, ignore_index)
    m = logits.max(axis=-1)                                  # (R,) max first: exp cannot overflow
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=-1))
    keep = _kept_rows(targets, V, ignore_index)
    picked = logits[np.arange(R), np.where(keep, targets, 0)]
    return np.where(keep, lse - picked, 0.0).astype(logits.dtype), lse


def cross_entropy_backward_ref(logits: np.ndarray, targets: np.ndarray, lse: np.ndarray,
                               dloss: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """dlogits[r] = (softmax(logits[r]) - onehot(targets[r])) * dloss[r]; zero rows where ignored.

    A row is ignored when its target is ignore_index or outside [0, V) (the forward already
    rejected every other out-of-range id).
    logits: (R, V), targets, lse, dloss: (R,) -> dlogits: (R, V)
    """
    R, V = logits.shape
    keep = _kept_rows(targets, V, ignore_index)
    p = np.exp(logits - lse[:, None])                        # softmax, from the saved logsumexp
    p[np.arange(R)[keep], targets[keep]] -= 1.0
    return p * np.where(keep, dloss, 0.0).astype(logits.dtype)[:, None]


def _causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """True where query i may NOT see key j: j > i + (Tk - Tq) (the queries are the last Tq)."""
    return np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + (Tk - Tq)


def attention_forward_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention.  p = softmax(scale q k^T) with masked entries 0, y = p v.

    q: (N, Tq, HS), k, v: (N, Tk, HS), Tk >= Tq -> y: (N, Tq, HS), p: (N, Tq, Tk)
    """
    Tq, Tk = q.shape[1], k.shape[1]
    s = q @ k.swapaxes(-1, -2)                                # (N, Tq, Tk)
    s *= scale                                                # in place: keeps float32 float32
    s[:, _causal_mask(Tq, Tk)] = -np.inf                     # exp(-inf) = 0 exactly
    p = softmax_forward_ref(s.reshape(-1, Tk)).reshape(s.shape)
    return p @ v, p


def attention_backward_ref(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           p: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of causal attention.   dy, q: (N, Tq, HS), k, v: (N, Tk, HS), p: (N, Tq, Tk)

    dv = p^T dy, dp = dy v^T, ds = p * (dp - rowsum(dp * p)) (softmax backward; masked p are 0,
    so masked ds are 0), then s = scale q k^T gives dq = scale ds k and dk = scale ds^T q.
    """
    dv = p.swapaxes(-1, -2) @ dy                              # (N, Tk, HS)
    dp = dy @ v.swapaxes(-1, -2)                              # (N, Tq, Tk)
    ds = softmax_backward_ref(p.reshape(-1, p.shape[-1]), dp.reshape(-1, p.shape[-1]))
    ds = ds.reshape(p.shape)
    ds *= scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def adamw_update_ref(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                     grad_scale: float, b1: float, b2: float, eps: float, step_size: float,
                     inv_sqrt_bc2: float, decay: float) -> None:
    """One AdamW step in place (math in optim.py); p, g, m, v: 1-D, same length and dtype.

    g is read, never written; Python float scalars keep float32 arrays float32 (NumPy 2).
    """
    g = g * grad_scale
    m *= b1
    m += (1.0 - b1) * g                            # m = b1 m + (1 - b1) g
    v *= b2
    v += (1.0 - b2) * (g * g)                      # v = b2 v + (1 - b2) g^2
    p *= decay                                     # decoupled: p *= 1 - lr * wd
    p -= step_size * m / (np.sqrt(v) * inv_sqrt_bc2 + eps)


# ---------------------------------------------------------------------------------------------
# A vectorisable exp. numba has no SVML, so np.exp inside an @njit loop is a scalar libm call
# (slow) and stops the loop from vectorising. This one is only +, *, floor and a bit trick, so
# LLVM turns the loops below into AVX code. Both dtypes are within a few ulp of np.exp
# (tests/test_kernels.py::test_exp_matches_numpy measures it).
#   exp(x) = 2^k * exp(r),  k = round(x / ln 2),  r = x - k ln 2 in [-ln2/2, ln2/2]
# exp(r) is a short polynomial; 2^k is built directly from its IEEE-754 exponent bits.
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
# float32: Cephes expf. ln 2 split in two so k * LN2_HI is exact; polynomial error < 1 ulp.
_F32_MAX_X, _F32_MIN_X = np.float32(88.37626), np.float32(-87.33654)  # keeps 2^k a normal float
_F32_LN2_HI, _F32_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_F32_LOG2E, _F32_HALF, _F32_ONE = np.float32(LOG2E), np.float32(0.5), np.float32(1.0)
_F32_P0, _F32_P1, _F32_P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), \
    np.float32(8.3334519073e-3)
_F32_P3, _F32_P4, _F32_P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), \
    np.float32(5.0000001201e-1)
# float64: Cephes' split of ln 2 and the Taylor series of exp(r) to r^13 (truncation < 1e-17).
_F64_MAX_X, _F64_MIN_X = 709.0, -708.0
_F64_LN2_HI, _F64_LN2_LO = 6.93145751953125e-1, 1.42860682030941723212e-6


def _exp(x):
    """exp(x) for one float32 or float64 inside numba code (the overload below picks the body)."""
    return math.exp(x)


@njit(cache=True, fastmath={"contract"})    # no "reassoc": it would undo the split of ln 2
def _exp_f32(x):
    xc = min(max(x, _F32_MIN_X), _F32_MAX_X)
    k = np.floor(xc * _F32_LOG2E + _F32_HALF)
    r = xc - k * _F32_LN2_HI - k * _F32_LN2_LO
    p = ((((_F32_P0 * r + _F32_P1) * r + _F32_P2) * r + _F32_P3) * r + _F32_P4) * r + _F32_P5
    p = p * r * r + r + _F32_ONE
    two_k = np.uint32((np.int32(k) + 127) << 23).view(np.float32)  # exponent field = k + bias
    y = p * two_k if x >= _F32_MIN_X else np.float32(0.0)  # below: under the smallest normal
    return y if x <= _F32_MAX_X else np.float32(np.inf)


@njit(cache=True, fastmath={"contract"})
def _exp_f64(x):
    xc = min(max(x, _F64_MIN_X), _F64_MAX_X)
    k = np.floor(xc * LOG2E + 0.5)
    r = xc - k * _F64_LN2_HI - k * _F64_LN2_LO
    p = 1.0 / 6227020800.0                                  # Horner, from 1/13! down to 1/0!
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    two_k = np.uint64((np.int64(k) + 1023) << 52).view(np.float64)
    y = p * two_k if x >= _F64_MIN_X else 0.0
    return y if x <= _F64_MAX_X else np.inf


@overload(_exp)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: _exp_f64(x)


# Loops may reorder sums (so they vectorise) and fuse a*b+c; no assumption that inputs are finite.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}

# Starting numba's thread pool costs ~100 us, more than a one-row LayerNorm takes (~6 us): a
# decoding step calls these kernels on single rows dozens of times. Inputs smaller than this many
# elements run a serial compile of the same loop.
PARALLEL_MIN_SIZE = 1 << 15


def _jit(fn):
    """Compile `fn` twice, parallel over rows (prange) and serial, and pick by input size."""
    parallel = njit(cache=True, parallel=True, fastmath=_FASTMATH)(fn)
    # a copy under its own name, so numba's on-disk cache keeps the two compiles apart
    serial_fn = types_.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                    fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    serial = njit(cache=True, fastmath=_FASTMATH)(serial_fn)

    @functools.wraps(fn)
    def run(*args):
        return (parallel if args[0].size >= PARALLEL_MIN_SIZE else serial)(*args)

    run.parallel, run.serial = parallel, serial
    return run


@_jit
def _exp_numba(x: np.ndarray) -> np.ndarray:
    """Elementwise _exp (for tests and the bench).   x: (N,) -> (N,)"""
    y = np.empty_like(x)
    for i in prange(x.shape[0]):
        y[i] = _exp(x[i])
    return y


# ---------------------------------------------------------------------------------------------
# numba kernels. prange runs over independent rows; sums accumulate in float64.
# ---------------------------------------------------------------------------------------------

@_jit
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
            e = _exp(x[row, i] - m)                         # <= 1: cannot overflow
            y[row, i] = e
            s += e
        inv = 1.0 / s
        for i in range(N):
            y[row, i] *= inv
    return y


@_jit
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


@_jit
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


@_jit
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


@_jit
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


@_jit
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


# tanh-GELU with one exp: 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) = sigmoid(2u), so
#   y = x * sigmoid(2u),   dy/dx = s + x s (1 - s) 2 du/dx  with s = sigmoid(2u),
# using tanh' = 1 - tanh^2 = 4 s (1 - s). sigmoid form has no cancellation for large |x|.
# Constants are cast to x's dtype so float32 math stays float32 (8 lanes of AVX, not 4).

@_jit
def gelu_forward_numba(x: np.ndarray) -> np.ndarray:
    """y = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).   x: (N,) -> y: (N,)"""
    k, c = x.dtype.type(SQRT_2_OVER_PI), x.dtype.type(GELU_C)
    one, two = x.dtype.type(1.0), x.dtype.type(2.0)
    y = np.empty_like(x)
    for i in prange(x.shape[0]):
        xi = x[i]
        u = k * (xi + c * xi * xi * xi)
        y[i] = xi / (one + _exp(-two * u))
    return y


@_jit
def gelu_backward_numba(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy * s * (1 + 2 x (1 - s) du/dx), s = sigmoid(2u).   x, dy: (N,) -> dx: (N,)"""
    k, c = x.dtype.type(SQRT_2_OVER_PI), x.dtype.type(GELU_C)
    one, two, three = x.dtype.type(1.0), x.dtype.type(2.0), x.dtype.type(3.0)
    dx = np.empty_like(x)
    for i in prange(x.shape[0]):
        xi = x[i]
        u = k * (xi + c * xi * xi * xi)
        du = k * (one + three * c * xi * xi)
        s = one / (one + _exp(-two * u))
        dx[i] = dy[i] * s * (one + two * xi * (one - s) * du)
    return dx


@_jit
def _cross_entropy_forward(logits, targets, ignore_index):
    R, V = logits.shape
    losses = np.empty(R, logits.dtype)
    lse = np.empty(R, logits.dtype)
    for row in prange(R):
        m = logits[row, 0]
        for i in range(1, V):
            m = max(m, logits[row, i])
        s = 0.0
        for i in range(V):
            s += _exp(logits[row, i] - m)
        lse[row] = m + math.log(s)
        t = targets[row]
        kept = t != ignore_index and 0 <= t < V
        losses[row] = lse[row] - logits[row, t] if kept else 0.0
    return losses, lse


def cross_entropy_forward_numba(logits: np.ndarray, targets: np.ndarray, ignore_index: int
                                ) -> tuple[np.ndarray, np.ndarray]:
    """losses[r] = lse[r] - logits[r, targets[r]] (0 where ignored), lse = logsumexp of row r.

    One read of each row for the max, one for sum(exp(x - max)); nothing of size (R, V) is made.
    logits: (R, V), targets: (R,) int -> losses: (R,), lse: (R,)
    """
    _check_targets(targets, logits.shape[1], ignore_index)
    return _cross_entropy_forward(logits, targets, ignore_index)


@_jit
def _cross_entropy_backward(logits, targets, lse, dloss, ignore_index):
    R, V = logits.shape
    dlogits = np.empty_like(logits)
    for row in prange(R):
        t = targets[row]
        if t == ignore_index or not 0 <= t < V:
            dlogits[row, :] = 0.0
            continue
        g, lse_r = dloss[row], lse[row]
        for i in range(V):
            dlogits[row, i] = _exp(logits[row, i] - lse_r) * g
        dlogits[row, t] = (_exp(logits[row, t] - lse_r) - 1.0) * g
    return dlogits


def cross_entropy_backward_numba(logits: np.ndarray, targets: np.ndarray, lse: np.ndarray,
                                 dloss: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """dlogits[r] = (exp(logits[r] - lse[r]) - onehot(targets[r])) * dloss[r]; 0 where ignored.

    logits: (R, V), targets, lse, dloss: (R,) -> dlogits: (R, V)
    """
    return _cross_entropy_backward(logits, targets, lse, dloss, ignore_index)


# Attention: the four products of the backward and the two of the forward are batched matmuls over
# (batch, head), and they go to BLAS whole: full T x T squares, twice the causal work, but at
# ~200 GFLOP/s against ~40 for the register-blocked numba loops that skipped the masked half
# (measured in a 124M training step: attention 0.45 s against 0.61 s; the loops are in git history).
# numba does the part BLAS cannot: the causal mask fused into the softmax and into its backward,
# row by row, on both cores. OpenBLAS's threads must not spin while those rows run (runtime.py).

@_jit
def _causal_softmax_rows(s: np.ndarray, scale: float) -> np.ndarray:
    """In place: s[n, i] <- softmax(scale * s[n, i, :i+off+1]), masked entries 0.

    s: (N, Tq, Tk) raw scores q k^T; query i sees keys j <= i + off, off = Tk - Tq.
    """
    N, Tq, Tk = s.shape
    off = Tk - Tq                                       # query i sees keys j <= i + off
    scale = s.dtype.type(scale)       # a Python float would turn the float32 loops into float64
    zero = s.dtype.type(0.0)
    for r in prange(N * Tq):
        n, i = r // Tq, r % Tq
        row, last = s[n, i], i + off
        m = row[0]
        for j in range(1, last + 1):
            m = max(m, row[j])
        total = 0.0
        for j in range(last + 1):
            e = _exp((row[j] - m) * scale)              # subtract the row max: no overflow
            row[j] = e
            total += e
        inv = s.dtype.type(1.0 / total)
        for j in range(last + 1):
            row[j] *= inv
        for j in range(last + 1, Tk):
            row[j] = zero                               # exactly 0, as exp(-inf) would give
    return s


@_jit
def _causal_softmax_backward_rows(p: np.ndarray, dp: np.ndarray, scale: float) -> np.ndarray:
    """In place: dp[n, i] <- scale * p (dp - sum_j p dp) over the visible keys, masked 0.

    p, dp: (N, Tq, Tk). The softmax Jacobian as in softmax_backward_ref, times d(scores)/d(q k^T).
    """
    N, Tq, Tk = p.shape
    off = Tk - Tq
    scale = p.dtype.type(scale)
    zero = p.dtype.type(0.0)
    for r in prange(N * Tq):
        n, i = r // Tq, r % Tq
        pr, ds, last = p[n, i], dp[n, i], i + off
        total = 0.0                                     # sum_j p_ij dp_ij
        for j in range(last + 1):
            total += pr[j] * ds[j]
        t = p.dtype.type(total)
        for j in range(last + 1):
            ds[j] = scale * pr[j] * (ds[j] - t)
        for j in range(last + 1, Tk):
            ds[j] = zero
    return dp


def _transposed(a: np.ndarray) -> np.ndarray:
    """a with its last two axes swapped, as a C-contiguous array: (N, T, HS) -> (N, HS, T)."""
    return np.ascontiguousarray(a.swapaxes(-1, -2))


def attention_forward_numba(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention: scores by BLAS, masked softmax in numba, then p @ v by BLAS.

    q: (N, Tq, HS), k, v: (N, Tk, HS), Tk >= Tq -> y: (N, Tq, HS), p: (N, Tq, Tk)
    """
    # NOTE: a stack of matmuls whose right operand is a transposed view ran ~4x slower than
    # copying k^T first (NumPy 2.4, OpenBLAS: measured 12.8 ms vs 3.0 ms at (72, 120, 64))
    p = _causal_softmax_rows(q @ _transposed(k), scale)         # (N, Tq, Tk)
    return p @ v, p


def attention_backward_numba(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                             p: np.ndarray, scale: float
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of causal attention (math in attention_backward_ref).

    dy, q: (N, Tq, HS), k, v: (N, Tk, HS), p: (N, Tq, Tk) -> dq, dk, dv (shapes of q, k, v)
    """
    dv = p.swapaxes(-1, -2) @ dy                                 # (N, Tk, HS)
    ds = _causal_softmax_backward_rows(p, dy @ _transposed(v), scale)   # (N, Tq, Tk)
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


# AdamW: one fused pass. NumPy's ufuncs would stream p, g, m and v through memory ~8 times; this
# reads and writes each element once, on both cores.

@_jit
def adamw_update_numba(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                       grad_scale: float, b1: float, b2: float, eps: float, step_size: float,
                       inv_sqrt_bc2: float, decay: float) -> None:
    """adamw_update_ref in one loop.   p, g, m, v: (N,), updated in place (g is only read)."""
    f = p.dtype.type                  # Python floats would turn the float32 loop into float64
    grad_scale, b1, b2, eps = f(grad_scale), f(b1), f(b2), f(eps)
    step_size, inv_sqrt_bc2, decay = f(step_size), f(inv_sqrt_bc2), f(decay)
    one = f(1.0)
    for i in prange(p.shape[0]):
        gi = g[i] * grad_scale
        mi = b1 * m[i] + (one - b1) * gi
        vi = b2 * v[i] + (one - b2) * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (np.sqrt(vi) * inv_sqrt_bc2 + eps)


# ---------------------------------------------------------------------------------------------
# Public names: the numba kernels unless TINYGPT_NUMBA=0.
# ---------------------------------------------------------------------------------------------

def pick(fast, ref):
    """The numba kernel, or its NumPy twin under TINYGPT_NUMBA=0 (every kernel module binds its
    public names through this one switch)."""
    return fast if USE_NUMBA else ref


softmax_forward = pick(softmax_forward_numba, softmax_forward_ref)
softmax_backward = pick(softmax_backward_numba, softmax_backward_ref)
layer_norm_forward = pick(layer_norm_forward_numba, layer_norm_forward_ref)
layer_norm_backward = pick(layer_norm_backward_numba, layer_norm_backward_ref)
rms_norm_forward = pick(rms_norm_forward_numba, rms_norm_forward_ref)
rms_norm_backward = pick(rms_norm_backward_numba, rms_norm_backward_ref)
gelu_forward = pick(gelu_forward_numba, gelu_forward_ref)
gelu_backward = pick(gelu_backward_numba, gelu_backward_ref)
cross_entropy_forward = pick(cross_entropy_forward_numba, cross_entropy_forward_ref)
cross_entropy_backward = pick(cross_entropy_backward_numba, cross_entropy_backward_ref)
attention_forward = pick(attention_forward_numba, attention_forward_ref)
attention_backward = pick(attention_backward_numba, attention_backward_ref)
adamw_update = pick(adamw_update_numba, adamw_update_ref)
