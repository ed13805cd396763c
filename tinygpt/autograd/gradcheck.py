"""Central-difference gradient checking in float64, against a random cotangent.

`gradcheck(f, *inputs)` builds the scalar loss L = sum(f(x) * g) for a fixed random g, never
sum(f(x)): softmax rows always sum to 1 and a LayerNorm's outputs to 0, so a backward that returns
zeros would pass a sum-based check. Each input's analytic gradient is compared with
(L(x + eps e_i) - L(x - eps e_i)) / 2 eps on every element (up to `max_elements`), and past that
on a sample of elements plus one random direction v, where <grad, v> must match the directional
difference.

    python -m pytest tests/test_ops.py -q -k grad
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tinygpt.autograd.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-6     # analytic vs central difference in float64 (STYLE.md section 9)


class GradcheckError(AssertionError):
    """The analytic and numerical gradients disagree; the message says where and by how much."""


def _as_input(x: Any, i: int) -> Any:
    """Float arrays/Tensors become float64 leaf tensors that require grad; others pass through."""
    if isinstance(x, Tensor):
        x = x.data
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        if not np.all(np.isfinite(x)):
            raise ValueError(f"gradcheck: input {i} of shape {x.shape} contains NaN or inf")
        return Tensor(x.astype(np.float64), requires_grad=True)
    return x


def gradcheck(f: Callable[..., Tensor], *inputs: Any, eps: float = 1e-6, rtol: float = RTOL,
              atol: float = ATOL, max_elements: int = 64, n_samples: int = 16,
              seed: int = 0) -> bool:
    """Raise GradcheckError unless f's backward matches central differences for every float input.

    `inputs` may mix float arrays (checked), and anything else f takes (ints, index arrays,
    Generators), passed through unchanged. Returns True so it can sit inside `assert`.
    """
    rng = np.random.default_rng(seed)
    args = [_as_input(x, i) for i, x in enumerate(inputs)]
    out = f(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: f must return a Tensor, got {type(out).__name__}")
    if out.dtype != np.float64:
        raise TypeError(f"gradcheck: f returned {out.dtype}; ops must keep float64 inputs float64")
    g = rng.standard_normal(out.shape)
    out.backward(g)

    def loss() -> float:
        return float(np.sum(f(*args).data * g))

    for i, t in enumerate(args):
        if not isinstance(t, Tensor):
            continue
        analytic = np.zeros_like(t.data) if t.grad is None else t.grad
        flat = t.data.reshape(-1)                     # a view: perturbing it perturbs the input
        picks = (range(flat.size) if flat.size <= max_elements
                 else rng.choice(flat.size, n_samples, replace=False))
        for j in picks:
            orig = flat[j]
            flat[j] = orig + eps
            up = loss()
            flat[j] = orig - eps
            down = loss()
            flat[j] = orig
            numeric = (up - down) / (2 * eps)
            got = analytic.reshape(-1)[j]
            if not abs(got - numeric) <= atol + rtol * abs(numeric):
                idx = np.unravel_index(j, t.shape)
                raise GradcheckError(f"input {i} {t.shape} at {idx}: analytic {got:.8g}, "
                                     f"numerical {numeric:.8g}")
        if flat.size > max_elements:                  # one random direction covers the rest
            v = rng.standard_normal(t.shape)
            base = t.data.copy()
            t.data[...] = base + eps * v
            up = loss()
            t.data[...] = base - eps * v
            down = loss()
            t.data[...] = base
            numeric, got = (up - down) / (2 * eps), float(np.sum(analytic * v))
            if not abs(got - numeric) <= atol + rtol * abs(numeric):
                raise GradcheckError(f"input {i} {t.shape} along a random direction: "
                                     f"analytic {got:.8g}, numerical {numeric:.8g}")
    return True
