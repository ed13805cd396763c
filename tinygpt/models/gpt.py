"""The GPT model: `GPTConfig`, the pre-LN transformer `Block`, and `GPT`.

    x = wte[idx] + wpe[0..T)                       (B, T, C)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ head                        (B, T, vocab)

The head is `wte` transposed when weights are tied (GPT-2), or its own `lm_head` (C, V) when not
(the book's chapter 4 model). Parameter names are GPT-2's, so its checkpoints load by name.

    python -c "from tinygpt import GPT, GPTConfig; print(GPT(GPTConfig.preset('gpt2')).num_parameters())"
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tinygpt.autograd import functional as F
from tinygpt.autograd.fused import Ragged
from tinygpt.autograd.tensor import Tensor, checkpoint, is_grad_enabled
from tinygpt.models.nn import (CausalSelfAttention, Dropout, Embedding, KVCache, LayerNorm, Linear, MLP,
                        Module, packed_product)
from tinygpt.core.validate import check_fields, check_number


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257          # GPT-2's BPE vocabulary; 65 for tiny-shakespeare characters
    block_size: int = 1024           # longest context T (GPT-2's n_positions)
    n_layer: int = 12                # transformer blocks
    n_head: int = 12                 # attention heads per block
    n_embd: int = 768                # residual stream width C
    n_inner: int | None = None       # MLP hidden width; None means 4 * n_embd
    dropout: float = 0.0             # on embeddings, attention output and MLP output (training only)
    qkv_bias: bool = False           # bias on the q, k, v projection (GPT-2 checkpoints: True)
    tie_weights: bool = False        # head = wte^T (GPT-2 checkpoints: True; the book's model: False)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        check_fields(self)                           # "64" or 64.0 from a JSON file, named
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_inner is not None and self.n_inner <= 0:
            raise ValueError(f"GPTConfig.n_inner must be positive or None, got {self.n_inner}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} is not divisible by n_head "
                             f"{self.n_head}")
        check_number("GPTConfig.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_number("GPTConfig.layer_norm_epsilon", self.layer_norm_epsilon, 0.0, lo_open=True)

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def n_kv_head(self) -> int:          # GPT-2 has a key/value head per query head
        return self.n_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """GPT-2 sizes (the book's settings: untied, no qkv bias) and small demo models."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),                # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),        # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),         # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),            # 1558M
    # small models that train in minutes on a laptop CPU
    "gpt-mini": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    "char-tiny": GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128),
}


class Block(Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, rng: np.random.Generator):
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.dropout,
                                        cfg.qkv_bias, rng)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg.n_embd, cfg.mlp_width, cfg.n_layer, cfg.dropout, rng)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                ragged: Ragged | None = None) -> Tensor:
        """x: (B, T, C), or (M, C) with a `ragged` layout (the kept positions of a batch)."""
        x = x + self.attn(self.ln_1(x), cache, layer, ragged)
        return x + self.mlp(self.ln_2(x))


class CausalLM(Module):
    """What every decoder-only language model here shares: ids -> hidden states -> logits.

    A subclass (GPT, `llama.Llama`) builds its layers under its checkpoint's own names and says
    how to embed tokens (`embed`), which blocks to run (`blocks`), the final norm (`norm_f`) and
    whether the head is tied (`tied_embedding`); the forward pass, the loss, the KV cache and
    the checks live here once. `config` has `vocab_size`, `block_size`, `n_layer`, `n_kv_head` and `head_size`.
    """

    config: Any
    # keep only each block's input in training and recompute the block in backward
    # (autograd.checkpoint): activations of one block instead of n_layer, for ~1/3 more time
    checkpoint_activations: bool = False

    def embed(self, idx: np.ndarray, start: int) -> Tensor:
        """Token (and, for GPT-2, position) embeddings of idx (B, T) at positions start..: (B, T, C)."""
        raise NotImplementedError

    def blocks(self) -> list[Module]:
        raise NotImplementedError

    def norm_f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head_weight(self) -> Tensor:
        """The (C, V) matrix that maps the final hidden state to logits."""
        tied = self.tied_embedding()
        return F.transpose(tied.weight) if tied is not None else self.lm_head.weight

    def hidden(self, idx: np.ndarray, cache: KVCache | None = None,
               lengths: np.ndarray | None = None) -> Tensor:
        """The residual stream after the final norm: (B, T, C).

        With `lengths` (B,), only each row's first lengths[n] positions are computed (a padded
        fine-tuning batch, see `fused.Ragged`): the result is (M, C), M = sum(lengths), row n's
        positions in order from `Ragged(lengths, T).offsets[n]`. Those rows equal the same
        positions of the (B, T, C) result up to float rounding.
        """
        idx = check_token_ids(idx, self.config.vocab_size)
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's "
                             f"block_size {self.config.block_size}; crop the context")
        ragged = None if lengths is None else Ragged(lengths, T)
        if ragged is not None and cache is not None:
            raise ValueError("hidden: lengths (a ragged batch) cannot be used with a KV cache")
        x = self.embed(idx, start)                                       # (B, T, C)
        if ragged is not None:
            x = F.reshape(x, -1, x.shape[-1])[ragged.index]              # (M, C)
        recompute = self.checkpoint_activations and cache is None and is_grad_enabled()
        for i, block in enumerate(self.blocks()):
            if recompute:
                x = checkpoint(lambda t, block=block: block(t, None, 0, ragged), x,
                               rngs=self._dropout_rngs())
            else:
                x = block(x, cache, i, ragged)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None,
                cache: KVCache | None = None):
        x = self.hidden(idx, cache)
        if cache is not None:
            x = x[:, -1:, :]                  # generation needs the next token only
        logits = self.logits(x)                                          # (B, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)

    def loss(self, idx: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> Tensor:
        """The mean next-token cross-entropy of `forward(idx, targets)`, computing only what it
        reads: the head (C x V, the widest matmul) runs on the rows whose target counts, and a
        row's positions after its last counted target (its padding) are not computed at all
        (`hidden(idx, lengths=...)`). Same value and gradients, up to float rounding."""
        idx = np.asarray(idx)
        t = np.asarray(targets)
        if idx.ndim != 2 or t.size != idx.size:
            raise ValueError(f"loss: targets {t.shape} do not fit ids {idx.shape}")
        counted = t.reshape(idx.shape) != ignore_index                  # (B, T)
        lengths = kept_lengths(counted)
        if lengths.sum() in (0, idx.size):                               # nothing to skip
            x = F.reshape(self.hidden(idx), -1, self.config.n_embd)     # (B T, C)
            rows, t = np.flatnonzero(counted), t.reshape(-1)
            if 0 < rows.size < t.size:
                x, t = x[rows], t[rows]
            return F.cross_entropy(self.logits(x), t, ignore_index=ignore_index)
        T = int(lengths.max())                       # the columns after every row's last are idle
        x = self.hidden(idx[:, :T], lengths=lengths)                     # (M, C)
        n, pos = np.nonzero(counted)
        x = x[Ragged(lengths, T).rows(n, pos)]                           # (counted, C)
        return F.cross_entropy(self.logits(x), t.reshape(idx.shape)[n, pos])

    def _dropout_rngs(self) -> tuple:
        """The Generator dropout masks are drawn from (the model's own rng), while training."""
        rng = getattr(self, "rng", None)
        return (rng,) if rng is not None and self.training else ()

    def logits(self, x: Tensor) -> Tensor:
        """Hidden states (B, T, C) -> logits (B, T, V); a tied head packed for generation reads
        the packed embedding rows (V, C) directly."""
        tied = self.tied_embedding()
        if tied is None:
            return self.lm_head(x)                  # a Linear (C, V) of its own, maybe packed
        if tied.packed is not None:
            return packed_product(tied.packed, x, None)
        return F.linear(x, tied.weight, transposed=True)           # the table (V, C) as stored

    def tied_embedding(self) -> Embedding | None:
        """The Embedding whose table is also the head, or None when the head is `lm_head`."""
        raise NotImplementedError

    def new_cache(self, batch: int = 1) -> KVCache:
        cfg = self.config
        first = next(self.named_parameters(), None)         # not a list of all: once per reply
        dtype = np.float32 if first is None else first[1].dtype
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, cfg.block_size, cfg.head_size, dtype)

    def astype(self, dtype) -> CausalLM:
        """Convert every parameter in place (float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
        return self


def kept_lengths(scored: np.ndarray) -> np.ndarray:
    """Per row of a (B, T) mask, 1 + the last position that is True (0 for none): the positions
    a causal model must compute for that row's scored ones."""
    scored = np.asarray(scored, dtype=bool)
    last = scored.shape[1] - np.argmax(scored[:, ::-1], axis=1)
    return np.where(scored.any(axis=1), last, 0)


class GPT(CausalLM):
    """GPT-2: token + position embeddings, `n_layer` blocks, final LayerNorm, vocabulary head.

    `model(idx)` -> logits (B, T, V); `model(idx, targets)` -> (logits, mean cross-entropy).
    With a `KVCache` (generation), only the last position's logits are computed: (B, 1, V).
    """

    def __init__(self, config: GPTConfig, seed: int = 0, init: bool = True):
        """`seed` draws the initial weights and, later, dropout masks. `init=False` leaves the
        weights uninitialised, for a caller that loads them straight away (load_gpt2)."""
        self.config = cfg = config
        self.rng = np.random.default_rng(seed)          # also drives dropout masks in training
        rng = self.rng if init else None
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rng)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, rng, std=0.01)
        self.drop = Dropout(cfg.dropout, rng)
        self.h = [Block(cfg, rng) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_weights else Linear(cfg.n_embd, cfg.vocab_size, rng,
                                                           bias=False)
        for module in self.modules():
            if isinstance(module, Dropout):
                module.rng = self.rng

    def embed(self, idx: np.ndarray, start: int) -> Tensor:
        pos = np.arange(start, start + idx.shape[1])
        return self.drop(self.wte(idx) + self.wpe(pos))

    def blocks(self) -> list[Block]:
        return self.h

    def norm_f(self, x: Tensor) -> Tensor:
        return self.ln_f(x)

    def tied_embedding(self) -> Embedding | None:
        return self.wte if self.lm_head is None else None


def check_token_ids(idx: np.ndarray, vocab_size: int, what: str = "token ids") -> np.ndarray:
    """idx as a (B, T) integer array with T >= 1 and every id in [0, vocab_size), or a clear
    error: the one check every entry point that takes token ids uses."""
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {idx.dtype}")
    if idx.ndim == 1:
        idx = idx[None, :]
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"{what} must have shape (B, T) with T >= 1 (not empty), got {idx.shape}")
    if idx.min() < 0 or idx.max() >= vocab_size:
        bad = idx.max() if idx.max() >= vocab_size else idx.min()
        raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size}")
    return idx
