"""Training-step benchmark: tokens/s of forward + loss + backward + AdamW, vs PyTorch eager.

    python -m tinygpt.bench train [--only mini,124m] [--steps 3] [--no-torch]

Configs: "mini" = preset gpt-mini (6 layers, 384 wide, 6 heads, GPT-2 vocab) at context 256, batch
8; "124m" = preset gpt2 (untied, the book's) at context 256, batch 4. Dropout 0. Each (config,
framework) runs in its own subprocess, so peak RSS (getrusage ru_maxrss) is that run's alone.

Model FLOPs utilisation (MFU) = achieved model FLOP/s / NumPy sgemm FLOP/s measured in the same
run, with model FLOPs per token = 6 N + 12 L C T (N = parameters that multiply: everything but the
embedding lookups; 12 L C T: attention scores and weighted sum, forward and backward, counted for
the full T x T square as the kernels compute it). PyTorch runs `torch_reference.gpt2_logits` on
copies of tinygpt's initial weights, 2 threads, its fused scaled_dot_product_attention, and
torch.optim.AdamW with the same decay groups, run twice: as the book calls it ("torch"), and
with fused=True ("torch-fused"), whose one-pass update is ~10x faster than the default on CPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CONFIGS = {"mini": ("gpt-mini", 8), "124m": ("gpt2", 4)}      # name -> (preset, batch size)
FRAMEWORKS = ("tinygpt", "torch", "torch-fused")
T = 256
# the book's chapter 6 step: GPT-2 124M, batch 8 x 120 tokens, a 2-class head on the last token
CLASSIFIER_TRAINABLE = ("all", "last-block")
CLS_B, CLS_T = 8, 120


def model_flops_per_token(cfg) -> float:
    """6 N + 12 L C T: N counts the weights used in matmuls (the head, but not wte/wpe lookups,
    unless wte is tied and so is also the head)."""
    C, V = cfg.n_embd, cfg.vocab_size
    per_block = 2 * C + C * 3 * C + (3 * C if cfg.qkv_bias else 0) + C * C + C + 2 * C \
        + 2 * C * cfg.mlp_width + cfg.mlp_width + C
    n = cfg.n_layer * per_block + 2 * C + C * V
    return 6 * n + 12 * cfg.n_layer * C * cfg.block_size


def sgemm_gflops(n: int = 2048, repeat: int = 5) -> float:
    """Best-of-`repeat` float32 GEMM rate, (n x n) @ (n x n)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _batch(vocab: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (B, T + 1))
    return ids[:, :-1], ids[:, 1:]


def run_tinygpt(preset: str, B: int, steps: int) -> dict:
    from itertools import repeat

    from tinygpt.models.gpt import GPT, GPTConfig
    from tinygpt.core import runtime
    from tinygpt.training.train import TrainConfig, make_optimizer, train_step
    runtime.keep_freed_memory()                  # as train() does
    cfg = GPTConfig.preset(preset, block_size=T, dropout=0.0)
    model = GPT(cfg, seed=0)
    train_cfg = TrainConfig(context_length=T, batch_size=B)
    opt = make_optimizer(model, train_cfg)
    batches = repeat(_batch(cfg.vocab_size, B))

    def step():                                  # train()'s own step, without its evaluations
        train_step(model, opt, batches, accum=train_cfg.accum, grad_clip=train_cfg.grad_clip)
    return _measure(step, steps, B, cfg)


def run_classifier(trainable: str, steps: int) -> dict:
    """One classifier step (forward, loss, backward, clipping, AdamW) of GPT-2 124M with `trainable`
    parameters: everything, or the book's last block + final norm + head. The frozen prefix
    records no graph (see nn.Module.requires_grad_), so its activations are not kept."""
    from tinygpt.models.gpt import GPT, GPTConfig
    from tinygpt.core import runtime
    from tinygpt.finetune.classify import Classifier, classification_loss, set_trainable
    from tinygpt.training.train import TrainConfig, make_optimizer, train_step
    runtime.keep_freed_memory()
    cfg = GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True, block_size=1024)
    model = Classifier(GPT(cfg, seed=0), 2, token_pos="last")
    set_trainable(model, trainable)
    opt = make_optimizer(model, TrainConfig(context_length=CLS_T, batch_size=CLS_B))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (CLS_B, CLS_T))
    batch = (ids, np.full(CLS_B, CLS_T), rng.integers(0, 2, CLS_B))

    def step():
        train_step(model, opt, iter([batch]), loss_fn=classification_loss,
                   count_tokens=lambda b: b[0].size)
    out = _measure(step, steps, CLS_B, cfg, tokens_per_step=CLS_B * CLS_T)
    out["trainable"] = model.num_parameters(trainable_only=True)
    return out


def run_torch_classifier(trainable: str, steps: int) -> dict:
    """The same classifier step in PyTorch (`torch_reference.gpt2_block`, tinygpt's initial
    weights): the frozen blocks under no_grad, as the book's model with requires_grad=False runs
    them, then the trained ones, the final norm and a 2-class head on the last token."""
    import torch
    import torch.nn.functional as F

    from tinygpt.models.gpt import GPT, GPTConfig
    from tinygpt.bench import torch_reference as ref
    torch.set_num_threads(2)
    cfg = GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True, block_size=1024)
    first_trained = 0 if trainable == "all" else cfg.n_layer - 1
    w = {n: t.clone().requires_grad_(trainable == "all" or n.startswith("ln_f")
                                     or n.startswith(f"h.{cfg.n_layer - 1}."))
         for n, t in ref.parameters(GPT(cfg, seed=0)).items()}
    head_w = (0.02 * torch.randn(cfg.n_embd, 2)).requires_grad_(True)
    head_b = torch.zeros(2, requires_grad=True)
    params = [t for t in w.values() if t.requires_grad] + [head_w, head_b]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, cfg.vocab_size, (CLS_B, CLS_T)))
    y = torch.from_numpy(rng.integers(0, 2, CLS_B))

    def step():
        with torch.set_grad_enabled(first_trained == 0):
            h = w["wte.weight"][x] + w["wpe.weight"][:CLS_T]
            for i in range(first_trained):
                h = ref.gpt2_block(h, w, f"h.{i}.", cfg.n_head)
        for i in range(first_trained, cfg.n_layer):
            h = ref.gpt2_block(h, w, f"h.{i}.", cfg.n_head)
        h = F.layer_norm(h[:, -1], (cfg.n_embd,), w["ln_f.weight"], w["ln_f.bias"], 1e-5)
        F.cross_entropy(h @ head_w + head_b, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = _measure(step, steps, CLS_B, cfg, tokens_per_step=CLS_B * CLS_T)
    out["trainable"] = sum(t.numel() for t in params)
    return out


def run_torch(preset: str, B: int, steps: int, fused_adamw: bool = False) -> dict:
    import torch

    from tinygpt.models.gpt import GPT, GPTConfig
    from tinygpt.bench import torch_reference as ref
    torch.set_num_threads(2)
    cfg = GPTConfig.preset(preset, block_size=T, dropout=0.0)
    w = ref.parameters(GPT(cfg, seed=0), requires_grad=True)    # tinygpt's own initial weights
    decay = [p for n, p in w.items() if p.ndim >= 2 and not n.startswith(("wte", "wpe"))]
    no_decay = [p for n, p in w.items() if not (p.ndim >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=4e-4,
                            fused=fused_adamw or None)
    x, y = (torch.from_numpy(a) for a in _batch(cfg.vocab_size, B))

    def step():
        logits = ref.gpt2_logits(x, w, cfg)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(w.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _measure(step, steps, B, cfg)


def _measure(step, steps: int, B: int, cfg, tokens_per_step: int | None = None) -> dict:
    step()                                       # warm-up: numba compile/cache load, allocations
    seconds = _timed(lambda: [step() for _ in range(steps)])
    tokens_per_s = (tokens_per_step or B * T) * steps / seconds
    return {"tokens_per_s": tokens_per_s, "step_s": seconds / steps,
            "model_gflops": tokens_per_s * model_flops_per_token(cfg) / 1e9,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(framework: str, name: str, steps: int) -> int:
    if name.startswith("cls-"):
        run = run_classifier if framework == "tinygpt" else run_torch_classifier
        print(json.dumps(run(name[4:], steps)))
        return 0
    preset, B = CONFIGS[name]
    if framework == "tinygpt":
        result = run_tinygpt(preset, B, steps)
    else:
        result = run_torch(preset, B, steps, fused_adamw=framework == "torch-fused")
    print(json.dumps(result))
    return 0


def _spawn(framework: str, name: str, steps: int) -> dict | None:
    proc = subprocess.run([sys.executable, "-m", "tinygpt.bench.train", "--child", framework,
                           "--only", name, "--steps", str(steps)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{framework} {name}: failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinygpt bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="mini,124m",
                        help="comma-separated: mini, 124m, and classifier (GPT-2 124M, B=8, "
                        "T=120: all parameters trained against the last block + norm + head)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if args.child:
        return _child(args.child, names[0], args.steps)
    if any(n not in CONFIGS and n != "classifier" for n in names):
        parser.error(f"--only takes {', '.join(CONFIGS)}, classifier")
    if "classifier" in names:
        names.remove("classifier")
        _classifier_table(args.steps, _have_torch() and not args.no_torch)
        if not names:
            return 0
    try:
        import torch  # noqa: F401  (only to know whether to compare)
        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
    gemm = sgemm_gflops()
    print(f"NumPy sgemm 2048^3 float32: {gemm:.0f} GFLOP/s (the MFU denominator); "
          f"context {T}, {args.steps} timed steps after a warm-up step, each run in a subprocess")
    print("torch: torch.optim.AdamW as the book uses it; torch-fused: with fused=True, "
          "PyTorch's fastest CPU AdamW")
    print(f"{'config':<24}{'framework':<12}{'tokens/s':>10}{'step s':>8}{'GFLOP/s':>9}"
          f"{'MFU':>7}{'peak RSS MB':>13}{'tinygpt/this':>14}")
    for name in names:
        preset, B = CONFIGS[name]
        results = {f: _spawn(f, name, args.steps) for f in FRAMEWORKS
                   if f == "tinygpt" or have_torch}
        ours = results["tinygpt"]
        for framework, r in results.items():
            if r is None:
                continue
            ratio = (f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x"
                     if framework != "tinygpt" and ours else "")
            print(f"{f'{name} ({preset}, B={B})':<24}{framework:<12}{r['tokens_per_s']:>10,.0f}"
                  f"{r['step_s']:>8.2f}{r['model_gflops']:>9.0f}"
                  f"{100 * r['model_gflops'] / gemm:>6.0f}%{r['peak_rss_mb']:>13,.0f}{ratio:>14}")
    return 0


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _classifier_table(steps: int, have_torch: bool) -> None:
    frameworks = ("tinygpt", "torch") if have_torch else ("tinygpt",)
    results = {(f, t): _spawn(f, f"cls-{t}", steps) for f in frameworks
               for t in CLASSIFIER_TRAINABLE}
    print(f"classifier step, GPT-2 124M, batch {CLS_B} x {CLS_T} tokens, 2-class head; "
          f"{steps} timed steps after a warm-up step (torch: its AdamW, no feature cache)")
    print(f"{'framework':<10}{'trainable':<12}{'parameters':>14}{'step s':>8}{'peak RSS MB':>13}"
          f"{'time vs all':>13}{'tinygpt/this':>14}")
    for (framework, name), r in results.items():
        full, ours = results[(framework, "all")], results[("tinygpt", name)]
        if r is not None and full is not None:
            ratio = f"{r['step_s'] / ours['step_s']:.2f}x" if framework != "tinygpt" else ""
            print(f"{framework:<10}{name:<12}{r['trainable']:>14,}{r['step_s']:>8.2f}"
                  f"{r['peak_rss_mb']:>13,.0f}{r['step_s'] / full['step_s']:>12.2f}x{ratio:>14}")


if __name__ == "__main__":
    sys.exit(main())
