"""Models for the chat and server tests: a scripted one that says exactly what a test wants, and
a tiny random GPT saved in the hub layout (with GPT-2's tokenizer) for the commands."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np

from tinygpt.model import GPT, GPTConfig
from tinygpt.tokenizer import GPT2Tokenizer


class ScriptedModel:
    """The CausalLM interface `generate.stream` uses, answering every prompt with `script`
    (token ids; repeated if asked for more). Counts how many calls run at once."""

    training = False

    def __init__(self, script: list[int], vocab_size: int = 50257, block_size: int = 64,
                 delay: float = 0.0):
        self.script, self.delay = list(script), delay
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.prompts: list[list[int]] = []
        self.active = self.max_active = 0
        self._count = threading.Lock()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def new_cache(self, batch: int = 1):
        return SimpleNamespace(length=0)

    def __call__(self, idx: np.ndarray, cache=None):
        with self._count:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            start = cache.length if cache is not None else 0
            if start == 0:
                self.prompts.append(idx[0].tolist())
                self._prompt_len = idx.shape[1]
            total = start + idx.shape[1]
            if cache is not None:
                cache.length = total
            step = (total - self._prompt_len) % len(self.script)
            logits = np.zeros((idx.shape[0], idx.shape[1], self.config.vocab_size), np.float32)
            logits[:, -1, self.script[step]] = 100.0     # certain even when sampling
            return SimpleNamespace(data=logits)
        finally:
            with self._count:
                self.active -= 1


def says(text: str, end: int | None = 50256, tok=None) -> list[int]:
    """A script: `text` in GPT-2 tokens, then the end token."""
    ids = (tok or GPT2Tokenizer()).encode(text)
    return ids + ([end] if end is not None else [])


def tiny_gpt(block_size: int = 64) -> GPT:
    cfg = GPTConfig(vocab_size=50257, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg, seed=0).eval()


def save_tiny_gpt(directory, block_size: int = 64) -> str:
    from tinygpt.weights import save_pretrained
    save_pretrained(tiny_gpt(block_size), directory, tokenizer=GPT2Tokenizer())
    return str(directory)
