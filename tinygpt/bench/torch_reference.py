"""The one PyTorch reference of our models, for benchmarks only (the library never imports torch).

Functions of a dict of torch tensors under tinygpt's own parameter names and layouts (Linear
weights (in, out)), so a bench hands PyTorch exactly tinygpt's arrays (`from_numpy`, no copy) or
leaf copies of them to train:

    gpt2_block(x, w, prefix, n_head)              one pre-LN block, training or prefill
    gpt2_logits(idx, w, cfg, cache=None, pos=0)   the whole GPT, optionally KV-cached
    llama_logits(idx, w, cfg, rope, cache, pos)   the whole Llama (RMSNorm, RoPE, GQA, SwiGLU)
    decode(logits_fn, prompt, n, cfg)             greedy KV-cached decoding, timed per token
    steps(logits_fn, prompt, n, cfg)              the same tokens, yielded one at a time

Attention is PyTorch's `scaled_dot_product_attention`, its fastest CPU path.
"""
from __future__ import annotations

import time


def parameters(model, requires_grad: bool = False) -> dict:
    """tinygpt model -> {name: torch tensor}: shared memory, or leaf copies to train."""
    import torch
    if requires_grad:
        return {n: torch.tensor(p.data, requires_grad=True) for n, p in model.named_parameters()}
    return {n: torch.from_numpy(p.data) for n, p in model.named_parameters()}


def _linear(x, w: dict, name: str):
    bias = w.get(name + ".bias")
    y = x @ w[name + ".weight"]
    return y if bias is None else y + bias


def _attend(q, k, v, cache, layer: int, pos: int):
    """q: (B, NH, T, HS), k, v: (B, KV, T, HS); with a cache, k and v join the cached ones."""
    import torch.nn.functional as F
    T = q.shape[2]
    if cache is not None:
        cache[layer][0][:, :, pos:pos + T], cache[layer][1][:, :, pos:pos + T] = k, v
        k, v = cache[layer][0][:, :, :pos + T], cache[layer][1][:, :, :pos + T]
    if k.shape[1] != q.shape[1]:                                 # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)   # T > 1 only at pos 0


def gpt2_block(x, w: dict, p: str, n_head: int, cache=None, layer: int = 0, pos: int = 0):
    import torch.nn.functional as F
    B, T, C = x.shape
    h = F.layer_norm(x, (C,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], 1e-5)
    q, k, v = _linear(h, w, p + "attn.c_attn").view(B, T, 3, n_head, C // n_head).permute(
        2, 0, 3, 1, 4)
    y = _attend(q, k, v, cache, layer, pos)
    x = x + _linear(y.transpose(1, 2).reshape(B, T, C), w, p + "attn.c_proj")
    h = F.layer_norm(x, (C,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], 1e-5)
    return x + _linear(F.gelu(_linear(h, w, p + "mlp.c_fc"), approximate="tanh"), w,
                       p + "mlp.c_proj")


def gpt2_logits(idx, w: dict, cfg, cache=None, pos: int = 0, head=None):
    """(B, T, V) logits; with a cache only the last position's. `head`: a (C, V) matrix to use
    instead of wte^T (a contiguous copy is PyTorch's fastest layout for one row)."""
    import torch
    import torch.nn.functional as F
    x = w["wte.weight"][idx] + w["wpe.weight"][pos:pos + idx.shape[1]]
    for i in range(cfg.n_layer):
        x = gpt2_block(x, w, f"h.{i}.", cfg.n_head, cache, i, pos)
    if cache is not None:
        x = x[:, -1:]
    x = F.layer_norm(x, (cfg.n_embd,), w["ln_f.weight"], w["ln_f.bias"], 1e-5)
    if head is not None:
        return x @ head
    return x @ (w["lm_head.weight"] if "lm_head.weight" in w else torch.t(w["wte.weight"]))


def rope_tables(cfg):
    import torch
    HS = cfg.head_size
    inv = cfg.rope_theta ** (-torch.arange(0, HS, 2, dtype=torch.float64) / HS)
    ang = torch.outer(torch.arange(cfg.block_size, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def _rope(x, rope, pos: int):
    import torch
    cos, sin = (t[pos:pos + x.shape[2]] for t in rope)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def llama_logits(idx, w: dict, cfg, rope, cache=None, pos: int = 0, head=None):
    import torch
    import torch.nn.functional as F
    B, T = idx.shape
    NH, KV, HS, eps = cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.rms_norm_eps
    x = w["model.embed_tokens.weight"][idx]
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        h = F.rms_norm(x, (cfg.n_embd,), w[p + "input_layernorm.weight"], eps)
        q = _linear(h, w, p + "self_attn.q_proj").view(B, T, NH, HS).transpose(1, 2)
        k = _linear(h, w, p + "self_attn.k_proj").view(B, T, KV, HS).transpose(1, 2)
        v = _linear(h, w, p + "self_attn.v_proj").view(B, T, KV, HS).transpose(1, 2)
        y = _attend(_rope(q, rope, pos), _rope(k, rope, pos), v, cache, i, pos)
        x = x + _linear(y.transpose(1, 2).reshape(B, T, NH * HS), w, p + "self_attn.o_proj")
        h = F.rms_norm(x, (cfg.n_embd,), w[p + "post_attention_layernorm.weight"], eps)
        g = F.silu(_linear(h, w, p + "mlp.gate_proj")) * _linear(h, w, p + "mlp.up_proj")
        x = x + _linear(g, w, p + "mlp.down_proj")
    if cache is not None:
        x = x[:, -1:]
    x = F.rms_norm(x, (cfg.n_embd,), w["model.norm.weight"], eps)
    if head is not None:
        return x @ head
    return x @ (w["lm_head.weight"] if "lm_head.weight" in w
                else torch.t(w["model.embed_tokens.weight"]))


def decode(logits_fn, prompt, n: int, cfg) -> tuple[list[float], list[int]]:
    """Greedy KV-cached decoding of batch 1: (times, tokens), times[0] the start and times[i] the
    moment token i was ready. `logits_fn(idx, cache, pos)` -> (1, T, V)."""
    times, tokens = [time.perf_counter()], []
    for token in steps(logits_fn, prompt, n, cfg):
        times.append(time.perf_counter())
        tokens.append(token)
    return times, tokens


def steps(logits_fn, prompt, n: int, cfg):
    """The n greedy tokens of `decode`, yielded one by one (the first one after the prompt)."""
    import torch
    shape = (1, cfg.n_kv_head, min(cfg.block_size, prompt.shape[1] + n), cfg.head_size)
    cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.n_layer)]
    idx, pos = prompt, 0
    with torch.inference_mode():
        for _ in range(n):
            token = int(logits_fn(idx, cache, pos)[0, -1].argmax())
            pos += idx.shape[1]
            idx = torch.tensor([[token]])
            yield token
