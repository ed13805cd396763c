"""A model in generation mode: weights packed once, row per output, as float32, int8 or 4-bit.

`pack_for_inference(model, quantize=None | "int8")` replaces every `Linear` weight (in, out) and
the token embedding by a `PackedWeight` that holds it **once** in the (out, in) layout that
`kernels/decode.py` streams; the float32 (in, out) copy is dropped as each tensor is packed, so
no more than one float32 tensor exists at a time beyond the packed ones. A tied head reads the
packed embedding. The packed model generates (`generate`, `chat`, `serve`) but cannot train:
its Linears have no `weight` Parameter any more.

`PackedWeight.from_gguf` keeps a GGUF file's Q8_0 blocks as int8 with a scale per 32 weights and
its Q4_1 (and Q4_0) blocks as 4-bit codes with a scale and offset per 32, instead of 540 MB of
float32.

    python -m tinygpt.bench generate --quantize int8
"""
from __future__ import annotations

import numpy as np

from tinygpt.kernels import decode as dk
from tinygpt.core import runtime
from tinygpt.models.nn import Embedding, Linear, Module

QUANTIZE = (None, "int8")
ACTIVATIONS = ("float32", "int8")
# a float32 product of this many rows (a prompt) is faster through BLAS than row dots: at 16 rows
# of SmolLM2's and GPT-2's shapes 1.4-2x faster on a Zen 4, at 8 about even, at 4 slower
BLAS_MIN_ROWS = 8
# and below this many rows BLAS runs faster as W @ x^T than as x @ W^T on the (out, in) layout
# (OpenBLAS, SmolLM2's shapes at 16 rows: 0.83 against 1.47 ms a layer, Zen 4); at 512 rows
# (a perplexity window) x @ W^T is the faster by up to 1.7x
BLAS_TALL_ROWS = 128
# a 4-bit product of this many rows (a perplexity window, a long prompt) dequantizes its weight
# into a float32 temporary and runs BLAS; fewer rows (a short prompt) decode each weight row once
# in the kernel and dot it with every row of x
DEQUANTIZE_MIN_ROWS = 64


class PackedWeight:
    """One weight matrix in the row-per-output layout of its kernel.

    kind "f32": w (O, I) float32; "i8": q (O, I) int8 with scale (O, I / G) float32;
    "q4": codes (O, I / 2) uint8 with d and mn (O, I / 32) float32 (GGUF Q4_1's order).
    `matmul(x)` is x @ W^T for x (M, I); `rows(idx)` dequantizes rows (embedding lookup).

    `activations` "int8" (a quantized kind, I a multiple of 32) quantizes x to Q8_0 blocks first,
    as llama.cpp does, and multiplies int8 by int8 (`set_activations`); a product of many rows
    multiplies those same rounded inputs by the float weights instead, so prompt and decode agree.
    """

    activations = "float32"

    def __init__(self, kind: str, arrays: tuple[np.ndarray, ...]):
        self.kind, self.arrays = kind, arrays
        first = arrays[0]
        self.shape = (first.shape[0], first.shape[1] * (2 if kind == "q4" else 1))   # (O, I)

    @classmethod
    def from_rows(cls, w_out_in: np.ndarray, quantize: str | None = None) -> PackedWeight:
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        if quantize == "int8":
            return cls("i8", dk.quantize_int8(np.asarray(w_out_in, np.float32)))
        return cls("f32", (np.ascontiguousarray(w_out_in, dtype=np.float32),))

    @classmethod
    def from_gguf(cls, tensor) -> PackedWeight:
        """Keep Q8_0, Q4_1 and Q4_0 blocks quantized (repacked once); other types become float32."""
        from tinygpt.formats.gguf import dequantize
        O, I = tensor.shape
        if tensor.ggml_type == "Q8_0":
            blocks = np.asarray(tensor.data).reshape(O, I // dk.GROUP, 34)
            d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
            q = blocks[:, :, 2:].copy().view(np.int8).reshape(O, I)
            return cls("i8", (q, d))
        if tensor.ggml_type == "Q4_1":
            blocks = np.asarray(tensor.data).reshape(O, I // dk.GROUP, 20)
            dm = blocks[:, :, :4].copy().view(np.float16).astype(np.float32)   # (O, I/32, 2)
            codes = np.ascontiguousarray(blocks[:, :, 4:]).reshape(O, I // 2)
            return cls("q4", (codes, np.ascontiguousarray(dm[:, :, 0]),
                              np.ascontiguousarray(dm[:, :, 1])))
        if tensor.ggml_type == "Q4_0":        # d (code - 8) = d code + mn with mn = -8 d, exactly
            blocks = np.asarray(tensor.data).reshape(O, I // dk.GROUP, 18)
            d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
            codes = np.ascontiguousarray(blocks[:, :, 2:]).reshape(O, I // 2)
            return cls("q4", (codes, d, np.float32(-8.0) * d))
        return cls("f32", (np.ascontiguousarray(dequantize(tensor), dtype=np.float32),))

    @staticmethod
    def stackable(parts: list[PackedWeight]) -> bool:
        """Whether `parts` can be one weight: the same kind, row length and activations."""
        first = parts[0]
        return all(p.kind == first.kind and p.shape[1] == first.shape[1] and
                   p.activations == first.activations and
                   [a.shape[1:] for a in p.arrays] == [a.shape[1:] for a in first.arrays]
                   for p in parts)

    @classmethod
    def stacked(cls, parts: list[PackedWeight]) -> PackedWeight | None:
        """One weight whose rows are the rows of `parts` in order (their outputs side by side),
        so one kernel call does several products that share an input (Llama's q, k and v).
        Parts that lie back to back in `gather`'s buffer are viewed as one; others are copied
        into a new array and each part's arrays replaced by views of it. No second copy stays
        either way. None when the parts differ in kind, row length or activations."""
        if not cls.stackable(parts):
            return None
        first = parts[0]
        spans = [_span(column) for column in zip(*(p.arrays for p in parts))]
        if all(span is not None for span in spans):    # side by side in `gather`'s buffer
            whole = cls(first.kind, tuple(spans))
            whole.activations = first.activations
            return whole
        arrays = tuple(np.concatenate(column) for column in zip(*(p.arrays for p in parts)))
        start = 0
        for p in parts:
            rows = p.arrays[0].shape[0]
            p.arrays = tuple(a[start:start + rows] for a in arrays)
            start += rows
        whole = cls(first.kind, arrays)
        whole.activations = first.activations
        return whole

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (M, I) float32 -> x @ W^T (M, O)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        M = x.shape[0]
        if self.kind == "f32":
            w = self.arrays[0]
            if M < BLAS_MIN_ROWS:
                return dk.matvec_f32(w, x)
            return np.ascontiguousarray((w @ x.T).T) if M < BLAS_TALL_ROWS else x @ w.T
        if self.activations == "int8":
            xq, xs, xsum = dk.quantize_q8_0(x)
            if M == 1:
                if self.kind == "i8":
                    return dk.matvec_i8_q8(*self.arrays, xq, xs)
                return dk.matvec_q4_q8(*self.arrays, xq, xs, xsum)
            x = dk.dequantize_i8(xq, xs)                # the rounded x: int8 rows, a scale per 32
        if self.kind == "i8":
            return dk.matvec_i8(*self.arrays, x)
        if M >= DEQUANTIZE_MIN_ROWS:
            return x @ self.dense().T
        return dk.matvec_q4(*self.arrays, x)

    def dense(self) -> np.ndarray:
        """The weights as a new float32 (O, I) array."""
        if self.kind == "f32":
            return self.arrays[0].copy()
        return (dk.dequantize_i8 if self.kind == "i8" else dk.dequantize_q4)(*self.arrays)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dequantized rows idx (...) -> (..., I)."""
        flat = np.asarray(idx).reshape(-1)
        if self.kind == "f32":
            out = self.arrays[0][flat]
        elif self.kind == "i8":
            out = dk.dequantize_i8_ref(*(a[flat] for a in self.arrays))
        else:
            out = dk.dequantize_q4_ref(*(a[flat] for a in self.arrays))
        return out.astype(np.float32, copy=False).reshape(*np.shape(idx), self.shape[1])


def gather(model: Module) -> Module:
    """Move every packed weight of `model` into one buffer, in the order a token reads them, each
    array a view of it; Llama's q, k, v (and gate, up) side by side, so `PackedWeight.stacked`
    takes them as one weight without a copy. Returns the model.

    Why: decoding streams every weight once per token, and the kernel reads memory at the speed
    of its pages. NumPy asks Linux for 2 MB pages only for arrays of 4 MB or more; SmolLM2's
    matrices are 0.4-3.5 MB, so they sat on 4 KB pages, and one pass over them ran at 82 % of a
    plain sum's bandwidth against 96 % from one buffer (538 MB, Zen 4, same run). Each old array
    is freed as soon as it is copied, so the peak is the buffer plus one array (given that the
    arrays were allocated after `runtime.return_freed_memory`, as the loaders and
    `pack_for_inference` see to)."""
    model.decode_plan = None                # stacked weights (inference/step.py) are rebuilt
    runs: list[list[tuple[PackedWeight, int]]] = []      # arrays back to back: (weight, which)
    for group in _reading_order(model):
        if PackedWeight.stackable(group):             # column j of every part, in turn
            runs += [[(p, j) for p in group] for j in range(len(group[0].arrays))]
        else:
            runs += [[(p, j)] for p in group for j in range(len(p.arrays))]
    order, offsets, end = [], [], 0
    for run in runs:
        end = -(-end // ALIGN) * ALIGN                # each run starts on a cache line
        for p, j in run:
            order.append((p, j))
            offsets.append(end)
            end += p.arrays[j].nbytes
    buffer = np.empty(end, np.uint8)
    for (p, j), start in zip(order, offsets):
        a = p.arrays[j]
        view = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        p.arrays = p.arrays[:j] + (view,) + p.arrays[j + 1:]     # the old array is freed here
    return model


ALIGN = 64                                  # bytes: each run of arrays starts on a cache line
STACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))   # Llama's shared inputs


def _reading_order(model: Module) -> list[list[PackedWeight]]:
    """The packed weights of `model` in the order of its attributes (a token's reading order),
    each once, as groups: the projections of STACKED together, every other weight alone."""
    groups: list[list[PackedWeight]] = []
    seen: set[int] = set()

    def add(weights: list[PackedWeight]) -> None:
        weights = [w for w in weights if id(w) not in seen]
        seen.update(id(w) for w in weights)
        if weights:
            groups.append(weights)

    def visit(module: Module) -> None:
        children = vars(module)
        for names in STACKED:
            packed = [getattr(children.get(n), "packed", None) for n in names]
            if all(w is not None for w in packed):
                add(packed)
        for _, child in module.named_children():
            if getattr(child, "packed", None) is not None:
                add([child.packed])
            visit(child)
    visit(model)
    return groups


def _span(arrays: tuple[np.ndarray, ...]) -> np.ndarray | None:
    """One array over `arrays` when they lie back to back, in this order, in one `gather`
    buffer (a view, no copy); None otherwise."""
    base = arrays[0].base
    if not (isinstance(base, np.ndarray) and base.dtype == np.uint8 and base.ndim == 1):
        return None
    address = base.__array_interface__["data"][0]
    start = at = arrays[0].__array_interface__["data"][0]
    for a in arrays:
        if a.base is not base or not a.flags.c_contiguous or \
                a.__array_interface__["data"][0] != at:
            return None
        at += a.nbytes
    first = arrays[0]
    whole = base[start - address:at - address].view(first.dtype)
    return whole.reshape(-1, *first.shape[1:])


def set_activations(model: Module, activations: str) -> Module:
    """How every quantized packed weight of `model` meets its input: "float32" (the weights are
    decoded to float32 in the dot products) or "int8" (the input is quantized to Q8_0 blocks and
    the dot products are int8 x int8 -> int32). Weights whose row length is not a multiple of 32
    stay float32. Returns the model."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is not None and packed.kind != "f32" and packed.shape[1] % dk.GROUP == 0:
            packed.activations = activations
    model.decode_plan = None               # stacked weights (inference/step.py) are rebuilt
    return model


def pack_module(module: Module, quantize: str | None = None) -> None:
    """Pack one Linear or Embedding in place (no-op when it is packed already)."""
    if module.packed is not None:
        return
    w = module.weight
    module.weight = None                               # drop the training copy as we go
    rows = w.data.T if isinstance(module, Linear) else w.data    # (out, in) either way
    module.packed = PackedWeight.from_rows(rows, quantize)
    w.data = np.empty(0, np.float32)   # a loader's name -> Parameter table may still hold `w`


def packer(model: Module, pack: str):
    """`on_tensor(name)` for a loader: packs the module that owns parameter `name` (Linear and
    Embedding weights; norms and biases stay as they are). `pack` is "float32" or "int8"."""
    if pack not in ("float32", "int8"):
        raise ValueError(f"pack must be 'float32' or 'int8', got {pack!r}")
    quantize = None if pack == "float32" else pack
    runtime.return_freed_memory()             # each float32 tensor leaves as soon as it is packed

    def on_tensor(name: str) -> None:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr == "weight" and isinstance(module, (Linear, Embedding)):
            pack_module(module, quantize)
    return on_tensor


def pack_for_inference(model: Module, quantize: str | None = None) -> Module:
    """Pack every Linear and Embedding weight of `model` in place (see the module docstring).
    Returns the model, in eval mode."""
    runtime.return_freed_memory()       # so `gather` gives each packed array back as it goes
    for module in model.modules():
        if isinstance(module, (Linear, Embedding)):
            pack_module(module, quantize)
    return gather(model).eval()


def packed_bytes(model: Module) -> int:
    """Bytes held by the packed weights plus any Parameters left (norms, biases)."""
    packed = sum(m.packed.nbytes for m in model.modules() if getattr(m, "packed", None) is not None)
    return packed + sum(p.data.nbytes for p in model.parameters())
