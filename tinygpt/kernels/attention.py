"""Causal attention softmax(q k^T * scale + mask) v: products on BLAS, the masked softmax in numba.

    python -m pytest tests/test_kernels.py -q
"""
import numpy as np
from numba import prange

from tinygpt.kernels.base import fast_exp, jit_rows, pick
from tinygpt.kernels.softmax import softmax_backward_ref, softmax_forward_ref


def causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """True where query i may NOT see key j: j > i + (Tk - Tq) (the queries are the last Tq)."""
    return np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + (Tk - Tq)


def attention_forward_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                          group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention.  p = softmax(scale q k^T) with masked entries 0, y = p v.

    q: (N, G Tq, HS), k, v: (N, Tk, HS), Tk >= Tq -> y: (N, G Tq, HS), p: (N, G Tq, Tk).
    `group` G > 1 is grouped-query attention: the G query heads that share a key/value head
    come as one stack of G Tq rows, each block of Tq masked on its own, so one product per
    key/value head does what G products on repeated keys would.
    """
    N, Tk = k.shape[0], k.shape[1]
    Tq = q.shape[1] // group
    s = q @ k.swapaxes(-1, -2)                                # (N, G Tq, Tk)
    s *= scale                                                # in place: keeps float32 float32
    s.reshape(N * group, Tq, Tk)[:, causal_mask(Tq, Tk)] = -np.inf    # exp(-inf) = 0 exactly
    p = softmax_forward_ref(s.reshape(-1, Tk)).reshape(s.shape)
    return p @ v, p


def attention_backward_ref(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           p: np.ndarray, scale: float, group: int = 1
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of causal attention.   dy, q: (N, G Tq, HS), k, v: (N, Tk, HS), p: (N, G Tq, Tk)

    dv = p^T dy, dp = dy v^T, ds = p * (dp - rowsum(dp * p)) (softmax backward; masked p are 0,
    so masked ds are 0), then s = scale q k^T gives dq = scale ds k and dk = scale ds^T q. The
    products over the G Tq rows sum a shared key/value head's gradient over its query heads.
    """
    dv = p.swapaxes(-1, -2) @ dy                              # (N, Tk, HS)
    dp = dy @ v.swapaxes(-1, -2)                              # (N, Tq, Tk)
    ds = softmax_backward_ref(p.reshape(-1, p.shape[-1]), dp.reshape(-1, p.shape[-1]))
    ds = ds.reshape(p.shape)
    ds *= scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv



# Attention: the four products of the backward and the two of the forward are batched matmuls over
# (batch, head), and they go to BLAS whole: full T x T squares, twice the causal work, but at
# ~200 GFLOP/s against ~40 for the register-blocked numba loops that skipped the masked half
# (measured in a 124M training step: attention 0.45 s against 0.61 s; the loops are in git history).
# numba does the part BLAS cannot: the causal mask fused into the softmax and into its backward,
# row by row, on both cores. OpenBLAS's threads must not spin while those rows run (runtime.py).

@jit_rows
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
            e = fast_exp((row[j] - m) * scale)              # subtract the row max: no overflow
            row[j] = e
            total += e
        inv = s.dtype.type(1.0 / total)
        for j in range(last + 1):
            row[j] *= inv
        for j in range(last + 1, Tk):
            row[j] = zero                               # exactly 0, as exp(-inf) would give
    return s


@jit_rows
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


def attention_forward_numba(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                            group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention: scores by BLAS, masked softmax in numba, then p @ v by BLAS.

    q: (N, G Tq, HS), k, v: (N, Tk, HS), Tk >= Tq -> y: (N, G Tq, HS), p: (N, G Tq, Tk)
    (`group` G as in attention_forward_ref)
    """
    # NOTE: a stack of matmuls whose right operand is a transposed view ran ~4x slower than
    # copying k^T first (NumPy 2.4, OpenBLAS: measured 12.8 ms vs 3.0 ms at (72, 120, 64))
    s = q @ _transposed(k)                                      # (N, G Tq, Tk)
    N, rows, Tk = s.shape
    p = _causal_softmax_rows(s.reshape(N * group, rows // group, Tk), scale).reshape(s.shape)
    return p @ v, p


def attention_backward_numba(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                             p: np.ndarray, scale: float, group: int = 1
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of causal attention (math in attention_backward_ref).

    dy, q: (N, G Tq, HS), k, v: (N, Tk, HS), p: (N, G Tq, Tk) -> dq, dk, dv (shapes of q, k, v)
    """
    N, rows, Tk = p.shape
    dv = p.swapaxes(-1, -2) @ dy                                 # (N, Tk, HS)
    blocks = (N * group, rows // group, Tk)
    ds = _causal_softmax_backward_rows(p.reshape(blocks), (dy @ _transposed(v)).reshape(blocks),
                                       scale).reshape(p.shape)   # (N, G Tq, Tk)
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


attention_forward = pick(attention_forward_numba, attention_forward_ref)
attention_backward = pick(attention_backward_numba, attention_backward_ref)
