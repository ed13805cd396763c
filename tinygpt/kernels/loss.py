"""Cross-entropy from logits (log-softmax and the loss in one pass), forward and backward.

    python -m pytest tests/test_kernels.py -q
"""
import math

import numpy as np
from numba import prange

from tinygpt.kernels.base import fast_exp, jit_rows, pick


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


@jit_rows
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
            s += fast_exp(logits[row, i] - m)
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


@jit_rows
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
            dlogits[row, i] = fast_exp(logits[row, i] - lse_r) * g
        dlogits[row, t] = (fast_exp(logits[row, t] - lse_r) - 1.0) * g
    return dlogits


def cross_entropy_backward_numba(logits: np.ndarray, targets: np.ndarray, lse: np.ndarray,
                                 dloss: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """dlogits[r] = (exp(logits[r] - lse[r]) - onehot(targets[r])) * dloss[r]; 0 where ignored.

    logits: (R, V), targets, lse, dloss: (R,) -> dlogits: (R, V)
    """
    return _cross_entropy_backward(logits, targets, lse, dloss, ignore_index)


cross_entropy_forward = pick(cross_entropy_forward_numba, cross_entropy_forward_ref)
cross_entropy_backward = pick(cross_entropy_backward_numba, cross_entropy_backward_ref)
