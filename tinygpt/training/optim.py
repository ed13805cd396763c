"""Optimizers and the learning-rate schedule: `SGD`, `AdamW`, `lr_at`, `clip_coef`.

This module owns how gradients become parameter updates. It reads `Tensor.grad` (filled by
`loss.backward()`) and writes `Tensor.data` in place; the loop that calls it is `train.py`.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", algorithm 2), per parameter:

    m = b1 m + (1 - b1) g                          first moment (running mean of g)
    v = b2 v + (1 - b2) g^2                        second moment (running mean of g^2)
    p = p - lr * wd * p                            decoupled decay: not part of g, so not in m, v
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Weight decay goes only to matrices (ndim >= 2): biases and LayerNorm weights are 1-D and never
decay (GPT-2, nanoGPT); the embeddings `wte`, `wpe` decay only with `decay_embeddings=True`.

Memory and speed: the moments are float32 arrays allocated once, next to the parameters, and the
update is one fused, in-place pass over (p, g, m, v) per parameter (`kernels.adamw_update`, numba,
both cores): it reads and writes each element once, where NumPy ufuncs would make ~8 passes.
`step(grad_scale=...)` multiplies the gradient on the fly: gradient clipping and the 1/n of
gradient accumulation cost no extra pass over the gradients.

    python -m pytest tests/test_optim.py -q
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from tinygpt import kernels
from tinygpt.autograd.tensor import Tensor

EMBEDDING_NAMES = ("wte.weight", "wpe.weight")   # GPT-2's token and position tables


def should_decay(name: str, p: Tensor, decay_embeddings: bool = False) -> bool:
    """Weight decay for matrices only: not biases, not LayerNorm weights (all 1-D), and not the
    embedding tables unless `decay_embeddings`."""
    if p.ndim < 2:
        return False
    return decay_embeddings or not name.endswith(EMBEDDING_NAMES)


def _named(params: Iterable[tuple[str, Tensor]] | Iterable[Tensor]) -> list[tuple[str, Tensor]]:
    """Accept `model.named_parameters()` or a plain list of tensors (named "0", "1", ...)."""
    out = [(p if isinstance(p, tuple) else (str(i), p)) for i, p in enumerate(params)]
    if not out:
        raise ValueError("optimizer got an empty parameter list")
    for name, p in out:
        if not isinstance(p, Tensor):
            raise TypeError(f"optimizer: parameter {name!r} is a {type(p).__name__}, not a Tensor")
    return out


def global_grad_norm(params: Iterable[Tensor]) -> float:
    """sqrt(sum of every gradient element squared), over all parameters that have a gradient."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            g = p.grad.reshape(-1)
            total += float(np.dot(g, g))     # BLAS dot: one pass, no g*g temporary
    return math.sqrt(total)


def clip_coef(norm: float, max_norm: float) -> float:
    """The factor that brings gradients of global norm `norm` to at most `max_norm`:
    min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_; max_norm 0: no clipping.

    The one clipping rule of tinygpt: `clip_grad_norm` applies it to the gradients, the trainer
    folds it into `optimizer.step(grad_scale=...)` instead (no extra pass over the gradients)."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients in place so their global norm is at most `max_norm`; return the norm
    before clipping."""
    params = list(params)
    norm = global_grad_norm(params)
    scale = clip_coef(norm, max_norm)
    if scale != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad *= scale
    return norm


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine decay to `min_lr`.

    Steps 0 .. warmup-1 ramp lr * (step + 1) / warmup, so step warmup-1 is the peak `lr`; from
    `warmup` to `max_steps` the rate follows half a cosine from lr down to min_lr, and stays there.
    With warmup=0 and min_lr=lr it is constant (the book's chapter 5 run).
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps or max_steps <= warmup:
        return min_lr
    progress = (step - warmup) / (max_steps - warmup)                  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class Optimizer:
    """Shared parts: named parameters, per-parameter decay flags, `lr`, the step count `t`."""

    def __init__(self, params, lr: float, weight_decay: float, decay_embeddings: bool):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        self.named = _named(params)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.decay = [should_decay(n, p, decay_embeddings) for n, p in self.named]
        self.t = 0                             # updates done so far

    def zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Per-parameter buffers by name, for checkpoints (the caller adds the parameters)."""
        return {}

    def state_dict(self) -> dict:
        """Everything but the arrays: JSON-ready."""
        return {"type": type(self).__name__, "t": self.t, "lr": self.lr}

    def load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore `state_dict()` and `state_arrays()`, copying into the preallocated buffers."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {state.get('type')}, not "
                             f"{type(self).__name__}")
        mine = self.state_arrays()
        missing = sorted(set(mine) - set(arrays))
        if missing:
            raise ValueError(f"optimizer state is missing {len(missing)} buffers, e.g. "
                             f"{missing[0]}")
        for key, buf in mine.items():
            if arrays[key].shape != buf.shape:
                raise ValueError(f"optimizer buffer {key}: expected shape {buf.shape}, got "
                                 f"{arrays[key].shape}")
            np.copyto(buf, arrays[key])
        self.t, self.lr = int(state["t"]), float(state["lr"])


class SGD(Optimizer):
    """p -= lr * (g + momentum buffer), with optional momentum and decoupled weight decay."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, decay_embeddings: bool = False):
        super().__init__(params, lr, weight_decay, decay_embeddings)
        self.momentum = float(momentum)
        self.buf = [np.zeros_like(p.data) for _, p in self.named] if momentum else []

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"momentum.{n}": b for (n, _), b in zip(self.named, self.buf)}

    def step(self, grad_scale: float = 1.0) -> None:
        """One update from the current gradients, each multiplied by `grad_scale` first."""
        self.t += 1
        lr, scale = self.lr, float(grad_scale)
        for i, (_, p) in enumerate(self.named):
            if p.grad is None:
                continue
            g = p.grad
            if scale != 1.0:
                g *= scale                      # leaf grads are ours to modify
            if self.decay[i] and self.weight_decay:
                p.data *= 1.0 - lr * self.weight_decay
            if self.momentum:
                self.buf[i] *= self.momentum
                self.buf[i] += g
                g = self.buf[i]
            p.data -= lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay; see the module docstring for the update."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, decay_embeddings: bool = False):
        super().__init__(params, lr, weight_decay, decay_embeddings)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.m = [np.zeros_like(p.data) for _, p in self.named]       # same dtype as p: float32
        self.v = [np.zeros_like(p.data) for _, p in self.named]

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"m.{n}": m for (n, _), m in zip(self.named, self.m)}
        out.update({f"v.{n}": v for (n, _), v in zip(self.named, self.v)})
        return out

    def step(self, grad_scale: float = 1.0) -> None:
        """One AdamW update from the current gradients, each multiplied by `grad_scale` first."""
        self.t += 1
        b1, b2, t = self.beta1, self.beta2, self.t
        step_size = self.lr / (1.0 - b1 ** t)
        inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2 ** t)
        for i, (_, p) in enumerate(self.named):
            if p.grad is None:
                continue
            decay = 1.0 - self.lr * self.weight_decay if self.decay[i] else 1.0
            p_, g, m, v = (a.reshape(-1) for a in (p.data, p.grad, self.m[i], self.v[i]))
            kernels.adamw_update(p_, g, m, v, float(grad_scale), b1, b2, self.eps, step_size,
                                 inv_sqrt_bc2, decay)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "betas": [self.beta1, self.beta2], "eps": self.eps}
