"""Layers: `Module` (parameter discovery, names, train/eval, state dicts) and the GPT-2 building blocks.

Attribute names are GPT-2's checkpoint names (`c_attn`, `c_proj`, `c_fc`, `ln_1`, ...), and
`Linear.weight` is stored (in, out) and applied as `x @ W + b`, so GPT-2 tensors load under their
own names with no transposes. Initialisation takes an explicit `np.random.Generator`.

    python -m pytest tests/test_nn.py -q
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from tinygpt.autograd import functional as F
from tinygpt.autograd.tensor import Tensor, is_grad_enabled


class Parameter(Tensor):
    """A Tensor that belongs to a Module's state: saved, loaded and counted, trained or frozen.

    Being a parameter and being trained are separate questions: `requires_grad` says whether the
    optimizer updates it (`Module.requires_grad_` freezes or unfreezes), and a frozen Parameter
    still appears in `named_parameters()`, state dicts, checkpoints and saved models.
    """

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class: finds parameters by walking attributes (Parameters, Modules, lists of Modules)."""

    training: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def modules(self) -> Iterator[Module]:
        """This module and every module inside it."""
        stack = [self]
        while stack:
            module = stack.pop()
            yield module
            stack.extend(child for _, child in module.named_children())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every Parameter, frozen or not, with a dotted name such as `h.3.attn.c_attn.weight`;
        a shared (tied) tensor appears once, under its first name."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            path, module = stack.pop(0)
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield path + name, value
            stack[:0] = [(f"{path}{name}.", child) for name, child in module.named_children()]

    def named_trainable_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """The parameters the optimizer updates: those with requires_grad."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return sum(p.size for p in params)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Train (True) or freeze (False) every parameter in this module; returns self.

        Freezing is what makes fine-tuning cheap: an op whose inputs all have requires_grad=False
        records no graph, so a frozen prefix of the model runs as if under no_grad and keeps none
        of its activations for backward.
        """
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
            if not requires_grad:
                p.grad = None
        return self

    def get_submodule(self, name: str) -> Module:
        """The module at a dotted path such as `h.11.mlp` ("" is this module)."""
        module: Any = self
        for part in name.split(".") if name else ():
            module = _child(module, part, name)
        if not isinstance(module, Module):
            raise ValueError(f"{name!r} is a {type(module).__name__}, not a module")
        return module

    def set_submodule(self, name: str, module: Module) -> None:
        """Replace the module at a dotted path (e.g. swap a Linear for a LoRA-wrapped one)."""
        if not name:
            raise ValueError("set_submodule needs a dotted path, not the empty name")
        parent_name, _, last = name.rpartition(".")
        parent = self
        for part in parent_name.split(".") if parent_name else ():
            parent = _child(parent, part, name)
        old = _child(parent, last, name)
        if not isinstance(old, Module):
            raise ValueError(f"{name!r} is a {type(old).__name__}, not a module")
        if isinstance(parent, list):
            parent[int(last)] = module
        else:
            setattr(parent, last, module)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        """Dropout on (mode=True) or off, for this module and everything in it."""
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameter arrays by name. NOTE: the live arrays, not copies: the optimizer updates
        them in place, so keep a snapshot with `{k: v.copy() for k, v in ...items()}`."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy arrays into the parameters by name; one error lists everything that does not fit."""
        params = dict(self.named_parameters())
        problems = mismatch_report(*shape_mismatches(
            {n: p.shape for n, p in params.items()}, {n: np.shape(a) for n, a in state.items()}),
            strict=strict)
        if problems:
            raise ValueError("state dict does not fit the model: " + "; ".join(problems))
        for name, array in state.items():
            if name in params:
                p = params[name]
                p.data = np.array(array, dtype=p.dtype, order="C")    # own, aligned copy


def packed_product(packed: Any, x: Tensor, bias: Tensor | None) -> Tensor:
    """x @ W + b through a packed weight's kernel: generation only, so no graph is recorded."""
    if is_grad_enabled() and x.requires_grad:
        raise RuntimeError("a model packed for inference cannot be trained: load it unpacked")
    return Tensor(packed_linear(packed, x.data, None if bias is None else bias.data))


def packed_linear(packed: Any, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The arrays' side of `packed_product`: x (..., I) @ W + b -> (..., O)."""
    y = packed.matmul(x.reshape(-1, x.shape[-1]))
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _child(obj: Any, part: str, path: str) -> Any:
    """One step of a dotted path: an attribute of a module, or an index into a list of them."""
    if isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
        return obj[int(part)]
    if isinstance(obj, Module) and part in vars(obj):
        return vars(obj)[part]
    raise ValueError(f"no submodule {path!r}: {part!r} not found")


def shape_mismatches(expected: dict[str, tuple], given: dict[str, tuple]
                     ) -> tuple[list[str], list[str], list[str]]:
    """Names (with shapes) missing from `given`, unexpected in it, and of the wrong shape."""
    missing = [f"{n} {tuple(s)}" for n, s in expected.items() if n not in given]
    unexpected = [f"{n} {tuple(s)}" for n, s in given.items() if n not in expected]
    misshaped = [f"{n}: expected {tuple(expected[n])}, got {tuple(s)}"
                 for n, s in given.items() if n in expected and tuple(s) != tuple(expected[n])]
    return missing, unexpected, misshaped


def mismatch_report(missing: list[str], unexpected: list[str], misshaped: list[str],
                    strict: bool = True) -> list[str]:
    """'missing: a, b and 3 more', 'unexpected: ...', 'wrong shape: ...': the parts of the one
    error every weights loader raises (`strict=False` reports only wrong shapes)."""
    from tinygpt.core.validate import short_list
    return [f"{label}: {short_list(items)}" for label, items in
            (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
            if items and (strict or label == "wrong shape")]


def _normal(rng: np.random.Generator | None, shape: tuple[int, ...], std: float) -> Parameter:
    """N(0, std^2) float32 weights; with rng=None uninitialised memory, for weights about to be
    loaded from a file (drawing 124M normals only to overwrite them takes ~1.5 s)."""
    if rng is None:
        return Parameter(np.empty(shape, np.float32))
    return Parameter(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


class Linear(Module):
    """y = x @ weight + bias, weight stored (in_features, out_features) as in GPT-2's Conv1D.

    For generation, `inference.pack_for_inference` may replace `weight` by `packed`, the same
    matrix held (out, in) as float32, int8 or 4-bit for the memory-bound decode kernels.
    """

    packed = None

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator | None,
                 bias: bool = True, std: float = 0.02):
        self.weight = _normal(rng, (in_features, out_features), std)
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return packed_product(self.packed, x, self.bias)


class Embedding(Module):
    """Rows of a (num_embeddings, embedding_dim) table, looked up by integer ids (or, packed for
    generation, dequantized from `packed`)."""

    packed = None

    def __init__(self, num_embeddings: int, embedding_dim: int, rng: np.random.Generator | None,
                 std: float = 0.02):
        self.weight = _normal(rng, (num_embeddings, embedding_dim), std)

    def forward(self, idx: np.ndarray) -> Tensor:
        if self.packed is None:
            return F.embedding(self.weight, idx)
        return Tensor(self.packed.rows(idx))


class LayerNorm(Module):
    """Normalise the last axis to zero mean and unit variance, then scale and shift."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        self.weight = Parameter(np.ones(n_embd, np.float32))
        self.bias = Parameter(np.zeros(n_embd, np.float32))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Zero a fraction p of activations in training; the mask comes from a shared Generator."""

    def __init__(self, p: float, rng: np.random.Generator):
        self.p, self.rng = p, rng

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.rng, training=self.training and is_grad_enabled())


class MLP(Module):
    """GPT-2's feed-forward: Linear(C, 4C) -> GELU (tanh form) -> Linear(4C, C) -> dropout."""

    def __init__(self, n_embd: int, n_inner: int, n_layer: int, dropout: float,
                 rng: np.random.Generator):
        self.c_fc = Linear(n_embd, n_inner, rng)
        self.c_proj = Linear(n_inner, n_embd, rng, std=0.02 / math.sqrt(2 * n_layer))
        self.dropout = Dropout(dropout, rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class KVCache:
    """Keys and values of the tokens seen so far, one (B, n_kv_head, capacity, HS) pair per layer,
    so decoding a token costs one new row instead of recomputing the whole prefix.

    The arrays grow (doubling, up to `block_size`) as tokens arrive: a model with an 8192-token
    context does not reserve 8192 positions for a 50-token chat.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, block_size: int, head_size: int,
                 dtype=np.float32, capacity: int = 256):
        shape = (batch, n_head, min(capacity, block_size), head_size)
        self.k = [np.zeros(shape, dtype) for _ in range(n_layer)]
        self.v = [np.zeros(shape, dtype) for _ in range(n_layer)]
        self.length = 0                       # tokens already cached
        self.block_size = block_size

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store this step's k, v (B, NH, T, HS) after the cached ones; return all of them."""
        start, end = self.length, self.length + k.shape[2]
        self.reserve(layer, end)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reserve(self, layer: int, end: int) -> None:
        """Make room for positions up to `end` in `layer`'s arrays (growing them if needed)."""
        if end > self.block_size:
            raise ValueError(f"KV cache holds {self.block_size} positions; {end} requested")
        if end > self.k[layer].shape[2]:
            self.k[layer], self.v[layer] = (self._grown(a, end) for a in (self.k[layer],
                                                                         self.v[layer]))

    def _grown(self, a: np.ndarray, needed: int) -> np.ndarray:
        B, H, capacity, HS = a.shape
        bigger = np.zeros((B, H, min(self.block_size, max(needed, 2 * capacity)), HS), a.dtype)
        bigger[:, :, :self.length] = a[:, :, :self.length]
        return bigger


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with GPT-2's fused qkv projection."""

    record: list | None = None     # a list: each forward appends its (B, NH, T, Tk) probabilities

    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float, qkv_bias: bool,
                 rng: np.random.Generator):
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.c_attn = Linear(n_embd, 3 * n_embd, rng, bias=qkv_bias)
        # residual projections get a smaller init, scaled by depth (GPT-2 paper, section 2.3)
        self.c_proj = Linear(n_embd, n_embd, rng, std=0.02 / math.sqrt(2 * n_layer))
        self.resid_dropout = Dropout(dropout, rng)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                ragged=None) -> Tensor:
        qkv = self.c_attn(x)                                             # (B, T, 3C)
        # per head h: q, k, v = its HS columns of each third; y_h = softmax(q k^T / sqrt(HS)) v
        y = F.multihead_attention(qkv, self.n_head, cache, layer, record=self.record,
                                  ragged=ragged)                      # (B, T, C), heads merged
        return self.resid_dropout(self.c_proj(y))
