"""Every differentiable op: one `Function` per piece of math, forward and backward side by side.

Elementwise and shape ops are plain NumPy; the hot fused ops (softmax, layer_norm, gelu,
cross_entropy, causal attention) call `kernels`, whose numba loops each have a NumPy twin
(`TINYGPT_NUMBA=0` runs the twins). Large matmuls go to BLAS through `np.matmul`.
The functional forms (`add`, `matmul`, `softmax`, ...) are the public API, re-exported by
`tinygpt.functional`; the block at the bottom attaches `+ - * / @ ** []` and methods to `Tensor`.

    python -m pytest tests/test_ops.py -q
"""
from __future__ import annotations

import builtins
import math
from typing import Any, Sequence

import numpy as np

from tinygpt import kernels
from tinygpt.autograd import Context, Function, Tensor


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` down to `shape`, undoing NumPy broadcasting."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _lift(x: Any, like: Tensor) -> Tensor:
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


class GELU(Function):
    """GPT-2's tanh GELU: y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Kernel: gelu_*."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        ctx.save(x)
        return kernels.gelu_forward(x.reshape(-1)).reshape(x.shape)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (x,) = ctx.saved
        dy = np.ascontiguousarray(dy).reshape(-1)
        return (kernels.gelu_backward(x.reshape(-1), dy).reshape(x.shape),)


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

def _axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % builtins.max(ndim, 1) for a in axes))


def _expand(dy: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool):
    """Broadcast a reduced gradient back over the reduced axes."""
    if not keepdims:
        dy = np.expand_dims(dy, axes)
    return np.broadcast_to(dy, shape)


class Sum(Function):
    """y = sum(x) over `axis`.   dx = dy broadcast back over the summed axes"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
        ctx.axes, ctx.keepdims, ctx.shape = _axes(axis, x.ndim), keepdims, x.shape
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
        ctx.axes, ctx.keepdims = _axes(axis, x.ndim), keepdims
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
        if sorted(a % builtins.max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
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


# --- fused ops on kernels ------------------------------------------------------------------------

def _rows(x: np.ndarray) -> np.ndarray:
    """(..., N) -> contiguous (rows, N), the layout every row kernel takes."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


class Softmax(Function):
    """y = exp(x) / sum(exp(x)) over the last axis.   x: (..., N) -> y: (..., N)

    Per row the Jacobian is diag(y) - y y^T, so dx = y * (dy - sum(dy * y)).
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        y = kernels.softmax_forward(_rows(x)).reshape(x.shape)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (y,) = ctx.saved
        return (kernels.softmax_backward(_rows(y), _rows(dy)).reshape(y.shape),)


class LogSoftmax(Function):
    """y = x - logsumexp(x) over the last axis.   dx = dy - softmax(x) * sum(dy)"""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        m = x.max(axis=-1, keepdims=True)
        y = x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (y,) = ctx.saved
        return (dy - np.exp(y) * dy.sum(axis=-1, keepdims=True),)


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance).

    x: (..., C), w, b: (C,). The kernel keeps mean and 1/std per row for the backward:
    with xhat = (x - mean) * rstd and g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, w: np.ndarray, b: np.ndarray,
                eps: float = 1e-5) -> np.ndarray:
        if w.shape != x.shape[-1:] or b.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: input {x.shape} needs weight and bias of shape "
                             f"{x.shape[-1:]}, got {w.shape} and {b.shape}")
        x2 = _rows(x)
        y, mean, rstd = kernels.layer_norm_forward(x2, w, b, eps)
        ctx.save(x2, w, mean, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, w, mean, rstd = ctx.saved
        dx, dw, db = kernels.layer_norm_backward(_rows(dy), x2, w, mean, rstd)
        return dx.reshape(dy.shape), dw, db


class CrossEntropy(Function):
    """Mean (or summed) -log softmax(logits)[target] over rows whose target is not ignore_index.

    logits: (..., V), targets: int (...) -> scalar. Fused with log-softmax: the kernel keeps each
    row's logsumexp, and dlogits = (softmax(logits) - onehot(target)) * dloss per row.
    """

    @staticmethod
    def forward(ctx: Context, logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100,
                reduction: str = "mean") -> np.ndarray:
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape "
                             f"{logits.shape[:-1]}, got {targets.shape}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
        x2 = _rows(logits)
        t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
        losses, lse = kernels.cross_entropy_forward(x2, t, ignore_index)
        n_valid = int((t != ignore_index).sum())
        if n_valid == 0:
            raise ValueError(f"cross_entropy: every target is ignore_index ({ignore_index}); "
                             "there is no loss to average")
        ctx.save(x2, t, lse)
        ctx.scale = 1.0 / n_valid if reduction == "mean" else 1.0
        ctx.shape, ctx.ignore_index = logits.shape, ignore_index
        return np.asarray(losses.sum(dtype=np.float64) * ctx.scale, dtype=logits.dtype)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, t, lse = ctx.saved
        dloss = np.where(t != ctx.ignore_index, dy * ctx.scale, 0).astype(x2.dtype)
        return kernels.cross_entropy_backward(x2, t, lse, dloss).reshape(ctx.shape), None


class CausalAttention(Function):
    """Causal scaled-dot-product attention, the mask applied inside the kernel.

    q: (..., Tq, HS), k, v: (..., Tk, HS) -> y: (..., Tq, HS). Query i sees keys j <= i + Tk - Tq
    (Tk > Tq when earlier keys come from a KV cache). P = softmax(q k^T / sqrt(HS)), y = P v;
    dv = P^T dy, dP = dy v^T, dS = P (dP - rowsum(dP P)) / sqrt(HS), dq = dS k, dk = dS^T q.
    """

    @staticmethod
    def forward(ctx: Context, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if q.shape[:-2] != k.shape[:-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1] \
                or q.shape[-2] > k.shape[-2]:
            raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape} must be "
                             "(..., Tq, HS), (..., Tk, HS), (..., Tk, HS) with Tq <= Tk")
        lead, (Tq, HS) = q.shape[:-2], q.shape[-2:]
        q3, k3, v3 = (np.ascontiguousarray(a).reshape(-1, a.shape[-2], HS) for a in (q, k, v))
        scale = 1.0 / math.sqrt(HS)
        y, p = kernels.attention_forward(q3, k3, v3, scale)
        ctx.save(q3, k3, v3, p)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape)
        return y.reshape(*lead, Tq, HS)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        q3, k3, v3, p = ctx.saved
        dy3 = np.ascontiguousarray(dy).reshape(q3.shape)
        dq, dk, dv = kernels.attention_backward(dy3, q3, k3, v3, p, ctx.scale)
        q_shape, k_shape = ctx.shapes
        return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(k_shape)


class MultiHeadAttention(Function):
    """Causal multi-head self-attention on GPT-2's fused projection: split heads, attend, merge.

    qkv: (B, T, 3C) as `c_attn` makes it, [q | k | v] along the last axis, each of the C columns
    being NH heads of HS -> y: (B, T, C), the heads' outputs side by side. The attention itself is
    `CausalAttention`'s forward and backward; doing the split and merge here, not as reshape,
    permute and index ops, saves building three zero-padded (B, T, 3C) gradients and adding them
    up, and ~7 op calls per layer when decoding. With a `cache` (generation, under no_grad) this step's keys and values are
    appended to it and the queries attend over every cached position.
    """

    @staticmethod
    def forward(ctx: Context, qkv: np.ndarray, n_head: int, cache=None, layer: int = 0
                ) -> np.ndarray:
        B, T, C3 = qkv.shape
        if C3 % (3 * n_head):
            raise ValueError(f"multihead_attention: last axis of qkv {qkv.shape} is not 3 x "
                             f"{n_head} heads")
        heads = qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]                               # (B, NH, T, HS)
        if cache is not None:
            k, v = cache.append(layer, k, v)                                 # (B, NH, Tk, HS)
        ctx.cached = cache is not None
        y = CausalAttention.forward(ctx, q, k, v)                            # (B, NH, T, HS)
        return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)                # merge heads

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        if ctx.cached:
            raise RuntimeError("backward through KV-cached attention: the cache is for "
                               "generation; run it under no_grad")
        B, NH, T, HS = ctx.shapes[0]
        dy_heads = dy.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)            # (B, NH, T, HS)
        dqkv = np.empty((B, T, 3, NH, HS), dy.dtype)
        for i, d in enumerate(CausalAttention.backward(ctx, dy_heads)):     # dq, dk, dv
            dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        return dqkv.reshape(B, T, 3 * NH * HS), None, None, None


# --- functional forms ------------------------------------------------------------------------------
# NOTE: `sum`, `max` and `pow` below shadow the builtins inside this module; code above that means
# the builtin says `builtins.max`.

def add(a: Tensor, b: Any) -> Tensor:
    return Add.apply(a, _lift(b, a))


def sub(a: Tensor, b: Any) -> Tensor:
    return Sub.apply(a, _lift(b, a))


def mul(a: Tensor, b: Any) -> Tensor:
    return Mul.apply(a, _lift(b, a))


def div(a: Tensor, b: Any) -> Tensor:
    return Div.apply(a, _lift(b, a))


def neg(x: Tensor) -> Tensor:
    return Neg.apply(x)


def pow(x: Tensor, p: float) -> Tensor:  # noqa: A001 (the math name)
    if isinstance(p, Tensor):
        raise TypeError("pow: the exponent must be a Python number, not a tensor")
    return Pow.apply(x, float(p))


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Batched matrix product; a 1-D operand is treated as a row (a) or column (b) vector."""
    b = _lift(b, a)
    if a.ndim == 1 and b.ndim >= 2:
        return reshape(matmul(reshape(a, (1, -1)), b), b.shape[:-2] + b.shape[-1:])
    if b.ndim == 1:
        out = matmul(a, reshape(b, (-1, 1)))
        return reshape(out, out.shape[:-1])
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias with weight (in, out)."""
    return Linear.apply(x, weight, bias)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    n = int(np.prod([x.shape[a] for a in _axes(axis, x.ndim)]))
    return mul(sum(x, axis, keepdims), 1.0 / builtins.max(n, 1))


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def reshape(x: Tensor, *shape) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape.apply(x, shape)


def permute(x: Tensor, *axes) -> Tensor:
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return Permute.apply(x, axes)


def transpose(x: Tensor, axes: Sequence[int] | None = None) -> Tensor:
    """Reverse the axes (like ndarray.T), or reorder them as given."""
    return permute(x, tuple(range(x.ndim))[::-1] if axes is None else tuple(axes))


def swapaxes(x: Tensor, a: int, b: int) -> Tensor:
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return permute(x, axes)


def getitem(x: Tensor, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data.astype(np.int64)
    elif isinstance(index, tuple):
        index = tuple(i.data.astype(np.int64) if isinstance(i, Tensor) else i for i in index)
    return GetItem.apply(x, index)


def concatenate(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    return Concatenate.apply(*[_lift(x, xs[0]) for x in xs], axis=axis)


def stack(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    return Stack.apply(*[_lift(x, xs[0]) for x in xs], axis=axis)


def split(x: Tensor, sections: int | Sequence[int], axis: int = -1) -> list[Tensor]:
    """Split into `sections` equal parts, or into parts of the given sizes, along `axis`."""
    n = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or n % sections:
            raise ValueError(f"split: axis {axis} of shape {x.shape} does not split into "
                             f"{sections} equal parts")
        sizes = [n // sections] * sections
    else:
        sizes = list(sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to {n} (axis {axis} of {x.shape})")
    out, start = [], 0
    for size in sizes:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, start + size)
        out.append(getitem(x, tuple(index)))
        start += size
    return out


def exp(x: Tensor) -> Tensor:
    return Exp.apply(x)


def log(x: Tensor) -> Tensor:
    return Log.apply(x)


def sqrt(x: Tensor) -> Tensor:
    return Sqrt.apply(x)


def tanh(x: Tensor) -> Tensor:
    return Tanh.apply(x)


def relu(x: Tensor) -> Tensor:
    return ReLU.apply(x)


def gelu(x: Tensor) -> Tensor:
    return GELU.apply(x)


def _last_axis(fn, x: Tensor, axis: int) -> Tensor:
    """Apply a last-axis op along any axis by swapping it to the end and back."""
    if axis in (-1, x.ndim - 1):
        return fn(x)
    return swapaxes(fn(swapaxes(x, axis, -1)), axis, -1)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _last_axis(Softmax.apply, x, axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _last_axis(LogSoftmax.apply, x, axis)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    return LayerNorm.apply(x, weight, bias, eps=eps)


def embedding(weight: Tensor, idx: np.ndarray) -> Tensor:
    """Rows of `weight` (V, C) for integer ids `idx` (...) -> (..., C)."""
    return Embedding.apply(weight, np.asarray(idx))


def dropout(x: Tensor, p: float, rng: np.random.Generator | None, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout in training needs an np.random.Generator (pass rng=...)")
    return Dropout.apply(x, p, rng)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Elementwise `a if cond else b`; cond is a constant boolean array."""
    like = a if isinstance(a, Tensor) else b
    if not isinstance(like, Tensor):
        raise TypeError("where: a or b must be a Tensor")
    cond = cond.data if isinstance(cond, Tensor) else cond
    return Where.apply(np.asarray(cond, dtype=bool), _lift(a, like), _lift(b, like))


def masked_fill(x: Tensor, mask: Any, value: float) -> Tensor:
    """x with `value` wherever `mask` is True (mask broadcasts to x)."""
    mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask, dtype=bool)
    try:
        np.broadcast_to(mask, x.shape)
    except ValueError:
        raise ValueError(f"masked_fill: mask {mask.shape} does not broadcast to {x.shape}") from None
    return where(mask, Tensor(np.asarray(value, dtype=x.dtype)), x)


def cross_entropy(logits: Tensor, targets: np.ndarray, ignore_index: int = -100,
                  reduction: str = "mean") -> Tensor:
    """Next-token loss from logits (..., V) and integer targets (...)."""
    targets = targets.data.astype(np.int64) if isinstance(targets, Tensor) else np.asarray(targets)
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index, reduction=reduction)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(HS), causal) v over the last two axes."""
    return CausalAttention.apply(q, k, v)


def multihead_attention(qkv: Tensor, n_head: int, cache=None, layer: int = 0) -> Tensor:
    """Causal self-attention of `n_head` heads from a fused (B, T, 3C) projection -> (B, T, C).

    `cache` is a `tinygpt.nn.KVCache` (or anything with its `append(layer, k, v)`)."""
    return MultiHeadAttention.apply(qkv, n_head, cache, layer)


# --- Tensor operators ------------------------------------------------------------------------------
# Tensor (autograd.py) has no arithmetic of its own: this one block attaches it, so the op
# definitions above stay the only place the math lives.

def _attach() -> None:
    T = Tensor
    T.__add__ = add
    T.__radd__ = lambda self, other: add(self, other)
    T.__sub__ = sub
    T.__rsub__ = lambda self, other: sub(_lift(other, self), self)
    T.__mul__ = mul
    T.__rmul__ = lambda self, other: mul(self, other)
    T.__truediv__ = div
    T.__rtruediv__ = lambda self, other: div(_lift(other, self), self)
    T.__neg__ = neg
    T.__pow__ = pow
    T.__matmul__ = matmul
    T.__rmatmul__ = lambda self, other: matmul(_lift(other, self), self)
    T.__getitem__ = getitem
    T.sum, T.mean, T.max = sum, mean, max
    T.reshape, T.permute, T.swapaxes = reshape, permute, swapaxes
    T.transpose = lambda self, *axes: transpose(self, axes[0] if len(axes) == 1 else (axes or None))
    T.T = property(transpose)
    T.exp, T.log, T.sqrt, T.tanh, T.relu, T.gelu = exp, log, sqrt, tanh, relu, gelu
    T.softmax, T.log_softmax = softmax, log_softmax
    # comparisons give plain boolean arrays (masks for where/masked_fill): no gradient flows
    T.__gt__ = lambda self, other: self.data > _lift(other, self).data
    T.__ge__ = lambda self, other: self.data >= _lift(other, self).data
    T.__lt__ = lambda self, other: self.data < _lift(other, self).data
    T.__le__ = lambda self, other: self.data <= _lift(other, self).data


_attach()
