"""One decoder layer per compiled call: generation's step (`inference/step.py`) without a Python
dispatch per kernel.

A token through a layer is ~10 kernels of `decode.py`, `norms.py`, `gelu.py` and `swiglu.py`;
called one by one from Python each costs a dispatch (argument typing, a parallel region's
wake-up), ~1.5-2 ms a token over SmolLM2's 30 layers (Zen 4). These run the same kernels in the
same order inside one call, so the result is bit for bit the step's. One row (B = 1). A weight
is its PackedWeight's `arrays`, and `_product` picks the kernel by their count when the layer
compiles: (w,) float32, (q, scale) int8, (codes, d, mn) 4-bit.

    python -m pytest tests/test_step.py -q
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from tinygpt.kernels.decode import (attend_one_numba, matvec_f32_numba, matvec_i8_numba,
                                    matvec_q4_numba, rope_append_numba)
from tinygpt.kernels.gelu import gelu_forward_numba
from tinygpt.kernels.norms import layer_norm_forward_numba, rms_norm_forward_numba
from tinygpt.kernels.swiglu import swiglu_forward_numba

# one row is below kernels.base.PARALLEL_MIN_SIZE: the serial compiles, as the step picks them
_rms_norm_serial, _layer_norm_serial = rms_norm_forward_numba.serial, layer_norm_forward_numba.serial
_gelu_serial, _swiglu_serial = gelu_forward_numba.serial, swiglu_forward_numba.serial
_NO_ROPE = np.zeros((1, 1), np.float32)


def _product(w: tuple, x: np.ndarray) -> np.ndarray:
    """x @ W^T for a packed weight's arrays: (w,) float32, (q, scale) int8, (codes, d, mn) 4-bit,
    the kernel PackedWeight.matmul runs for one row. Compiled code only (the overload below)."""
    raise NotImplementedError("_product runs inside compiled layers only")


@overload(_product, jit_options={"cache": True})
def _product_of_kind(w, x):
    n = len(w.types) if isinstance(w, types.BaseTuple) else 0
    if n == 1:
        return lambda w, x: matvec_f32_numba(w[0], x)
    if n == 2:
        return lambda w, x: matvec_i8_numba(w[0], w[1], x)
    if n == 3:
        return lambda w, x: matvec_q4_numba(w[0], w[1], w[2], x)
    return None


@njit(cache=True)
def llama_layer(x: np.ndarray, norm_in: np.ndarray, qkv_w: tuple, o_w: tuple,
                norm_post: np.ndarray, gate_up_w: tuple, down_w: tuple, eps_in: float,
                eps_post: float, n_head: int, n_kv_head: int, cos: np.ndarray, sin: np.ndarray,
                pos: int, k_cache: np.ndarray, v_cache: np.ndarray) -> np.ndarray:
    """x (1, C) -> x after one Llama layer: h = rms(x); x += o(attn(rope(qkv(h))));
    h = rms(x); x += down(silu(gate(h)) * up(h)). q, k, v and gate, up are stacked weights."""
    h = _rms_norm_serial(x, norm_in, eps_in)[0]
    q = rope_append_numba(_product(qkv_w, h), n_head, n_kv_head, cos, sin, pos, k_cache,
                          v_cache, True)
    x = x + _product(o_w, attend_one_numba(q, k_cache, v_cache, pos + 1).reshape(1, -1))
    gate_up = _product(gate_up_w, _rms_norm_serial(x, norm_post, eps_post)[0])
    inner = gate_up.shape[1] // 2
    m = _swiglu_serial(np.ascontiguousarray(gate_up[0, :inner]),
                       np.ascontiguousarray(gate_up[0, inner:]))
    return x + _product(down_w, m.reshape(1, -1))


@njit(cache=True)
def gpt2_layer(x: np.ndarray, ln1_w: np.ndarray, ln1_b: np.ndarray, attn_w: tuple,
               attn_b: np.ndarray, proj_w: tuple, proj_b: np.ndarray, ln2_w: np.ndarray,
               ln2_b: np.ndarray, fc_w: tuple, fc_b: np.ndarray, out_w: tuple,
               out_b: np.ndarray, eps_1: float, eps_2: float, n_head: int, pos: int,
               k_cache: np.ndarray, v_cache: np.ndarray) -> np.ndarray:
    """x (1, C) -> x after one GPT-2 block: x += c_proj(attn(c_attn(ln_1(x))));
    x += mlp.c_proj(gelu(c_fc(ln_2(x)))). Every product adds its bias after the dot products."""
    qkv = _product(attn_w, _layer_norm_serial(x, ln1_w, ln1_b, eps_1)[0])
    qkv += attn_b
    q = rope_append_numba(qkv, n_head, n_head, _NO_ROPE, _NO_ROPE, pos, k_cache, v_cache, False)
    y = _product(proj_w, attend_one_numba(q, k_cache, v_cache, pos + 1).reshape(1, -1))
    y += proj_b
    x = x + y
    h = _product(fc_w, _layer_norm_serial(x, ln2_w, ln2_b, eps_2)[0])
    h += fc_b
    y = _product(out_w, _gelu_serial(h.reshape(-1)).reshape(h.shape))
    y += out_b
    return x + y
