"""Autoregressive text generation: greedy, temperature, top-k, top-p, eos; KV-cached; streaming.

`stream(...)` yields each new column of token ids as it is produced; `generate(...)` collects them.
Both run under `no_grad` with the model's dropout off.

KV cache and the context window: while the sequence fits in `block_size`, each step feeds only the
new token and reuses the cached keys and values. Once it is longer, the window slides: every
token's position changes, so cached keys are stale, and each step recomputes the last `block_size`
tokens from scratch. The logits are then exactly those of uncached generation, which crops the
context the same way (tests/test_generate.py checks this at every step).

A `logits_processor(seq, logits) -> logits` (seq (B, T) the ids so far, logits (B, V)) may change
the logits before each token is chosen: `constrain.py`'s masks keep the output inside a JSON
schema or a regex that way, and `logprobs.py` records the distribution it was chosen from.

    python -m tinygpt generate --model gpt2 --prompt "Every effort moves you"
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from tinygpt.autograd.tensor import no_grad
from tinygpt.inference import step
from tinygpt.models.gpt import GPT, check_token_ids
from tinygpt.models.nn import KVCache
from tinygpt.core.validate import check_number


# below this, logits / temperature can overflow to inf (and inf - inf to NaN): such a temperature
# is greedy in all but exact ties, so it is treated as 0
MIN_TEMPERATURE = 1e-6

# (ids so far (B, T), next-token logits (B, V)) -> the logits to choose from (B, V)
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _check_args(model: GPT, idx: np.ndarray, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, eos_id: int | None = None,
                seed: int | None = None) -> tuple[np.ndarray, float]:
    """(prompt ids as int64, the temperature to sample with), or a ValueError naming the
    argument."""
    vocab = model.config.vocab_size
    try:
        idx = check_token_ids(idx, vocab, "prompt ids")
    except (TypeError, ValueError) as e:
        raise type(e)(f"generate: {e}") from None
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    check_number("generate: temperature", temperature, 0.0)
    if top_k is not None and top_k <= 0:
        raise ValueError(f"generate: top_k must be a positive integer, got {top_k}")
    if top_p is not None:
        check_number("generate: top_p", top_p, 0.0, 1.0, lo_open=True)
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise ValueError(f"generate: eos_id {eos_id} is not a token id (0..{vocab - 1})")
    if seed is not None and seed < 0:
        raise ValueError(f"generate: seed must be >= 0, got {seed}")
    return idx.astype(np.int64), 0.0 if temperature < MIN_TEMPERATURE else float(temperature)


def next_token_logits(model: GPT, seq: np.ndarray, cache: KVCache | None,
                      fast: bool | None = None) -> tuple:
    """Logits (B, V) for the token after `seq` (B, T), and the cache to use next time.

    With `cache=None` the context is cropped to `block_size` and run whole. A one-token step of
    a packed model runs `step.decode` (the same logits without the autograd layer); `fast` is
    `step.supports(model)` when the caller knows it already (a loop asks once, not per token).
    """
    block = model.config.block_size
    with no_grad():
        if cache is None:
            return model(seq[:, -block:]).data[:, -1, :], None
        if seq.shape[1] > block or cache.length == 0 or cache.length >= seq.shape[1]:
            cache = model.new_cache(seq.shape[0])           # (re)fill from the cropped window
            return model(seq[:, -block:], cache=cache).data[:, -1, :], cache
        if seq.shape[1] - cache.length == 1 and (step.supports(model) if fast is None else fast):
            return step.decode(model, seq[:, -1:], cache), cache
        return model(seq[:, cache.length:], cache=cache).data[:, -1, :], cache


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> np.ndarray:
    """Pick one token id per row of `logits` (B, V). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p           # mass of the better tokens
        sorted_p[before >= top_p] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


def stream(model: GPT, idx: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           seed: int | None = None, use_cache: bool = True,
           logits_processor: LogitsProcessor | None = None) -> Iterator[np.ndarray]:
    """Yield the next token ids (B,) one step at a time.

    Stops after `max_new_tokens`, or once every row has produced `eos_id` (rows that finished
    early keep producing `eos_id`). `seed` makes sampling reproducible without touching global
    random state. Arguments are checked here, before the first token is asked for.
    """
    seq, temperature = _check_args(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                   seed)
    return _stream(model, seq, max_new_tokens, temperature, top_k, top_p, eos_id,
                   np.random.default_rng(seed), use_cache, logits_processor)


def _stream(model: GPT, seq: np.ndarray, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, eos_id: int | None,
            rng: np.random.Generator, use_cache: bool,
            logits_processor: LogitsProcessor | None = None) -> Iterator[np.ndarray]:
    was_training = model.training
    model.eval()
    cache = model.new_cache(seq.shape[0]) if use_cache else None
    done = np.zeros(seq.shape[0], dtype=bool)
    fast = step.supports(model)
    try:
        for _ in range(max_new_tokens):
            logits, cache = next_token_logits(model, seq, cache, fast)
            if logits_processor is not None:
                logits = logits_processor(seq, logits)
            token = sample(logits, temperature, top_k, top_p, rng)
            if eos_id is not None:
                token = np.where(done, eos_id, token)
                done |= token == eos_id
            seq = np.concatenate([seq, token[:, None]], axis=1)
            yield token
            if eos_id is not None and done.all():
                break
    finally:
        model.train(was_training)


def generate(model: GPT, idx: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None, use_cache: bool = True,
             callback: Callable[[np.ndarray], None] | None = None,
             logits_processor: LogitsProcessor | None = None) -> np.ndarray:
    """The prompt followed by up to `max_new_tokens` generated ids: (B, T + n).

    `callback(token_ids)` is called with each new column (B,) as soon as it exists (streaming).
    """
    prompt, _ = _check_args(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed)
    new = []
    for token in stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                        use_cache, logits_processor):
        new.append(token)
        if callback is not None:
            callback(token)
    return np.concatenate([prompt] + [t[:, None] for t in new], axis=1)


class TextStream:
    """Token ids in, text out, holding back bytes of a character split across tokens.

    GPT-2's tokens are byte sequences, so a character such as "é" or an emoji may span two tokens;
    decoding the first alone gives U+FFFD. Pending ids are decoded together and released once
    they end on a whole character (the point before them is always a character boundary).
    """

    def __init__(self, tok):
        self.tok, self.pending = tok, []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tok.decode(self.pending), []
        return text
