"""Generation speed, memory and quality: tinygpt's weight modes against PyTorch on the same weights.

    python -m tinygpt.bench generate [--model DIR|FILE.gguf] [--prompt-tokens 16] [--new-tokens 128]
                                     [--modes blas,float32,int8,int8x8,gguf,ggufx8] [--ppl TEXT]

Batch 1, greedy, KV-cached. Without --model, a randomly initialised 124M GPT-2 (preset gpt2 with
qkv bias and tied head) is written to a temporary directory first, so every run also times the
real loading path. A .gguf --model is a Llama (SmolLM2-135M in ../shared). tinygpt's modes:

    blas      the training layout, every product through BLAS (what generation did before)
    float32   weights packed (out, in) once while loading, numba matrix-vector kernels
    int8      the same with int8 weights and a float32 scale per row
    int8x8    int8 weights times int8 activations (Q8_0 blocks of 32, int32 dot products)
    gguf      a .gguf file's own Q8_0 / Q4_1 blocks kept quantized
    ggufx8    those blocks times int8 activations, as llama.cpp runs them

Each run is its own subprocess, so its peak resident memory (`ru_maxrss`) is its own. PyTorch, if
importable, runs `torch_reference.py`'s GPT-2 or Llama (2 threads) on the very same float32
arrays. The bench also measures how fast this machine streams memory (a numba sum over an array
the size of the weights), so the decode speed can be read as achieved weight bandwidth, and
splits a float32 token into its matrix products, attention and the rest. `paired` is the same
fraction with both measured in the same moments (32 pairs of one token and one sum over the
weights' bytes, median against median): on a shared machine it is the steadier figure. The
prefill is the fastest of 15 runs of the prompt (one run varies by 2x here). `--ppl TEXT`
adds each mode's perplexity of a text. Figures are printed, never asserted.
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

MODES = ("blas", "float32", "int8", "int8x8", "gguf", "ggufx8")


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
    modes = args.modes.split(",") if args.modes else [m for m in MODES
                                                      if not m.startswith("gguf") or gguf]
    results = {mode: _child(mode, args, model) for mode in modes}
    if not args.no_torch and _has_torch():
        results["torch"] = _child("torch", args, model)
    first = next(iter(results.values()))
    stream_gbs = first["stream_gbs"]
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, greedy "
          f"({model}); memory streams at {stream_gbs:.1f} GB/s here (numba sum, best of 5)")
    print(f"{'engine':<14}{'weights MB':>11}{'load s':>8}{'prefill ms':>11}{'decode tok/s':>13}"
          f"{'weight GB/s':>12}{'of stream':>10}{'paired':>8}{'peak RSS MB':>12}"
          f"{'RSS-weights':>12}")
    for name, r in results.items():
        gbs = r["weights_bytes"] * r["decode_tps"] / 1e9
        label = name if name == "torch" else f"tinygpt {name}"
        print(f"{label:<14}{r['weights_bytes'] / 1e6:>11.0f}{r['load_s']:>8.2f}"
              f"{r['prefill_ms']:>11.1f}{r['decode_tps']:>13.1f}{gbs:>12.1f}"
              f"{gbs / stream_gbs:>10.0%}{r['paired']:>8.0%}{r['peak_rss_mb']:>12.0f}"
              f"{r['peak_rss_mb'] - r['weights_bytes'] / 2**20:>12.0f}")
    if "float32" in results and "split_ms" in results["float32"]:
        s = results["float32"]["split_ms"]
        print(f"float32 token (fastest of 3 turns each), kernel by kernel: {s['total']:.2f} ms = "
              f"products {s['products']:.2f} + attention {s['attention']:.2f} + the rest "
              f"{s['total'] - s['products'] - s['attention']:.2f} (norms, activations, adds, "
              f"Python dispatch); one call per layer: {s['one_call']:.2f} ms")
    if "torch" in results:
        theirs = results["torch"]
        for name, r in results.items():
            if name != "torch":
                print(f"tinygpt {name} / torch: {r['decode_tps'] / theirs['decode_tps']:.2f}x "
                      f"decode, {theirs['prefill_ms'] / r['prefill_ms']:.2f}x prefill; same "
                      f"tokens: {r['tokens'] == theirs['tokens']}")
    base = results.get("blas") or results.get("float32") or results.get("torch")
    for name, r in results.items():
        if name != "torch" and base is not None:
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


def _sum_kernel():
    """A parallel numba sum of a float32 array: reading memory and nothing else."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=False)
    def total(a):
        s = np.float32(0.0)
        for i in prange(a.shape[0]):
            s += a[i]
        return s
    return total


def _stream_gbs(n_bytes: int) -> float:
    """How fast this machine reads memory: a parallel numba sum over n_bytes of float32."""
    total = _sum_kernel()
    a = np.ones(n_bytes // 4, np.float32)
    total(a)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        total(a)
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best / 1e9


def _paired(next_token, n_bytes: int, n: int = 32) -> float:
    """Decode bandwidth as a fraction of the stream's with both measured in the same moments:
    n pairs of (one token, one sum over as many bytes as the weights), the median token against
    the median sum. A shared machine's bandwidth moves by 1.5x within a minute, and a best-of-5
    stream set against the mean of 128 tokens mixes two different machines."""
    total = _sum_kernel()
    a = np.ones(max(n_bytes // 4, 1), np.float32)
    total(a)
    tokens, sums = [], []
    for _ in range(n):
        start = time.perf_counter()
        next_token()
        tokens.append(time.perf_counter() - start)
        start = time.perf_counter()
        total(a)
        sums.append(time.perf_counter() - start)
    return float(np.median(sums) / np.median(tokens))


# --- children -------------------------------------------------------------------------------------

def _run_child(args) -> dict:
    if args.child == "export":
        from tinygpt.models.gpt import GPT, GPTConfig
        from tinygpt.hub.pretrained import save_pretrained
        save_pretrained(GPT(GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True)), args.model)
        return {}
    if args.child == "torch":
        return _run_torch(args)
    return _run_tinygpt(args)


def _load(args, mode: str):
    from tinygpt.hub.pretrained import load_pretrained
    from tinygpt.inference.pack import set_activations
    weights = mode.removesuffix("x8")
    model, tok = load_pretrained(args.model, download=False,
                                 pack={"blas": None}.get(weights, weights))
    if mode.endswith("x8"):
        set_activations(model, "int8")
    return model, tok


def _run_tinygpt(args) -> dict:
    from tinygpt.inference.generate import stream
    from tinygpt.inference.pack import packed_bytes
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
    out["prefill_ms"] = _best_ms(lambda: next(stream(model, prompt, 1)))
    out["stream_gbs"] = _stream_gbs(max(weights, 1 << 28))
    steps = stream(model, prompt, 34)
    next(steps)                                            # the prefill is not paired
    out["paired"] = _paired(lambda: next(steps), weights)
    if args.child == "float32":
        out["split_ms"] = _split_token(model, prompt)
    if args.ppl:
        out["ppl"] = _perplexity(model, tok, args.ppl)
    return out


def _split_token(model, prompt: np.ndarray, n: int = 32, rounds: int = 3) -> dict:
    """ms per decoded token in the matrix products, in attention, and in total, with each layer
    run kernel by kernel (timers cannot see inside a layer's one compiled call); and the total
    with one call per layer (`decode_layers.gpt2_layer`, `llama_layer`), as generation runs it.
    The two ways take turns `rounds` times, and each keeps its fastest round."""
    from tinygpt.kernels import decode as decode_kernels
    from tinygpt.inference import pack as inference
    from tinygpt.inference import step
    from tinygpt.inference.generate import stream
    spent = {"products": 0.0, "attention": 0.0}

    def token_ms() -> float:
        it = stream(model, prompt, n + 1)
        next(it)                                               # the prefill is not counted
        spent.update(products=0.0, attention=0.0)
        start = time.perf_counter()
        for _ in it:
            pass
        return 1e3 * (time.perf_counter() - start) / n

    def timed(fn, key):
        def run(*a):
            t = time.perf_counter()
            y = fn(*a)
            spent[key] += time.perf_counter() - t
            return y
        return run

    def kernel_by_kernel() -> dict:
        matmul, attend, one_call = (inference.PackedWeight.matmul, decode_kernels.attend_one,
                                    step._one_call)
        inference.PackedWeight.matmul = timed(matmul, "products")
        decode_kernels.attend_one = timed(attend, "attention")  # fused.py looks it up per call
        step._one_call = lambda *a: False
        try:
            total = token_ms()
        finally:
            inference.PackedWeight.matmul, decode_kernels.attend_one = matmul, attend
            step._one_call = one_call
        return {**{k: 1e3 * v / n for k, v in spent.items()}, "total": total}
    runs = [(kernel_by_kernel(), token_ms()) for _ in range(rounds)]
    best = min((split for split, _ in runs), key=lambda split: split["total"])
    return {**best, "one_call": min(one for _, one in runs)}


def _perplexity(model, tok, path: str, window: int = 512) -> float:
    """exp(mean next-token loss) over the text in non-overlapping windows of `window` tokens."""
    from tinygpt.autograd import functional as F
    from tinygpt.autograd.tensor import Tensor, no_grad
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


def _best_ms(run, repeats: int = 15) -> float:
    """The fastest of `repeats` runs of a prompt's forward pass, in ms (one run is noisy)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def _figures(load_s: float, times: list[float], tokens: list[int], weights: int) -> dict:
    """times[0] is the start, times[i] the moment token i was ready."""
    n = len(tokens)
    return {"load_s": load_s, "prefill_ms": 1e3 * (times[1] - times[0]),
            "decode_tps": (n - 1) / (times[-1] - times[1]), "total_tps": n / (times[-1] - times[0]),
            "peak_rss_mb": _peak_rss_mb(), "weights_bytes": weights, "tokens": tokens}


def _run_torch(args) -> dict:
    import torch

    from tinygpt.bench import torch_reference as ref
    from tinygpt.models.llama import Llama
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, _ = _load(args, "blas")                         # the same arrays, shared by from_numpy
    w, cfg = ref.parameters(model), model.config
    load_s = time.perf_counter() - start
    # PyTorch's fastest head for one row is x @ (C, V) contiguous (5.0 ms vs 8.8 ms for
    # F.linear(x, wte), measured at 2 threads): we give it that, at the cost of a copy.
    tied = model.tied_embedding()
    head = torch.from_numpy(tied.weight.data).t().contiguous() if tied is not None else None
    if isinstance(model, Llama):
        rope = ref.rope_tables(cfg)
        fn = lambda idx, cache, pos: ref.llama_logits(idx, w, cfg, rope, cache, pos, head)  # noqa
    else:
        fn = lambda idx, cache, pos: ref.gpt2_logits(idx, w, cfg, cache, pos, head)  # noqa: E731
    prompt = torch.from_numpy(_prompt(args.prompt_tokens, cfg.vocab_size))
    ref.decode(fn, prompt, 2, cfg)
    times, tokens = ref.decode(fn, prompt, args.new_tokens, cfg)
    out = _figures(load_s, times, tokens, sum(p.data.nbytes for p in model.parameters()))
    out["prefill_ms"] = _best_ms(lambda: ref.decode(fn, prompt, 1, cfg))
    out["stream_gbs"] = math.nan
    steps = ref.steps(fn, prompt, 34, cfg)
    next(steps)                                            # the prefill is not paired
    out["paired"] = _paired(lambda: next(steps), out["weights_bytes"])
    return out


if __name__ == "__main__":
    sys.exit(main())
