"""Hot loops of tinygpt, one module per piece of math, each kernel beside its NumPy twin.

`base.py` holds what they share (the `TINYGPT_NUMBA=0` switch `pick`, `jit_rows`, a vectorisable
exp); `softmax.py`, `norms.py` (LayerNorm, RMSNorm), `gelu.py`, `swiglu.py` (Llama's gate),
`loss.py` (cross-entropy), `attention.py` (the causal softmax inside attention) and `adamw.py`
are the training kernels;
`decode.py` holds the memory-bound loops of generation, `decode_layers.py` a whole decoder
layer of them per call, and `quant.py` GGUF's block formats. They
know nothing about `Tensor` or autograd: `autograd/fused.py` reshapes its inputs and calls the
names gathered here.

Benchmark: `python -m tinygpt.bench kernels`.   Tests: `pytest tests/test_kernels.py`.
"""
from tinygpt.kernels.adamw import adamw_update, adamw_update_numba, adamw_update_ref
from tinygpt.kernels.attention import (causal_mask, attention_backward, attention_backward_numba,
                                       attention_backward_ref, attention_forward,
                                       attention_forward_numba, attention_forward_ref)
from tinygpt.kernels.base import FASTMATH, PARALLEL_MIN_SIZE, USE_NUMBA, exp_numba, jit_rows, pick
from tinygpt.kernels.gelu import (gelu_backward, gelu_backward_numba, gelu_backward_ref,
                                  gelu_forward, gelu_forward_numba, gelu_forward_ref)
from tinygpt.kernels.loss import (cross_entropy_backward, cross_entropy_backward_numba,
                                  cross_entropy_backward_ref, cross_entropy_forward,
                                  cross_entropy_forward_numba, cross_entropy_forward_ref)
from tinygpt.kernels.norms import (layer_norm_backward, layer_norm_backward_numba,
                                   layer_norm_backward_ref, layer_norm_forward,
                                   layer_norm_forward_numba, layer_norm_forward_ref,
                                   rms_norm_backward, rms_norm_backward_numba,
                                   rms_norm_backward_ref, rms_norm_forward, rms_norm_forward_numba,
                                   rms_norm_forward_ref)
from tinygpt.kernels.swiglu import (swiglu_backward, swiglu_backward_numba, swiglu_backward_ref,
                                    swiglu_forward, swiglu_forward_numba, swiglu_forward_ref)
from tinygpt.kernels.softmax import (softmax_backward, softmax_backward_numba,
                                     softmax_backward_ref, softmax_forward, softmax_forward_numba,
                                     softmax_forward_ref)
