"""AdamW and SGD against hand-computed updates (and torch.optim.AdamW when installed), the
learning-rate schedule, gradient clipping, and which parameters get weight decay."""
import math

import numpy as np
import pytest

from tinygpt import GPT, GPTConfig, Tensor
from tinygpt.training.optim import (SGD, AdamW, clip_coef, clip_grad_norm, global_grad_norm, lr_at,
                           should_decay)

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)


def _adamw_reference(p, grads, lr, b1, b2, eps, wd):
    """Algorithm 2 of Loshchilov & Hutter, written out in float64, one scalar at a time."""
    p, m, v = list(p), [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * wd * p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p)


def test_adamw_matches_hand_computed_reference():
    w0 = np.array([[0.5, -1.0], [2.0, 0.25]])                     # a matrix: decayed
    grads = [np.array([[0.1, -0.2], [0.3, 0.0]]), np.array([[-0.5, 0.4], [0.05, 1.0]]),
             np.array([[0.2, 0.2], [-0.1, -0.3]])]
    w = Tensor(w0.copy(), requires_grad=True)                      # float64 kept
    opt = AdamW([("w", w)], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    for g in grads:
        w.grad = g.copy()
        opt.step()
    expected = _adamw_reference(w0.ravel(), [g.ravel() for g in grads], 0.1, 0.9, 0.99, 1e-8, 0.5)
    np.testing.assert_allclose(w.data.ravel(), expected, rtol=1e-12, atol=1e-14)


def test_adamw_grad_scale_equals_scaled_gradient():
    a, b = (Tensor(np.ones((3, 4)), requires_grad=True) for _ in range(2))
    opt_a, opt_b = AdamW([("a", a)], lr=0.01), AdamW([("b", b)], lr=0.01)
    g = np.arange(12.0).reshape(3, 4) - 5
    a.grad, b.grad = g * 0.25, g.copy()
    opt_a.step()
    opt_b.step(grad_scale=0.25)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-12)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((5, 3), np.float32), rng.standard_normal(3, np.float32)
    w, b = Tensor(w0.copy(), requires_grad=True), Tensor(b0.copy(), requires_grad=True)
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    opt = AdamW([("w", w), ("b", b)], lr=1e-2, weight_decay=0.1)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1},
                              {"params": [tb], "weight_decay": 0.0}], lr=1e-2)
    for _ in range(5):
        gw, gb = rng.standard_normal((5, 3), np.float32), rng.standard_normal(3, np.float32)
        w.grad, b.grad = gw.copy(), gb.copy()
        tw.grad, tb.grad = torch.from_numpy(gw.copy()), torch.from_numpy(gb.copy())
        opt.step()
        topt.step()
    np.testing.assert_allclose(w.data, tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.data, tb.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_keeps_float32_and_preallocates():
    model = GPT(TINY)
    opt = AdamW(model.named_parameters(), lr=1e-3)
    buffers = [id(m) for m in opt.m] + [id(v) for v in opt.v]
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.step()
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert all(a.dtype == np.float32 for a in opt.m + opt.v)
    assert [id(m) for m in opt.m] + [id(v) for v in opt.v] == buffers


def test_no_weight_decay_on_biases_layernorm_and_embeddings():
    model = GPT(TINY.__class__(**{**TINY.__dict__, "qkv_bias": True}))
    names = {n: should_decay(n, p) for n, p in model.named_parameters()}
    assert not any(v for n, v in names.items() if n.endswith(".bias") or ".ln_" in n
                   or n.startswith("ln_f"))
    assert not names["wte.weight"] and not names["wpe.weight"]
    assert names["h.0.attn.c_attn.weight"] and names["lm_head.weight"]
    assert should_decay("wte.weight", model.wte.weight, decay_embeddings=True)
    # zero gradients: Adam's update is 0, so only decayed parameters move, by exactly (1 - lr wd)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    opt = AdamW(model.named_parameters(), lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = np.zeros_like(p.data)
    opt.step()
    for n, p in model.named_parameters():
        factor = np.float32(1 - 0.1 * 0.5) if names[n] else np.float32(1)
        np.testing.assert_array_equal(p.data, before[n] * factor, err_msg=n)


def test_sgd_step_and_momentum():
    w = Tensor(np.array([[1.0, 2.0]]), requires_grad=True)
    opt = SGD([w], lr=0.5, momentum=0.9)
    w.grad = np.array([[1.0, -1.0]])
    opt.step()                                                      # buf = g
    np.testing.assert_allclose(w.data, [[0.5, 2.5]])
    w.grad = np.array([[1.0, -1.0]])
    opt.step()                                                      # buf = 0.9 g + g
    np.testing.assert_allclose(w.data, [[0.5 - 0.5 * 1.9, 2.5 + 0.5 * 1.9]])


def test_lr_schedule_warmup_peak_and_end():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    assert lr_at(0, lr, min_lr, warmup, max_steps) == pytest.approx(lr / warmup)
    assert lr_at(4, lr, min_lr, warmup, max_steps) == pytest.approx(lr * 5 / warmup)
    assert lr_at(warmup - 1, lr, min_lr, warmup, max_steps) == pytest.approx(lr)   # peak
    assert lr_at(warmup, lr, min_lr, warmup, max_steps) == pytest.approx(lr)       # cos(0)
    assert lr_at(60, lr, min_lr, warmup, max_steps) == pytest.approx((lr + min_lr) / 2)
    assert lr_at(max_steps, lr, min_lr, warmup, max_steps) == pytest.approx(min_lr)
    assert lr_at(10 * max_steps, lr, min_lr, warmup, max_steps) == pytest.approx(min_lr)
    values = [lr_at(s, lr, min_lr, warmup, max_steps) for s in range(warmup, max_steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))          # monotone decay
    assert {lr_at(s, lr, lr, 0, 50) for s in range(60)} == {lr}      # constant: the book's ch. 5


def test_clip_grad_norm():
    a, b = Tensor(np.zeros(2), requires_grad=True), Tensor(np.zeros((1, 2)), requires_grad=True)
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([[0.0, 4.0]])   # global norm 5
    assert global_grad_norm([a, b]) == pytest.approx(5.0)
    assert clip_grad_norm([a, b], 10.0) == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad, [3.0, 0.0])                  # under the limit: untouched
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    assert global_grad_norm([a, b]) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(b.grad, [[0.0, 0.8]], rtol=1e-5)


def test_clip_coef_is_pytorchs_rule():
    assert clip_coef(5.0, 10.0) == 1.0 and clip_coef(5.0, 0.0) == 1.0       # under; 0: off
    assert clip_coef(5.0, 1.0) == 1.0 / (5.0 + 1e-6)                        # clip_grad_norm_'s


def test_optimizer_state_round_trip():
    model = GPT(TINY)
    opt = AdamW(model.named_parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = np.full_like(p.data, 0.5)
    opt.step()
    other = AdamW(GPT(TINY).named_parameters(), lr=0.0)
    other.load_state(opt.state_dict(), opt.state_arrays())
    assert other.t == 1 and other.lr == opt.lr
    for key, arr in opt.state_arrays().items():
        np.testing.assert_array_equal(other.state_arrays()[key], arr)
    with pytest.raises(ValueError, match="SGD"):
        SGD(model.named_parameters()).load_state(opt.state_dict(), {})
