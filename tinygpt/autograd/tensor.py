"""The autograd engine: `Tensor`, the `Function`/`Context` base every op derives from, and backward.

A `Tensor` wraps an `np.ndarray` (float32 by default, float64 kept) and remembers the `Function`
call that produced it. `Tensor.backward()` walks that graph in reverse topological order with an
explicit stack (so a 48-layer model never meets Python's recursion limit), calls each op's
`backward`, checks the gradient's shape and dtype at the op that produced it, and accumulates into
the leaves. The ops live in `ops.py` and `fused.py`; the operators `+ - * / @ ...` on `Tensor` are
attached in `functional.py`. `checkpoint(fn, *inputs)` trades time for memory: it keeps only a
region's inputs and recomputes the region in backward (activation checkpointing).

    python -c "import tinygpt as tg; x = tg.Tensor([1., 2.], requires_grad=True); (x * x).sum().backward(); print(x.grad)"
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import numpy as np

_GRAD_ENABLED = True


@contextlib.contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    global _GRAD_ENABLED
    previous, _GRAD_ENABLED = _GRAD_ENABLED, enabled
    try:
        yield
    finally:
        _GRAD_ENABLED = previous


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block ops record no graph: for evaluation and generation."""
    with _grad_mode(False):
        yield


def is_grad_enabled() -> bool:
    return _GRAD_ENABLED


def as_float_array(data: Any, name: str = "tensor") -> np.ndarray:
    """float32 unless the input is already float64. Integer, bool or object arrays are an error;
    Python numbers and lists of them are converted."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.ndarray):
        if data.dtype == np.float32 or data.dtype == np.float64:
            return data
        if data.dtype.kind == "f":                      # float16 and friends compute in float32
            return data.astype(np.float32)
        raise TypeError(f"{name}: expected a floating-point array, got dtype {data.dtype} with "
                        f"shape {data.shape}; convert it first, e.g. .astype(np.float32)")
    arr = np.asarray(data)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: cannot make a float tensor from dtype {arr.dtype} with shape "
                        f"{arr.shape}")
    return arr.astype(np.float64 if arr.dtype == np.float64 and isinstance(data, np.generic)
                      else np.float32)


class Tensor:
    """An n-dimensional float array with an optional gradient.

    `data` is the np.ndarray; `grad` is None or an array of the same shape and dtype. A tensor made
    by an op remembers that op in `_ctx` (its `Context`, which knows the inputs). Arithmetic
    (`+ - * / @ ** [] .sum() ...`) is attached at the bottom of functional.py, in one visible block.
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_retains_grad", "__weakref__")
    __array_priority__ = 1000          # make `ndarray * Tensor` call Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False):
        self.data: np.ndarray = as_float_array(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Context | None = None
        self._retains_grad = False

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, precision=4, threshold=8)}{grad})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def astype(self, dtype) -> Tensor:
        """A copy in another float dtype, cut from the graph (used for float64 gradient checks)."""
        return Tensor(self.data.astype(dtype), requires_grad=self.requires_grad)

    def zero_grad(self) -> None:
        self.grad = None

    def retain_grad(self) -> None:
        """Keep this interior tensor's gradient after backward (leaves always keep theirs)."""
        self._retains_grad = True

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def backward(self, grad: np.ndarray | None = None, retain_graph: bool = False) -> None:
        """Reverse-mode differentiation from this tensor.

        Leaf gradients accumulate (`+`) until `zero_grad()`. Interior gradients are reset at the
        start of every call, so with `retain_graph=True` calling backward twice gives the same
        interior gradients (and they stay readable on `.grad`). Without it, each op's saved arrays
        are released as soon as its backward has run, so backward's peak memory stays within the
        forward's, and a second backward through the same graph is an error.
        """
        if self._ctx is None and not self.requires_grad:
            raise RuntimeError("backward() through a tensor that does not require grad: "
                               "create the inputs with requires_grad=True (and not under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} "
                                   "needs a gradient argument of that shape")
            grad = np.ones_like(self.data)
        grad = np.array(grad, dtype=self.dtype)             # our own copy: leaves may keep it
        if grad.shape != self.shape:
            raise ValueError(f"backward(): gradient shape {grad.shape} does not match tensor "
                             f"shape {self.shape}")
        order = _topological_order(self)
        grads: dict[int, np.ndarray] = {id(self): grad}
        given: set[int] = set()                              # arrays handed to leaves this call
        for i, node in enumerate(order):                     # outputs before their inputs
            order[i] = None                                  # let processed tensors be freed
            g = grads.pop(id(node), None)
            if node._ctx is None:                            # backward() on a leaf itself
                if g is not None and node.requires_grad:
                    _accumulate(node, g, given)
                continue
            if node._retains_grad or retain_graph:
                node.grad = g
            if g is None:
                continue
            ctx = node._ctx
            if ctx.released:
                raise RuntimeError(f"backward() through {ctx.fn.__name__} a second time: its "
                                   "saved arrays were freed; pass retain_graph=True the first time")
            inputs, input_grads = ctx.inputs, ctx.fn.backward(ctx, g)
            if not retain_graph:
                ctx.release()
            for parent, pg in zip(inputs, input_grads):
                if parent is None or pg is None or not parent.requires_grad:
                    continue
                _check_grad(ctx.fn.__name__, parent, pg)
                if parent._ctx is None:                      # a leaf: into its .grad now
                    _accumulate(parent, pg, given)
                    continue
                key = id(parent)
                pg = pg.dense() if isinstance(pg, RowGrad) else pg
                grads[key] = pg if key not in grads else grads[key] + pg


def _accumulate(leaf: Tensor, g: np.ndarray | RowGrad, given: set[int]) -> None:
    """leaf.grad += g, in place when no one but the leaf holds its array (CPython's reference
    count: the leaf's and the call's), so a parameter used twice (a tied embedding and head:
    113 MB for SmolLM2) holds two arrays at the peak, not three. A .grad someone kept, a view,
    or an array an op also gave elsewhere is never written into: it is replaced by a new sum."""
    if leaf.grad is None:
        leaf.grad = g.dense() if isinstance(g, RowGrad) else _own(g, given)
        return
    if not (sys.getrefcount(leaf.grad) <= 2 and leaf.grad.base is None
            and leaf.grad.flags.writeable):
        leaf.grad = leaf.grad.copy()                 # someone else sees it: sum into a new one
    if isinstance(g, RowGrad):
        g.add_to(leaf.grad)
    else:
        leaf.grad += g


class RowGrad:
    """A gradient that is zero but on some rows: an embedding table's, where only the batch's
    token ids get one. Backward adds it into the table's gradient in place (a tied head has made
    that already) instead of building a dense (V, C) of zeros first: 113 MB for SmolLM2.

    rows[i] belongs to row idx[i]; an id that repeats adds up.   idx: (N,), rows: (N, C)
    """

    def __init__(self, shape: tuple, idx: np.ndarray, rows: np.ndarray):
        self.shape, self.dtype, self.idx, self.rows = tuple(shape), rows.dtype, idx, rows

    def add_to(self, out: np.ndarray) -> None:
        np.add.at(out, self.idx, self.rows)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=self.dtype)
        self.add_to(out)
        return out


def _own(g: np.ndarray, given: set[int]) -> np.ndarray:
    """`g` itself when no one else can see it, else a copy, so a leaf's .grad is its own array.

    Ops return fresh arrays, but also views of them (reshape), read-only broadcasts (sum), and
    one array for two inputs (add); copying only those saves a copy of every parameter's
    gradient per step (~650 MB for GPT-2 124M untied).
    """
    if g.base is not None or not g.flags.writeable or id(g) in given:
        g = g.copy()
    given.add(id(g))
    return g


def _check_grad(op: str, t: Tensor, g: np.ndarray) -> None:
    """A wrong backward fails here, at the op that produced it, not three ops later."""
    if g.shape != t.shape or g.dtype != t.dtype:
        raise RuntimeError(f"{op}.backward returned a gradient of shape {g.shape} {g.dtype} for "
                           f"an input of shape {t.shape} {t.dtype}")


def _topological_order(root: Tensor) -> list[Tensor | None]:
    """Every tensor `root` depends on through grad-requiring ops, outputs first.

    Iterative depth-first search: a node is appended once all its inputs are, and the reversed
    list puts each tensor before everything it was computed from. A node is marked when it is
    expanded, not when it is pushed, so a tensor used twice still comes after both its users.
    """
    order: list[Tensor | None] = []
    expanded: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in expanded:
            continue
        expanded.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in node._ctx.inputs:
                if parent is not None and parent.requires_grad and id(parent) not in expanded:
                    stack.append((parent, False))
    order.reverse()
    return order


class Context:
    """What one op call keeps for its backward: its inputs (as Tensors) and any saved arrays."""

    __slots__ = ("fn", "inputs", "saved", "needs_input_grad", "released", "__dict__")

    def __init__(self, fn: type, inputs: tuple[Tensor | None, ...]):
        self.fn = fn
        self.inputs = inputs
        self.needs_input_grad = tuple(t is not None and t.requires_grad for t in inputs)
        self.saved: tuple = ()
        self.released = False

    def save(self, *arrays: Any) -> None:
        self.saved = arrays

    def release(self) -> None:
        """Drop saved arrays, attributes and input links once backward has used them."""
        self.saved = ()
        self.inputs = ()
        self.__dict__.clear()
        self.released = True


class Function:
    """Base class of every differentiable op: subclasses define `forward` and `backward`.

    `forward(ctx, *arrays, **kwargs)` takes np.ndarrays (Tensors are unwrapped; other positional
    arguments such as integer indices are passed through) and returns one np.ndarray.
    `backward(ctx, dy)` returns one gradient per positional input, or None where an input is not
    differentiable.
    """

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple[np.ndarray | None, ...]:
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Tensor:
        tensors = tuple(a if isinstance(a, Tensor) else None for a in args)
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        ctx = Context(cls, tensors)
        out = Tensor(cls.forward(ctx, *arrays, **kwargs))
        if _GRAD_ENABLED and any(ctx.needs_input_grad):
            out.requires_grad = True
            out._ctx = ctx
        return out


# --- activation checkpointing ---------------------------------------------------------------------

class Recompute(Function):
    """y = fn(*inputs), keeping only the inputs; backward runs fn again and differentiates that.

    A transformer block's backward needs ~10 (B, T, C)-sized activations and its attention
    probabilities; a checkpointed block keeps one (B, T, C) input and pays one more forward pass.
    """

    @staticmethod
    def forward(ctx: Context, fn, *arrays: np.ndarray, rngs: tuple = ()) -> np.ndarray:
        # NOTE: fn runs with grad on (its graph is dropped when it returns), not under no_grad:
        # Dropout drops only while grad is on, so no_grad here would make the replay differ
        ctx.region, ctx.rng_states = fn, [rng.bit_generator.state for rng in rngs]
        ctx.rngs, ctx.requires_grad = rngs, [t.requires_grad for t in ctx.inputs[1:]]
        ctx.save(*arrays)
        out = fn(*(Tensor(a, requires_grad=r) for a, r in zip(arrays, ctx.requires_grad)))
        ctx.output_requires_grad = out.requires_grad    # true when fn used a trained parameter
        return out.data

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        inputs = [Tensor(a, requires_grad=r) for a, r in zip(ctx.saved, ctx.requires_grad)]
        now = [rng.bit_generator.state for rng in ctx.rngs]
        for rng, state in zip(ctx.rngs, ctx.rng_states):        # replay the same dropout masks
            rng.bit_generator.state = state
        try:
            with _grad_mode(True):
                out = ctx.region(*inputs)
            # a backward of its own: parameter grads accumulate into their .grad here, once,
            # and the inputs' grads go back to the outer backward like any op's
            out.backward(dy)
        finally:
            for rng, state in zip(ctx.rngs, now):
                rng.bit_generator.state = state
        return (None, *(t.grad for t in inputs))


def checkpoint(fn, *inputs: Tensor, rngs: tuple = ()) -> Tensor:
    """fn(*inputs) (one Tensor) without keeping fn's activations for backward.

    `inputs` are every tensor fn depends on that is not a Parameter (a Parameter it uses, through
    a closure or as a Module's weight, gets its gradient from the recomputation); `rngs` are the
    Generators fn draws from (dropout), rewound so the recomputation draws the same numbers.
    Without grad mode there is nothing to save and fn simply runs.
    """
    if not _GRAD_ENABLED:
        return fn(*inputs)
    ctx = Context(Recompute, (None, *inputs))
    out = Tensor(Recompute.forward(ctx, fn, *(t.data for t in inputs), rngs=tuple(rngs)))
    if ctx.output_requires_grad:
        out.requires_grad, out._ctx = True, ctx
    return out
