"""The Llama family (SmolLM2, Llama 2/3, TinyLlama): `LlamaConfig` and `Llama`, beside `GPT`.

Llama is GPT-2 with four pieces swapped (the book's bonus chapter "GPT to Llama" makes the same
changes): RMSNorm instead of LayerNorm, rotary position embeddings (RoPE) on q and k instead of a
learned position table, a SwiGLU MLP instead of GELU, and grouped-query attention, where several
query heads share one key/value head (SmolLM2-135M: 9 query heads over 3 key/value heads, so the
KV cache holds 3).

    x = embed_tokens[idx]                                          (B, T, C)
    for each layer:  x = x + o_proj(attn(rope(q_proj(h)), rope(k_proj(h)), v_proj(h))),
                     h = rms_norm(x) * input_layernorm
                     x = x + down_proj(silu(gate_proj(h2)) * up_proj(h2)),
                     h2 = rms_norm(x) * post_attention_layernorm
    logits = rms_norm(x) * norm @ head                             (B, T, V)

Attribute names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`), so a hub checkpoint
loads by name; `Linear` keeps its (in, out) layout, and `hub/llama.py` transposes on load.
The forward pass, loss, KV cache and generation are `CausalLM`'s, shared with GPT.

    python -c "from tinygpt.models.llama import *; print(Llama(LlamaConfig.preset('smollm2-135m')).num_parameters())"
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tinygpt.autograd import functional as F
from tinygpt.autograd.tensor import Tensor
from tinygpt.autograd.fused import rope_tables
from tinygpt.models.gpt import CausalLM
from tinygpt.models.nn import Embedding, KVCache, Linear, Module, Parameter
from tinygpt.core.validate import check_fields, check_number


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152          # SmolLM2's byte-level BPE
    block_size: int = 8192           # longest context T (Hugging Face: max_position_embeddings)
    n_layer: int = 30                # transformer blocks (num_hidden_layers)
    n_head: int = 9                  # query heads (num_attention_heads)
    n_kv_head: int = 3               # key/value heads, each shared by n_head / n_kv_head queries
    n_embd: int = 576                # residual stream width C (hidden_size)
    n_inner: int = 1536              # SwiGLU hidden width (intermediate_size)
    head_dim: int | None = None      # per-head width; None means n_embd // n_head
    rms_norm_eps: float = 1e-5       # added to mean(x^2) in RMSNorm
    rope_theta: float = 100000.0     # RoPE base: position t turns pair i by t * theta^(-2i/HS)
    tie_weights: bool = True         # head = embed_tokens^T (SmolLM2: tied)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        check_fields(self)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig: n_head {self.n_head} is not a multiple of n_kv_head "
                             f"{self.n_kv_head}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"LlamaConfig: n_embd {self.n_embd} is not divisible by n_head "
                             f"{self.n_head} (give head_dim)")
        if self.head_size % 2:
            raise ValueError(f"LlamaConfig: RoPE needs an even head size, got {self.head_size}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"LlamaConfig.head_dim must be positive or None, got {self.head_dim}")
        check_number("LlamaConfig.rms_norm_eps", self.rms_norm_eps, 0.0, lo_open=True)
        check_number("LlamaConfig.rope_theta", self.rope_theta, 1.0, lo_open=True)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; choose from "
                             f"{', '.join(LLAMA_PRESETS)}")
        return replace(LLAMA_PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> LlamaConfig:
        """From a Hugging Face `LlamaForCausalLM` config.json (transformers 4 or 5 layout)."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        if hf.get("model_type", "llama") not in ("llama", "mistral", "qwen2") or \
                hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{source}: model_type {hf.get('model_type')!r} with biases is not a "
                             "plain Llama")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"{source}: RoPE scaling {rope.get('rope_type')!r} is not supported "
                             "(only the default rotary embedding)")
        def get(key, default=None):
            if key not in hf and default is None:
                raise ValueError(f"{source}: missing {key}")
            return hf.get(key, default)
        n_head, n_embd = get("num_attention_heads"), get("hidden_size")
        head_dim = hf.get("head_dim")
        if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and \
                head_dim == n_embd // n_head:
            head_dim = None                                  # the default, kept implicit
        return cls(vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
                   n_layer=get("num_hidden_layers"), n_head=n_head,
                   n_kv_head=get("num_key_value_heads", n_head), n_embd=n_embd,
                   n_inner=get("intermediate_size"), head_dim=head_dim,
                   rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                   rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                   tie_weights=bool(hf.get("tie_word_embeddings", False)))

    def to_hf(self) -> dict:
        """The config.json that transformers' `LlamaForCausalLM` reads."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": self.vocab_size, "max_position_embeddings": self.block_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "hidden_size": self.n_embd,
                "intermediate_size": self.n_inner, "head_dim": self.head_size,
                "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                "tie_word_embeddings": self.tie_weights, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(),                                         # 134,515,008
    "llama-tiny": LlamaConfig(vocab_size=1024, block_size=256, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=64, n_inner=160),
}


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis: LayerNorm without centring or bias."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        self.weight = Parameter(np.ones(n_embd, np.float32))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)


class RotaryTables:
    """RoPE's cos and sin tables (block_size, head_size), computed once and shared by every layer."""

    def __init__(self, cfg: LlamaConfig, dtype=np.float32):
        self.cfg = cfg
        self.astype(dtype)

    def astype(self, dtype) -> None:
        self.cos, self.sin = rope_tables(self.cfg.head_size, self.cfg.block_size,
                                         self.cfg.rope_theta, dtype)

    @property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cos, self.sin


class LlamaAttention(Module):
    """Grouped-query causal self-attention with RoPE; separate q, k, v projections, no biases."""

    record: list | None = None     # a list: each forward appends its (B, NH, T, Tk) probabilities

    def __init__(self, cfg: LlamaConfig, rotary: RotaryTables, rng: np.random.Generator | None):
        C, HS = cfg.n_embd, cfg.head_size
        self.n_head, self.n_kv_head, self.rotary = cfg.n_head, cfg.n_kv_head, rotary
        self.q_proj = Linear(C, cfg.n_head * HS, rng, bias=False)
        self.k_proj = Linear(C, cfg.n_kv_head * HS, rng, bias=False)
        self.v_proj = Linear(C, cfg.n_kv_head * HS, rng, bias=False)
        self.o_proj = Linear(cfg.n_head * HS, C, rng, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                ragged=None) -> Tensor:
        y = F.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.n_head,
                        self.n_kv_head, cache, layer, rope=self.rotary.tables,
                        record=self.record, ragged=ragged)                # (B, T, NH HS)
        return self.o_proj(y)


class LlamaMLP(Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) (Shazeer 2020)."""

    def __init__(self, cfg: LlamaConfig, rng: np.random.Generator | None):
        self.gate_proj = Linear(cfg.n_embd, cfg.n_inner, rng, bias=False)
        self.up_proj = Linear(cfg.n_embd, cfg.n_inner, rng, bias=False)
        self.down_proj = Linear(cfg.n_inner, cfg.n_embd, rng, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


class LlamaBlock(Module):
    """Pre-norm block: x + attn(rms_norm(x)), then + mlp(rms_norm(x))."""

    def __init__(self, cfg: LlamaConfig, rotary: RotaryTables, rng: np.random.Generator | None):
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary, rng)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, rng)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                ragged=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, layer, ragged)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(Module):
    """The trunk, under Hugging Face's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: LlamaConfig, rotary: RotaryTables, rng: np.random.Generator | None):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.n_embd, rng)
        self.layers = [LlamaBlock(cfg, rotary, rng) for _ in range(cfg.n_layer)]
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)


class Llama(CausalLM):
    """A Llama-architecture language model; `model(idx)`, `model(idx, targets)` and the KV cache
    behave exactly as GPT's (see `CausalLM`)."""

    def __init__(self, config: LlamaConfig, seed: int = 0, init: bool = True):
        """`seed` draws the initial weights (N(0, 0.02), as transformers initialises Llama);
        `init=False` leaves them uninitialised for a loader that fills them at once."""
        self.config = cfg = config
        self.rng = np.random.default_rng(seed)
        rng = self.rng if init else None
        self.rotary = RotaryTables(cfg)
        self.model = LlamaModel(cfg, self.rotary, rng)
        self.lm_head = None if cfg.tie_weights else Linear(cfg.n_embd, cfg.vocab_size, rng,
                                                           bias=False)

    def embed(self, idx: np.ndarray, start: int) -> Tensor:
        return self.model.embed_tokens(idx)          # positions enter through RoPE instead

    def blocks(self) -> list[LlamaBlock]:
        return self.model.layers

    def norm_f(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def tied_embedding(self) -> Embedding | None:
        return self.model.embed_tokens if self.lm_head is None else None

    def astype(self, dtype) -> Llama:
        super().astype(dtype)
        self.rotary.astype(dtype)
        return self
