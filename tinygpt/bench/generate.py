"""Generation speed, memory and quality: tinygpt's weight modes against PyTorch on the same weights.

    python -m tinygpt.bench generate [--model DIR|FILE.gguf] [--prompt-tokens 16] [--new-tokens 128]
                                     [--modes blas,float32,int8,gguf] [--ppl TEXT]

Batch 1, greedy, KV-cached. Without --model, a randomly initialised 124M GPT-2 (preset gpt2 with
qkv bias and tied head) is written to a temporary directory first, so every run also times the
real loading path. A .gguf --model is a Llama (SmolLM2-135M in ../shared). tinygpt's modes:

    blas      the training layout, every product through BLAS (what generation did before)
    float32   weights packed (out, in) once while loading, numba matrix-vector kernels
    int8      the same with int8 weights and a float32 scale per row
    gguf      a .gguf file's own Q8_0 / Q4_1 blocks kept quantized

Each run is its own subprocess, so its peak resident memory (`ru_maxrss`) is its own. PyTorch, if
importable, runs a compact GPT-2 or Llama written below (2 threads) on the very same float32
arrays. The bench also measures how fast this machine streams memory (a numba sum over an array
the size of the weights), so the decode speed can be read as achieved weight bandwidth, and
splits a float32 token into its matrix products, attention and the rest. `--ppl TEXT` adds each
mode's perplexity of a text. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MODES = ("blas", "float32", "int8", "gguf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinygpt bench generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GPT-2 dir or .gguf (default: random 124M)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {MODES}")
    parser.add_argument("--ppl", default=None, help="a UTF-8 text: perplexity per mode")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_run_child(args)))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    if args.model is not None:
        return _compare(args, args.model)
    with tempfile.TemporaryDirectory(prefix="tinygpt-bench-") as tmp:
        _child("export", args, tmp)
        return _compare(args, tmp)


def _compare(args, model: str) -> int:
    gguf = model.endswith(".gguf")
    modes = args.modes.split(",") if args.modes else [m for m in MODES if m != "gguf" or gguf]
    results = {mode: _child(mode, args, model) for mode in modes}
    if not args.no_torch and _has_torch():
        results["torch"] = _child("torch", args, model)
    first = next(iter(results.values()))
    stream_gbs = first["stream_gbs"]
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, greedy "
          f"({model}); memory streams at {stream_gbs:.1f} GB/s here (numba sum, best of 5)")
    print(f"{'engine':<14}{'weights MB':>11}{'load s':>8}{'prefill ms':>11}{'decode tok/s':>13}"
          f"{'weight GB/s':>12}{'of stream':>10}{'peak RSS MB':>12}{'RSS-weights':>12}")
    for name, r in results.items():
        gbs = r["weights_bytes"] * r["decode_tps"] / 1e9
        label = name if name == "torch" else f"tinygpt {name}"
        print(f"{label:<14}{r['weights_bytes'] / 1e6:>11.0f}{r['load_s']:>8.2f}"
              f"{r['prefill_ms']:>11.1f}{r['decode_tps']:>13.1f}{gbs:>12.1f}"
              f"{gbs / stream_gbs:>10.0%}{r['peak_rss_mb']:>12.0f}"
              f"{r['peak_rss_mb'] - r['weights_bytes'] / 2**20:>12.0f}")
    if "float32" in results and "split_ms" in results["float32"]:
        s = results["float32"]["split_ms"]
        print(f"float32 token: {s['total']:.2f} ms = products {s['products']:.2f} + attention "
              f"{s['attention']:.2f} + the rest {s['total'] - s['products'] - s['attention']:.2f}"
              f" (norms, activations, adds, Python dispatch)")
    if "torch" in results:
        theirs = results["torch"]
        for name, r in results.items():
            if name != "torch":
                print(f"tinygpt {name} / torch: {r['decode_tps'] / theirs['decode_tps']:.2f}x "
                      f"decode, {theirs['prefill_ms'] / r['prefill_ms']:.2f}x prefill; same "
                      f"tokens: {r['tokens'] == theirs['tokens']}")
    base = results.get("blas") or results.get("float32")
    for name, r in results.items():
        if name != "torch":
            same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
            print(f"tinygpt {name}: {same}/{len(base['tokens'])} greedy tokens as the float32 "
                  "model" + (f"; perplexity {r['ppl']:.3f}" if "ppl" in r else ""))
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    return 0


def _child(kind: str, args, model: str) -> dict:
    cmd = [sys.executable, "-m", "tinygpt.bench.generate", "--child", kind, "--model", model,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if args.ppl:
        cmd += ["--ppl", args.ppl]
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


def _stream_gbs(n_bytes: int) -> float:
    """How fast this machine reads memory: a parallel numba sum over n_bytes of float32."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=False)
    def total(a):
        s = np.float32(0.0)
        for i in prange(a.shape[0]):
            s += a[i]
        return s
    a = np.ones(n_bytes // 4, np.float32)
    total(a)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        total(a)
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best / 1e9


# --- children -------------------------------------------------------------------------------------

def _run_child(args) -> dict:
    if args.child == "export":
        from tinygpt.model import GPT, GPTConfig
        from tinygpt.weights import save_pretrained
        save_pretrained(GPT(GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True)), args.model)
        return {}
    if args.child == "torch":
        return _run_torch(args)
    return _run_tinygpt(args)


def _load(args, mode: str):
    from tinygpt.weights import load_pretrained
    pack = {"blas": None}.get(mode, mode)
    return load_pretrained(args.model, download=False, pack=pack)


def _run_tinygpt(args) -> dict:
    from tinygpt.generate import stream
    from tinygpt.inference import packed_bytes
    start = time.perf_counter()
    model, tok = _load(args, args.child)
    load_s = time.perf_counter() - start
    weights = packed_bytes(model)
    prompt = _prompt(args.prompt_tokens, model.config.vocab_size)
    list(stream(model, prompt, 2))                         # warm-up: numba kernels, BLAS threads
    times, tokens = [time.perf_counter()], []
    for token in stream(model, prompt, args.new_tokens):
        times.append(time.perf_counter())
        tokens.append(int(token[0]))
    out = _figures(load_s, times, tokens, weights)
    out["stream_gbs"] = _stream_gbs(max(weights, 1 << 28))
    if args.child == "float32":
        out["split_ms"] = _split_token(model, prompt)
    if args.ppl:
        out["ppl"] = _perplexity(model, tok, args.ppl)
    return out


def _split_token(model, prompt: np.ndarray, n: int = 32) -> dict:
    """ms per decoded token in the matrix products, in attention, and in total."""
    from tinygpt import decode_kernels, inference
    from tinygpt.generate import stream
    spent = {"products": 0.0, "attention": 0.0}

    def timed(fn, key):
        def run(*a):
            t = time.perf_counter()
            y = fn(*a)
            spent[key] += time.perf_counter() - t
            return y
        return run
    matmul, attend = inference.PackedWeight.matmul, decode_kernels.attend_one
    inference.PackedWeight.matmul = timed(matmul, "products")
    decode_kernels.attend_one = timed(attend, "attention")      # fused.py looks it up per call
    try:
        it = stream(model, prompt, n + 1)
        next(it)                                               # the prefill is not counted
        spent.update(products=0.0, attention=0.0)
        start = time.perf_counter()
        for _ in it:
            pass
        total = time.perf_counter() - start
    finally:
        inference.PackedWeight.matmul, decode_kernels.attend_one = matmul, attend
    return {k: 1e3 * v / n for k, v in {**spent, "total": total}.items()}


def _perplexity(model, tok, path: str, window: int = 512) -> float:
    """exp(mean next-token loss) over the text in non-overlapping windows of `window` tokens."""
    from tinygpt import functional as F
    from tinygpt.autograd import Tensor, no_grad
    with open(path, encoding="utf-8") as f:
        ids = np.array(tok.encode(f.read()), np.int64)
    window = min(window, model.config.block_size)
    total, count = 0.0, 0
    with no_grad():
        for start in range(0, len(ids) - 1, window):
            x = ids[start:start + window][None]
            y = ids[start + 1:start + 1 + window][None]
            x = x[:, :y.shape[1]]
            logits = model(x).data
            total += float(F.cross_entropy(Tensor(logits), y, reduction="sum").data)
            count += y.size
    return math.exp(total / count)


def _prompt(n: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (1, n))


def _figures(load_s: float, times: list[float], tokens: list[int], weights: int) -> dict:
    """times[0] is the start, times[i] the moment token i was ready."""
    n = len(tokens)
    return {"load_s": load_s, "prefill_ms": 1e3 * (times[1] - times[0]),
            "decode_tps": (n - 1) / (times[-1] - times[1]), "total_tps": n / (times[-1] - times[0]),
            "peak_rss_mb": _peak_rss_mb(), "weights_bytes": weights, "tokens": tokens}


def _run_torch(args) -> dict:
    import torch
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, _ = _load(args, "blas")                         # the same arrays, shared by from_numpy
    w = {name: torch.from_numpy(p.data) for name, p in model.named_parameters()}
    load_s = time.perf_counter() - start
    prompt = torch.from_numpy(_prompt(args.prompt_tokens, model.config.vocab_size))
    engine = (_TorchGPT2 if hasattr(model, "wte") else _TorchLlama)(w, model.config)
    engine.generate(prompt, 2)
    times, tokens = engine.generate(prompt, args.new_tokens)
    out = _figures(load_s, times, tokens, sum(p.data.nbytes for p in model.parameters()))
    out["stream_gbs"] = math.nan
    return out


class _TorchDecoder:
    """Greedy KV-cached decoding in PyTorch; subclasses give the forward of one model family."""

    def __init__(self, w: dict, cfg):
        self.w, self.cfg = w, cfg

    def generate(self, prompt, n: int) -> tuple[list[float], list[int]]:
        import torch
        cfg = self.cfg
        cache = [(torch.zeros(cfg.n_kv_head, cfg.block_size, cfg.head_size),
                  torch.zeros(cfg.n_kv_head, cfg.block_size, cfg.head_size))
                 for _ in range(cfg.n_layer)]
        times, tokens, idx, pos = [time.perf_counter()], [], prompt, 0
        with torch.inference_mode():
            for _ in range(n):
                token = int(self._forward(idx, cache, pos).argmax())
                pos += idx.shape[1]
                idx = torch.tensor([[token]])
                times.append(time.perf_counter())
                tokens.append(token)
        return times, tokens


class _TorchGPT2(_TorchDecoder):
    """GPT-2 inference in PyTorch on tinygpt's (in, out) weights, as Hugging Face's Conv1D does."""

    def __init__(self, w: dict, cfg):
        super().__init__(w, cfg)
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


class _TorchLlama(_TorchDecoder):
    """Llama inference in PyTorch on tinygpt's (in, out) weights: RMSNorm, RoPE, GQA, SwiGLU."""

    def __init__(self, w: dict, cfg):
        import torch
        super().__init__(w, cfg)
        self.head = w["model.embed_tokens.weight"].t().contiguous()      # as for GPT-2 above
        HS = cfg.head_size
        inv = cfg.rope_theta ** (-torch.arange(0, HS, 2, dtype=torch.float64) / HS)
        ang = torch.outer(torch.arange(cfg.block_size, dtype=torch.float64), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()

    def _rope(self, x, pos: int):
        import torch
        T, half = x.shape[1], x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[pos:pos + T] + rot * self.sin[pos:pos + T]

    def _forward(self, idx, cache: list, pos: int):
        import torch
        import torch.nn.functional as F
        w, cfg = self.w, self.cfg
        T, NH, KV, HS = idx.shape[1], cfg.n_head, cfg.n_kv_head, cfg.head_size
        x = w["model.embed_tokens.weight"][idx[0]]                              # (T, C)
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            h = F.rms_norm(x, (cfg.n_embd,), w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            q = (h @ w[p + "self_attn.q_proj.weight"]).view(T, NH, HS).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"]).view(T, KV, HS).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"]).view(T, KV, HS).transpose(0, 1)
            q, k = self._rope(q, pos), self._rope(k, pos)
            cache[i][0][:, pos:pos + T], cache[i][1][:, pos:pos + T] = k, v
            k, v = cache[i][0][:, :pos + T], cache[i][1][:, :pos + T]
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(NH // KV, 0),
                                               v.repeat_interleave(NH // KV, 0), is_causal=T > 1)
            x = x + y.transpose(0, 1).reshape(T, NH * HS) @ w[p + "self_attn.o_proj.weight"]
            h = F.rms_norm(x, (cfg.n_embd,), w[p + "post_attention_layernorm.weight"],
                           cfg.rms_norm_eps)
            g = F.silu(h @ w[p + "mlp.gate_proj.weight"]) * (h @ w[p + "mlp.up_proj.weight"])
            x = x + g @ w[p + "mlp.down_proj.weight"]
        x = F.rms_norm(x[-1:], (cfg.n_embd,), w["model.norm.weight"], cfg.rms_norm_eps)
        return (x @ self.head)[0]


if __name__ == "__main__":
    sys.exit(main())
