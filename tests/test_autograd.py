"""The engine (tinygpt/autograd/tensor.py): Tensor dtypes, backward's rules, graph lifetime, no_grad."""
import gc
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt.autograd.functional as F
from tinygpt import Tensor, no_grad
from tinygpt.autograd.tensor import Context, Function, is_grad_enabled
from tinygpt.autograd.gradcheck import gradcheck
from tests.conftest import GRAD_ATOL, GRAD_RTOL
from tests.strategies import arrays, shapes


# --- Tensor construction and dtypes ---------------------------------------------------------------

@pytest.mark.parametrize("data", [[1, 2, 3], [1.5, -2.0], 3, 2.5, [[True, False]]])
def test_python_numbers_become_float32(data):
    t = Tensor(data)
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t.data, np.asarray(data, dtype=np.float32))
    assert t.shape == np.shape(data)
    assert t.grad is None and not t.requires_grad


def test_float64_is_kept_and_float16_computes_in_float32():
    x64 = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert Tensor(x64).dtype == np.float64
    assert Tensor(x64).data is x64                       # no copy for a float array already fine
    assert Tensor(np.float64(1.5)).dtype == np.float64
    assert Tensor(np.ones((2, 2), np.float16)).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, bool, object])
def test_non_float_arrays_are_a_type_error_naming_dtype_and_shape(dtype):
    arr = np.zeros((2, 3), dtype=dtype)
    with pytest.raises(TypeError) as e:
        Tensor(arr)
    assert str(np.dtype(dtype)) in str(e.value) and "(2, 3)" in str(e.value)


def test_ops_keep_float64():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = (x * 2.0 + 1.0).tanh().sum()
    assert y.dtype == np.float64
    y.backward()
    assert x.grad.dtype == np.float64 and x.grad.shape == x.shape


# --- backward: arguments and errors ---------------------------------------------------------------

def test_scalar_backward_needs_no_grad_argument():
    x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])
    assert x.grad.dtype == np.float32


def test_non_scalar_backward_without_grad_is_an_error():
    x = Tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"non-scalar.*\(2,\)"):
        (x * 3.0).backward()


def test_backward_with_explicit_grad_and_wrong_shape():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = x * 3.0
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        y.backward(np.ones(3))
    y.backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [3.0, 30.0])


def test_backward_through_a_tensor_that_does_not_require_grad():
    with pytest.raises(RuntimeError, match="requires_grad"):
        Tensor([1.0, 2.0]).sum().backward()
    x = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        y = (x * x).sum()
    with pytest.raises(RuntimeError, match="requires_grad"):
        y.backward()


def test_leaf_grads_accumulate_until_zero_grad():
    x = Tensor([1.0, -2.0], requires_grad=True)
    (x * x).sum().backward()
    (x * x).sum().backward()                        # a second, separate graph
    np.testing.assert_array_equal(x.grad, [4.0, -8.0])
    x.zero_grad()
    assert x.grad is None
    (x * 5.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 5.0])


def test_a_kept_grad_array_is_never_written_into():
    """Leaves accumulate in place only into an array no one else holds (a tied parameter's
    two uses then need no third array); one the caller kept, or a view of it, stays as it was."""
    w = Tensor(np.ones((3, 2)), requires_grad=True)
    x = Tensor(np.arange(6.0).reshape(2, 3))
    (F.linear(x, w) + F.linear(x, w)).sum().backward()          # two uses in one graph
    np.testing.assert_array_equal(w.grad, 2 * np.tile(x.data.sum(0)[:, None], 2))
    kept, view = w.grad, w.grad[:1]
    snapshot = kept.copy()
    (F.linear(x, w) + F.linear(x, w)).sum().backward()
    np.testing.assert_array_equal(kept, snapshot)
    np.testing.assert_array_equal(view, snapshot[:1])
    np.testing.assert_array_equal(w.grad, 2 * snapshot)


def test_retain_graph_gives_the_same_interior_grads_and_accumulates_leaves():
    x = Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    h = x * x                                        # interior node
    h.retain_grad()
    z = (h * h.tanh()).sum()
    z.backward(retain_graph=True)
    h_grad, x_grad = h.grad.copy(), x.grad.copy()
    # d/dh (h tanh h) = tanh h + h (1 - tanh^2 h);  dh/dx = 2x
    hv = x.data ** 2
    expected_h = np.tanh(hv) + hv * (1 - np.tanh(hv) ** 2)
    np.testing.assert_allclose(h_grad, expected_h, rtol=1e-12)
    np.testing.assert_allclose(x_grad, expected_h * 2 * x.data, rtol=1e-12)
    z.backward(retain_graph=True)
    np.testing.assert_array_equal(h.grad, h_grad)   # interior: reset each call, not doubled
    np.testing.assert_allclose(x.grad, 2 * x_grad, rtol=1e-15)   # leaves accumulate


def test_second_backward_without_retain_graph_is_a_clear_error():
    x = Tensor([1.0, 2.0], requires_grad=True)
    z = (x.exp() * x).sum()
    z.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        z.backward()


def test_interior_grads_are_not_kept_unless_asked():
    x = Tensor([1.0, 2.0], requires_grad=True)
    h = x * 2.0
    (h * h).sum().backward()
    assert h.grad is None and x.grad is not None


# --- sums over paths ------------------------------------------------------------------------------

def test_tensor_used_several_times_gets_the_sum_of_all_paths():
    x = Tensor(np.array([-1.5, 0.0, 2.0]), requires_grad=True)
    (x * x + x).sum().backward()                    # d/dx = 2x + 1
    np.testing.assert_array_equal(x.grad, 2 * x.data + 1)

    x.zero_grad()                                   # diamond: a -> (b, c) -> d
    a = x * 3.0
    b, c = a.tanh(), a * a
    (b * c).sum().backward()
    av = 3.0 * x.data
    expected = 3.0 * ((1 - np.tanh(av) ** 2) * av ** 2 + np.tanh(av) * 2 * av)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12, atol=1e-15)


_UNARY = {"tanh": F.tanh, "neg": F.neg, "sq": lambda t: t * t}
_BINARY = {"add": F.add, "sub": F.sub, "mul": lambda a, b: F.tanh(a * b)}   # tanh keeps it bounded


@st.composite
def expression_dags(draw):
    """A random straight-line program over two inputs: each step reads any earlier values."""
    n_steps = draw(st.integers(1, 8))
    steps = []
    for i in range(n_steps):
        n_values = 2 + i
        if draw(st.booleans()):
            steps.append((draw(st.sampled_from(sorted(_UNARY))),
                          draw(st.integers(0, n_values - 1))))
        else:
            steps.append((draw(st.sampled_from(sorted(_BINARY))),
                          draw(st.integers(0, n_values - 1)), draw(st.integers(0, n_values - 1))))
    return steps


def _run_dag(steps, x, y):
    values = [x, y]
    for op, *args in steps:
        fn = _UNARY.get(op) or _BINARY[op]
        values.append(fn(*(values[i] for i in args)))
    out = values[-1]
    for v in values[2:-1]:                          # every intermediate reaches the output
        out = out + v * 0.5
    return out + x * 0.0 + y * 0.0                  # an unused input still gets a (zero) grad


@given(expression_dags(), st.data())
def test_random_expression_dags_match_finite_differences(steps, data):
    shape = data.draw(shapes(max_dims=2, max_side=3))
    x, y = data.draw(arrays(shape, -1.5, 1.5)), data.draw(arrays(shape, -1.5, 1.5))
    gradcheck(lambda a, b: _run_dag(steps, a, b), x, y, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_long_chain_has_no_recursion_limit():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 5000] * 2, rtol=1e-10)


# --- no_grad --------------------------------------------------------------------------------------

def test_no_grad_records_no_graph_and_nests():
    x = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()                 # the inner block restored "off", not "on"
        y = (x * x).exp()
    assert y._ctx is None and not y.requires_grad
    assert is_grad_enabled()
    z = x * x
    assert z._ctx is not None and z.requires_grad


def test_no_grad_restores_state_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert is_grad_enabled()
    assert (Tensor([1.0], requires_grad=True) * 2.0).requires_grad


# --- a wrong backward fails at its op -------------------------------------------------------------

class _SumForgetsShape(Function):
    """y = 2x, but backward returns a summed (wrong-shape) gradient."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        return 2 * x

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return (np.asarray(2 * dy.sum(), dtype=dy.dtype),)


class _WrongDtype(Function):
    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        return 2 * x

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        return ((2 * dy).astype(np.float16),)


@pytest.mark.parametrize("fn", [_SumForgetsShape, _WrongDtype])
def test_wrong_backward_is_caught_at_its_op(fn):
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = (fn.apply(x) * 3.0).tanh().sum()            # later ops are fine; the error names `fn`
    with pytest.raises(RuntimeError, match=fn.__name__):
        y.backward()


# --- memory: saved arrays are released after backward ---------------------------------------------

class _SavesACopy(Function):
    """y = x * c with c a fresh array that only the context holds."""

    @staticmethod
    def forward(ctx: Context, x: np.ndarray) -> np.ndarray:
        c = np.full_like(x, 3.0)
        ctx.save(c)
        return x * c

    @staticmethod
    def backward(ctx: Context, dy: np.ndarray) -> tuple:
        (c,) = ctx.saved
        return (dy * c,)


def test_backward_releases_saved_arrays():
    x = Tensor(np.ones((256, 256), np.float32), requires_grad=True)
    y = _SavesACopy.apply(x)
    ref = weakref.ref(y._ctx.saved[0])
    z = (y * y).sum()
    ctx = y._ctx
    z.backward()
    gc.collect()
    assert ref() is None, "the saved array outlived backward"
    assert ctx.saved == () and ctx.inputs == ()
    np.testing.assert_array_equal(x.grad, np.full((256, 256), 18.0, np.float32))


def test_retain_graph_keeps_saved_arrays():
    x = Tensor(np.ones((4, 4), np.float32), requires_grad=True)
    y = _SavesACopy.apply(x)
    ref = weakref.ref(y._ctx.saved[0])
    y.sum().backward(retain_graph=True)
    gc.collect()
    assert ref() is not None
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.full((4, 4), 6.0, np.float32))


def test_intermediate_tensors_are_freed_after_backward():
    x = Tensor(np.ones((128, 128), np.float32), requires_grad=True)
    h = x.exp()                                     # exp saves its output for backward
    ref = weakref.ref(h.data)
    z = (h * 2.0).sum()
    del h
    z.backward()
    gc.collect()
    assert ref() is None, "an interior activation survived backward"


def test_leaf_gradients_never_share_memory():
    # add hands one array to both inputs, reshape a view, sum a read-only broadcast: every leaf
    # must still get an array of its own that it may modify in place
    a, b = Tensor(np.ones((2, 3)), requires_grad=True), Tensor(np.ones((2, 3)), requires_grad=True)
    c = Tensor(np.ones(6), requires_grad=True)
    seed = np.full((2, 3), 2.0, np.float32)
    (a + b + c.reshape((2, 3))).backward(seed)
    grads = [a.grad, b.grad, c.grad]
    assert all(g.flags.writeable and g.flags.owndata for g in grads)
    assert not any(np.shares_memory(x, y) for i, x in enumerate(grads) for y in grads[i + 1:])
    assert not any(np.shares_memory(g, seed) for g in grads)
    a.grad *= 0                                   # in place: the others are unchanged
    np.testing.assert_array_equal(b.grad, seed)
    np.testing.assert_array_equal(c.grad, seed.ravel())
    s = Tensor(np.ones((2, 2)), requires_grad=True)
    s.sum().backward()
    assert s.grad.flags.writeable
