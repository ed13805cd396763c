"""Kernel benchmark: forward + backward time of each numba kernel vs its NumPy twin (and PyTorch).

GPT-2-small shapes (B=8, T=256, C=768, 12 heads, V=50257), float32, median of a few runs after a
warm-up call (which also triggers numba's compile, or loads it from the cache).

    python -m tinygpt.bench kernels [--repeat 5] [--only gelu,cross_entropy]
"""
import argparse
import statistics
import time
from typing import Callable

import numpy as np

from tinygpt import kernels

B, T, C, NH, V = 8, 256, 768, 12, 50257
R, HS = B * T, C // NH


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()                                                      # warm-up: compile, page in buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cases(rng: np.random.Generator) -> dict[str, tuple[str, Callable, Callable, Callable | None]]:
    """name -> (shape text, numba fwd+bwd, twin fwd+bwd, torch fwd+bwd or None)."""
    f32 = np.float32
    x_ln, dy_ln = rng.standard_normal((R, C), f32), rng.standard_normal((R, C), f32)
    w_ln, b_ln = rng.standard_normal(C, f32), rng.standard_normal(C, f32)
    x_g, dy_g = rng.standard_normal(R * 4 * C, f32), rng.standard_normal(R * 4 * C, f32)
    x_sm, dy_sm = rng.standard_normal((R, C), f32), rng.standard_normal((R, C), f32)
    logits = rng.standard_normal((R, V), f32)
    targets = rng.integers(0, V, R)
    dloss = np.full(R, 1.0 / R, f32)
    q, k, v, dy_a = (rng.standard_normal((B * NH, T, HS), f32) for _ in range(4))
    scale = 1.0 / np.sqrt(HS)

    def layer_norm(suffix):
        fwd, bwd = getattr(kernels, "layer_norm_forward" + suffix), \
            getattr(kernels, "layer_norm_backward" + suffix)
        return lambda: bwd(dy_ln, x_ln, w_ln, *fwd(x_ln, w_ln, b_ln, 1e-5)[1:])

    def gelu(suffix):
        fwd, bwd = getattr(kernels, "gelu_forward" + suffix), getattr(kernels, "gelu_backward" + suffix)
        return lambda: (fwd(x_g), bwd(x_g, dy_g))

    def softmax(suffix):
        fwd, bwd = getattr(kernels, "softmax_forward" + suffix), \
            getattr(kernels, "softmax_backward" + suffix)
        return lambda: bwd(fwd(x_sm), dy_sm)

    def cross_entropy(suffix):
        fwd, bwd = getattr(kernels, "cross_entropy_forward" + suffix), \
            getattr(kernels, "cross_entropy_backward" + suffix)
        return lambda: bwd(logits, targets, fwd(logits, targets, -100)[1], dloss)

    def attention(suffix):
        fwd, bwd = getattr(kernels, "attention_forward" + suffix), \
            getattr(kernels, "attention_backward" + suffix)
        return lambda: bwd(dy_a, q, k, v, fwd(q, k, v, scale)[1], scale)

    torch_fns = _torch_cases(x_ln, dy_ln, w_ln, b_ln, x_g, dy_g, x_sm, dy_sm, logits, targets,
                             q, k, v, dy_a)
    return {
        "layer_norm": (f"({R}, {C})", layer_norm("_numba"), layer_norm("_ref"),
                       torch_fns.get("layer_norm")),
        "gelu": (f"({R * 4 * C},)", gelu("_numba"), gelu("_ref"), torch_fns.get("gelu")),
        "softmax": (f"({R}, {C})", softmax("_numba"), softmax("_ref"), torch_fns.get("softmax")),
        "cross_entropy": (f"({R}, {V})", cross_entropy("_numba"), cross_entropy("_ref"),
                          torch_fns.get("cross_entropy")),
        "attention": (f"({B * NH}, {T}, {HS})", attention("_numba"), attention("_ref"),
                      torch_fns.get("attention")),
    }


def _torch_cases(x_ln, dy_ln, w_ln, b_ln, x_g, dy_g, x_sm, dy_sm, logits, targets, q, k, v, dy_a
                 ) -> dict[str, Callable]:
    """The same ops in PyTorch eager (2 threads), forward + backward; {} without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    torch.set_num_threads(2)

    def leaf(a):
        return torch.from_numpy(a).requires_grad_(True)

    def fwd_bwd(make):                                        # make() -> (output, cotangent)
        def run():
            out, g = make()
            out.backward(g)
        return run

    t_dy_ln, t_dy_g, t_dy_sm = map(torch.from_numpy, (dy_ln, dy_g, dy_sm))
    t_targets, t_dy_a = torch.from_numpy(targets), torch.from_numpy(dy_a)
    t_w, t_b = leaf(w_ln), leaf(b_ln)
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    return {
        "layer_norm": fwd_bwd(lambda: (F.layer_norm(leaf(x_ln), (x_ln.shape[1],), t_w, t_b),
                                       t_dy_ln)),
        "gelu": fwd_bwd(lambda: (F.gelu(leaf(x_g), approximate="tanh"), t_dy_g)),
        "softmax": fwd_bwd(lambda: (torch.softmax(leaf(x_sm), dim=-1), t_dy_sm)),
        "cross_entropy": fwd_bwd(lambda: (F.cross_entropy(leaf(logits), t_targets), None)),
        # explicit math (not the fused SDPA kernel), so p is materialised like ours
        "attention": fwd_bwd(lambda: (torch.softmax(
            (leaf(q) @ leaf(k).transpose(-1, -2) / np.sqrt(q.shape[-1])).masked_fill(
                ~mask, float("-inf")), dim=-1) @ leaf(v), t_dy_a)),
    }


def bench_block(repeat: int, B: int = 8, T: int = 256) -> None:
    """Forward + backward of one GPT-2-small Block (C=768, 12 heads) built from tinygpt ops, and
    the same block in PyTorch eager (2 threads, same weights) when torch is installed."""
    from tinygpt.autograd.tensor import Tensor
    from tinygpt.models.gpt import Block, GPTConfig

    cfg = GPTConfig.preset("gpt2", qkv_bias=True)
    rng = np.random.default_rng(0)
    block = Block(cfg, rng)
    x = Tensor(rng.standard_normal((B, T, cfg.n_embd), dtype=np.float32), requires_grad=True)
    dy = rng.standard_normal((B, T, cfg.n_embd), dtype=np.float32)

    def step():
        x.grad = None
        block.zero_grad()
        block(x).backward(dy)

    t_ours = _median_ms(step, repeat)
    print(f"\nblock (B={B}, T={T}, C={cfg.n_embd}, {cfg.n_head} heads) forward+backward: "
          f"tinygpt {t_ours:.1f} ms", end="")
    torch_step = _torch_block(block, x.data, dy, cfg.n_head)
    if torch_step is None:
        print(" (PyTorch not installed)")
        return
    t_torch = _median_ms(torch_step, repeat)
    print(f", PyTorch eager {t_torch:.1f} ms, tinygpt/PyTorch time ratio {t_ours / t_torch:.2f}"
          " (target <= 1.2)")


def _torch_block(block, x: np.ndarray, dy: np.ndarray, n_head: int) -> Callable | None:
    """The same pre-LN block in PyTorch eager (`torch_reference.gpt2_block`), on leaf copies of
    our weights; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from tinygpt.autograd.tensor import Tensor
    from tinygpt.bench import torch_reference as ref
    torch.set_num_threads(2)
    w = ref.parameters(block, requires_grad=True)
    xt, dyt = torch.tensor(x, requires_grad=True), torch.tensor(dy)

    with torch.no_grad():                       # sanity: both compute the same block
        gap = float(np.abs(ref.gpt2_block(xt, w, "", n_head).numpy()
                           - block(Tensor(x)).data).max())
    if gap > 1e-3:
        print(f" [warning: PyTorch block differs by {gap:.2e}]", end="")

    def step():
        xt.grad = None
        for t in w.values():
            t.grad = None
        ref.gpt2_block(xt, w, "", n_head).backward(dyt)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinygpt bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per kernel (median)")
    parser.add_argument("--only", default="", help="comma-separated kernel names")
    args = parser.parse_args(argv)
    cases = _cases(np.random.default_rng(0))
    names = [n for n in cases if not args.only or n in args.only.split(",")]
    print(f"float32, forward+backward, median of {args.repeat} (ms)")
    print(f"{'kernel':<14} {'shape':<18} {'numba':>9} {'numpy':>9} {'speed-up':>9} {'torch':>9}"
          f" {'numba/torch':>12}")
    for name in names:
        shape, fast, ref, torch_fn = cases[name]
        t_fast, t_ref = _median_ms(fast, args.repeat), _median_ms(ref, args.repeat)
        t_torch = _median_ms(torch_fn, args.repeat) if torch_fn else float("nan")
        print(f"{name:<14} {shape:<18} {t_fast:9.1f} {t_ref:9.1f} {t_ref / t_fast:8.1f}x "
              f"{t_torch:9.1f} {t_fast / t_torch:11.2f}x")
    if not args.only:
        bench_block(args.repeat)
    return 0
