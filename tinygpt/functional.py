"""The functional API: every differentiable op as a function of Tensors (defined in ops.py).

    import tinygpt.functional as F
    y = F.softmax(x @ w, axis=-1)
"""
from tinygpt.ops import (add, causal_attention, concatenate, cross_entropy, div, dropout,
                         embedding, exp, gelu, getitem, layer_norm, linear, log, log_softmax,
                         masked_fill, matmul, max, mean, mul, multihead_attention, neg, permute,
                         pow, relu, reshape, softmax, split, sqrt, stack, sub, sum, swapaxes, tanh,
                         transpose, where)

__all__ = ["add", "causal_attention", "concatenate", "cross_entropy", "div", "dropout",
           "embedding", "exp", "gelu", "getitem", "layer_norm", "linear", "log", "log_softmax",
           "masked_fill", "matmul", "max", "mean", "mul", "multihead_attention", "neg", "permute",
           "pow", "relu", "reshape", "softmax", "split", "sqrt", "stack", "sub", "sum", "swapaxes",
           "tanh", "transpose", "where"]
