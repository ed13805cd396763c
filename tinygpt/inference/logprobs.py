"""Token log-probabilities: a logits processor that records, for each generated token, its
log-probability and the most likely alternatives, in OpenAI's and Ollama's shapes.

The distribution recorded is the one the token was chosen from after every earlier processor
(a constraint's mask included) at temperature 1: under a JSON schema, the alternatives are the
tokens the schema allowed. `generate.py` calls processors; `serve.py` returns the entries.

    rec = LogprobRecorder(top=5)
    generate(model, prompt, 10, logits_processor=chain(constraint.processor(), rec))
    rec.finish(last_token); rec.entries        # [(token, logprob, [(id, logprob), ...]), ...]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP = 20                  # OpenAI's and Ollama's limit on top_logprobs


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]          # most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis; subtract the max so exp cannot overflow (-inf stays -inf)."""
    z = logits.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


class LogprobRecorder:
    """A processor (seq, logits) -> logits that changes nothing and keeps one step's
    log-probabilities until the next call says which token was chosen."""

    def __init__(self, top: int = 0):
        if not 0 <= top <= MAX_TOP:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP}, got {top}")
        self.top, self.entries = top, []
        self._pending: np.ndarray | None = None
        self._seen: int | None = None

    def __call__(self, seq: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self._seen is not None and seq.shape[1] > self._seen:
            self.finish(int(seq[0, self._seen]))
        self._seen = seq.shape[1]
        self._pending = log_softmax(logits[0])
        return logits

    def finish(self, token: int) -> None:
        """Record the chosen `token` against the last distribution (call after the last step)."""
        lp = self._pending
        if lp is None:
            return
        self._pending = None
        top = []
        if self.top:
            k = min(self.top, lp.shape[0])
            ids = np.argpartition(-lp, k - 1)[:k]
            ids = ids[np.argsort(-lp[ids], kind="stable")]
            top = [(int(i), float(lp[i])) for i in ids if np.isfinite(lp[i])]
        self.entries.append(TokenLogprob(token, float(lp[token]), top))


def chain(*processors):
    """One processor running each of `processors` (None skipped) in order."""
    procs = [p for p in processors if p is not None]
    if not procs:
        return None
    if len(procs) == 1:
        return procs[0]

    def run(seq: np.ndarray, logits: np.ndarray) -> np.ndarray:
        for p in procs:
            logits = p(seq, logits)
        return logits
    return run


def _piece(tokenizer, token: int) -> tuple[str, list[int]]:
    data = tokenizer.decode_bytes([token]) if hasattr(tokenizer, "decode_bytes") else \
        tokenizer.decode([token]).encode("utf-8")
    return data.decode("utf-8", errors="replace"), list(data)


def _finite(x: float) -> float:
    return x if np.isfinite(x) else -9999.0      # JSON has no -Infinity; OpenAI uses -9999


def openai_content(tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    """`choices[0].logprobs.content`: token text, logprob, bytes and top_logprobs per token."""
    out = []
    for e in entries:
        text, data = _piece(tokenizer, e.token)
        tops = []
        for i, lp in e.top:
            t, d = _piece(tokenizer, i)
            tops.append({"token": t, "logprob": _finite(lp), "bytes": d})
        out.append({"token": text, "logprob": _finite(e.logprob), "bytes": data,
                    "top_logprobs": tops})
    return out


def ollama_logprobs(tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    """Ollama's `logprobs`: the same fields, `top_logprobs` only when asked for."""
    return [{k: v for k, v in e.items() if k != "top_logprobs" or v}
            for e in openai_content(tokenizer, entries)]


__all__ = ["LogprobRecorder", "MAX_TOP", "TokenLogprob", "chain", "log_softmax",
           "ollama_logprobs", "openai_content"]
