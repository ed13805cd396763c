"""Every op: a hypothesis gradient check in float64, dtype kept, broadcasting, clear errors."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import tinygpt.autograd.functional as F
from tinygpt import Tensor
from tinygpt.autograd.tensor import Function
from tinygpt.autograd.gradcheck import GradcheckError, gradcheck
from tests.strategies import arrays, broadcastable_pair, shapes


# --- elementwise and binary ops -------------------------------------------------------------------

@given(broadcastable_pair(), st.data())
def test_binary_ops_broadcast_grad(pair, data):
    sa, sb = pair
    a = data.draw(arrays(sa))
    b = data.draw(arrays(sb, lo=0.5, hi=3.0))          # keep division away from 0
    for f in (F.add, F.sub, F.mul, F.div):
        gradcheck(f, a, b)


@given(st.data())
def test_unary_ops_grad(data):
    x = data.draw(arrays(data.draw(shapes())))
    gradcheck(F.neg, x)
    gradcheck(F.exp, x)
    gradcheck(F.tanh, x)
    gradcheck(F.gelu, x)
    gradcheck(lambda t: F.pow(t, 3), x)
    positive = np.abs(x) + 0.1
    gradcheck(F.log, positive)
    gradcheck(F.sqrt, positive)
    gradcheck(lambda t: F.pow(t, -1.5), positive)


@given(st.data())
def test_relu_grad_away_from_kink(data):
    x = data.draw(arrays(data.draw(shapes())))
    assume(np.min(np.abs(x)) > 1e-3)                    # relu has a kink at 0
    gradcheck(F.relu, x)


@given(st.data())
def test_matmul_grad_batched_broadcast(data):
    n, k, m = (data.draw(st.integers(1, 4)) for _ in range(3))
    batch_a = data.draw(st.sampled_from([(), (2,), (1,), (3, 1)]))
    batch_b = data.draw(st.sampled_from([(), (2,), (1,), (1, 2)]))
    assume(_broadcasts(batch_a, batch_b))
    a = data.draw(arrays(batch_a + (n, k)))
    b = data.draw(arrays(batch_b + (k, m)))
    gradcheck(F.matmul, a, b)


def _broadcasts(a, b):
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


@given(st.data())
def test_matmul_vector_operands(data):
    k, m = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    gradcheck(F.matmul, data.draw(arrays((k,))), data.draw(arrays((k, m))))
    gradcheck(F.matmul, data.draw(arrays((m, k))), data.draw(arrays((k,))))


@given(st.data(), st.booleans())
def test_linear_grad(data, with_bias):
    lead = data.draw(shapes(min_dims=1, max_dims=2, max_side=3))
    n_in, n_out = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    x, w = data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_in, n_out)))
    if with_bias:
        gradcheck(F.linear, x, w, data.draw(arrays((n_out,))))
    else:
        gradcheck(lambda x, w: F.linear(x, w), x, w)


@given(st.data(), st.booleans())
def test_linear_with_a_weight_stored_out_in_grad(data, with_bias):
    """transposed=True (a tied head reading the embedding table): x @ w^T, and the gradient
    comes back in w's own (out, in) layout, equal to linear(x, w^T)'s."""
    lead = data.draw(shapes(min_dims=1, max_dims=2, max_side=3))
    n_in, n_out = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    x, w = data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_out, n_in)))
    b = data.draw(arrays((n_out,))) if with_bias else None
    gradcheck(lambda x, w, *b: F.linear(x, w, *b, transposed=True), x, w, *([b] if with_bias else []))
    ours, theirs = Tensor(w, requires_grad=True), Tensor(w, requires_grad=True)
    F.linear(Tensor(x), ours, transposed=True).sum().backward()
    F.linear(Tensor(x), F.transpose(theirs)).sum().backward()
    assert ours.grad.flags.c_contiguous and ours.grad.shape == w.shape
    np.testing.assert_allclose(ours.grad, theirs.grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"stored out, in"):
        F.linear(Tensor(np.ones((2, n_in + 1))), Tensor(w), transposed=True)


# --- reductions and shape ops -----------------------------------------------------------------------

@given(st.data(), st.booleans())
def test_reductions_grad(data, keepdims):
    shape = data.draw(shapes(max_dims=3))
    x = data.draw(arrays(shape, unique=True))
    # max has a kink wherever two values are within the finite-difference step of each other
    assume(x.size == 1 or np.min(np.diff(np.sort(x, axis=None))) > 1e-3)
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    gradcheck(lambda t: F.sum(t, axis, keepdims), x)
    gradcheck(lambda t: F.mean(t, axis, keepdims), x)
    gradcheck(lambda t: F.max(t, axis, keepdims), x)


@given(st.data())
def test_shape_ops_grad(data):
    shape = data.draw(shapes(min_dims=2, max_dims=4))
    x = data.draw(arrays(shape))
    perm = data.draw(st.permutations(range(len(shape))))
    gradcheck(lambda t: F.permute(t, perm), x)
    gradcheck(lambda t: F.transpose(t), x)
    gradcheck(lambda t: F.swapaxes(t, 0, -1), x)
    gradcheck(lambda t: F.reshape(t, (-1,)), x)
    gradcheck(lambda t: t.reshape(shape[::-1]) * 2.0, x)


@given(st.data())
def test_getitem_grad_basic_and_integer_arrays(data):
    shape = data.draw(shapes(min_dims=2, max_dims=3, min_side=2))
    x = data.draw(arrays(shape))
    gradcheck(lambda t: t[1:, ::-1], x)
    gradcheck(lambda t: t[..., 0], x)
    gradcheck(lambda t: t[None, -1], x)
    # repeated indices: the backward must add, not overwrite
    rows = np.array(data.draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, max_size=6)))
    gradcheck(lambda t: t[rows], x)
    gradcheck(lambda t: t[rows, 0], x)


@given(st.data())
def test_concatenate_stack_split_grad(data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=2))
    a, b = data.draw(arrays(shape)), data.draw(arrays(shape))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    gradcheck(lambda s, t: F.concatenate([s, t * t], axis=axis), a, b)
    gradcheck(lambda s, t: F.stack([s, t, s], axis=axis), a, b)
    n = shape[axis]
    gradcheck(lambda s: F.concatenate(F.split(s, [1, n - 1], axis=axis)[::-1], axis=axis), a)


# --- masking, dropout, embedding ----------------------------------------------------------------------

@given(st.data())
def test_where_and_masked_fill_grad(data):
    shape = data.draw(shapes(min_dims=1, max_dims=3))
    a, b = data.draw(arrays(shape)), data.draw(arrays(shape[-1:]))       # b broadcasts
    cond = data.draw(arrays(shape)) > 0
    gradcheck(lambda s, t: F.where(cond, s, t), a, b)
    gradcheck(lambda s: F.masked_fill(s, cond, -1e9).tanh(), a)


@given(st.data(), st.floats(0.0, 0.9))
def test_dropout_grad_and_statistics(data, p):
    x = data.draw(arrays(data.draw(shapes())))
    # the same seed each call, so the mask is a constant of the function
    gradcheck(lambda t: F.dropout(t, p, np.random.default_rng(7)), x)
    big = Tensor(np.ones(20000))
    y = F.dropout(big, p, np.random.default_rng(1)).data
    assert set(np.unique(y)) <= {0.0, 1.0 / (1.0 - p)}
    assert abs(np.mean(y == 0) - p) < 0.03
    assert F.dropout(big, p, None, training=False) is big


@given(st.data())
def test_embedding_grad_with_repeated_ids(data):
    V, C = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    w = data.draw(arrays((V, C)))
    idx = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=8))).reshape(1, -1)
    gradcheck(lambda t: F.embedding(t, idx), w)


@given(st.data())
def test_embedding_row_gradient_adds_into_every_kind_of_table(data):
    """The table's gradient comes back as rows (RowGrad): alone, after a tied head's dense one,
    into a .grad the caller kept (never written), and through an op on the table (not a leaf)."""
    V, C = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    w = data.draw(arrays((V, C)))
    idx = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=8))).reshape(1, -1)
    gradcheck(lambda t: F.linear(F.embedding(t, idx), t, transposed=True), w)     # tied: both uses
    gradcheck(lambda t: F.embedding(t * 2.0, idx), w)                              # interior table
    table = Tensor(w.copy(), requires_grad=True)
    F.embedding(table, idx).sum().backward()
    once = np.zeros((V, C))
    np.add.at(once, idx.reshape(-1), 1.0)
    np.testing.assert_array_equal(table.grad, once)
    kept = table.grad
    F.embedding(table, idx).sum().backward()
    np.testing.assert_array_equal(kept, once)
    np.testing.assert_array_equal(table.grad, 2 * once)


# --- fused ops -----------------------------------------------------------------------------------------

@given(st.data())
def test_softmax_log_softmax_grad(data):
    shape = data.draw(shapes(min_dims=1, max_dims=3))
    x = data.draw(arrays(shape, lo=-10, hi=10))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    gradcheck(lambda t: F.softmax(t, axis=axis), x)
    gradcheck(lambda t: F.log_softmax(t, axis=axis), x)


@given(st.data())
def test_layer_norm_grad(data):
    x = data.draw(arrays(data.draw(shapes(min_dims=2))))
    assume(np.all(x.std(axis=-1) > 1e-2) or x.shape[-1] == 1)
    w, b = data.draw(arrays(x.shape[-1:])), data.draw(arrays(x.shape[-1:]))
    gradcheck(F.layer_norm, x, w, b)


@given(st.data(), st.sampled_from(["mean", "sum"]))
def test_cross_entropy_grad_with_ignore_index(data, reduction):
    R, V = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    logits = data.draw(arrays((R, V), lo=-20, hi=20))
    targets = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=R, max_size=R)))
    ignored = np.array(data.draw(st.lists(st.booleans(), min_size=R, max_size=R)))
    assume(not ignored.all())
    targets[ignored] = -100
    gradcheck(lambda t: F.cross_entropy(t, targets, reduction=reduction), logits)
    expected = -F.log_softmax(Tensor(logits)).data[~ignored, targets[~ignored]]
    got = F.cross_entropy(Tensor(logits), targets, reduction=reduction).item()
    assert np.isclose(got, expected.mean() if reduction == "mean" else expected.sum())


@given(st.data())
def test_causal_attention_grad_and_mask(data):
    lead = data.draw(st.sampled_from([(1,), (2,), (2, 3)]))
    Tk, HS = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    Tq = data.draw(st.integers(1, Tk))                  # Tq < Tk: queries after a KV cache
    q = data.draw(arrays(lead + (Tq, HS)))
    k, v = data.draw(arrays(lead + (Tk, HS))), data.draw(arrays(lead + (Tk, HS)))
    gradcheck(F.causal_attention, q, k, v)
    # the same thing from unfused ops
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(HS)
    mask = np.triu(np.ones((Tq, Tk), bool), k=Tk - Tq + 1)
    ref = F.softmax(Tensor(np.where(mask, -np.inf, scores))).data @ v
    np.testing.assert_allclose(F.causal_attention(Tensor(q), Tensor(k), Tensor(v)).data, ref,
                               rtol=1e-10, atol=1e-12)


@given(st.data())
def test_multihead_attention_grad_and_equals_split_attend_merge(data):
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    NH, HS = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    qkv = data.draw(arrays((B, T, 3 * NH * HS)))
    gradcheck(lambda t: F.multihead_attention(t, NH), qkv)
    # the same thing from the unfused ops, forward and backward
    g = np.random.default_rng(0).standard_normal((B, T, NH * HS))
    fused, unfused = Tensor(qkv, requires_grad=True), Tensor(qkv, requires_grad=True)
    y = F.multihead_attention(fused, NH)
    heads = F.permute(F.reshape(unfused, (B, T, 3, NH, HS)), (2, 0, 3, 1, 4))
    ref = F.reshape(F.permute(F.causal_attention(heads[0], heads[1], heads[2]), (0, 2, 1, 3)),
                    (B, T, NH * HS))
    np.testing.assert_allclose(y.data, ref.data, rtol=1e-12, atol=1e-14)
    y.backward(g)
    ref.backward(g)
    np.testing.assert_allclose(fused.grad, unfused.grad, rtol=1e-12, atol=1e-14)


def test_multihead_attention_with_a_cache_attends_over_it_and_refuses_backward():
    from tinygpt.models.nn import KVCache
    rng = np.random.default_rng(0)
    B, NH, HS, T = 1, 2, 4, 5
    qkv = rng.standard_normal((B, T, 3 * NH * HS))
    whole = F.multihead_attention(Tensor(qkv), NH).data
    cache = KVCache(n_layer=1, batch=B, n_head=NH, block_size=8, head_size=HS, dtype=np.float64)
    first = F.multihead_attention(Tensor(qkv[:, :3]), NH, cache).data
    cache.length = 3
    last = F.multihead_attention(Tensor(qkv[:, 3:], requires_grad=True), NH, cache)
    np.testing.assert_allclose(np.concatenate([first, last.data], axis=1), whole, rtol=1e-12)
    with pytest.raises(RuntimeError, match="KV-cached attention"):
        last.sum().backward()


def test_multihead_attention_rejects_a_width_that_is_not_three_heads():
    with pytest.raises(ValueError, match=r"qkv \(1, 2, 10\) is not 3 x 2 heads"):
        F.multihead_attention(Tensor(np.zeros((1, 2, 10))), 2)


# --- ops for stage 3 and Llama --------------------------------------------------------------------

@given(st.data())
def test_log_sigmoid_and_silu_grad(data):
    x = data.draw(arrays(data.draw(shapes()), lo=-30, hi=30))
    gradcheck(F.log_sigmoid, x)
    gradcheck(F.silu, x)
    np.testing.assert_allclose(F.silu(Tensor(x)).data, x / (1 + np.exp(-x)), rtol=1e-12,
                               atol=1e-300)


@given(st.data())
def test_swiglu_grad_and_value(data):
    """F.swiglu(a, b), one fused op, is silu(a) * b, and its gradients pass the check."""
    shape = data.draw(shapes())
    a, b = data.draw(arrays(shape, lo=-30, hi=30)), data.draw(arrays(shape))
    gradcheck(F.swiglu, a, b)
    np.testing.assert_allclose(F.swiglu(Tensor(a), Tensor(b)).data,
                               (F.silu(Tensor(a)) * Tensor(b)).data, rtol=1e-12, atol=1e-300)
    with pytest.raises(ValueError, match="differ in shape"):
        F.swiglu(Tensor(np.ones(3)), Tensor(np.ones(2)))


def test_log_sigmoid_is_stable_far_out():
    x = np.array([-1000.0, -100.0, -81.0, 0.0, 81.0, 100.0, 1000.0])
    y = F.log_sigmoid(Tensor(x, requires_grad=True))
    assert np.all(np.isfinite(y.data))
    np.testing.assert_allclose(y.data[:3], x[:3], rtol=1e-12)          # log sigmoid(x) ~ x
    assert y.data[3] == pytest.approx(-np.log(2.0))
    np.testing.assert_allclose(y.data[4:], -np.exp(-x[4:]), rtol=1e-6, atol=0)   # ~ -exp(-x)
    y.backward(np.ones_like(x))
    np.testing.assert_allclose(y.grad if y.grad is not None else 0, 0)  # interior: not kept
    x32 = Tensor(np.array([-200.0, 200.0], np.float32), requires_grad=True)
    F.log_sigmoid(x32).sum().backward()
    np.testing.assert_allclose(x32.grad, [1.0, 0.0], atol=1e-30)


@given(st.data())
def test_take_along_axis_grad_with_repeated_indices(data):
    lead = data.draw(st.sampled_from([(), (2,), (2, 3)]))
    N, K = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    x = data.draw(arrays(lead + (N,)))
    idx = np.array(data.draw(st.lists(st.integers(0, N - 1), min_size=int(np.prod(lead)) * K,
                                      max_size=int(np.prod(lead)) * K))).reshape(lead + (K,))
    gradcheck(lambda t: F.take_along_axis(t, idx), x)
    np.testing.assert_array_equal(F.gather(Tensor(x), idx).data, np.take_along_axis(x, idx, -1))
    with pytest.raises(IndexError, match="out of range"):
        F.take_along_axis(Tensor(x), np.full(lead + (1,), N))


@given(st.data())
def test_cross_entropy_per_row_losses(data):
    R, V = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    logits = data.draw(arrays((2, R, V), lo=-20, hi=20))
    targets = np.array(data.draw(st.lists(st.integers(-1, V - 1), min_size=2 * R,
                                          max_size=2 * R))).reshape(2, R)
    targets[targets < 0] = -100                          # some rows ignored, maybe all of them
    gradcheck(lambda t: F.cross_entropy(t, targets, reduction="none"), logits)
    got = F.cross_entropy(Tensor(logits), targets, reduction="none").data
    assert got.shape == (2, R)
    logp = F.log_softmax(Tensor(logits)).data
    kept = targets != -100
    expected = np.where(kept, -np.take_along_axis(logp, np.where(kept, targets, 0)[..., None],
                                                  -1)[..., 0], 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@given(st.data())
def test_rms_norm_grad_and_definition(data):
    x = data.draw(arrays(data.draw(shapes(min_dims=2))))
    w = data.draw(arrays(x.shape[-1:]))
    assume(np.all((x * x).mean(axis=-1) > 1e-2))        # keep rstd's derivative well scaled
    gradcheck(F.rms_norm, x, w)
    ref = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(F.rms_norm(Tensor(x), Tensor(w)).data, ref, rtol=1e-10)


def _rope_reference(x, positions, base):
    """Per position and pair, the 2-D rotation that defines RoPE (half-split pairs, as HF Llama)."""
    out = np.empty_like(x)
    HS = x.shape[-1]
    half = HS // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            a = pos * base ** (-2 * i / HS)
            x1, x2 = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = x1 * np.cos(a) - x2 * np.sin(a)
            out[..., t, i + half] = x2 * np.cos(a) + x1 * np.sin(a)
    return out


@given(st.data())
def test_rope_grad_and_rotation(data):
    from tinygpt.autograd.fused import rope_tables
    T, HS = data.draw(st.integers(1, 5)), 2 * data.draw(st.integers(1, 3))
    start = data.draw(st.integers(0, 4))
    x = data.draw(arrays((2, T, HS)))
    cos, sin = rope_tables(HS, start + T, base=100.0, dtype=np.float64)
    cos, sin = cos[start:], sin[start:]
    gradcheck(lambda t: F.rope(t, cos, sin), x)
    np.testing.assert_allclose(F.rope(Tensor(x), cos, sin).data,
                               _rope_reference(x, range(start, start + T), 100.0), rtol=1e-10,
                               atol=1e-12)


@given(st.data())
def test_grouped_query_attention_grad_and_equals_repeated_heads(data):
    """GQA = multi-head attention whose key/value heads are repeated for each query group."""
    from tinygpt.autograd.fused import rope_tables
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    KV, group, HS = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), 2
    NH = KV * group
    q = data.draw(arrays((B, T, NH * HS)))
    k, v = data.draw(arrays((B, T, KV * HS))), data.draw(arrays((B, T, KV * HS)))
    tables = rope_tables(HS, T, base=100.0, dtype=np.float64)
    use_rope = data.draw(st.booleans())
    rope = tables if use_rope else None
    gradcheck(lambda a, b, c: F.attention(a, b, c, NH, KV, rope=rope), q, k, v)
    qkv = np.concatenate([q, k, v], axis=-1)
    gradcheck(lambda t: F.multihead_attention(t, NH, n_kv_head=KV, rope=rope), qkv)

    def heads(a, n):
        return a.reshape(B, T, n, HS).transpose(0, 2, 1, 3)
    qh, kh, vh = heads(q, NH), heads(k, KV), heads(v, KV)
    if use_rope:
        qh, kh = (_rope_reference(a, range(T), 100.0) for a in (qh, kh))
    kh, vh = np.repeat(kh, group, axis=1), np.repeat(vh, group, axis=1)
    ref = F.causal_attention(Tensor(qh), Tensor(kh), Tensor(vh)).data
    ref = ref.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)
    got = F.attention(Tensor(q), Tensor(k), Tensor(v), NH, KV, rope=rope).data
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(F.multihead_attention(Tensor(qkv), NH, n_kv_head=KV,
                                                     rope=rope).data, ref, rtol=1e-10, atol=1e-12)


def test_grouped_query_attention_with_a_cache_and_rope_matches_the_whole_sequence():
    from tinygpt.autograd.fused import rope_tables
    from tinygpt.models.nn import KVCache
    rng = np.random.default_rng(0)
    B, NH, KV, HS, T = 1, 4, 2, 4, 6
    q, k, v = (rng.standard_normal((B, T, n * HS)) for n in (NH, KV, KV))
    rope = rope_tables(HS, 8, dtype=np.float64)
    whole = F.attention(Tensor(q), Tensor(k), Tensor(v), NH, KV, rope=rope).data
    cache = KVCache(n_layer=1, batch=B, n_head=KV, block_size=8, head_size=HS, dtype=np.float64)
    parts = []
    for a, b in ((0, 4), (4, 5), (5, 6)):            # a prefill, then one token at a time
        parts.append(F.attention(Tensor(q[:, a:b]), Tensor(k[:, a:b]), Tensor(v[:, a:b]), NH, KV,
                                 cache=cache, rope=rope).data)
        cache.length = b
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-10, atol=1e-12)
    assert cache.k[0].shape[1] == KV                 # the cache holds only the key/value heads


def test_attention_rejects_heads_that_do_not_group():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        F.attention(Tensor(np.zeros((1, 2, 12))), Tensor(np.zeros((1, 2, 8))),
                    Tensor(np.zeros((1, 2, 8))), 3, 2)
    with pytest.raises(ValueError, match="3 query \\+ 2 x 2 key/value heads"):
        F.multihead_attention(Tensor(np.zeros((1, 2, 10))), 3, n_kv_head=2)


# --- properties beyond gradients ----------------------------------------------------------------------

OPS_1 = [F.neg, F.exp, F.tanh, F.gelu, F.relu, F.silu, F.log_sigmoid, F.softmax, F.log_softmax,
         lambda t: t.sum(0),
         lambda t: t.mean(), lambda t: t.max(-1), lambda t: t.T, lambda t: t[0],
         lambda t: F.pow(t, 2), lambda t: t * 2 + 1 - t / 3, lambda t: F.sqrt(t * t + 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", range(len(OPS_1)))
def test_ops_keep_dtype(op, dtype):
    x = Tensor(np.random.default_rng(0).standard_normal((3, 4)).astype(dtype), requires_grad=True)
    y = OPS_1[op](x)
    assert y.dtype == dtype
    y.backward(np.ones(y.shape, dtype))
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_ops_keep_dtype(dtype):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 4)).astype(dtype), requires_grad=True)
    w, b = Tensor(np.ones(4, dtype)), Tensor(np.zeros(4, dtype))
    assert F.layer_norm(x, w, b).dtype == dtype
    assert F.linear(x, Tensor(np.ones((4, 5), dtype))).dtype == dtype
    assert F.cross_entropy(x, np.zeros((2, 3), np.int64)).dtype == dtype
    assert F.causal_attention(x, x, x).dtype == dtype
    assert F.multihead_attention(F.concatenate([x, x, x], axis=-1), 2).dtype == dtype
    assert F.rms_norm(x, w).dtype == dtype
    assert F.cross_entropy(x, np.zeros((2, 3), np.int64), reduction="none").dtype == dtype
    from tinygpt.autograd.fused import rope_tables
    cos, sin = rope_tables(4, 3, dtype=dtype)
    assert F.rope(x, cos, sin).dtype == dtype
    kv = x[..., :2]
    assert F.attention(x, kv, kv, 2, 1, rope=rope_tables(2, 3, dtype=dtype)).dtype == dtype
    assert F.take_along_axis(x, np.zeros((2, 3, 1), np.int64)).dtype == dtype


def test_shape_mismatch_errors_name_both_shapes():
    a, b = Tensor(np.ones((2, 3))), Tensor(np.ones((4,)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        a + b
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        a @ Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(5,\)"):
        F.layer_norm(a, Tensor(np.ones(5)), Tensor(np.ones(5)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        F.cross_entropy(a, np.zeros(3, np.int64))


def test_bad_targets_and_ids_are_clear_errors():
    logits = Tensor(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="every target is ignore_index"):
        F.cross_entropy(logits, np.full(2, -100))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(logits, np.zeros(2))
    with pytest.raises(ValueError, match="7"):
        F.cross_entropy(logits, np.array([0, 7]))
    with pytest.raises(IndexError, match="token id 9 .* 5 rows"):
        F.embedding(logits.T, np.array([9]))


def test_gradcheck_catches_a_wrong_backward():
    class Square(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save(x)
            return x * x

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved
            return (dy * x,)                     # wrong: should be 2 * x * dy

    with pytest.raises(GradcheckError, match="analytic"):
        gradcheck(Square.apply, np.array([1.0, 2.0]))


def test_gradcheck_uses_a_cotangent_not_a_sum():
    # softmax's backward replaced by zeros passes a sum-based check; the cotangent check fails it
    class ZeroGradSoftmax(Function):
        @staticmethod
        def forward(ctx, x):
            return F.softmax(Tensor(x)).data

        @staticmethod
        def backward(ctx, dy):
            return (np.zeros_like(dy),)

    with pytest.raises(GradcheckError):
        gradcheck(ZeroGradSoftmax.apply, np.array([[0.1, 0.5, -0.3]]))


def test_gradcheck_rejects_nan_inputs():
    with pytest.raises(ValueError, match="NaN"):
        gradcheck(F.exp, np.array([1.0, np.nan]))
