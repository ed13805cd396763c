"""Hot loops of tinygpt: each kernel as a NumPy reference twin `X_ref` and a fast `X_numba`.

This module owns the fused, performance-critical pieces of math (softmax, LayerNorm, tanh-GELU,
cross-entropy from logits, causal attention), each on plain contiguous arrays. It knows nothing
about `Tensor` or autograd: `ops.py` reshapes its inputs and calls the public names below.

Every public name `X` is bound at import to `X_numba`, or to `X_ref` when the environment has
`TINYGPT_NUMBA=0` (debugging, or no numba). Kernels return new arrays, keep the input dtype
(float32 for training, float64 for gradient checks) and never write into their inputs.

Benchmark: `python -m tinygpt.bench kernels`.   Tests: `pytest tests/test_kernels.py`.
"""
import math
import os

import numpy as np

USE_NUMBA = os.environ.get("TINYGPT_NUMBA", "1") != "0"

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
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)     # (R,)
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


def gelu_forward_ref(x: np.ndarray) -> np.ndarray:
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise.   x: (N,) -> y: (N,)"""
    t = np.tanh(SQRT_2_OVER_PI * (x + GELU_C * x ** 3))
    return 0.5 * x * (1.0 + t)


def gelu_backward_ref(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx), t = tanh(u).   x, dy: (N,) -> dx: (N,)"""
    t = np.tanh(SQRT_2_OVER_PI * (x + GELU_C * x ** 3))
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


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
    s = scale * (q @ k.swapaxes(-1, -2))                     # (N, Tq, Tk)
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
    ds = scale * softmax_backward_ref(p.reshape(-1, p.shape[-1]), dp.reshape(-1, p.shape[-1]))
    ds = ds.reshape(p.shape)
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


# ---------------------------------------------------------------------------------------------
# Public names: the numba kernels unless TINYGPT_NUMBA=0.
# ---------------------------------------------------------------------------------------------

softmax_forward_numba = softmax_forward_ref
softmax_backward_numba = softmax_backward_ref
layer_norm_forward_numba = layer_norm_forward_ref
layer_norm_backward_numba = layer_norm_backward_ref
gelu_forward_numba = gelu_forward_ref
gelu_backward_numba = gelu_backward_ref
cross_entropy_forward_numba = cross_entropy_forward_ref
cross_entropy_backward_numba = cross_entropy_backward_ref
attention_forward_numba = attention_forward_ref
attention_backward_numba = attention_backward_ref

_pick = (lambda fast, ref: fast) if USE_NUMBA else (lambda fast, ref: ref)
softmax_forward = _pick(softmax_forward_numba, softmax_forward_ref)
softmax_backward = _pick(softmax_backward_numba, softmax_backward_ref)
layer_norm_forward = _pick(layer_norm_forward_numba, layer_norm_forward_ref)
layer_norm_backward = _pick(layer_norm_backward_numba, layer_norm_backward_ref)
gelu_forward = _pick(gelu_forward_numba, gelu_forward_ref)
gelu_backward = _pick(gelu_backward_numba, gelu_backward_ref)
cross_entropy_forward = _pick(cross_entropy_forward_numba, cross_entropy_forward_ref)
cross_entropy_backward = _pick(cross_entropy_backward_numba, cross_entropy_backward_ref)
attention_forward = _pick(attention_forward_numba, attention_forward_ref)
attention_backward = _pick(attention_backward_numba, attention_backward_ref)
