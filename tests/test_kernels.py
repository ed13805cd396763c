"""Kernels: every numba kernel agrees with its NumPy twin, every twin's backward agrees with
central differences of its forward, dtypes are kept, and bad targets fail clearly.

Values come from a NumPy generator seeded by hypothesis (shapes and seed drawn together), so rows
are typical data rather than degenerate ones (a row of equal values makes float32 LayerNorm
divide rounding noise by sqrt(eps), which no twin comparison can survive).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from tests.conftest import (GRAD_ATOL, GRAD_RTOL, TWIN32_ATOL, TWIN32_RTOL, TWIN64_ATOL,
                            TWIN64_RTOL)
from tinygpt import kernels

DTYPES = [np.float64, np.float32]
TOLS = {np.float64: dict(rtol=TWIN64_RTOL, atol=TWIN64_ATOL),
        np.float32: dict(rtol=TWIN32_RTOL, atol=TWIN32_ATOL)}

sides = st.integers(1, 9)
seeds = st.integers(0, 2**32 - 1)


def _assert_twins(fast, ref, dtype, **tol_override):
    fast = fast if isinstance(fast, tuple) else (fast,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for a, b in zip(fast, ref, strict=True):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **{**TOLS[dtype], **tol_override})


def _numgrad(f, x: np.ndarray, g: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of loss = sum(f(x) * g) w.r.t. every element of x (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = np.sum(f(x) * g)
        x[i] = old - eps
        down = np.sum(f(x) * g)
        x[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def _assert_grad(analytic, f, x, g):
    np.testing.assert_allclose(analytic, _numgrad(f, x, g), rtol=GRAD_RTOL, atol=GRAD_ATOL)


# --- the vectorisable exp inside the numba kernels -----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    big = 87.0 if dtype == np.float32 else 708.0
    x = np.concatenate([rng.uniform(-30, 5, 100_000), rng.uniform(-big, big, 100_000),
                        [0.0, -0.0, 1.0, -1.0, big, -big]]).astype(dtype)
    y, ref = kernels.exp_numba(x), np.exp(x)
    # a few ulp of np.exp (which is itself about 1 ulp from exact)
    np.testing.assert_allclose(y, ref, rtol=4 * np.finfo(dtype).eps, atol=0)
    edge = kernels.exp_numba(np.array([-np.inf, -1e4, 1e4, np.inf], dtype))
    assert edge.dtype == dtype and list(edge) == [0.0, 0.0, np.inf, np.inf]


# --- numba kernel vs NumPy twin ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(R=sides, N=sides, seed=seeds, scale=st.sampled_from([1.0, 5.0, 50.0]))
@example(R=1, N=1, seed=0, scale=1.0)
def test_softmax_twins(dtype, R, N, seed, scale):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((R, N))).astype(dtype)
    dy = rng.standard_normal((R, N)).astype(dtype)
    y = kernels.softmax_forward_ref(x)
    _assert_twins(kernels.softmax_forward_numba(x), y, dtype)
    _assert_twins(kernels.softmax_backward_numba(y, dy), kernels.softmax_backward_ref(y, dy), dtype)


def _layer_norm_condition(x: np.ndarray) -> float:
    """max |x| / std over the rows that vary: x - mean loses about log10 of this many digits."""
    x = x.astype(np.float64)
    std = x.std(axis=-1)
    varies = std > 0                                    # a constant row normalises to exactly 0
    return float(np.max(np.abs(x[varies]).max(axis=-1) / std[varies])) if varies.any() else 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@given(R=sides, C=sides, seed=seeds, shift=st.sampled_from([0.0, 3.0]))
@example(R=1, C=1, seed=0, shift=0.0)
@example(R=4, C=2, seed=5116, shift=3.0)            # a row ~ (3.0, 3.02): |x| / std ~ 150
def test_layer_norm_twins(dtype, R, C, seed, shift):
    rng = np.random.default_rng(seed)
    x = (shift + rng.standard_normal((R, C))).astype(dtype)
    w, b = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    dy = rng.standard_normal((R, C)).astype(dtype)
    # Twins that round x - mean differently (float64 sums in numba, float32 in NumPy) differ by
    # ~ eps * |x| / std once normalised: scale atol by that condition number, not by a guess.
    tol = dict(atol=TOLS[dtype]["atol"] * max(1.0, _layer_norm_condition(x)))
    fwd = kernels.layer_norm_forward_ref(x, w, b, 1e-5)
    _assert_twins(kernels.layer_norm_forward_numba(x, w, b, 1e-5), fwd, dtype, **tol)
    _, mean, rstd = fwd
    _assert_twins(kernels.layer_norm_backward_numba(dy, x, w, mean, rstd),
                  kernels.layer_norm_backward_ref(dy, x, w, mean, rstd), dtype, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@given(R=sides, C=sides, seed=seeds, scale=st.sampled_from([1e-3, 1.0, 30.0]))
@example(R=1, C=1, seed=0, scale=1.0)
@example(R=6, C=6, seed=1, scale=1e-3)               # dx ~ 470 in a row where one element is -0.005
def test_rms_norm_twins(dtype, R, C, seed, scale):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((R, C))).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal((R, C)).astype(dtype)
    fwd = kernels.rms_norm_forward_ref(x, w, 1e-5)
    _assert_twins(kernels.rms_norm_forward_numba(x, w, 1e-5), fwd, dtype)
    # dx is rstd (w dy - x mean(x w dy) rstd^2): two terms of size rstd |w dy| that may cancel, so
    # an element's error scales with the largest of its outputs, not with its own size.
    fast = kernels.rms_norm_backward_numba(dy, x, w, fwd[1])
    for a, b in zip(fast, kernels.rms_norm_backward_ref(dy, x, w, fwd[1]), strict=True):
        _assert_twins(a, b, dtype, atol=TOLS[dtype]["atol"] * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("dtype", DTYPES)
@given(N=st.integers(1, 300), seed=seeds)
@example(N=1, seed=0)
def test_gelu_twins(dtype, N, seed):
    # NOTE: |x| <= 3 because past that the float32 tanh twin itself loses accuracy (1 + tanh(u)
    # cancels); test_gelu_float32_accuracy checks the numba kernel out to |x| = 10.
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, N).astype(dtype)
    dy = rng.standard_normal(N).astype(dtype)
    _assert_twins(kernels.gelu_forward_numba(x), kernels.gelu_forward_ref(x), dtype)
    _assert_twins(kernels.gelu_backward_numba(x, dy), kernels.gelu_backward_ref(x, dy), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(N=st.integers(1, 300), seed=seeds)
@example(N=1, seed=0)
def test_swiglu_twins(dtype, N, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.uniform(-8, 8, N).astype(dtype) for _ in range(2))
    dy = rng.standard_normal(N).astype(dtype)
    _assert_twins(kernels.swiglu_forward_numba(a, b), kernels.swiglu_forward_ref(a, b), dtype)
    for ours, ref in zip(kernels.swiglu_backward_numba(a, b, dy),
                         kernels.swiglu_backward_ref(a, b, dy)):
        _assert_twins(ours, ref, dtype)


def test_gelu_float32_accuracy():
    """numba float32 GELU vs the float64 twin (the truth) over a wide range."""
    rng = np.random.default_rng(0)
    x, dy = rng.uniform(-10, 10, 100_000), rng.standard_normal(100_000)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    x = x32.astype(np.float64)
    dy = dy32.astype(np.float64)
    np.testing.assert_allclose(kernels.gelu_forward_numba(x32), kernels.gelu_forward_ref(x),
                               **TOLS[np.float32])
    np.testing.assert_allclose(kernels.gelu_backward_numba(x32, dy32),
                               kernels.gelu_backward_ref(x, dy), **TOLS[np.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@given(R=sides, V=sides, seed=seeds, scale=st.sampled_from([1.0, 50.0]), ignore=st.booleans())
@example(R=1, V=1, seed=0, scale=1.0, ignore=False)
def test_cross_entropy_twins(dtype, R, V, seed, scale, ignore):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((R, V))).astype(dtype)
    targets = rng.integers(0, V, R)
    if ignore:
        targets[rng.random(R) < 0.5] = -100
    dloss = rng.standard_normal(R).astype(dtype)
    losses, lse = kernels.cross_entropy_forward_ref(logits, targets, -100)
    # loss = lse - logit cancels: one rounding of lse (about |lse| * 6e-8 in float32) is an
    # honest difference between two correct float32 sums, so atol scales with |lse|.
    atol = TOLS[dtype]["atol"] + TOLS[dtype]["rtol"] * float(np.abs(lse).max())
    _assert_twins(kernels.cross_entropy_forward_numba(logits, targets, -100), (losses, lse), dtype,
                  atol=atol)
    assert np.all(losses[targets == -100] == 0)
    dlogits = kernels.cross_entropy_backward_numba(logits, targets, lse, dloss)
    _assert_twins(dlogits, kernels.cross_entropy_backward_ref(logits, targets, lse, dloss), dtype)
    assert np.all(dlogits[targets == -100] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@given(N=st.integers(1, 3), Tq=st.integers(1, 6), extra=st.integers(0, 3),
       HS=st.integers(1, 5), group=st.integers(1, 3), seed=seeds)
@example(N=1, Tq=1, extra=0, HS=1, group=1, seed=0)
def test_attention_twins(dtype, N, Tq, extra, HS, group, seed):
    rng = np.random.default_rng(seed)
    Tk = Tq + extra                                           # Tq < Tk: queries after a KV cache
    q = rng.standard_normal((N, group * Tq, HS)).astype(dtype)   # G query heads' rows stacked
    k, v = (rng.standard_normal((N, Tk, HS)).astype(dtype) for _ in range(2))
    dy = rng.standard_normal((N, group * Tq, HS)).astype(dtype)
    scale = 1.0 / np.sqrt(HS)
    y, p = kernels.attention_forward_ref(q, k, v, scale, group)
    y_fast, p_fast = kernels.attention_forward_numba(q, k, v, scale, group)
    _assert_twins((y_fast, p_fast), (y, p), dtype)
    masked = np.tile(kernels.causal_mask(Tq, Tk), (group, 1))
    assert np.all(p_fast[:, masked] == 0)                        # masked: exactly zero
    _assert_twins(kernels.attention_backward_numba(dy, q, k, v, p, scale, group),
                  kernels.attention_backward_ref(dy, q, k, v, p, scale, group), dtype)


@given(N=st.integers(1, 2), Tq=st.integers(1, 4), extra=st.integers(0, 2),
       group=st.integers(2, 3), seed=seeds)
def test_grouped_attention_is_attention_on_repeated_keys(N, Tq, extra, group, seed):
    """G query heads on one key/value head, stacked, equal G heads on G copies of it; the
    stacked backward sums the copies' key and value gradients."""
    rng = np.random.default_rng(seed)
    HS, Tk = 3, Tq + extra
    q = rng.standard_normal((N, group * Tq, HS))
    k, v = (rng.standard_normal((N, Tk, HS)) for _ in range(2))
    dy = rng.standard_normal(q.shape)
    y, p = kernels.attention_forward_ref(q, k, v, 0.5, group)
    dq, dk, dv = kernels.attention_backward_ref(dy, q, k, v, p, 0.5, group)
    heads = lambda a: a.reshape(N * group, -1, HS)               # noqa: E731
    rep = lambda a: np.repeat(a, group, axis=0)                  # noqa: E731
    y1, p1 = kernels.attention_forward_ref(heads(q), rep(k), rep(v), 0.5)
    dq1, dk1, dv1 = kernels.attention_backward_ref(heads(dy), heads(q), rep(k), rep(v), p1, 0.5)
    np.testing.assert_allclose(y, y1.reshape(y.shape), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dq, dq1.reshape(dq.shape), rtol=1e-12, atol=1e-12)
    for d, d1 in ((dk, dk1), (dv, dv1)):
        np.testing.assert_allclose(d, d1.reshape(N, group, Tk, HS).sum(axis=1), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@given(N=st.sampled_from([1, 7, 1 << 16]), seed=seeds, grad_scale=st.sampled_from([1.0, 0.3]),
       decay=st.sampled_from([1.0, 0.999]))
@example(N=1, seed=0, grad_scale=1.0, decay=1.0)
def test_adamw_update_twins(dtype, N, seed, grad_scale, decay):
    # 1 << 16 elements take the parallel compile, the others the serial one
    rng = np.random.default_rng(seed)
    p, g, m = (rng.standard_normal(N).astype(dtype) for _ in range(3))
    v = rng.random(N).astype(dtype)
    args = (grad_scale, 0.9, 0.95, 1e-8, 4e-4 / (1 - 0.9 ** 3), 1 / np.sqrt(1 - 0.95 ** 3), decay)
    ref = [a.copy() for a in (p, g, m, v)]
    kernels.adamw_update_ref(*ref, *args)
    fast = [a.copy() for a in (p, g, m, v)]
    kernels.adamw_update_numba(*fast, *args)
    np.testing.assert_array_equal(fast[1], g)                  # the gradient is only read
    _assert_twins(tuple(fast), tuple(ref), dtype)
    assert not np.array_equal(fast[0], p)                      # and the parameters did move


# --- each backward twin vs central differences of its forward (float64) -------------------------

@given(R=st.integers(1, 3), N=st.integers(1, 5), seed=seeds)
def test_softmax_grad(R, N, seed):
    rng = np.random.default_rng(seed)
    x, g = rng.standard_normal((R, N)), rng.standard_normal((R, N))
    dx = kernels.softmax_backward_ref(kernels.softmax_forward_ref(x), g)
    _assert_grad(dx, kernels.softmax_forward_ref, x, g)


@given(R=st.integers(1, 3), C=st.integers(1, 5), seed=seeds)
def test_layer_norm_grad(R, C, seed):
    rng = np.random.default_rng(seed)
    x, g = rng.standard_normal((R, C)), rng.standard_normal((R, C))
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    _, mean, rstd = kernels.layer_norm_forward_ref(x, w, b, 1e-5)
    dx, dw, db = kernels.layer_norm_backward_ref(g, x, w, mean, rstd)
    _assert_grad(dx, lambda x_: kernels.layer_norm_forward_ref(x_, w, b, 1e-5)[0], x, g)
    _assert_grad(dw, lambda w_: kernels.layer_norm_forward_ref(x, w_, b, 1e-5)[0], w, g)
    _assert_grad(db, lambda b_: kernels.layer_norm_forward_ref(x, w, b_, 1e-5)[0], b, g)


@given(N=st.integers(1, 20), seed=seeds)
def test_gelu_grad(N, seed):
    rng = np.random.default_rng(seed)
    x, g = rng.uniform(-4, 4, N), rng.standard_normal(N)
    _assert_grad(kernels.gelu_backward_ref(x, g), kernels.gelu_forward_ref, x, g)


@given(N=st.integers(1, 20), seed=seeds)
def test_swiglu_grad(N, seed):
    rng = np.random.default_rng(seed)
    a, b, g = rng.uniform(-4, 4, N), rng.uniform(-4, 4, N), rng.standard_normal(N)
    da, db = kernels.swiglu_backward_ref(a, b, g)
    _assert_grad(da, lambda a_: kernels.swiglu_forward_ref(a_, b), a, g)
    _assert_grad(db, lambda b_: kernels.swiglu_forward_ref(a, b_), b, g)


@given(R=st.integers(1, 4), V=st.integers(1, 6), seed=seeds)
def test_cross_entropy_grad(R, V, seed):
    rng = np.random.default_rng(seed)
    logits, g = 3 * rng.standard_normal((R, V)), rng.standard_normal(R)
    targets = rng.integers(0, V, R)
    targets[rng.random(R) < 0.3] = -100
    _, lse = kernels.cross_entropy_forward_ref(logits, targets, -100)
    dlogits = kernels.cross_entropy_backward_ref(logits, targets, lse, g)
    _assert_grad(dlogits, lambda x: kernels.cross_entropy_forward_ref(x, targets, -100)[0],
                 logits, g)


@given(N=st.integers(1, 2), Tq=st.integers(1, 4), extra=st.integers(0, 2), HS=st.integers(1, 3),
       seed=seeds)
def test_attention_grad(N, Tq, extra, HS, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((N, Tq, HS))
    k, v = (rng.standard_normal((N, Tq + extra, HS)) for _ in range(2))
    g = rng.standard_normal((N, Tq, HS))
    scale = 0.7
    _, p = kernels.attention_forward_ref(q, k, v, scale)
    dq, dk, dv = kernels.attention_backward_ref(g, q, k, v, p, scale)
    _assert_grad(dq, lambda q_: kernels.attention_forward_ref(q_, k, v, scale)[0], q, g)
    _assert_grad(dk, lambda k_: kernels.attention_forward_ref(q, k_, v, scale)[0], k, g)
    _assert_grad(dv, lambda v_: kernels.attention_forward_ref(q, k, v_, scale)[0], v, g)


# --- dtypes, errors, the switch -----------------------------------------------------------------

@pytest.mark.parametrize("version", ["_ref", "_numba"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_preserved(version, dtype):
    def kernel(name):
        return getattr(kernels, name + version)
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((3, 4), 4, 4))
    targets = np.array([0, -100, 3])
    q = rng.standard_normal((2, 3, 4)).astype(dtype)
    _, lse = kernel("cross_entropy_forward")(x, targets, -100)
    _, mean, rstd = kernel("layer_norm_forward")(x, w, b, 1e-5)
    _, p = kernel("attention_forward")(q, q, q, 0.5)
    outs = [kernel("softmax_forward")(x), kernel("softmax_backward")(x, x),
            *kernel("layer_norm_forward")(x, w, b, 1e-5),
            *kernel("layer_norm_backward")(x, x, w, mean, rstd),
            kernel("gelu_forward")(w), kernel("gelu_backward")(w, b),
            *kernel("cross_entropy_forward")(x, targets, -100),
            kernel("cross_entropy_backward")(x, targets, lse, w[:3]),
            *kernel("attention_forward")(q, q, q, 0.5),
            *kernel("attention_backward")(q, q, q, q, p, 0.5)]
    assert all(o.dtype == dtype for o in outs)


@pytest.mark.parametrize("version", ["_ref", "_numba"])
@pytest.mark.parametrize("bad", [5, -1, 1000])
def test_bad_target_raises(version, bad):
    forward = getattr(kernels, "cross_entropy_forward" + version)
    logits = np.zeros((3, 5))
    with pytest.raises(ValueError, match=rf"target id {bad}\b.*V=5"):
        forward(logits, np.array([0, bad, -100]), -100)


def test_numba_switch():
    code = ("from tinygpt import kernels; "
            "assert not kernels.USE_NUMBA; "
            "assert kernels.softmax_forward is kernels.softmax_forward_ref; "
            "assert kernels.attention_backward is kernels.attention_backward_ref")
    env = {**os.environ, "TINYGPT_NUMBA": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    if kernels.USE_NUMBA:
        assert kernels.softmax_forward is kernels.softmax_forward_numba
