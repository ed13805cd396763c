"""What constrained decoding costs per token: a plain decode step against the same step with a
JSON schema's mask, interleaved in one run, plus the mask's own time (warm: a cached state's
lookup and add; cold: a state's first mask over the whole vocabulary).

    tinygpt bench constrain --model ../shared/fixtures/smollm2-135m-instruct/model.gguf

The decode loop is `generate.stream`; the schema is an object with one free string, so every
step of a long reply stays inside the constraint (the judge's `{"score": N}` ends after ~7).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}
PROMPT = "Describe a cat in one JSON object."


def _step_times(model, ids: np.ndarray, n: int, processor=None) -> list[float]:
    """Seconds between consecutive tokens of one greedy reply (the first, prefill, left out)."""
    from tinygpt.inference.generate import stream
    times, last = [], None
    for _ in stream(model, ids, n, temperature=0.0, logits_processor=processor):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tinygpt bench constrain", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="../shared/fixtures/smollm2-135m-instruct/model.gguf")
    p.add_argument("--tokens", type=int, default=32, help="tokens per reply (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="plain/constrained pairs (default 5)")
    args = p.parse_args(argv)
    if not 2 <= args.tokens <= 512 or not 1 <= args.rounds <= 100:
        print("--tokens must be in 2..512 and --rounds in 1..100")
        return 2
    from tinygpt.apps.chat import render, stop_tokens
    from tinygpt.hub.pretrained import load_pretrained
    from tinygpt.inference.constrain import Constraint, vocabulary
    from tinygpt.models.llama import Llama

    model, tok = load_pretrained(args.model, download=False, pack="float32")
    template = "chatml" if isinstance(model, Llama) else "alpaca"     # as `tinygpt serve` picks
    ids = np.array([tok.encode(render([{"role": "user", "content": PROMPT}], template))])
    t0 = time.perf_counter()
    vocabulary(tok)
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    constraint = Constraint.from_schema(tok, SCHEMA, stop_tokens(tok, template)[0])
    compile_s = time.perf_counter() - t0
    _step_times(model, ids, 4)                                     # warm up kernels
    plain, constrained = [], []
    for _ in range(args.rounds):                                   # interleaved A/B
        plain += _step_times(model, ids, args.tokens)
        constrained += _step_times(model, ids, args.tokens, constraint.processor())
    guide = constraint.guide
    n_states = len(guide.masks)
    # the mask alone, on a cached state: what each constrained step adds
    proc = constraint.processor()
    logits = np.random.default_rng(0).standard_normal((1, tok.n_vocab)).astype(np.float32)
    seq = ids.copy()
    proc(seq, logits)
    warm = []
    for _ in range(200):
        t0 = time.perf_counter()
        proc(seq, logits)
        warm.append(time.perf_counter() - t0)
    cold = []
    for state in range(1, guide.dfa.n_states):
        guide.masks.pop(state, None)
        t0 = time.perf_counter()
        guide.mask(state)
        cold.append(time.perf_counter() - t0)
    p_ms, c_ms = statistics.median(plain) * 1e3, statistics.median(constrained) * 1e3
    w_us = statistics.median(warm) * 1e6
    print(f"model {args.model}: vocabulary {tok.n_vocab} tokens, {args.tokens} tokens x "
          f"{args.rounds} rounds, interleaved")
    print(f"vocabulary laid out once: {vocab_s * 1e3:.0f} ms; schema compiled: "
          f"{compile_s * 1e3:.1f} ms, {guide.dfa.n_states} DFA states ({n_states} visited)")
    print(f"decode step, median: plain {p_ms:.2f} ms, constrained {c_ms:.2f} ms "
          f"(ratio {c_ms / p_ms:.3f})")
    print(f"mask on a cached state (lookup + add): {w_us:.0f} us = {w_us / 1e3 / p_ms:.3%} of "
          f"a plain step", flush=True)
    print(f"mask of a new state (once per state): median {statistics.median(cold) * 1e3:.1f} ms, "
          f"max {max(cold) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
