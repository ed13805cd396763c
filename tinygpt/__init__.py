"""tinygpt: a GPT built from first principles in NumPy.

The public API, bottom layer first (see README "Reading order"):
autograd (`Tensor`, `no_grad`), ops (`tinygpt.functional`), `gradcheck`, layers (`tinygpt.nn`),
the model (`GPTConfig`, `GPT`).
"""
from tinygpt import functional
from tinygpt.autograd import Tensor, no_grad
from tinygpt.gradcheck import gradcheck
from tinygpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "Tensor", "functional", "gradcheck", "no_grad"]
