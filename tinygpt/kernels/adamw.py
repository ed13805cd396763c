"""The AdamW update (decoupled weight decay), in place, in one pass over p, g, m and v.

    python -m pytest tests/test_kernels.py -q
"""
import numpy as np
from numba import prange

from tinygpt.kernels.base import jit_rows, pick


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



# AdamW: one fused pass. NumPy's ufuncs would stream p, g, m and v through memory ~8 times; this
# reads and writes each element once, on both cores.

@jit_rows
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


adamw_update = pick(adamw_update_numba, adamw_update_ref)
