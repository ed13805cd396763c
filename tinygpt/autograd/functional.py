"""The functional API: every differentiable op as a function of Tensors, as `torch.nn.functional`.

    import tinygpt.autograd.functional as F
    y = F.softmax(x @ w, axis=-1)

Each function checks and converts its arguments, then applies one `Function` from `ops.py`
(primitives) or `fused.py` (kernel-backed). The block at the bottom gives `Tensor` its operators
(`+ - * / @ ** []`, `.sum()`, `.T`, ...), so the op definitions stay the only place the math lives.
"""
from __future__ import annotations

import builtins
from typing import Any, Sequence

import numpy as np

from tinygpt.autograd import fused
from tinygpt.autograd import ops, shape_ops
from tinygpt.autograd.tensor import Tensor

# NOTE: `sum`, `max` and `pow` below shadow the builtins inside this module; code here that means
# the builtin says `builtins.max`.

def add(a: Tensor, b: Any) -> Tensor:
    return ops.Add.apply(a, ops.lift(b, a))


def sub(a: Tensor, b: Any) -> Tensor:
    return ops.Sub.apply(a, ops.lift(b, a))


def mul(a: Tensor, b: Any) -> Tensor:
    return ops.Mul.apply(a, ops.lift(b, a))


def div(a: Tensor, b: Any) -> Tensor:
    return ops.Div.apply(a, ops.lift(b, a))


def neg(x: Tensor) -> Tensor:
    return ops.Neg.apply(x)


def pow(x: Tensor, p: float) -> Tensor:  # noqa: A001 (the math name)
    if isinstance(p, Tensor):
        raise TypeError("pow: the exponent must be a Python number, not a tensor")
    return ops.Pow.apply(x, float(p))


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Batched matrix product; a 1-D operand is treated as a row (a) or column (b) vector."""
    b = ops.lift(b, a)
    inner_b = b.shape[-2:-1] if b.ndim >= 2 else b.shape
    if a.ndim == 0 or b.ndim == 0 or a.shape[-1:] != inner_b:       # checked on what was passed
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match (inner "
                         f"dimensions {a.shape[-1:]} and {inner_b})")
    if a.ndim == 1 and b.ndim >= 2:
        return reshape(matmul(reshape(a, (1, -1)), b), b.shape[:-2] + b.shape[-1:])
    if b.ndim == 1:
        out = matmul(a, reshape(b, (-1, 1)))
        return reshape(out, out.shape[:-1])
    return ops.MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
           transposed: bool = False) -> Tensor:
    """x @ weight + bias with weight (in, out), or (out, in) with `transposed` (x @ weight^T)."""
    return ops.Linear.apply(x, weight, bias, transposed=transposed)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return ops.Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    n = int(np.prod([x.shape[a] for a in ops.normalize_axes(axis, x.ndim)]))
    return mul(sum(x, axis, keepdims), 1.0 / builtins.max(n, 1))


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return ops.Max.apply(x, axis=axis, keepdims=keepdims)


def reshape(x: Tensor, *shape) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return shape_ops.Reshape.apply(x, shape)


def permute(x: Tensor, *axes) -> Tensor:
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return shape_ops.Permute.apply(x, axes)


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
    return shape_ops.GetItem.apply(x, index)


def concatenate(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    return shape_ops.Concatenate.apply(*[ops.lift(x, xs[0]) for x in xs], axis=axis)


def stack(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    return shape_ops.Stack.apply(*[ops.lift(x, xs[0]) for x in xs], axis=axis)


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
    return ops.Exp.apply(x)


def log(x: Tensor) -> Tensor:
    return ops.Log.apply(x)


def sqrt(x: Tensor) -> Tensor:
    return ops.Sqrt.apply(x)


def tanh(x: Tensor) -> Tensor:
    return ops.Tanh.apply(x)


def relu(x: Tensor) -> Tensor:
    return ops.ReLU.apply(x)


def gelu(x: Tensor) -> Tensor:
    return fused.GELU.apply(x)


def silu(x: Tensor) -> Tensor:
    return ops.SiLU.apply(x)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up as one op (Llama's MLP): keeps the two inputs only."""
    return fused.SwiGLU.apply(gate, up)


def log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)), finite for any finite x (DPO's loss)."""
    return ops.LogSigmoid.apply(x)


def take_along_axis(x: Tensor, idx: np.ndarray, axis: int = -1) -> Tensor:
    """x's entries at integer `idx` along the last axis (e.g. the log-prob of each target)."""
    if axis not in (-1, x.ndim - 1):
        raise ValueError("take_along_axis: only the last axis is supported")
    return shape_ops.TakeAlongAxis.apply(x, np.asarray(idx.data if isinstance(idx, Tensor) else idx))


gather = take_along_axis


def _last_axis(fn, x: Tensor, axis: int) -> Tensor:
    """Apply a last-axis op along any axis by swapping it to the end and back."""
    if axis in (-1, x.ndim - 1):
        return fn(x)
    return swapaxes(fn(swapaxes(x, axis, -1)), axis, -1)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _last_axis(fused.Softmax.apply, x, axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _last_axis(fused.LogSoftmax.apply, x, axis)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    return fused.LayerNorm.apply(x, weight, bias, eps=eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    return fused.RMSNorm.apply(x, weight, eps=eps)


def rope(x: Tensor, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """Rotate x: (..., T, HS) by RoPE at the positions of cos, sin: (T, HS) (`fused.rope_tables`)."""
    return fused.RoPE.apply(x, np.asarray(cos, x.dtype), np.asarray(sin, x.dtype))


def embedding(weight: Tensor, idx: np.ndarray) -> Tensor:
    """Rows of `weight` (V, C) for integer ids `idx` (...) -> (..., C)."""
    return shape_ops.Embedding.apply(weight, np.asarray(idx))


def dropout(x: Tensor, p: float, rng: np.random.Generator | None, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout in training needs an np.random.Generator (pass rng=...)")
    return shape_ops.Dropout.apply(x, p, rng)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Elementwise `a if cond else b`; cond is a constant boolean array."""
    like = a if isinstance(a, Tensor) else b
    if not isinstance(like, Tensor):
        raise TypeError("where: a or b must be a Tensor")
    cond = cond.data if isinstance(cond, Tensor) else cond
    return shape_ops.Where.apply(np.asarray(cond, dtype=bool), ops.lift(a, like), ops.lift(b, like))


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
    return fused.CrossEntropy.apply(logits, targets, ignore_index=ignore_index, reduction=reduction)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(HS), causal) v over the last two axes."""
    return fused.CausalAttention.apply(q, k, v)


def multihead_attention(qkv: Tensor, n_head: int, cache=None, layer: int = 0,
                        n_kv_head: int | None = None, rope=None,
                        record: list | None = None, ragged=None) -> Tensor:
    """Causal self-attention of `n_head` heads from a fused (B, T, 3C) projection -> (B, T, C).

    `cache` is a `tinygpt.models.nn.KVCache` (or anything with its `append(layer, k, v)` and `length`);
    `n_kv_head` < n_head shares key/value heads (grouped-query attention); `rope` = (cos, sin)
    tables rotate q and k (see `fused.rope_tables`); a `record` list gets the softmax
    probabilities the kernel computed, (B, NH, T, Tk) (attention pictures); with a `ragged`
    layout (`fused.Ragged`) qkv is (M, 3C), the batch's kept positions, and so is the output."""
    return fused.MultiHeadAttention.apply(qkv, n_head, cache, layer, n_kv_head=n_kv_head,
                                          rope=rope, record=record, ragged=ragged)


def attention(q: Tensor, k: Tensor, v: Tensor, n_head: int, n_kv_head: int | None = None,
              cache=None, layer: int = 0, rope=None, record: list | None = None,
              ragged=None) -> Tensor:
    """Causal self-attention on separate projections q: (B, T, NH HS), k, v: (B, T, KV HS),
    as Llama's q_proj, k_proj, v_proj make them -> (B, T, NH HS). Arguments as above."""
    return fused.SelfAttention.apply(q, k, v, n_head=n_head, n_kv_head=n_kv_head or n_head,
                                     cache=cache, layer=layer, rope=rope, record=record,
                                     ragged=ragged)


# --- Tensor operators ------------------------------------------------------------------------------
# Tensor (tensor.py) has no arithmetic of its own: this one block attaches it, so the op
# definitions above stay the only place the math lives.

def _attach() -> None:
    T = Tensor
    T.__add__ = add
    T.__radd__ = lambda self, other: add(self, other)
    T.__sub__ = sub
    T.__rsub__ = lambda self, other: sub(ops.lift(other, self), self)
    T.__mul__ = mul
    T.__rmul__ = lambda self, other: mul(self, other)
    T.__truediv__ = div
    T.__rtruediv__ = lambda self, other: div(ops.lift(other, self), self)
    T.__neg__ = neg
    T.__pow__ = pow
    T.__matmul__ = matmul
    T.__rmatmul__ = lambda self, other: matmul(ops.lift(other, self), self)
    T.__getitem__ = getitem
    T.sum, T.mean, T.max = sum, mean, max
    T.reshape, T.permute, T.swapaxes = reshape, permute, swapaxes
    T.transpose = lambda self, *axes: transpose(self, axes[0] if len(axes) == 1 else (axes or None))
    T.T = property(transpose)
    T.exp, T.log, T.sqrt, T.tanh, T.relu, T.gelu = exp, log, sqrt, tanh, relu, gelu
    T.silu = silu
    T.softmax, T.log_softmax = softmax, log_softmax
    # comparisons give plain boolean arrays (masks for where/masked_fill): no gradient flows
    T.__gt__ = lambda self, other: self.data > ops.lift(other, self).data
    T.__ge__ = lambda self, other: self.data >= ops.lift(other, self).data
    T.__lt__ = lambda self, other: self.data < ops.lift(other, self).data
    T.__le__ = lambda self, other: self.data <= ops.lift(other, self).data


_attach()
