"""LoRA (Hu et al. 2021; the book's appendix E): train a low-rank correction beside frozen weights.

A Linear's output y = x @ W + b gets a trainable detour through rank r:

    y = x @ W + b + (alpha / r) * (x @ A) @ B        A: (in, r), B: (r, out), W: (in, out) frozen

A is drawn like PyTorch's Kaiming-uniform with a = sqrt(5) on the fan-in r (bound 1/sqrt(r),
as `kaiming_uniform_` treats the (in, r) tensor of the book's LoRALayer) and B starts at zero, so
before any training the model computes exactly what the base model does. Scaling by alpha / r is
the rule the book's repository uses today (the printed book multiplied by alpha alone).

What this module does to a model:
- `apply_lora(model, rank, alpha, targets)` freezes every parameter and wraps every Linear (or
  those whose names match `targets`) in a `LoRALinear`, which keeps the Linear's `weight`/`bias`
  under their own names, so checkpoints keep GPT-2's tensor names and only `lora_A`/`lora_B` are
  new. GPT-2's fused `c_attn` computes q, k and v in one matmul; it gets one adapter per part
  (A (C, 3r) and B (3r, C): three (C, r) @ (r, C) pairs), exactly what the book's three separate
  Linears W_query, W_key, W_value get, so the parameter counts are the book's.
- The language-model head of a `CausalLM` counts as a Linear named `lm_head`. A *tied* head
  (GPT-2, SmolLM2: the head is the embedding transposed) is untied first: the head gets its own
  frozen weight, a transposed view of the embedding (no copy), so the adapter changes what the
  model says without changing how it reads (the book's GPTModel has a separate out_head anyway),
  and a merged model saves as a plain untied hub-layout model. The forward pass calls `lm_head` like any
  Linear; code that multiplies by `head_weight()` instead gets W + (alpha/r) A @ B from it.
- `merge(model)` folds (alpha/r) A @ B into each W (generation then costs what the base model
  costs); `unmerge(model)` puts the base W back exactly; `unload(model)` merges for good and
  leaves plain Linears (a model `save_pretrained` writes like any other).
- `save_adapter` writes only the adapters (`lora.safetensors`, a few MB) and `lora.json` (rank,
  alpha, targets, the wrapped layers and a fingerprint of the base model); `load_adapter` puts them
  on a base model and refuses one with another architecture, other weights or another rank.

    python -c "from tinygpt import GPT, GPTConfig; from tinygpt.finetune.lora import apply_lora; \
print(apply_lora(GPT(GPTConfig.preset('gpt2')), rank=16, alpha=16))"
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import types
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from tinygpt.autograd import functional as F
from tinygpt.autograd.tensor import Context, Function, Tensor, no_grad
from tinygpt.core.fileio import write_json_atomic
from tinygpt.models.gpt import CausalLM
from tinygpt.models.nn import Linear, Module, Parameter, shape_mismatches
from tinygpt.formats.safetensors import load_safetensors, save_safetensors

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "lora.safetensors", "lora.json"
FORMAT = "tinygpt-lora-1"
FUSED_PARTS = {"c_attn": 3}      # GPT-2's q, k, v projection: one adapter per part, as the book's


def _up(h: np.ndarray, B: np.ndarray, parts: int) -> np.ndarray:
    """h (N, p r) -> (N, out): part i's r columns of h times its block B_i (r, out/p)."""
    if parts == 1:
        return h @ B
    return np.concatenate([hi @ Bi for hi, Bi in zip(np.split(h, parts, axis=1),
                                                      np.split(B, parts, axis=0))], axis=1)


def _up_transposed(g: np.ndarray, B: np.ndarray, parts: int) -> np.ndarray:
    """g (N, out) -> (N, p r): output block i times B_i^T, the backward of `_up` for h."""
    if parts == 1:
        return g @ B.T
    return np.concatenate([gi @ Bi.T for gi, Bi in zip(np.split(g, parts, axis=1),
                                                        np.split(B, parts, axis=0))], axis=1)


class LoRALinearFn(Function):
    """y = x @ W + b + s (x @ A) @ B in one op.   x: (..., in) -> y: (..., out); s = alpha / r

    One op instead of linear + matmuls + scale + add keeps one output array per layer alive for
    backward, as a plain Linear does, plus the small h = x A (N, p r). With g = s dy (s applied
    to the small products, so no scaled copy of dy is made):
        dh = g B^T,   dx = dy W^T + dh A^T,   dA = x^T dh,   dB = h^T g,
        dW = x^T dy and db = sum(dy) only if W, b are trained (LoRA freezes them).
    With parts, B is block diagonal: `_up` and `_up_transposed` multiply by it block by block.
    """

    @staticmethod
    def forward(ctx: Context, x: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                a: np.ndarray, bb: np.ndarray, scaling: float = 1.0,
                parts: int = 1) -> np.ndarray:
        x2 = x.reshape(-1, x.shape[-1])                                     # (N, in)
        h = x2 @ a                                                          # (N, p r)
        y = x2 @ w
        if b is not None:
            y += b
        y += _up(h * np.asarray(scaling, h.dtype), bb, parts)               # (N, out)
        ctx.save(x2, h, w, a, bb)
        ctx.x_shape, ctx.scaling, ctx.parts = x.shape, scaling, parts
        return y.reshape(*x.shape[:-1], w.shape[1])

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        x2, h, w, a, bb = ctx.saved
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad
        dy2 = dy.reshape(-1, w.shape[1])                                    # (N, out)
        s = np.asarray(ctx.scaling, dy2.dtype)     # g = s dy is never formed: s scales the small
        dh = _up_transposed(dy2, bb, ctx.parts) * s                         # (N, p r)
        dx = (dy2 @ w.T + dh @ a.T).reshape(ctx.x_shape) if need_x else None
        dw = x2.T @ dy2 if need_w else None
        db = dy2.sum(axis=0) if need_b else None
        da = x2.T @ dh if need_a else None
        dbb = (np.concatenate([hi.T @ gi for hi, gi in zip(np.split(h, ctx.parts, axis=1),
                                                           np.split(dy2, ctx.parts, axis=1))]) * s
               if need_bb else None)
        return dx, dw, db, da, dbb


class LoRALinear(Module):
    """A frozen Linear plus (alpha / r) * (x @ A) @ B.   x: (..., in) -> (..., out)

    With `parts` p > 1 the output columns are p equal blocks (GPT-2's q | k | v), each with its
    own rank-r pair: A holds the p (in, r) matrices side by side (in, p r) and B the p (r, out/p)
    matrices stacked (p r, out/p); block i of the output gets (x @ A_i) @ B_i.
    """

    def __init__(self, linear: Linear, rank: int, alpha: float, rng: np.random.Generator,
                 parts: int = 1):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha}")
        n_in, n_out = linear.weight.shape
        if n_out % parts:
            raise ValueError(f"a Linear with {n_out} outputs does not split into {parts} parts")
        self.weight, self.bias = linear.weight, linear.bias          # same tensors, same names
        self.rank, self.alpha, self.parts = int(rank), float(alpha), int(parts)
        self.scaling = self.alpha / self.rank
        dtype = linear.weight.dtype
        bound = 1.0 / math.sqrt(rank)        # Kaiming-uniform, a = sqrt(5), fan-in r
        self.lora_A = Parameter(rng.uniform(-bound, bound, (n_in, parts * rank)).astype(dtype))
        self.lora_B = Parameter(np.zeros((parts * rank, n_out // parts), dtype))
        self.merged = False

    def _up(self, h: Tensor) -> Tensor:
        """h (..., p r) -> (..., out): each part's r columns times its own block of B."""
        if self.parts == 1:
            return h @ self.lora_B
        pieces = [hp @ bp for hp, bp in zip(F.split(h, self.parts, axis=-1),
                                             F.split(self.lora_B, self.parts, axis=0))]
        return F.concatenate(pieces, axis=-1)

    def delta(self, x: Tensor) -> Tensor:
        """The adapter's share of the output, (alpha / r) (x @ A) @ B: (..., out). Going through
        rank r costs (in + out) r per row instead of the in * out of forming A @ B."""
        return self._up(x @ self.lora_A) * self.scaling

    def delta_weight(self) -> Tensor:
        """(alpha / r) A @ B as an (in, out) matrix: what `merge` adds to W."""
        return self._up(self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # what F.linear(x, W, b) + self.delta(x) computes, as one op (see LoRALinearFn)
        return LoRALinearFn.apply(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                  scaling=self.scaling, parts=self.parts)

    def merge(self) -> None:
        """W <- W + (alpha/r) A @ B; the base W is kept (one more copy while merged), so that
        `unmerge` restores it bit for bit rather than up to the rounding of a subtraction."""
        if not self.merged:
            with no_grad():
                self._base = self.weight.data
                self.weight.data = self._base + self.delta_weight().data
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.weight.data, self._base = self._base, None
            self.merged = False


# --- putting adapters into a model --------------------------------------------------------------

def _matches(name: str, targets: Sequence[str] | None) -> bool:
    """A target is a run of whole parts of the dotted name (`c_attn`, `mlp.c_proj`, `attn` for
    every Linear under an `attn`, `h.0`) or a glob over the full name (`h.1?.*`)."""
    if targets is None:
        return True
    return any(f".{t}." in f".{name}." or fnmatch.fnmatchcase(name, t) for t in targets)


def _linears(model: Module) -> list[tuple[str, Module]]:
    """(dotted name, module) of every Linear and LoRALinear, in parameter order."""
    found, stack = [], [("", model)]
    while stack:
        path, module = stack.pop(0)
        if isinstance(module, (Linear, LoRALinear)) and path:
            found.append((path, module))
            continue
        stack[:0] = [(f"{path}.{n}" if path else n, child) for n, child in module.named_children()]
    return found


def _untie_head(model: CausalLM) -> None:
    """Give a tied head its own frozen (C, V) weight, so it can take an adapter.

    The weight is the embedding table transposed, a view of the same memory rather than a copy
    (SmolLM2: 113 MB saved); both are frozen, and BLAS multiplies by a transposed matrix at full
    speed. A merge gives the head an array of its own, so the embedding never changes."""
    W = model.head_weight().data                                           # (C, V) view
    head = Linear(W.shape[0], W.shape[1], None, bias=False)
    head.weight.data = W
    model.lm_head = head
    model.config = replace(model.config, tie_weights=False)


def _adapted_head_weight(model: CausalLM) -> Tensor:
    """head_weight() of a model whose lm_head is a LoRALinear: W + (alpha/r) A @ B.

    NOTE: CausalLM's forward calls lm_head, but some heads of stage 3 (a classifier's, DPO's
    log-probs) multiply by head_weight(), so it must include the adapter too. This forms the
    (C, V) matrix on every call; merge first to make it free. Set on the instance by apply_lora."""
    head = model.lm_head
    return head.weight if head.merged else head.weight + head.delta_weight()


def apply_lora(model: Module, rank: int, alpha: float, targets: Sequence[str] | None = None,
               rng: np.random.Generator | int = 0) -> int:
    """Freeze `model` and wrap its Linears (all, or those matching `targets`) in LoRALinear.

    `targets` are module names as in `named_parameters` without `.weight`: whole dotted parts
    (`c_attn`, `mlp.c_proj`, `attn`, `h.11`, `lm_head`) or globs (`h.1?.*`); each must match at
    least one Linear. When `model` is a CausalLM, its head counts as a Linear named `lm_head`
    (tied heads are untied first, see the module docstring). `rng` (a Generator or a seed) draws
    every A. Returns the number of trainable parameters afterwards (the adapters' size).
    """
    if isinstance(targets, str):
        targets = [targets]
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    is_lm = isinstance(model, CausalLM)
    if is_lm and model.lm_head is None and _matches("lm_head", targets):
        _untie_head(model)
    linears = _linears(model)
    if any(isinstance(m, LoRALinear) for _, m in linears):
        raise ValueError("the model already has LoRA adapters; load or apply them once")
    for t in targets or ():
        if not any(_matches(name, [t]) for name, _ in linears):
            raise ValueError(f"LoRA target {t!r} matches no Linear; the model's Linears are e.g. "
                             f"{', '.join(n for n, _ in linears[:6])}")
    model.requires_grad_(False)
    for name, linear in linears:
        if _matches(name, targets):
            parts = FUSED_PARTS.get(name.rsplit(".", 1)[-1], 1)
            model.set_submodule(name, LoRALinear(linear, rank, alpha, rng, parts))
    if is_lm and isinstance(model.lm_head, LoRALinear):
        model.head_weight = types.MethodType(_adapted_head_weight, model)
    return model.num_parameters(trainable_only=True)


def lora_layers(model: Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in _linears(model) if isinstance(m, LoRALinear)}


def merge(model: Module) -> Module:
    """Fold every adapter into its weight: W += (alpha/r) A @ B. Returns the model."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge(model: Module) -> Module:
    """Undo `merge`: the base weights exactly as they were."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


# --- saving and loading adapters ----------------------------------------------------------------

def base_fingerprint(model: Module) -> str:
    """sha256 over the base (non-LoRA) parameters' names, shapes and an evenly strided sample of
    up to ~1024 values each: cheap, and different for different checkpoints or a merged model."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            continue
        flat = p.data.reshape(-1)
        sample = flat[::max(1, flat.size // 1024)].astype(np.float32)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def _describe_base(model: Module) -> dict:
    config = getattr(model, "config", None)
    return {"class": type(model).__name__,
            "config": asdict(config) if is_dataclass(config) else None,
            "fingerprint": base_fingerprint(model)}


def save_adapter(model: Module, dir: str | os.PathLike, targets: Sequence[str] | None = None,
                 base_name: str | None = None) -> Path:
    """Write the adapters as `dir/lora.safetensors` and `dir/lora.json`, atomically.

    The JSON holds rank, alpha, the `targets` given to apply_lora, each wrapped layer's parts,
    and the base model (class, config, `base_fingerprint`, and `base_name`, e.g. its path).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (apply_lora first)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapters are merged into the weights; unmerge before saving them")
    (rank, alpha), = {(layer.rank, layer.alpha) for layer in layers.values()}
    directory = Path(dir)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{ab}": getattr(layer, ab).data for name, layer in layers.items()
               for ab in ("lora_A", "lora_B")}
    save_safetensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": FORMAT})
    write_json_atomic(directory / ADAPTER_CONFIG, {
        "format": FORMAT, "rank": rank, "alpha": alpha,
        "targets": None if targets is None else list(targets),
        "layers": {name: layer.parts for name, layer in layers.items()},
        "base": {**_describe_base(model), "name": base_name}}, indent=2)
    return directory


def _read_adapter_config(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no LoRA adapter here: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tinygpt LoRA adapter (format {FORMAT!r} expected)")
    return config


def load_adapter(model: Module, dir: str | os.PathLike,
                 rng: np.random.Generator | int = 0) -> dict:
    """Put the adapters saved in `dir` onto `model` (applying LoRA first if it has none); returns
    the adapter's JSON. A model of another class, config or base weights, or LoRA of another
    rank or alpha, is a ValueError naming the difference (the model then holds fresh adapters:
    load the base again before using it)."""
    directory = Path(dir)
    config = _read_adapter_config(directory / ADAPTER_CONFIG)
    where = directory / ADAPTER_CONFIG
    base = config.get("base") or {}
    if base.get("class") != type(model).__name__:
        raise ValueError(f"{where}: adapter was trained on a {base.get('class')}, not a "
                         f"{type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        apply_lora(model, config["rank"], config["alpha"], list(config["layers"]), rng)
        layers = lora_layers(model)
    have = {(layer.rank, layer.alpha) for layer in layers.values()}
    if have != {(config["rank"], config["alpha"])}:
        ranks = ", ".join(f"rank {r} alpha {a:g}" for r, a in sorted(have))
        raise ValueError(f"{where}: adapter has rank {config['rank']} alpha {config['alpha']:g}, "
                         f"but the model's LoRA layers have {ranks}")
    if any(layer.merged for layer in layers.values()):
        raise ValueError(f"{where}: the model's adapters are merged; unmerge before loading")
    ours = _describe_base(model)
    for key, what in (("config", "config"),
                      ("fingerprint", "weights")):
        if base.get(key) != ours[key]:
            name = f" ({base['name']})" if base.get("name") else ""
            raise ValueError(f"{where}: adapter was trained on another base model{name}: its "
                             f"{what} differs from this model's")
    wanted = {f"{n}.{ab}": getattr(layer, ab) for n, layer in layers.items()
              for ab in ("lora_A", "lora_B")}
    arrays = load_safetensors(directory / ADAPTER_WEIGHTS, mmap=False)
    missing, unexpected, misshaped = shape_mismatches(
        {n: p.shape for n, p in wanted.items()}, {n: a.shape for n, a in arrays.items()})
    problems = [f"{label} [{', '.join(items)}]" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
                if items]
    if problems:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: adapters do not fit the model: "
                         + "; ".join(problems))
    for name, p in wanted.items():
        p.data = np.array(arrays[name], dtype=p.dtype, order="C")
    return config


def unload(model: Module) -> Module:
    """Merge every adapter and put plain Linears back: a model with the base's structure and
    names (`save_pretrained` then writes an ordinary hub-layout model). Returns the model."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = Linear(*layer.weight.shape, None, bias=layer.bias is not None)
        plain.weight, plain.bias = layer.weight, layer.bias
        model.set_submodule(name, plain)
    vars(model).pop("head_weight", None)             # the class's own head_weight again
    return model
