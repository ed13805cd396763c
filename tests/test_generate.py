"""Generation (tinygpt/inference/generate.py): greedy, KV cache vs none, streaming, sampling, eos, errors."""
import numpy as np
import pytest

from tinygpt.inference.generate import generate, next_token_logits, sample, stream
from tests.test_model import tiny_model

V, BLOCK = 11, 8
PROMPT = np.array([[3, 1, 4, 1, 5]])       # 5 tokens, block_size 8: 12 new ones slide past it
CACHE_RTOL, CACHE_ATOL = 1e-10, 1e-12             # float64: cached and uncached differ by rounding


@pytest.fixture(scope="module")
def model():
    return tiny_model(np.float64, seed=5, noise=0.5)


def _uncached_logits(model, seq):
    """Last-position logits of a plain forward over the cropped context: the reference."""
    return model(seq[:, -BLOCK:]).data[:, -1, :]


def test_greedy_is_deterministic_and_is_argmax_of_uncached_logits(model):
    out = generate(model, PROMPT, 12)
    assert out.shape == (1, 5 + 12) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :5], PROMPT)
    np.testing.assert_array_equal(generate(model, PROMPT, 12), out)
    for t in range(5, out.shape[1]):
        np.testing.assert_array_equal(out[:, t], _uncached_logits(model, out[:, :t]).argmax(-1))
    np.testing.assert_array_equal(generate(model, PROMPT, 12, use_cache=False), out)


@pytest.mark.parametrize("batch", [1, 2])
def test_cached_and_uncached_logits_agree_at_every_step(model, batch):
    seq = np.concatenate([PROMPT, PROMPT[:, ::-1]])[:batch]
    cache = model.new_cache(batch)
    for step in range(12):                          # lengths 5..16: inside and past block_size 8
        cached, cache = next_token_logits(model, seq, cache)
        uncached, none = next_token_logits(model, seq, None)
        assert none is None and cached.shape == (batch, V)
        np.testing.assert_allclose(cached, uncached, rtol=CACHE_RTOL, atol=CACHE_ATOL,
                                   err_msg=f"step {step}, length {seq.shape[1]}")
        np.testing.assert_allclose(uncached, _uncached_logits(model, seq), rtol=0, atol=0)
        seq = np.concatenate([seq, cached.argmax(-1)[:, None]], axis=1)
    assert seq.shape[1] == 5 + 12


def test_cache_is_used_inside_the_window(model):
    """Inside the window each step feeds one token (the cache grows by one), then it refills."""
    seq, cache, lengths = PROMPT, model.new_cache(1), []
    for _ in range(6):
        logits, cache = next_token_logits(model, seq, cache)
        lengths.append(cache.length)
        seq = np.concatenate([seq, logits.argmax(-1)[:, None]], axis=1)
    assert lengths == [5, 6, 7, 8, 8, 8]


def test_stream_yields_one_column_per_step_and_callback_sees_them_in_order(model):
    idx = np.concatenate([PROMPT, PROMPT[:, ::-1]])
    it = stream(model, idx, 6)
    first = next(it)                                # available before the rest is computed
    assert first.shape == (2,)
    columns = [first] + list(it)
    assert len(columns) == 6
    seen = []
    out = generate(model, idx, 6, callback=lambda col: seen.append(col.copy()))
    np.testing.assert_array_equal(np.stack(columns, axis=1), out[:, 5:])
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 5:])


def test_zero_new_tokens_returns_the_prompt(model):
    np.testing.assert_array_equal(generate(model, PROMPT, 0), PROMPT)


def test_one_dimensional_prompt(model):
    np.testing.assert_array_equal(generate(model, PROMPT[0], 4), generate(model, PROMPT, 4))


# --- sampling -------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    a = generate(model, PROMPT, 20, temperature=1.0, seed=1)
    np.testing.assert_array_equal(generate(model, PROMPT, 20, temperature=1.0, seed=1), a)
    assert not np.array_equal(generate(model, PROMPT, 20, temperature=1.0, seed=2), a)
    np.testing.assert_array_equal(
        generate(model, PROMPT, 20, temperature=1.0, seed=1, use_cache=False), a)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPT, 12)
    for seed in range(3):
        np.testing.assert_array_equal(
            generate(model, PROMPT, 12, temperature=1.5, top_k=1, seed=seed), greedy)
        np.testing.assert_array_equal(
            generate(model, PROMPT, 12, temperature=1.5, top_p=1e-9, seed=seed), greedy)


def test_temperature_spreads_or_sharpens_the_distribution():
    logits = np.tile(np.linspace(0.0, 5.0, V), (4000, 1))          # token V-1 is the favourite
    rng = np.random.default_rng(0)
    hot = np.bincount(sample(logits, 100.0, None, None, rng), minlength=V) / 4000
    assert hot.min() > 0.06 and hot.max() < 0.13                  # near uniform 1/11 = 0.091
    cold = sample(logits, 0.05, None, None, rng)
    assert (cold == V - 1).all()
    normal = np.bincount(sample(logits, 1.0, None, None, rng), minlength=V) / 4000
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    np.testing.assert_allclose(normal, p, atol=0.03)               # ~4 standard errors at 4000


def test_top_k_and_top_p_keep_only_the_best_tokens():
    logits = np.tile(np.log(np.array([0.05, 0.5, 0.3, 0.15])), (3000, 1))
    rng = np.random.default_rng(0)
    assert set(sample(logits, 1.0, 2, None, rng)) == {1, 2}
    assert set(sample(logits, 1.0, None, 0.7, rng)) == {1, 2}      # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(sample(logits, 1.0, None, 0.5, rng)) == {1}         # 0.5 alone reaches 0.5


# --- eos ------------------------------------------------------------------------------------------

def test_eos_stops_a_single_row(model):
    free = generate(model, PROMPT, 12)[0, 5:]
    eos = int(free[3])
    stop = int(np.flatnonzero(free == eos)[0])      # the first time eos appears
    out = generate(model, PROMPT, 12, eos_id=eos)
    assert out.shape == (1, 5 + stop + 1)
    np.testing.assert_array_equal(out[0, 5:], free[:stop + 1])


def test_eos_pads_finished_rows(model):
    prompts = np.array([[0, 0, 0, 1, 8], [9, 1, 0, 9, 0]])
    free = generate(model, prompts, 12)[:, 5:]
    eos = 2
    first = [int(np.flatnonzero(row == eos)[0]) for row in free]
    assert first == [1, 4], f"{free} : the setup needs row 0 to finish before row 1"
    out = generate(model, prompts, 12, eos_id=eos)[:, 5:]
    assert out.shape == (2, 5)                                      # stops when row 1 is done
    np.testing.assert_array_equal(out[0], [free[0, 0], eos, eos, eos, eos])   # padded with eos
    np.testing.assert_array_equal(out[1], free[1, :5])              # unaffected by row 0


# --- errors and state -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(idx=np.array([[1, 11]])), ValueError, "11"),
    (dict(idx=np.array([[1, -2]])), ValueError, "-2"),
    (dict(idx=np.zeros((1, 0), np.int64)), ValueError, "empty"),
    (dict(idx=np.array([[1.0, 2.0]])), TypeError, "float64"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-3), ValueError, "top_k"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
])
def test_bad_arguments_are_clear_errors(model, kwargs, error, needle):
    args = {"idx": PROMPT, "max_new_tokens": 3, "temperature": 1.0, **kwargs}
    with pytest.raises(error, match=needle):
        generate(model, **args)
    with pytest.raises(error, match=needle):
        next(stream(model, **args))


@pytest.mark.parametrize("training", [True, False])
def test_training_flag_is_restored(model, training):
    model.train(training)
    generate(model, PROMPT, 3)
    assert model.training == training and model.h[0].mlp.dropout.training == training

    def boom(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):           # also when the caller stops half-way
        generate(model, PROMPT, 3, callback=boom)
    assert model.training == training and model.h[1].attn.resid_dropout.training == training
    model.eval()


def test_generation_records_no_graph(model):
    model.train()
    seen = []
    generate(model, PROMPT, 2, callback=seen.append)
    assert all(p.grad is None for p in model.parameters())
    logits, _ = next_token_logits(model, PROMPT, None)
    assert isinstance(logits, np.ndarray)
    model.eval()


def test_stream_checks_arguments_when_called_not_when_iterated():
    model = tiny_model()
    with pytest.raises(ValueError, match="temperature"):
        stream(model, np.array([1, 2]), 3, temperature=-1.0)     # no next() needed
