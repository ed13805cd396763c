"""Tokenizer throughput: our from-scratch BPE (`bpe.py`) vs tiktoken, on the same text.

    python -m tinygpt.bench tokenizer [--data PATH] [--repeat 3]

Prints MB/s and tokens/s for each: the first call (our per-word cache empty) and the best of
--repeat later calls (cache full, as deep into a long corpus), and whether both gave the same ids.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tinygpt.hub.download import shared_data_dir
from tinygpt.text.bpe import BPETokenizer
from tinygpt.text.tokenizer import GPT2Tokenizer

DEFAULT_DATA = shared_data_dir() / "tinyshakespeare.txt"


def _time_encode(fn, text: str, repeat: int) -> tuple[float, float, list[int]]:
    """Seconds of the first (cold) call, the best of `repeat` later calls, and the ids."""
    start = time.perf_counter()
    ids = fn(text)
    cold = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        ids = fn(text)
        best = min(best, time.perf_counter() - start)
    return cold, best, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinygpt bench tokenizer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="UTF-8 text file")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"text file not found: {args.data} (give one with --data)")
    text = args.data.read_text(encoding="utf-8")
    n_mb = len(text.encode("utf-8")) / 1e6

    start = time.perf_counter()
    ours = BPETokenizer.from_gpt2()
    load_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = GPT2Tokenizer()
    load_theirs = time.perf_counter() - start

    print(f"text: {args.data} ({n_mb:.2f} MB); cold = first call (empty word cache), "
          f"warm = best of {args.repeat} later calls")
    print(f"{'tokenizer':<22}{'load s':>7}{'cold s':>8}{'warm s':>8}{'MB/s cold':>11}"
          f"{'MB/s warm':>11}{'tokens/s warm':>15}")
    results = {}
    for name, tok, load in (("tinygpt.text.bpe (Python)", ours, load_ours),
                            ("tiktoken (Rust)", theirs, load_theirs)):
        cold, warm, ids = _time_encode(tok.encode, text, args.repeat)
        results[name] = (warm, ids)
        print(f"{name:<22}{load:>7.2f}{cold:>8.3f}{warm:>8.3f}{n_mb / cold:>11.2f}"
              f"{n_mb / warm:>11.2f}{len(ids) / warm:>15,.0f}")
    (t_ours, ids_ours), (t_theirs, ids_theirs) = results.values()
    print(f"tokens: {len(ids_theirs):,}; identical ids: {ids_ours == ids_theirs}; "
          f"warm, tiktoken is {t_ours / t_theirs:.1f}x faster")
    return 0 if ids_ours == ids_theirs else 1
