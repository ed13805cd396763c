"""Activation checkpointing (autograd.checkpoint, CausalLM.checkpoint_activations): a recomputed
region gives the gradients of the plain graph, parameters' included, exactly once."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygpt.autograd.functional as F
from tinygpt import GPT, GPTConfig, Tensor, no_grad
from tinygpt.autograd.tensor import checkpoint
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.models.llama import Llama, LlamaConfig
from tests.strategies import arrays

# float32 models: the recomputation repeats the same float32 operations, so the only difference
# is the order gradients are summed in (a parameter's share from the region is added as a whole)
RTOL, ATOL = 1e-5, 1e-6


def _region(w, b):
    """A small region that uses two parameters through its closure, one of them twice."""
    return lambda x: F.tanh(x @ w + b) @ w.swapaxes(0, 1) * x


@given(st.data())
def test_checkpoint_gradients_match_finite_differences(data):
    x = data.draw(arrays((3, 4)))
    w, b = data.draw(arrays((4, 4))), data.draw(arrays((4,)))
    gradcheck(lambda x, w, b: checkpoint(_region(w, b), x), x, w, b)


def test_checkpoint_input_and_parameter_grads_equal_the_plain_ones():
    rng = np.random.default_rng(0)
    x0, w0, b0 = (rng.standard_normal(s) for s in ((5, 4), (4, 4), (4,)))
    g = rng.standard_normal((5, 4))
    grads = []
    for wrap in (lambda f, x: f(x), checkpoint):
        x, w, b = (Tensor(a, requires_grad=True) for a in (x0, w0, b0))
        y = wrap(_region(w, b), x * 2.0)         # the region's input is itself computed
        (y * y).backward(g)
        grads.append([x.grad, w.grad, b.grad])
    for plain, recomputed in zip(*grads):
        np.testing.assert_allclose(recomputed, plain, rtol=1e-12, atol=1e-12)


def test_frozen_input_still_trains_the_parameters_inside():
    """A LoRA model's block input needs no grad, but the adapters inside it do."""
    w = Tensor(np.eye(3), requires_grad=True)
    y = checkpoint(lambda x: x @ w, Tensor(np.ones((2, 3))))
    assert y.requires_grad
    y.sum().backward()
    np.testing.assert_array_equal(w.grad, np.full((3, 3), 2.0))
    with no_grad():
        assert not checkpoint(lambda x: x @ w, Tensor(np.ones((2, 3)))).requires_grad


def _grads(model, idx, targets, recompute: bool) -> dict:
    model.zero_grad()
    model.checkpoint_activations = recompute
    state = model.rng.bit_generator.state
    loss = model(idx, targets)[1]
    loss.backward()
    model.rng.bit_generator.state = state             # the same dropout masks for the next run
    return {"loss": loss.data, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("make", [
    lambda: GPT(GPTConfig.preset("char-tiny", n_layer=3, dropout=0.1), seed=1),
    lambda: Llama(LlamaConfig.preset("llama-tiny", n_layer=3), seed=1)])
def test_checkpointed_model_gradients_equal_the_plain_ones(make):
    model = make()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, model.config.vocab_size, (2, 12))
    targets = rng.integers(0, model.config.vocab_size, (2, 12))
    plain = _grads(model, idx, targets, recompute=False)
    recomputed = _grads(model, idx, targets, recompute=True)
    assert recomputed.keys() == plain.keys()
    for name, g in plain.items():
        assert recomputed[name] is not None, name
        np.testing.assert_allclose(recomputed[name], g, rtol=RTOL, atol=ATOL, err_msg=name)


def test_dropout_masks_replay_and_the_generator_moves_on_as_without_checkpointing():
    model = GPT(GPTConfig.preset("char-tiny", n_layer=2, dropout=0.5), seed=3)
    idx = np.random.default_rng(0).integers(0, 65, (2, 8))
    after = []
    for recompute in (False, True):
        model.rng = np.random.default_rng(7)
        for m in model.modules():
            if hasattr(m, "rng") and m is not model:
                m.rng = model.rng
        model.checkpoint_activations = recompute
        model(idx, idx)[1].backward()
        after.append(model.rng.random())
        model.zero_grad()
    assert after[0] == after[1]
