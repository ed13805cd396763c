"""tinygpt: a GPT built from first principles in NumPy.

The public API, bottom layer first (README "Reading order"): the autograd engine (`Tensor`,
`no_grad`), the ops (`tinygpt.functional`), `gradcheck`, the model (`GPTConfig`, `GPT`),
tokenizers and data, generation, training, and GPT-2 weights.
"""
from tinygpt import runtime

runtime.set_blas_spin()     # before NumPy loads OpenBLAS: see runtime.py

from tinygpt import functional  # noqa: E402
from tinygpt.autograd import Tensor, no_grad
from tinygpt.data import DataLoader, GPTDataset, MemmapDataset, create_dataloader, prepare
from tinygpt.generate import generate, stream
from tinygpt.gradcheck import gradcheck
from tinygpt.model import GPT, GPTConfig
from tinygpt.optim import SGD, AdamW
from tinygpt.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer
from tinygpt.train import TrainConfig, train
from tinygpt.weights import load_gpt2, save_pretrained

__all__ = ["AdamW", "CharTokenizer", "DataLoader", "GPT", "GPT2Tokenizer", "GPTConfig",
           "GPTDataset", "MemmapDataset", "SGD", "Tensor", "TrainConfig", "create_dataloader",
           "functional", "generate", "get_tokenizer", "gradcheck", "load_gpt2", "no_grad",
           "prepare", "save_pretrained", "stream", "train"]
