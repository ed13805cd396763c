"""Primitive ops: one `Function` per piece of math, forward and backward side by side.

Elementwise arithmetic, matmul and linear, reductions, shape and index ops, where, dropout and
embedding, all plain NumPy (large matmuls go to BLAS through `np.matmul`). The kernel-backed
fused ops (softmax, layer_norm, gelu, cross_entropy, attention) are in `fused.py`; the functions
that call both (`F.add`, `F.matmul`, ...) and the block that gives `Tensor` its operators are in
`functional.py`.

    python -m pytest tests/test_ops.py -q
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinygpt.autograd import Context, Function, Tensor


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
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        if w.ndim != 2 or x.shape[-1] != w.shape[0] or (b is not None and b.shape != w.shape[1:]):
            bias = "" if b is None else f" and bias {b.shape}"
            raise ValueError(f"linear: input {x.shape} does not fit weight {w.shape}{bias}")
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ w
        if b is not None:
            y += b
        ctx.save(x2, w)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w.shape[1])

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, w = ctx.saved
        dy2 = dy.reshape(-1, w.shape[1])
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = (dy2 @ w.T).reshape(ctx.x_shape) if need_x else None
        dw = x2.T @ dy2 if need_w else None
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


# --- shape ops ------------------------------------------------------------------------------------

class Reshape(Function):
    """y = x viewed with another shape of the same size."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {x.shape} to {tuple(shape)}") from None

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return dy.reshape(ctx.shape), None


class Permute(Function):
    """y = x with its axes reordered.   dx = dy with the inverse order"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        if sorted(a % max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
            raise ValueError(f"permute: {tuple(axes)} is not an ordering of the {x.ndim} axes "
                             f"of shape {x.shape}")
        ctx.inverse = np.argsort([a % x.ndim for a in axes])
        return x.transpose(axes)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return dy.transpose(ctx.inverse), None


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, np.integer, slice)) for i in items)


class GetItem(Function):
    """y = x[index], basic or integer-array indexing.

    Backward scatters dy into zeros; integer arrays may repeat an index, so it adds (np.add.at).
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, index: Any) -> np.ndarray:
        ctx.shape, ctx.index = x.shape, index
        try:
            return np.asarray(x[index])
        except IndexError as e:
            raise IndexError(f"index into tensor of shape {x.shape}: {e}") from None

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        dx = np.zeros(ctx.shape, dtype=dy.dtype)
        if _is_basic_index(ctx.index):
            dx[ctx.index] = dy
        else:
            np.add.at(dx, ctx.index, dy)
        return dx, None


class TakeAlongAxis(Function):
    """y[..., j] = x[..., idx[..., j]] on the last axis, as np.take_along_axis.
    x: (..., N), idx: int (..., K) -> y: (..., K). dx scatters dy back, adding where ids repeat."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != x.ndim or idx.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"take_along_axis: indices of shape {idx.shape} and dtype "
                             f"{idx.dtype} do not fit input {x.shape} (integers, same leading "
                             "axes)")
        if idx.size and (idx.min() < -x.shape[-1] or idx.max() >= x.shape[-1]):
            raise IndexError(f"take_along_axis: index out of range for last axis of {x.shape}")
        ctx.save(idx)
        ctx.shape = x.shape
        return np.take_along_axis(x, idx, axis=-1)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (idx,) = ctx.saved
        dx = np.zeros(ctx.shape, dtype=dy.dtype)
        lead = np.indices(idx.shape, sparse=True)[:-1]
        np.add.at(dx, (*lead, idx), dy)
        return dx, None


class Concatenate(Function):
    """y = concatenate(xs, axis).   each dx is its slice of dy"""

    @staticmethod
    def forward(ctx: Context, *xs: np.ndarray, axis: int = 0) -> np.ndarray:
        try:
            y = np.concatenate(xs, axis=axis)
        except ValueError:
            raise ValueError(f"concatenate along axis {axis}: shapes "
                             f"{[x.shape for x in xs]} do not fit") from None
        ctx.axis = axis % y.ndim
        ctx.splits = np.cumsum([x.shape[ctx.axis] for x in xs])[:-1]
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return tuple(np.split(dy, ctx.splits, axis=ctx.axis))


class Stack(Function):
    """y = stack(xs, axis): a new axis.   each dx is its index of dy along that axis"""

    @staticmethod
    def forward(ctx: Context, *xs: np.ndarray, axis: int = 0) -> np.ndarray:
        if len({x.shape for x in xs}) != 1:
            raise ValueError(f"stack: shapes {[x.shape for x in xs]} differ")
        y = np.stack(xs, axis=axis)
        ctx.axis = axis % y.ndim
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return tuple(np.moveaxis(dy, ctx.axis, 0))


# --- masking, dropout, embedding -----------------------------------------------------------------

class Where(Function):
    """y = a where cond else b (cond is a constant bool array, all three broadcast)."""

    @staticmethod
    def forward(ctx: Context, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        cond = np.asarray(cond, dtype=bool)
        try:
            shape = np.broadcast_shapes(cond.shape, a.shape, b.shape)
        except ValueError:
            raise ValueError(f"where: condition {cond.shape}, a {a.shape} and b {b.shape} "
                             "do not broadcast") from None
        ctx.save(cond)
        ctx.shapes = (a.shape, b.shape, shape)
        return np.where(cond, a, b)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (cond,), (sa, sb, _) = ctx.saved, ctx.shapes
        zero = dy.dtype.type(0)
        return None, unbroadcast(np.where(cond, dy, zero), sa), unbroadcast(np.where(cond, zero, dy), sb)


class Dropout(Function):
    """y = x * mask / (1 - p), mask ~ Bernoulli(1 - p) from the given Generator."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
        scale = x.dtype.type(1.0 / (1.0 - p))
        mask = (rng.random(x.shape, dtype=np.float32) >= p) * scale    # float mask: 0 or 1/(1-p)
        mask = mask.astype(x.dtype, copy=False)
        ctx.save(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (mask,) = ctx.saved
        return dy * mask, None, None


class Embedding(Function):
    """y = weight[idx].   weight: (V, C), idx: int (...) -> y: (..., C)

    dweight gathers dy rows back to their token ids, adding where an id repeats.
    """

    @staticmethod
    def forward(ctx: Context, weight: np.ndarray, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"embedding: token ids must be integers, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
            bad = idx.max() if idx.max() >= weight.shape[0] else idx.min()
            raise IndexError(f"embedding: token id {bad} is out of range for an embedding "
                             f"table of {weight.shape[0]} rows")
        ctx.save(idx)
        ctx.shape = weight.shape
        return weight[idx]

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (idx,) = ctx.saved
        dw = np.zeros(ctx.shape, dtype=dy.dtype)
        np.add.at(dw, idx.reshape(-1), dy.reshape(-1, ctx.shape[1]))
        return dw, None
