"""Primitive ops: one `Function` per piece of math, forward and backward side by side.

Elementwise arithmetic, matmul and linear, and reductions, all plain NumPy (large matmuls go to
BLAS through `np.matmul`). Shape and index ops, where, dropout and embedding are in
`shape_ops.py`; the kernel-backed
fused ops (softmax, layer_norm, gelu, cross_entropy, attention) are in `fused.py`; the functions
that call both (`F.add`, `F.matmul`, ...) and the block that gives `Tensor` its operators are in
`functional.py`.

    python -m pytest tests/test_ops.py -q
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinygpt.autograd.tensor import Context, Function, Tensor


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` down to `shape`, undoing NumPy broadcasting."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def lift(x: Any, like: Tensor) -> Tensor:
    """A Python number or array beside a tensor becomes a constant tensor of the same dtype."""
    if isinstance(x, Tensor):
        if x.dtype != like.dtype:
            raise TypeError(f"dtype mismatch: {like.dtype} tensor of shape {like.shape} with "
                            f"{x.dtype} tensor of shape {x.shape}; convert one with .astype()")
        return x
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"cannot combine a tensor with a value of dtype {arr.dtype}")
    return Tensor(arr.astype(like.dtype))


def _broadcast_shape(op: str, a: np.ndarray, b: np.ndarray) -> None:
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast") from None


# --- elementwise arithmetic --------------------------------------------------------------------

class Add(Function):
    """y = a + b (broadcasting).   da = unbroadcast(dy), db = unbroadcast(dy)"""

    @staticmethod
    def forward(ctx: Context, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _broadcast_shape("add", a, b)
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        sa, sb = ctx.shapes
        return unbroadcast(dy, sa), unbroadcast(dy, sb)


class Sub(Function):
    """y = a - b (broadcasting)."""

    @staticmethod
    def forward(ctx: Context, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _broadcast_shape("sub", a, b)
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        sa, sb = ctx.shapes
        return unbroadcast(dy, sa), unbroadcast(-dy, sb)


class Mul(Function):
    """y = a * b (broadcasting).   da = dy * b, db = dy * a"""

    @staticmethod
    def forward(ctx: Context, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _broadcast_shape("mul", a, b)
        ctx.save(a, b)
        return a * b

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        a, b = ctx.saved
        da = unbroadcast(dy * b, a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(dy * a, b.shape) if ctx.needs_input_grad[1] else None
        return da, db


class Div(Function):
    """y = a / b (broadcasting).   da = dy / b, db = -dy * a / b^2"""

    @staticmethod
    def forward(ctx: Context, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        _broadcast_shape("div", a, b)
        ctx.save(a, b)
        return a / b

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        a, b = ctx.saved
        da = unbroadcast(dy / b, a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-dy * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None
        return da, db


class Neg(Function):
    """y = -x"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        return -x

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return (-dy,)


class Pow(Function):
    """y = x ** p for a constant exponent p.   dx = dy * p * x^(p-1)"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, p: float) -> np.ndarray:
        ctx.save(x)
        ctx.p = p
        return x ** x.dtype.type(p)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (x,), p = ctx.saved, ctx.p
        return dy * (x.dtype.type(p) * x ** x.dtype.type(p - 1)), None


class Exp(Function):
    """y = exp(x).   dx = dy * y"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        y = np.exp(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (y,) = ctx.saved
        return (dy * y,)


class Log(Function):
    """y = log(x).   dx = dy / x"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        ctx.save(x)
        return np.log(x)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (x,) = ctx.saved
        return (dy / x,)


class Sqrt(Function):
    """y = sqrt(x).   dx = dy / (2 y)"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        y = np.sqrt(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (y,) = ctx.saved
        return (dy / (2 * y),)


class Tanh(Function):
    """y = tanh(x).   dx = dy * (1 - y^2)"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        y = np.tanh(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (y,) = ctx.saved
        return (dy * (1 - y * y),)


class ReLU(Function):
    """y = max(x, 0).   dx = dy where x > 0"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        mask = x > 0
        ctx.save(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (mask,) = ctx.saved
        return (dy * mask,)

def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) from e = exp(-|x|) <= 1: no overflow, and no 1 - tiny cancellation."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1, e) / (1 + e)


class LogSigmoid(Function):
    """y = log(sigmoid(x)) = -log(1 + exp(-x)), computed as min(x, 0) - log1p(exp(-|x|)) so that
    neither branch overflows (|x| > 80 included).   dy/dx = 1 - sigmoid(x) = sigmoid(-x)."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        e = np.exp(-np.abs(x))                           # in (0, 1]: never overflows
        ctx.save(x, e)
        return np.minimum(x, 0) - np.log1p(e)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x, e = ctx.saved
        sig_neg = np.where(x >= 0, e, 1) / (1 + e)        # sigmoid(-x), stable on both sides
        return (dy * sig_neg,)


class SiLU(Function):
    """y = x * sigmoid(x) (Llama's MLP gate).   dy/dx = s (1 + x (1 - s)), s = sigmoid(x)."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        s = sigmoid(x)
        ctx.save(x, s)
        return x * s

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x, s = ctx.saved
        return (dy * s * (1.0 + x * (1.0 - s)),)


# --- matmul --------------------------------------------------------------------------------------

class MatMul(Function):
    """y = a @ b over the last two axes, batch axes broadcast.   a: (..., n, k), b: (..., k, m)

    da = dy @ b^T and db = a^T @ dy, each summed over the batch axes it was broadcast along.
    """

    @staticmethod
    def forward(ctx: Context, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match "
                             f"(inner dimensions {a.shape[-1:]} and {b.shape[-2:-1]})")
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch dimensions of {a.shape} and {b.shape} "
                             "do not broadcast") from None
        ctx.save(a, b)
        return a @ b

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        a, b = ctx.saved
        da = unbroadcast(dy @ b.swapaxes(-1, -2), a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(a.swapaxes(-1, -2) @ dy, b.shape) if ctx.needs_input_grad[1] else None
        return da, db


class Linear(Function):
    """y = x @ w + b with w stored (in, out) as in GPT-2.   x: (..., in) -> y: (..., out)

    The batch axes are flattened so each of forward, dx and dw is one BLAS call:
    dx = dy @ w^T, dw = x^T @ dy, db = sum(dy) over rows.
    `transposed=True` takes w stored (out, in), y = x @ w^T: a tied head reads the embedding
    table (V, C) as it is, and dw = dy^T @ x comes out in that layout (a gradient of the
    transposed view would need a transposed copy: 113 MB for SmolLM2).
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                transposed: bool = False) -> np.ndarray:
        n_in, n_out = (w.shape[::-1] if transposed else w.shape) if w.ndim == 2 else (-1, -1)
        if w.ndim != 2 or x.shape[-1] != n_in or (b is not None and b.shape != (n_out,)):
            bias = "" if b is None else f" and bias {b.shape}"
            layout = " (stored out, in)" if transposed else ""
            raise ValueError(f"linear: input {x.shape} does not fit weight {w.shape}{layout}{bias}")
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ (w.T if transposed else w)
        if b is not None:
            y += b
        ctx.save(x2, w)
        ctx.x_shape, ctx.transposed = x.shape, transposed
        return y.reshape(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, w = ctx.saved
        t = ctx.transposed
        dy2 = dy.reshape(-1, w.shape[0] if t else w.shape[1])
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = (dy2 @ (w if t else w.T)).reshape(ctx.x_shape) if need_x else None
        dw = (dy2.T @ x2 if t else x2.T @ dy2) if need_w else None
        db = dy2.sum(axis=0) if need_b else None
        return dx, dw, db


# --- reductions -----------------------------------------------------------------------------------

def normalize_axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % max(ndim, 1) for a in axes))


def _expand(dy: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool):
    """Broadcast a reduced gradient back over the reduced axes."""
    if not keepdims:
        dy = np.expand_dims(dy, axes)
    return np.broadcast_to(dy, shape)


class Sum(Function):
    """y = sum(x) over `axis`.   dx = dy broadcast back over the summed axes"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
        ctx.axes, ctx.keepdims, ctx.shape = normalize_axes(axis, x.ndim), keepdims, x.shape
        return np.asarray(x.sum(axis=ctx.axes, keepdims=keepdims))

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return (_expand(dy, ctx.shape, ctx.axes, ctx.keepdims),)


class Max(Function):
    """y = max(x) over `axis`.   dx = dy at the maximum (shared equally between ties)"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
        if x.size == 0:
            raise ValueError(f"max of an empty tensor of shape {x.shape}")
        ctx.axes, ctx.keepdims = normalize_axes(axis, x.ndim), keepdims
        y = x.max(axis=ctx.axes, keepdims=True)
        ctx.save(x == y)
        return np.asarray(y if keepdims else y.squeeze(axis=ctx.axes))

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (mask,) = ctx.saved
        dy = _expand(dy, mask.shape, ctx.axes, ctx.keepdims)
        count = mask.sum(axis=ctx.axes, keepdims=True)
        return ((dy * mask / count).astype(dy.dtype),)
