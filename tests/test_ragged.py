"""Ragged batches (fused.Ragged, CausalLM.hidden(lengths=...)): a padded batch's tails are not
computed, and what is computed equals the padded pass."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygpt.autograd.functional as F
from tinygpt import GPT, GPTConfig, Tensor
from tinygpt.autograd.fused import Ragged, rope_tables
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.models.gpt import kept_lengths
from tinygpt.models.llama import Llama, LlamaConfig
from tests.strategies import arrays


def test_pad_and_pack_place_each_row_prefix():
    r = Ragged(np.array([2, 0, 3]), 4)
    assert r.size == 5 and r.index.tolist() == [0, 1, 8, 9, 10]
    a = np.arange(10.0).reshape(5, 2)
    padded = r.pad(a)
    assert padded.shape == (3, 4, 2)
    np.testing.assert_array_equal(padded[0, :2], a[:2])
    np.testing.assert_array_equal(padded[2, :3], a[2:])
    assert not padded[0, 2:].any() and not padded[1].any() and not padded[2, 3].any()
    np.testing.assert_array_equal(r.pack(padded), a)
    assert r.rows(np.array([2, 0]), np.array([1, 1])).tolist() == [3, 1]


def test_bad_lengths_and_a_cache_are_refused():
    with pytest.raises(ValueError, match=r"values in \[0, 4\]"):
        Ragged(np.array([5, 1]), 4)
    with pytest.raises(ValueError, match="expected \\(3, W\\) rows"):
        Ragged(np.array([1, 2]), 4).pad(np.zeros((4, 2)))
    model = GPT(GPTConfig.preset("char-tiny", n_layer=1), seed=0)
    with pytest.raises(ValueError, match="KV cache"):
        model.hidden(np.zeros((1, 3), np.int64), model.new_cache(), lengths=np.array([2]))


def test_kept_lengths_are_one_past_the_last_scored_position():
    scored = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], bool)
    assert kept_lengths(scored).tolist() == [3, 0, 4]


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_ragged_attention_gradients_match_finite_differences(data):
    """Grouped-query attention with RoPE on the packed rows of a ragged batch."""
    B, T, NH, KV, HS = 2, 4, 2, 1, 4
    lengths = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    lengths[0] = max(lengths[0], 1)
    r = Ragged(lengths, T)
    q = data.draw(arrays((r.size, NH * HS)))
    k, v = data.draw(arrays((r.size, KV * HS))), data.draw(arrays((r.size, KV * HS)))
    rope = rope_tables(HS, T, dtype=np.float64)
    gradcheck(lambda q, k, v: F.attention(q, k, v, NH, KV, rope=rope, ragged=r), q, k, v)
    qkv = data.draw(arrays((r.size, 3 * NH * HS)))
    gradcheck(lambda x: F.multihead_attention(x, NH, ragged=r), qkv)


MODELS = {
    "gpt": lambda: GPT(GPTConfig.preset("char-tiny", n_layer=2), seed=1),
    "llama": lambda: Llama(LlamaConfig.preset("llama-tiny", n_layer=2), seed=1),
}


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ragged_loss_and_gradients_equal_the_padded_pass(name, checkpointed):
    """Each row's padding (every target -100 after its last counted one) is skipped: the loss and
    every gradient equal the full forward's, in float64 to rounding."""
    rng = np.random.default_rng(3)
    model = MODELS[name]().astype(np.float64)
    B, T, V = 3, 10, model.config.vocab_size
    idx, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    targets[0, 6:] = -100                       # padding
    targets[1, :3] = targets[1, 8:] = -100      # a masked prompt and padding
    results = []
    for run in (lambda m: m(idx, targets)[1], lambda m: m.loss(idx, targets)):
        model.zero_grad()
        model.checkpoint_activations = checkpointed
        loss = run(model)
        loss.backward()
        results.append((loss.item(), [p.grad.copy() for p in model.parameters()]))
    (full, g_full), (ragged, g_ragged) = results
    assert ragged == pytest.approx(full, rel=1e-12)
    for a, b in zip(g_full, g_ragged):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hidden_rows_are_the_padded_pass_rows(name):
    model = MODELS[name]()
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 7))
    lengths = np.array([7, 2, 5])
    full = model.hidden(idx).data
    packed = model.hidden(idx, lengths=lengths)
    r = Ragged(lengths, 7)
    assert packed.shape == (14, model.config.n_embd)
    for n, L in enumerate(lengths):
        np.testing.assert_allclose(packed.data[r.offsets[n]:r.offsets[n] + L], full[n, :L],
                                   rtol=1e-5, atol=1e-6)


def test_an_unpadded_batch_takes_the_plain_path():
    """Nothing to skip: loss() runs the (B, T) pass, not a ragged one of the same size."""
    model = GPT(GPTConfig.preset("char-tiny", n_layer=1), seed=0)
    seen = []
    original = model.hidden
    model.hidden = lambda *a, **k: seen.append(k.get("lengths")) or original(*a, **k)
    idx = np.ones((2, 4), np.int64)
    model.loss(idx, idx)
    model.loss(idx, np.where(np.arange(4) < 3, idx, -100))
    assert seen[0] is None and seen[1].tolist() == [3, 3]
    assert isinstance(model.loss(idx, idx), Tensor)
