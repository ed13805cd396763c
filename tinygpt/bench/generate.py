"""Generation speed and memory of the 124M GPT-2: tinygpt vs the same weights in PyTorch.

    python -m tinygpt.bench generate [--model DIR] [--prompt-tokens 16] [--new-tokens 128]

Batch 1, greedy, KV-cached. Without --model, a randomly initialised 124M GPT-2 (preset gpt2 with
qkv bias and tied head) is written to a temporary directory first, so both runs also time the real
loading path (`weights.load_gpt2`). Each engine runs in its own subprocess, so its peak resident
memory (`ru_maxrss`) is its own: interpreter, libraries, weights, KV cache and activations.
PyTorch, if importable, runs a compact GPT-2 written below (2 threads, its own KV cache) on the
very same arrays (`torch.from_numpy`, no copy). Figures are printed, never asserted; other work on
the machine halves them easily, so the load average is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinygpt bench generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GPT-2 checkpoint dir (default: random 124M)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch run")
    parser.add_argument("--child", choices=("tinygpt", "torch", "export"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_CHILDREN[args.child](args)))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    if args.model is not None:
        return _compare(args, args.model)
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        _child("export", args, tmp)
        return _compare(args, tmp)


def _compare(args, model_dir: str) -> int:
    results = {"tinygpt": _child("tinygpt", args, model_dir)}
    if not args.no_torch and _has_torch():
        results["torch"] = _child("torch", args, model_dir)
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, greedy, "
          f"weights {results['tinygpt']['weights_mb']:.0f} MB ({model_dir})")
    print(f"{'engine':<9}{'load s':>8}{'prefill ms':>11}{'decode tok/s':>13}{'total tok/s':>12}"
          f"{'peak RSS MB':>12}{'RSS/weights':>12}")
    for name, r in results.items():
        print(f"{name:<9}{r['load_s']:>8.2f}{r['prefill_ms']:>11.1f}{r['decode_tps']:>13.1f}"
              f"{r['total_tps']:>12.1f}{r['peak_rss_mb']:>12.0f}"
              f"{r['peak_rss_mb'] / r['weights_mb']:>12.2f}")
    if "torch" in results:
        ours, theirs = results["tinygpt"], results["torch"]
        print(f"tinygpt / torch: {ours['total_tps'] / theirs['total_tps']:.2f}x tokens/s; "
              f"same tokens: {ours['tokens'] == theirs['tokens']}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    return 0


def _child(kind: str, args, model_dir: str) -> dict:
    cmd = [sys.executable, "-m", "tinygpt.bench.generate", "--child", kind, "--model", model_dir,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"bench child {kind} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _prompt(n: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (1, n))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


# --- children -------------------------------------------------------------------------------------

def _export(args) -> dict:
    from tinygpt.model import GPT, GPTConfig
    from tinygpt.weights import save_pretrained
    save_pretrained(GPT(GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True)), args.model)
    return {}


def _run_tinygpt(args) -> dict:
    from tinygpt.generate import stream
    from tinygpt.weights import load_gpt2
    start = time.perf_counter()
    model = load_gpt2(args.model)
    load_s = time.perf_counter() - start
    prompt = _prompt(args.prompt_tokens, model.config.vocab_size)
    list(stream(model, prompt, 2))                         # warm-up: numba kernels, BLAS threads
    times, tokens = [time.perf_counter()], []
    for token in stream(model, prompt, args.new_tokens):
        times.append(time.perf_counter())
        tokens.append(int(token[0]))
    weights = sum(p.data.nbytes for p in model.parameters())
    return _figures(load_s, times, tokens, weights)


def _run_torch(args) -> dict:
    import torch
    from tinygpt.weights import load_gpt2
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = load_gpt2(args.model)                          # the same arrays, shared by from_numpy
    w = {name: torch.from_numpy(p.data) for name, p in model.named_parameters()}
    load_s = time.perf_counter() - start
    prompt = torch.from_numpy(_prompt(args.prompt_tokens, model.config.vocab_size))
    gpt = _TorchGPT2(w, model.config)
    gpt.generate(prompt, 2)
    times, tokens = gpt.generate(prompt, args.new_tokens)
    weights = sum(p.data.nbytes for p in model.parameters())
    return _figures(load_s, times, tokens, weights)


def _figures(load_s: float, times: list[float], tokens: list[int], weights: int) -> dict:
    """times[0] is the start, times[i] the moment token i was ready."""
    n = len(tokens)
    return {"load_s": load_s, "prefill_ms": 1e3 * (times[1] - times[0]),
            "decode_tps": (n - 1) / (times[-1] - times[1]), "total_tps": n / (times[-1] - times[0]),
            "peak_rss_mb": _peak_rss_mb(), "weights_mb": weights / 2**20, "tokens": tokens}


class _TorchGPT2:
    """GPT-2 inference in PyTorch on tinygpt's (in, out) weights, as Hugging Face's Conv1D does."""

    def __init__(self, w: dict, cfg):
        self.w, self.cfg = w, cfg
        # PyTorch's fastest head for one row is x @ (C, V) contiguous: 5.0 ms vs 8.8 ms for
        # F.linear(x, wte) (measured, 2 threads). We give it that, at +154 MB of memory.
        self.head = w["wte.weight"].t().contiguous()

    def _linear(self, x, name: str):
        return self.w[name + ".bias"].addmm(x, self.w[name + ".weight"])  # b + x @ W

    def _forward(self, idx, cache: list, pos: int):
        import torch.nn.functional as F
        w, cfg = self.w, self.cfg
        T, C, NH = idx.shape[1], cfg.n_embd, cfg.n_head
        x = (w["wte.weight"][idx[0]] + w["wpe.weight"][pos:pos + T])            # (T, C)
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            h = F.layer_norm(x, (C,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], 1e-5)
            q, k, v = self._linear(h, p + "attn.c_attn").view(T, 3, NH, C // NH).permute(1, 2, 0, 3)
            cache[i][0][:, pos:pos + T], cache[i][1][:, pos:pos + T] = k, v       # (NH, T, HS)
            k, v = cache[i][0][:, :pos + T], cache[i][1][:, :pos + T]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)          # pos 0 if T > 1
            x = x + self._linear(y.transpose(0, 1).reshape(T, C), p + "attn.c_proj")
            h = F.layer_norm(x, (C,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], 1e-5)
            h = F.gelu(self._linear(h, p + "mlp.c_fc"), approximate="tanh")
            x = x + self._linear(h, p + "mlp.c_proj")
        x = F.layer_norm(x[-1:], (C,), w["ln_f.weight"], w["ln_f.bias"], 1e-5)
        return (x @ self.head)[0]                                               # (V,)

    def generate(self, prompt, n: int) -> tuple[list[float], list[int]]:
        import torch
        cfg, HS = self.cfg, self.cfg.n_embd // self.cfg.n_head
        cache = [(torch.zeros(cfg.n_head, cfg.block_size, HS), torch.zeros(cfg.n_head,
                  cfg.block_size, HS)) for _ in range(cfg.n_layer)]
        times, tokens, idx, pos = [time.perf_counter()], [], prompt, 0
        with torch.inference_mode():
            for _ in range(n):
                token = int(self._forward(idx, cache, pos).argmax())
                pos += idx.shape[1]
                idx = torch.tensor([[token]])
                times.append(time.perf_counter())
                tokens.append(token)
        return times, tokens


_CHILDREN = {"tinygpt": _run_tinygpt, "torch": _run_torch, "export": _export}

if __name__ == "__main__":
    sys.exit(main())
