"""Fused ops: the `Function`s whose forward and backward call numba kernels (`kernels.py`).

Softmax, log-softmax, LayerNorm, GELU, cross-entropy and causal attention each do in one or two
passes over memory what a chain of primitive ops would do in many, and keep only what their
backward needs. Every kernel has a NumPy twin (`TINYGPT_NUMBA=0` runs the twins), and every op here
is gradient-checked like the primitives.

    python -m pytest tests/test_ops.py -q -k "softmax or layer_norm or attention or entropy"
"""
from __future__ import annotations

import math

import numpy as np

from tinygpt import kernels
from tinygpt.autograd import Context, Function

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
