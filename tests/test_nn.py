"""Layers (tinygpt/models/nn.py): parameter discovery and names, train/eval, state dicts, gradients."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygpt import Tensor, no_grad
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.models.nn import MLP, CausalSelfAttention, Dropout, LayerNorm, Linear, Module, Parameter
from tests.conftest import GRAD_ATOL, GRAD_RTOL
from tests.strategies import arrays


def to_float64(module: Module, rng: np.random.Generator, noise: float = 0.3) -> Module:
    """Parameters in float64, moved off their init by `noise` * N(0, 1).

    GPT init (std 0.02, zero biases, unit LayerNorm weights) makes many gradients tiny or exactly
    symmetric; a bigger spread keeps the gradient check from passing by being near zero.
    """
    for p in module.parameters():
        p.data = p.data.astype(np.float64) + noise * rng.standard_normal(p.shape)
    return module


def _owner(module: Module, name: str) -> tuple[object, str]:
    """The module and attribute a dotted parameter name lives at: 'h.0.attn.c_attn.weight'."""
    path, _, attr = name.rpartition(".")
    return module.get_submodule(path), attr


def gradcheck_parameters(module: Module, forward, seed: int = 0) -> bool:
    """Central differences for every parameter of `module`, through `forward()` -> Tensor.

    Each parameter becomes an input of tinygpt.autograd.gradcheck (all elements up to 64, past that 16
    sampled elements plus one random direction), swapped into the module for each evaluation.
    """
    names = [name for name, _ in module.named_parameters()]
    slots = [_owner(module, name) for name in names]
    arrays_ = [p.data for _, p in module.named_parameters()]

    def f(*params: Tensor) -> Tensor:
        for (obj, attr), p in zip(slots, params):
            setattr(obj, attr, p)
        return forward()

    try:
        return gradcheck(f, *arrays_, rtol=GRAD_RTOL, atol=GRAD_ATOL, seed=seed)
    finally:
        for (obj, attr), a in zip(slots, arrays_):       # leave plain leaf parameters behind
            setattr(obj, attr, Parameter(a))


# --- parameter discovery and names ----------------------------------------------------------------

class _Toy(Module):
    def __init__(self, rng):
        self.inp = Linear(3, 4, rng)
        self.layers = [Linear(4, 4, rng, bias=False), LayerNorm(4)]
        self.out = Linear(4, 4, rng)
        self.out.weight = self.layers[0].weight          # tied: one tensor, two places
        self.scale = Parameter(np.ones(4, np.float32))
        self.buffer = Tensor(np.zeros(4, np.float32))    # no grad: not a parameter
        self.drop = Dropout(0.5, rng)

    def forward(self, x):
        x = self.layers[1](self.layers[0](self.inp(x)))
        return self.drop(self.out(x)) * self.scale


def test_named_parameters_dotted_names_lists_and_tied_tensors():
    m = _Toy(np.random.default_rng(0))
    names = [n for n, _ in m.named_parameters()]
    assert sorted(names) == sorted(["inp.weight", "inp.bias", "layers.0.weight",
                                    "layers.1.weight", "layers.1.bias", "out.bias", "scale"])
    assert len(set(names)) == len(names)
    assert m.num_parameters() == 3 * 4 + 4 + 16 + 4 + 4 + 4 + 4     # the tied 4x4 counted once
    assert len(m.parameters()) == 7
    assert all(p.requires_grad for p in m.parameters())
    assert dict(m.named_parameters())["layers.0.weight"] is m.out.weight


def test_frozen_parameters_stay_parameters_but_not_trainable():
    m = _Toy(np.random.default_rng(0))
    assert m.requires_grad_(False) is m
    assert len(m.parameters()) == 7 and m.trainable_parameters() == []
    assert set(m.state_dict()) == {n for n, _ in m.named_parameters()}
    m.get_submodule("layers.1").requires_grad_(True)
    assert [n for n, _ in m.named_trainable_parameters()] == ["layers.1.weight", "layers.1.bias"]
    assert m.num_parameters(trainable_only=True) == 8
    assert m.num_parameters() == 3 * 4 + 4 + 16 + 4 + 4 + 4 + 4


def test_get_and_set_submodule_walk_attributes_and_lists():
    m = _Toy(np.random.default_rng(0))
    assert m.get_submodule("layers.0") is m.layers[0]
    assert m.get_submodule("") is m
    new = Linear(4, 4, np.random.default_rng(1))
    m.set_submodule("layers.0", new)
    assert m.layers[0] is new
    m.set_submodule("out", new)
    assert m.out is new
    for bad in ("layers.7", "nope", "layers.0.weight", "scale"):
        with pytest.raises(ValueError, match="submodule|not a module"):
            m.get_submodule(bad)
    with pytest.raises(ValueError):
        m.set_submodule("inp.weight", new)


def test_frozen_prefix_records_no_graph():
    """Ops whose inputs are all frozen record nothing: backward stops at the first trainable op."""
    rng = np.random.default_rng(0)
    first, second = Linear(3, 4, rng), Linear(4, 2, rng)
    first.requires_grad_(False)
    h = first(Tensor(np.ones((2, 3), np.float32)))
    assert h._ctx is None and not h.requires_grad          # nothing kept for backward
    second(h).sum().backward()
    assert first.weight.grad is None and second.weight.grad is not None


def test_zero_grad_clears_every_parameter():
    m = _Toy(np.random.default_rng(0))
    m.train(False)
    m(Tensor(np.ones((2, 3), np.float32))).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def _all_modules(module):
    stack = [module]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(child for _, child in m.named_children())


def test_train_eval_reaches_every_submodule():
    m = _Toy(np.random.default_rng(0))
    assert m.eval() is m
    assert all(not sub.training for sub in _all_modules(m))
    assert len(list(_all_modules(m))) == 6
    m.train()
    assert all(sub.training for sub in _all_modules(m))


# --- state dicts ----------------------------------------------------------------------------------

def test_state_dict_round_trip_and_copy():
    a, b = _Toy(np.random.default_rng(0)), _Toy(np.random.default_rng(1))
    x = Tensor(np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32))
    a.eval(), b.eval()
    state = {k: v.copy() for k, v in a.state_dict().items()}
    assert set(state) == {n for n, _ in a.named_parameters()}
    b.load_state_dict(state)
    np.testing.assert_array_equal(b(x).data, a(x).data)
    for v in state.values():                        # load copies: later edits do not leak in
        v[...] = 7.0
    np.testing.assert_array_equal(b(x).data, a(x).data)
    assert b.out.weight is b.layers[0].weight       # loading keeps the tie


def test_load_state_dict_lists_every_problem_in_one_error_and_loads_nothing():
    m = _Toy(np.random.default_rng(0))
    before = {k: v.copy() for k, v in m.state_dict().items()}
    state = dict(before)
    del state["inp.bias"]                                    # missing
    state["extra.weight"] = np.zeros(2, np.float32)          # unexpected
    state["scale"] = np.zeros(5, np.float32)                 # wrong shape
    state["inp.weight"] = np.full((3, 4), 9.0, np.float32)   # fine, but must not be loaded alone
    with pytest.raises(ValueError) as e:
        m.load_state_dict(state)
    msg = str(e.value)
    for needle in ("missing", "inp.bias", "unexpected", "extra.weight", "wrong shape", "scale",
                   "(4,)", "(5,)"):
        assert needle in msg, needle
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match="wrong shape") as e:   # strict=False: shapes still count
        m.load_state_dict(state, strict=False)
    assert "missing" not in str(e.value)
    del state["scale"]
    m.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(m.inp.weight.data, 9.0)


# --- gradients of whole layers, float64 -----------------------------------------------------------

def _mlp(rng):
    return to_float64(MLP(n_embd=4, n_inner=8, n_layer=2, dropout=0.0, rng=rng), rng)


@given(st.integers(0, 2**16), st.data())
def test_mlp_input_grad(seed, data):
    mlp = _mlp(np.random.default_rng(seed))
    x = data.draw(arrays((2, 3, 4)))
    gradcheck(mlp, x, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_mlp_parameter_grads():
    rng = np.random.default_rng(1)
    mlp = _mlp(rng)
    x = Tensor(rng.standard_normal((2, 3, 4)))
    assert gradcheck_parameters(mlp, lambda: mlp(x))


def _attention(rng, qkv_bias=True):
    attn = CausalSelfAttention(n_embd=8, n_head=2, n_layer=2, dropout=0.0, qkv_bias=qkv_bias,
                               rng=rng)
    return to_float64(attn, rng)


@given(st.integers(0, 2**16), st.integers(1, 5), st.data())
def test_attention_input_grad(seed, T, data):
    attn = _attention(np.random.default_rng(seed))
    x = data.draw(arrays((2, T, 8)))
    gradcheck(attn, x, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_parameter_grads(qkv_bias):
    rng = np.random.default_rng(2)
    attn = _attention(rng, qkv_bias)
    x = Tensor(rng.standard_normal((2, 5, 8)))
    names = [n for n, _ in attn.named_parameters()]
    assert ("c_attn.bias" in names) == qkv_bias
    assert gradcheck_parameters(attn, lambda: attn(x))


def test_gradcheck_parameters_can_fail():
    """The helper above must notice a wrong parameter gradient (here: a stopped path)."""
    rng = np.random.default_rng(3)
    mlp = _mlp(rng)
    x = Tensor(rng.standard_normal((2, 3, 4)))

    def leaky():                                    # c_fc.bias enters through .data: no gradient
        h = (x @ mlp.c_fc.weight + Tensor(mlp.c_fc.bias.data)).gelu()
        return mlp.c_proj(h)

    with pytest.raises(AssertionError, match="input 1"):
        gradcheck_parameters(mlp, leaky)


# --- dropout --------------------------------------------------------------------------------------

def test_dropout_only_in_training_with_grad():
    drop = Dropout(0.5, np.random.default_rng(0))
    x = Tensor(np.ones((64, 64), np.float32), requires_grad=True)
    y = drop(x)
    zeros = (y.data == 0).mean()
    assert 0.4 < zeros < 0.6
    np.testing.assert_array_equal(y.data[y.data != 0], 2.0)    # survivors scaled by 1/(1-p)
    drop.eval()
    np.testing.assert_array_equal(drop(x).data, x.data)
    drop.train()
    with no_grad():
        np.testing.assert_array_equal(drop(x).data, x.data)
    assert (drop(x).data == 0).any()                             # back on after no_grad


def test_dropout_mask_is_used_in_backward():
    drop = Dropout(0.3, np.random.default_rng(0))
    x = Tensor(np.ones((8, 8)), requires_grad=True)
    y = drop(x)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)              # dy/dx = mask / (1 - p) = y / x
