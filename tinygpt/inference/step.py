"""Decoding one token on plain arrays: a packed model's layers without the autograd layer.

A packed model (`pack.py`) generates through the same modules that train, and every op of a
token's forward pass becomes a Tensor made by a Function's `apply` (a Context, shape checks, a
graph decision). For one token that bookkeeping costs more than the small ops themselves: 1.7 of
12.9 ms per GPT-2 token went to the norms, adds and dispatch (`bench generate`, Zen 4). Here a
step calls the **same kernels on the same arrays in the same order** and nothing else, so its
logits are bit for bit those of `model(ids, cache=cache)` (tests/test_step.py checks):

    GPT-2:  x = wte[id] + wpe[pos];  per block  h = ln_1(x);  x += c_proj(attn(c_attn(h)))
                                                h = ln_2(x);  x += mlp.c_proj(gelu(c_fc(h)))
    Llama:  x = embed[id];           per layer  h = rms(x);   x += o_proj(attn(rope(q, k), v))
                                                h = rms(x);   x += down(silu(gate(h)) * up(h))
    logits = norm_f(x) @ head

With one row, each layer is a single compiled call (`decode_layers.gpt2_layer`, `llama_layer`)
running those same kernels in that order: 1.5-3.3 ms less per float32 token than calling them
one by one from here (`bench generate`, Zen 4), and still bit for bit the forward pass.
Batches and int8 activations go kernel by kernel.

Attention is two kernel calls: `rope_append` (RoPE on q and k, the key and value into the
cache) and `attend_one`. Llama's q, k, v products run as one call on their stacked rows, and so do
gate and up (`PackedWeight.stacked`): each output row is the same dot product either way.

    python -m tinygpt.bench generate
"""
from __future__ import annotations

import numpy as np

from tinygpt import kernels
from tinygpt.inference.pack import PackedWeight
from tinygpt.kernels import decode as dk
from tinygpt.kernels import decode_layers as dl
from tinygpt.models.gpt import GPT, CausalLM
from tinygpt.models.nn import Embedding, KVCache, Linear, Parameter, packed_linear


def supports(model: CausalLM) -> bool:
    """True when `decode` can run this model: a GPT or a Llama in eval mode, every Linear (and a
    tied head's embedding) packed, float32, no attention record. One walk over the modules: ask
    once per generation."""
    from tinygpt.models.llama import Llama
    if model.training or not isinstance(model, (GPT, Llama)):
        return False
    tied, linears = model.tied_embedding(), 0
    for m in model.modules():
        if isinstance(m, Linear):
            linears += 1
            if m.packed is None:
                return False
        if getattr(m, "record", None) is not None:                 # attention probabilities kept
            return False
        if any(isinstance(v, Parameter) and v.dtype != np.float32 for v in vars(m).values()):
            return False
    return linears > 0 and (tied is None or tied.packed is not None)


def decode(model: CausalLM, idx: np.ndarray, cache: KVCache) -> np.ndarray:
    """Logits (B, V) of the token after `idx` (B, 1), the step's keys and values appended to
    `cache` (the caller checked that the position fits the context)."""
    pos = cache.length
    if isinstance(model, GPT):
        x = _rows(model.wte, idx)[:, 0] + _rows(model.wpe, np.arange(pos, pos + 1))   # (B, C)
        for i, block in enumerate(model.h):
            if _one_call(x, block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                         block.mlp.c_proj):
                cache.reserve(i, pos + 1)
                x = dl.gpt2_layer(x, *_norm(block.ln_1), *_weight(block.attn.c_attn),
                                  *_weight(block.attn.c_proj), *_norm(block.ln_2),
                                  *_weight(block.mlp.c_fc), *_weight(block.mlp.c_proj),
                                  block.ln_1.eps, block.ln_2.eps, block.attn.n_head, pos,
                                  cache.k[i], cache.v[i])
                continue
            qkv = _linear(block.attn.c_attn, _layer_norm(x, block.ln_1))
            y = _attend(qkv, block.attn.n_head, block.attn.n_head, None, cache, i, pos)
            x = x + _linear(block.attn.c_proj, y)
            h = _linear(block.mlp.c_fc, _layer_norm(x, block.ln_2))
            x = x + _linear(block.mlp.c_proj, kernels.gelu_forward(h.reshape(-1)).reshape(h.shape))
        x = _layer_norm(x, model.ln_f)
    else:
        x = _rows(model.model.embed_tokens, idx)[:, 0]
        for i, (layer, (qkv_w, gate_up_w)) in enumerate(zip(model.model.layers, _plan(model))):
            att, mlp = layer.self_attn, layer.mlp
            if _one_call(x, qkv_w, att.o_proj, gate_up_w, mlp.down_proj):
                cache.reserve(i, pos + 1)
                x = dl.llama_layer(x, layer.input_layernorm.weight.data, qkv_w.arrays,
                                   att.o_proj.packed.arrays,
                                   layer.post_attention_layernorm.weight.data,
                                   gate_up_w.arrays, mlp.down_proj.packed.arrays,
                                   layer.input_layernorm.eps,
                                   layer.post_attention_layernorm.eps, att.n_head, att.n_kv_head,
                                   *att.rotary.tables, pos, cache.k[i], cache.v[i])
                continue
            h = _rms_norm(x, layer.input_layernorm)
            qkv = qkv_w.matmul(h) if qkv_w is not None else np.concatenate(
                [_linear(att.q_proj, h), _linear(att.k_proj, h), _linear(att.v_proj, h)], axis=-1)
            y = _attend(qkv, att.n_head, att.n_kv_head, att.rotary.tables, cache, i, pos)
            x = x + _linear(att.o_proj, y)
            h = _rms_norm(x, layer.post_attention_layernorm)
            if gate_up_w is not None:
                a, b = np.split(gate_up_w.matmul(h), 2, axis=-1)
                a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
            else:
                a, b = _linear(mlp.gate_proj, h), _linear(mlp.up_proj, h)
            x = x + _linear(mlp.down_proj, kernels.swiglu_forward(a.reshape(-1), b.reshape(-1)
                                                                  ).reshape(a.shape))
        x = _rms_norm(x, model.model.norm)
    cache.length += 1
    tied = model.tied_embedding()
    return (tied.packed if tied is not None else model.lm_head.packed).matmul(x)


def _plan(model: CausalLM) -> list[tuple]:
    """Per Llama layer, (q, k, v) and (gate, up) stacked into one weight each, where their kinds
    allow (`PackedWeight.stacked`): 4 kernel calls per layer instead of 7. Built on the first
    step and kept on the model (`set_activations` drops it)."""
    plan = getattr(model, "decode_plan", None)
    if plan is None:
        plan = [(PackedWeight.stacked([layer.self_attn.q_proj.packed, layer.self_attn.k_proj.packed,
                                       layer.self_attn.v_proj.packed]),
                 PackedWeight.stacked([layer.mlp.gate_proj.packed, layer.mlp.up_proj.packed]))
                for layer in model.model.layers]
        model.decode_plan = plan
    return plan


def _attend(qkv: np.ndarray, n_head: int, n_kv_head: int, rope, cache: KVCache, layer: int,
            pos: int) -> np.ndarray:
    """The new token's query over the cache: qkv (B, (NH + 2 KV) HS) -> (B, NH HS). Its key and
    value go into the cache at `pos`, RoPE-rotated (when `rope` is given) as the layer would."""
    cache.reserve(layer, pos + 1)
    k, v = cache.k[layer], cache.v[layer]
    cos, sin = rope if rope is not None else (_NO_TABLE, _NO_TABLE)
    q = dk.rope_append(np.ascontiguousarray(qkv), n_head, n_kv_head, cos, sin, pos, k, v,
                       rope is not None)
    return dk.attend_one(q, k, v, pos + 1).reshape(qkv.shape[0], -1)


_NO_TABLE = np.zeros((1, 1), np.float32)


def _one_call(x: np.ndarray, *weights) -> bool:
    """Whether a layer runs as one compiled call (`decode_layers.gpt2_layer`, `llama_layer`):
    one row, every weight packed (a Linear's or a stacked one) with float32 activations, and the
    numba kernels on (not the twins)."""
    if x.shape[0] != 1 or dk.matvec_f32 is not dk.matvec_f32_numba:
        return False
    packed = [getattr(w, "packed", w) for w in weights]
    return all(p is not None and p.activations == "float32" for p in packed)


def _weight(layer: Linear) -> tuple[tuple, np.ndarray]:
    """A packed Linear's arrays and its bias (zeros when it has none: adding 0 keeps every
    value)."""
    w = layer.packed
    return w.arrays, layer.bias.data if layer.bias is not None else np.zeros(w.shape[0],
                                                                             np.float32)


def _norm(norm) -> tuple[np.ndarray, np.ndarray]:
    return norm.weight.data, norm.bias.data


def _rows(embedding: Embedding, idx: np.ndarray) -> np.ndarray:
    if embedding.packed is not None:
        return embedding.packed.rows(idx)
    return embedding.weight.data[idx]


def _linear(layer: Linear, x: np.ndarray) -> np.ndarray:
    return packed_linear(layer.packed, x, None if layer.bias is None else layer.bias.data)


def _layer_norm(x: np.ndarray, norm) -> np.ndarray:
    return kernels.layer_norm_forward(x.reshape(-1, x.shape[-1]), norm.weight.data,
                                      norm.bias.data, norm.eps)[0].reshape(x.shape)


def _rms_norm(x: np.ndarray, norm) -> np.ndarray:
    return kernels.rms_norm_forward(x.reshape(-1, x.shape[-1]), norm.weight.data,
                                    norm.eps)[0].reshape(x.shape)
