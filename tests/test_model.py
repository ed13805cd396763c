"""The GPT (tinygpt/models/gpt.py): config checks, sizes, causality, init loss, overfit, gradients."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygpt import GPT, GPTConfig, no_grad
from tinygpt.models.gpt import PRESETS
from tests.conftest import MODEL32_ATOL, MODEL32_RTOL
from tests.test_nn import gradcheck_parameters, to_float64

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny_model(dtype=np.float64, seed: int = 0, noise: float = 0.0, **overrides) -> GPT:
    """A 2-layer, 8-wide GPT; `noise` moves weights off the small GPT-2 init (sharper logits)."""
    model = GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)
    if noise:
        to_float64(model, np.random.default_rng(seed + 1), noise)
    return model.astype(dtype)


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, needle", [
    (dict(n_embd=10, n_head=4), "divisible"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-1), "block_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=0), "n_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_config_rejects_bad_values(bad, needle):
    with pytest.raises(ValueError, match=needle):
        GPTConfig(**{**TINY, **bad})


def test_presets():
    sizes = {name: (c.n_layer, c.n_head, c.n_embd) for name, c in PRESETS.items()}
    # GPT-2 paper, table 2 (and the Hugging Face configs)
    assert sizes["gpt2"] == (12, 12, 768)
    assert sizes["gpt2-medium"] == (24, 16, 1024)
    assert sizes["gpt2-large"] == (36, 20, 1280)
    assert sizes["gpt2-xl"] == (48, 25, 1600)
    gpt2 = GPTConfig.preset("gpt2")
    assert (gpt2.vocab_size, gpt2.block_size, gpt2.mlp_width) == (50257, 1024, 3072)
    small = GPTConfig.preset("gpt2", block_size=256, tie_weights=True)
    assert small.block_size == 256 and small.tie_weights and PRESETS["gpt2"].block_size == 1024
    with pytest.raises(ValueError, match="gpt2-medium"):       # the error lists what exists
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="divisible"):          # overrides are validated too
        GPTConfig.preset("gpt2", n_head=7)


@pytest.mark.slow
def test_gpt2_parameter_counts():
    """The book's figures (chapter 4): 163,009,536 untied; 124,412,160 with the head tied to wte."""
    model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_parameters() == 163_009_536
    assert model.lm_head.weight.shape == (768, 50257)
    del model
    tied = GPT(GPTConfig.preset("gpt2", tie_weights=True))
    assert tied.num_parameters() == 124_412_160
    names = [n for n, _ in tied.named_parameters()]
    assert names[:3] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight"]
    assert "h.11.mlp.c_proj.bias" in names and names[-1] == "ln_f.bias"


def test_parameter_names_are_gpt2s():
    names = {n for n, _ in GPT(GPTConfig(**TINY, qkv_bias=True)).named_parameters()}
    per_block = {f"h.1.{s}" for s in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
        "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    assert per_block <= names
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"} <= names
    assert len(names) == 4 + 1 + 2 * 12


# --- forward properties ---------------------------------------------------------------------------

_CAUSAL_MODEL = tiny_model(noise=0.3)


@given(st.data())
def test_causality(data):
    """Changing the tokens after position t never changes the logits at positions <= t."""
    V, T_max = TINY["vocab_size"], TINY["block_size"]
    B = data.draw(st.integers(1, 2))
    T = data.draw(st.integers(2, T_max))
    t = data.draw(st.integers(0, T - 2))
    ids = st.integers(0, V - 1)
    idx = np.array(data.draw(st.lists(ids, min_size=B * T, max_size=B * T))).reshape(B, T)
    other = idx.copy()
    other[:, t + 1:] = np.array(data.draw(st.lists(ids, min_size=B * (T - t - 1),
                                                   max_size=B * (T - t - 1)))).reshape(B, -1)
    a, b = _CAUSAL_MODEL(idx).data, _CAUSAL_MODEL(other).data
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-12, atol=1e-13)
    if (other[:, t + 1:] != idx[:, t + 1:]).any():
        assert not np.allclose(a, b)                  # and the change is visible somewhere later


def test_batch_rows_are_independent():
    model = _CAUSAL_MODEL
    idx = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    both = model(idx).data
    np.testing.assert_allclose(both[1], model(idx[1:]).data[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("vocab_size", [65, 50257])
@pytest.mark.parametrize("tie_weights", [False, True])
def test_loss_at_init_is_log_vocab(vocab_size, tie_weights):
    """Small init means nearly uniform predictions: cross-entropy ln(V) (the book, chapter 5)."""
    model = GPT(GPTConfig(**{**TINY, "vocab_size": vocab_size, "n_embd": 16},
                          tie_weights=tie_weights), seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, vocab_size, (2, 8))
    targets = rng.integers(0, vocab_size, (2, 8))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 8, vocab_size) and loss.shape == ()
    assert abs(loss.item() - math.log(vocab_size)) < 0.1


def _adam(params, lr):
    """A few lines of Adam, so this test needs nothing but the model and autograd."""
    m = [np.zeros_like(p.data) for p in params]
    v = [np.zeros_like(p.data) for p in params]
    for t in range(1, 10**9):
        for p, mi, vi in zip(params, m, v):
            mi[...] = 0.9 * mi + 0.1 * p.grad
            vi[...] = 0.999 * vi + 0.001 * p.grad ** 2
            p.data -= lr * (mi / (1 - 0.9 ** t)) / (np.sqrt(vi / (1 - 0.999 ** t)) + 1e-8)
            p.grad = None
        yield


def test_overfits_one_batch():
    model = GPT(GPTConfig(**{**TINY, "n_embd": 16}), seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 11, (4, 8))
    targets = rng.integers(0, 11, (4, 8))
    step = _adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
        next(step)
    assert losses[0] > 2.0                      # ln 11 = 2.40 at init
    assert losses[-1] < 0.05, losses[::10]      # 32 targets, each after a distinct prefix


def test_float32_and_float64_forward_agree():
    m32, m64 = tiny_model(np.float32, noise=0.3), tiny_model(np.float64, noise=0.3)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    l32, loss32 = m32(idx, idx)
    l64, loss64 = m64(idx, idx)
    assert l32.dtype == np.float32 and l64.dtype == np.float64
    np.testing.assert_allclose(l32.data, l64.data, rtol=MODEL32_RTOL, atol=MODEL32_ATOL)
    np.testing.assert_allclose(loss32.item(), loss64.item(), rtol=MODEL32_RTOL, atol=MODEL32_ATOL)


def test_eval_with_dropout_is_deterministic_and_training_is_not():
    model = GPT(GPTConfig(**TINY, dropout=0.5), seed=0)
    idx = np.arange(8)[None, :]
    a, b = model(idx).data, model(idx).data
    assert not np.array_equal(a, b)
    model.eval()
    np.testing.assert_array_equal(model(idx).data, model(idx).data)
    model.train()
    with no_grad():
        np.testing.assert_array_equal(model(idx).data, model(idx).data)


# --- gradient of the whole model, float64 ---------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True), dict(tie_weights=True)],
                         ids=["untied", "qkv_bias", "tied"])
def test_whole_model_gradcheck(overrides):
    model = tiny_model(np.float64, seed=3, noise=0.3, **overrides)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 11, (2, 8))
    targets = rng.integers(0, 11, (2, 8))
    assert gradcheck_parameters(model, lambda: model(idx))
    assert gradcheck_parameters(model, lambda: model(idx, targets)[1], seed=1)


def test_tied_head_gets_gradient_from_both_uses():
    model = tiny_model(np.float64, seed=3, noise=0.3, tie_weights=True)
    idx = np.array([[1, 2, 3]])
    _, loss = model(idx, np.array([[2, 3, 4]]))
    loss.backward()
    untouched_rows = [r for r in range(11) if r not in (1, 2, 3)]
    # rows never looked up still get gradient through the head: proof the head is wte itself
    assert np.abs(model.wte.weight.grad[untouched_rows]).sum() > 0
    assert model.lm_head is None


@pytest.mark.parametrize("tie_weights", [False, True])
@given(data=st.data())
def test_loss_runs_the_head_on_counted_rows_only_with_the_same_value_and_gradients(tie_weights,
                                                                                     data):
    """CausalLM.loss gathers the rows whose target is not -100 before the head: the loss and
    every gradient are those of forward(idx, targets), which runs the head on every row."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8))
    idx, targets = rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))
    targets[rng.random((B, T)) < data.draw(st.floats(0, 0.9))] = -100
    targets.reshape(-1)[rng.integers(B * T)] = 3                       # one row that counts
    grads = []
    for run in (lambda m: m(idx, targets)[1], lambda m: m.loss(idx, targets)):
        model = tiny_model(np.float64, seed=1, noise=0.3, tie_weights=tie_weights)
        loss = run(model)
        loss.backward()
        grads.append((loss.item(), [p.grad for p in model.parameters()]))
    (full, g_full), (cropped, g_cropped) = grads
    assert cropped == pytest.approx(full, rel=1e-12)
    for a, b in zip(g_full, g_cropped):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-14)


def test_loss_with_no_counted_row_is_a_clear_error():
    with pytest.raises(ValueError, match="every target is ignore_index"):
        tiny_model().loss(np.array([[1, 2]]), np.array([[-100, -100]]))
    with pytest.raises(ValueError, match="do not fit"):
        tiny_model().loss(np.array([[1, 2]]), np.array([[1, 2, 3]]))


# --- bad token ids --------------------------------------------------------------------------------

@pytest.mark.parametrize("idx, error, needle", [
    (np.array([[1, 11]]), ValueError, "11"),
    (np.array([[1, -1]]), ValueError, "-1"),
    (np.array([[1.0, 2.0]]), TypeError, "float64"),
    (np.zeros((1, 0), np.int64), ValueError, r"\(1, 0\)"),
    (np.zeros((1, 9), np.int64), ValueError, "block_size 8"),
    (np.zeros((1, 2, 3), np.int64), ValueError, r"\(1, 2, 3\)"),
])
def test_bad_idx_is_a_clear_error(idx, error, needle):
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(error, match=needle):
        model(idx)


def test_one_dimensional_idx_is_one_row():
    model = tiny_model()
    np.testing.assert_array_equal(model(np.array([1, 2, 3])).data,
                                  model(np.array([[1, 2, 3]])).data)


def test_state_dict_round_trip_after_a_training_step():
    """Train-a-bit, save, load into a new model: identical logits (float32)."""
    a = GPT(GPTConfig(**TINY), seed=0)
    idx = np.arange(8)[None, :]
    _, loss = a(idx, idx)
    loss.backward()
    next(_adam(a.parameters(), lr=1e-2))
    b = GPT(GPTConfig(**TINY), seed=1)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(idx).data, b(idx).data)


def test_uninitialised_model_loads_weights_and_keeps_dropout():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.2)
    source = GPT(cfg, seed=3)
    empty = GPT(cfg, init=False)
    empty.load_state_dict(source.state_dict())
    idx = np.arange(8).reshape(1, 8) % 11
    source.eval(), empty.eval()
    np.testing.assert_array_equal(empty(idx).data, source(idx).data)
    empty.train()
    _, loss = empty(idx, idx)                  # dropout in training needs the model's generator
    loss.backward()
    assert np.isfinite(loss.item())
