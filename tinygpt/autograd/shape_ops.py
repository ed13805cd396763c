"""Primitive ops that move, pick or mask elements: reshape, permute, indexing, take_along_axis,
concatenate, stack, where, dropout and embedding. Each backward puts the gradient back where the
forward took the value from (a scatter-add for indexing and embedding).

The arithmetic, matmul and reductions are in `ops.py`; `functional.py` calls both.

    python -m pytest tests/test_ops.py -q
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinygpt.autograd.ops import unbroadcast
from tinygpt.autograd.tensor import Context, Function, RowGrad


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


def _is_distinct_rows(index: Any) -> bool:
    """A 1-D integer array naming each row at most once: plain assignment scatters it."""
    return (isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "iu"
            and (index.size == 0 or index.min() >= 0) and np.unique(index).size == index.size)


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
        if _is_basic_index(ctx.index) or _is_distinct_rows(ctx.index):
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

    dweight gathers dy rows back to their token ids, adding where an id repeats: a RowGrad, so
    a table's gradient is never a dense copy of zeros first.
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
        return RowGrad(ctx.shape, idx.reshape(-1), dy.reshape(-1, ctx.shape[1])), None
