"""Fused ops: the `Function`s whose forward and backward call numba kernels (`tinygpt/kernels/`).

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
from tinygpt.kernels import decode as decode_kernels
from tinygpt.autograd.tensor import Context, Function, is_grad_enabled

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


class SwiGLU(Function):
    """Llama's gate: y = silu(a) * b = a sigmoid(a) b, elementwise.   a, b: (...) -> y: (...)

    Saves a and b only; kernel: swiglu_* (both gradients in one pass).
    """

    @staticmethod
    def forward(ctx: Context, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.shape != b.shape:
            raise ValueError(f"swiglu: gate {a.shape} and up {b.shape} differ in shape")
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        ctx.save(a, b)
        return kernels.swiglu_forward(a.reshape(-1), b.reshape(-1)).reshape(a.shape)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        a, b = ctx.saved
        dy = np.ascontiguousarray(dy).reshape(-1)
        da, db = kernels.swiglu_backward(a.reshape(-1), b.reshape(-1), dy)
        return da.reshape(a.shape), db.reshape(b.shape)


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


class RMSNorm(Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis (Llama; no centring, no bias).

    x: (..., C), w: (C,). With xhat = x * rstd and g = dy * w, dx = rstd * (g - xhat * mean(g * xhat)).
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
        if w.shape != x.shape[-1:]:
            raise ValueError(f"rms_norm: input {x.shape} needs a weight of shape {x.shape[-1:]}, "
                             f"got {w.shape}")
        x2 = _rows(x)
        y, rstd = kernels.rms_norm_forward(x2, w, eps)
        ctx.save(x2, w, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, w, rstd = ctx.saved
        dx, dw = kernels.rms_norm_backward(_rows(dy), x2, w, rstd)
        return dx.reshape(dy.shape), dw


class CrossEntropy(Function):
    """-log softmax(logits)[target] per row: their mean over rows whose target is not
    ignore_index ("mean"), their sum ("sum"), or each row's loss, 0 where ignored ("none").

    logits: (..., V), targets: int (...) -> scalar, or (...) for "none". Fused with log-softmax:
    the kernel keeps each row's logsumexp, and dlogits = (softmax(logits) - onehot(target)) * dloss
    per row.
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
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got "
                             f"{reduction!r}")
        x2 = _rows(logits)
        t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
        losses, lse = kernels.cross_entropy_forward(x2, t, ignore_index)
        ctx.save(x2, t, lse)
        ctx.shape, ctx.ignore_index, ctx.reduction = logits.shape, ignore_index, reduction
        if reduction == "none":                     # the kernel gives ignored rows a loss of 0
            ctx.scale = 1.0
            return losses.astype(logits.dtype, copy=False).reshape(targets.shape)
        n_valid = int((t != ignore_index).sum())
        if n_valid == 0:
            raise ValueError(f"cross_entropy: every target is ignore_index ({ignore_index}); "
                             "there is no loss to average")
        ctx.scale = 1.0 / n_valid if reduction == "mean" else 1.0
        return np.asarray(losses.sum(dtype=np.float64) * ctx.scale, dtype=logits.dtype)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, t, lse = ctx.saved
        dy = dy.reshape(-1) if ctx.reduction == "none" else dy     # a loss per row, or one
        dloss = np.where(t != ctx.ignore_index, dy * ctx.scale, 0).astype(x2.dtype)
        return kernels.cross_entropy_backward(x2, t, lse, dloss).reshape(ctx.shape), None


# --- attention -------------------------------------------------------------------------------
# Two ops share these helpers: `CausalAttention` (q, k, v already split into heads) and
# `SelfAttention` (heads split, rotated and merged inside, keys and values cached for generation).

def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int = 1
            ) -> tuple[np.ndarray, tuple]:
    """Causal softmax(q k^T / sqrt(HS)) v and what its backward needs.

    q: (..., G H, Tq, HS), k, v: (..., H, Tk, HS) -> y: (..., G H, Tq, HS). Query i sees keys
    j <= i + Tk - Tq (Tk > Tq when earlier keys come from a KV cache). Query heads g H .. share
    key/value head g when `group` G > 1: their rows go to the kernel as one (G Tq, HS) stack.
    """
    lead, (Tq, HS) = q.shape[:-2], q.shape[-2:]
    q3 = np.ascontiguousarray(q).reshape(-1, group * Tq, HS)
    k3, v3 = (np.ascontiguousarray(a).reshape(-1, a.shape[-2], HS) for a in (k, v))
    scale = 1.0 / math.sqrt(HS)
    y, p = kernels.attention_forward(q3, k3, v3, scale, group)
    return y.reshape(*lead, Tq, HS), (q3, k3, v3, p, scale, q.shape, k.shape, group)


def _attend_backward(saved: tuple, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P = softmax(S), S = q k^T / sqrt(HS), y = P v:  dv = P^T dy, dP = dy v^T,
    dS = P (dP - rowsum(dP P)) / sqrt(HS), dq = dS k, dk = dS^T q."""
    q3, k3, v3, p, scale, q_shape, k_shape, group = saved
    dy3 = np.ascontiguousarray(dy).reshape(q3.shape)
    dq, dk, dv = kernels.attention_backward(dy3, q3, k3, v3, p, scale, group)
    return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(k_shape)


def rope_tables(head_size: int, n_positions: int, base: float = 10000.0,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of RoPE's angles, each (n_positions, head_size), computed once per model.

    Position t rotates the pair (x[i], x[i + HS/2]) by t * base^(-2i/HS) (Su et al. 2021, in the
    half-split pairing that Hugging Face's Llama uses), so q.k depends only on the distance.
    """
    if head_size % 2:
        raise ValueError(f"RoPE needs an even head size, got {head_size}")
    inv_freq = base ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)   # (HS/2,)
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)           # (P, HS/2)
    angles = np.concatenate([angles, angles], axis=-1)                              # (P, HS)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False) -> np.ndarray:
    """x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1] for the halves x = [x1, x2].

    The map is orthogonal, so its transpose (the backward) is the rotation by -angle:
    `inverse=True` gives x cos - rotate_half(x) sin.   x: (..., T, HS), cos, sin: (T, HS)
    """
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos - rot * sin if inverse else x * cos + rot * sin


class RoPE(Function):
    """Rotary position embedding of x: (..., T, HS) at positions given by cos, sin: (T, HS)."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        if cos.shape != x.shape[-2:] or sin.shape != cos.shape:
            raise ValueError(f"rope: input {x.shape} needs cos and sin of shape {x.shape[-2:]}, "
                             f"got {cos.shape} and {sin.shape}")
        ctx.save(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        cos, sin = ctx.saved
        return _rotate(dy, cos, sin, inverse=True), None, None


class CausalAttention(Function):
    """Causal scaled-dot-product attention, the mask applied inside the kernel.

    q: (..., Tq, HS), k, v: (..., Tk, HS) -> y: (..., Tq, HS); see `_attend`.
    """

    @staticmethod
    def forward(ctx: Context, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if q.shape[:-2] != k.shape[:-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1] \
                or q.shape[-2] > k.shape[-2]:
            raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape} must be "
                             "(..., Tq, HS), (..., Tk, HS), (..., Tk, HS) with Tq <= Tk")
        y, saved = _attend(q, k, v)
        ctx.save(*saved)
        return y

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return _attend_backward(ctx.saved, dy)


def _heads(x: np.ndarray, n: int) -> np.ndarray:
    """(B, T, n * HS) -> (B, n, T, HS), a view."""
    B, T, C = x.shape
    return x.reshape(B, T, n, C // n).transpose(0, 2, 1, 3)


def _merge(y: np.ndarray) -> np.ndarray:
    """(B, n, T, HS) -> (B, T, n * HS)."""
    B, n, T, HS = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, n * HS)


class Ragged:
    """The positions of a right-padded (B, T) batch that a pass computes: row n's first lengths[n].

    Fine-tuning batches are padded to their longest row, and a row's padding after its last
    scored token changes nothing: attention is causal, so no earlier position sees it. With a
    `Ragged` the position-wise layers (norms, products, MLP, residual adds) run on the M =
    sum(lengths) kept positions as one (M, C) matrix, row by row in order; attention pads its
    inputs back to (B, T, ...) with zeros, attends as usual, and packs its output again.

        index[m] = n T + t for the m-th kept position (row n, position t); row n starts at offsets[n]
    """

    def __init__(self, lengths: np.ndarray, T: int):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or np.any(self.lengths < 0) or np.any(self.lengths > T):
            raise ValueError(f"ragged lengths must be a 1-D array of values in [0, {T}], got "
                             f"{np.asarray(lengths).tolist()}")
        self.shape = (self.lengths.shape[0], int(T))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.index = np.flatnonzero(np.arange(T)[None, :] < self.lengths[:, None])   # (M,)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def pad(self, a: np.ndarray) -> np.ndarray:
        """(M, W) -> (B, T, W), zeros at the positions not kept."""
        B, T = self.shape
        if a.ndim != 2 or a.shape[0] != self.size:
            raise ValueError(f"ragged: expected ({self.size}, W) rows, got {a.shape}")
        out = np.zeros((B * T, a.shape[1]), a.dtype)
        out[self.index] = a
        return out.reshape(B, T, a.shape[1])

    def pack(self, a: np.ndarray) -> np.ndarray:
        """(B, T, W) -> (M, W): the kept positions' rows."""
        return a.reshape(self.shape[0] * self.shape[1], -1)[self.index]

    def rows(self, n: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Where position t of row n is among the M kept rows (t < lengths[n])."""
        return self.offsets[n] + t


def _self_attention(ctx: Context, q, k, v, cache, layer: int, rope, record=None) -> np.ndarray:
    """Heads in, merged output out: RoPE on q and k, append k, v to the cache, share each key/value
    head among n_head / n_kv_head query heads (grouped-query attention), attend causally.

    q: (B, NH, T, HS), k, v: (B, KV, T, HS) -> y: (B, T, NH * HS). A `record` list gets the
    attention probabilities this call used, P: (B, NH, T, Tk), the array the backward reads
    (pictures read it; nothing may write to it).
    """
    NH, KV, T = q.shape[1], k.shape[1], q.shape[2]
    if rope is not None:
        start = cache.length if cache is not None else 0
        cos, sin = (table[start:start + T] for table in rope)          # (T, HS) each
        if cos.shape != (T, q.shape[-1]):
            raise ValueError(f"rope tables of shape {rope[0].shape} do not cover positions "
                             f"{start}..{start + T - 1} of head size {q.shape[-1]}")
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        ctx.rope = (cos, sin)
    if cache is not None:
        k, v = cache.append(layer, k, v)                               # (B, KV, Tk, HS)
        # decoding one token reads the cache in place (that kernel keeps no P to record)
        if T == 1 and q.dtype == np.float32 and not is_grad_enabled() and record is None:
            ctx.cached = True
            return decode_kernels.attend_one(np.ascontiguousarray(q[:, :, 0]),
                                             cache.k[layer], cache.v[layer],
                                             k.shape[2]).reshape(q.shape[0], 1, NH * q.shape[3])
    # query head h reads key/value head h // (NH / KV): one product per key/value head
    y, ctx.attn = _attend(q, k, v, NH // KV)
    if record is not None:
        record.append(ctx.attn[3].reshape(q.shape[0], NH, T, k.shape[2]))   # (B, NH, T, Tk)
    ctx.cached = cache is not None
    return _merge(y)


def _self_attention_backward(ctx: Context, dy: np.ndarray):
    """dq: (B, NH, T, HS), dk, dv: (B, KV, T, HS) from dy: (B, T, NH * HS)."""
    if ctx.cached:
        raise RuntimeError("backward through KV-cached attention: the cache is for "
                           "generation; run it under no_grad")
    NH = ctx.attn[5][1]                                              # q's (B, NH, T, HS)
    # a shared key/value head's gradient is summed over its query heads by the kernel's products
    dq, dk, dv = _attend_backward(ctx.attn, _heads(dy, NH))
    if getattr(ctx, "rope", None) is not None:
        cos, sin = ctx.rope
        dq, dk = _rotate(dq, cos, sin, inverse=True), _rotate(dk, cos, sin, inverse=True)
    return dq, dk, dv


def _refuse_cache(cache) -> None:
    if cache is not None:
        raise ValueError("attention: a ragged batch is for training and scoring, not with a "
                         "KV cache")


def _check_heads(op: str, n_head: int, n_kv_head: int, widths: tuple[int, int]) -> None:
    q_width, kv_width = widths
    if n_head <= 0 or n_kv_head <= 0 or n_head % n_kv_head or q_width % n_head \
            or kv_width * n_head != q_width * n_kv_head:
        raise ValueError(f"{op}: {n_head} query heads of width {q_width} and {n_kv_head} "
                         f"key/value heads of width {kv_width} do not fit (n_head must be a "
                         "multiple of n_kv_head, every head the same size)")


class MultiHeadAttention(Function):
    """Causal multi-head self-attention on a fused projection: split heads, attend, merge.

    qkv: (B, T, (NH + 2 KV) HS) as GPT-2's `c_attn` makes it, [q | k | v] along the last axis
    -> y: (B, T, NH HS). Doing the split and merge here, not as reshape, permute and index ops,
    saves building three zero-padded (B, T, 3C) gradients and adding them up, and ~7 op calls
    per layer when decoding. With a `cache` (generation, under no_grad) this step's keys and
    values are appended to it and the queries attend over every cached position. A `record`
    list gets each call's attention probabilities (see `_self_attention`).
    """

    @staticmethod
    def forward(ctx: Context, qkv: np.ndarray, n_head: int, cache=None, layer: int = 0,
                n_kv_head: int | None = None, rope=None, record=None,
                ragged: Ragged | None = None) -> np.ndarray:
        if ragged is not None:
            _refuse_cache(cache)
            y = MultiHeadAttention.forward(ctx, ragged.pad(qkv), n_head, None, layer,
                                           n_kv_head, rope, record)
            ctx.ragged = ragged
            return ragged.pack(y)
        ctx.ragged = None
        KV = n_kv_head or n_head
        width = qkv.shape[-1] // (n_head + 2 * KV) if qkv.shape[-1] % (n_head + 2 * KV) == 0 else 0
        if not width:
            heads = (f"3 x {n_head} heads" if KV == n_head
                     else f"{n_head} query + 2 x {KV} key/value heads")
            raise ValueError(f"multihead_attention: last axis of qkv {qkv.shape} is not {heads}")
        q, k, v = np.split(qkv, [n_head * width, (n_head + KV) * width], axis=-1)
        return _self_attention(ctx, _heads(q, n_head), _heads(k, KV), _heads(v, KV), cache,
                               layer, rope, record)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        ragged = ctx.ragged
        dq, dk, dv = _self_attention_backward(ctx, dy if ragged is None else ragged.pad(dy))
        dqkv = np.concatenate([_merge(d) for d in (dq, dk, dv)], axis=-1)
        return (dqkv if ragged is None else ragged.pack(dqkv)), None, None, None


class SelfAttention(Function):
    """Causal self-attention on separate projections (Llama's q_proj, k_proj, v_proj).

    q: (B, T, NH HS), k, v: (B, T, KV HS) -> y: (B, T, NH HS); with `rope` = (cos, sin) tables
    (see `rope_tables`) q and k are rotated at their positions, offset by the cache's length;
    `record` as in `MultiHeadAttention`.
    """

    @staticmethod
    def forward(ctx: Context, q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int,
                n_kv_head: int, cache=None, layer: int = 0, rope=None,
                record=None, ragged: Ragged | None = None) -> np.ndarray:
        if ragged is not None:
            _refuse_cache(cache)
            y = SelfAttention.forward(ctx, ragged.pad(q), ragged.pad(k), ragged.pad(v), n_head,
                                      n_kv_head, None, layer, rope, record)
            ctx.ragged = ragged
            return ragged.pack(y)
        ctx.ragged = None
        if q.ndim != 3 or k.shape != v.shape or k.shape[:2] != q.shape[:2]:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must be (B, T, "
                             "NH * HS), (B, T, KV * HS), (B, T, KV * HS)")
        _check_heads("attention", n_head, n_kv_head, (q.shape[-1], k.shape[-1]))
        return _self_attention(ctx, _heads(q, n_head), _heads(k, n_kv_head),
                               _heads(v, n_kv_head), cache, layer, rope, record)

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        ragged = ctx.ragged
        grads = _self_attention_backward(ctx, dy if ragged is None else ragged.pad(dy))
        return tuple(_merge(d) if ragged is None else ragged.pack(_merge(d)) for d in grads)
