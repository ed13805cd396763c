"""tinygpt: a GPT built from first principles in NumPy.

The public API, gathered from the folders bottom floor first (README "The folders"): the autograd
engine (`Tensor`, `no_grad`, `functional`, `gradcheck`), tokenizers and data, the models
(`GPTConfig`, `GPT`, `LlamaConfig`, `Llama`), generation (and `pack_for_inference`), pretrained
weights (`load_pretrained` reads GPT-2 and Llama folders, names, runs and .gguf files), and
training. Stage 3 lives in `tinygpt.finetune` (classify, instruct, lora, dpo).
"""
from tinygpt.core import runtime

runtime.set_blas_spin()     # before NumPy loads OpenBLAS: see runtime.py

from tinygpt.autograd import functional  # noqa: E402
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.autograd.tensor import Tensor, no_grad
from tinygpt.text.data import DataLoader, GPTDataset, MemmapDataset, create_dataloader, prepare
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.inference.generate import generate, stream
from tinygpt.inference.pack import pack_for_inference
from tinygpt.hub.gpt2 import load_gpt2
from tinygpt.hub.pretrained import load_pretrained, save_pretrained
from tinygpt.training.optim import SGD, AdamW
from tinygpt.training.train import TrainConfig, train

__all__ = ["AdamW", "CharTokenizer", "DataLoader", "GPT", "GPT2Tokenizer", "GPTConfig",
           "GPTDataset", "Llama", "LlamaConfig", "MemmapDataset", "SGD", "Tensor", "TrainConfig",
           "create_dataloader", "functional", "generate", "get_tokenizer", "gradcheck",
           "load_gpt2", "load_pretrained", "no_grad", "pack_for_inference", "prepare",
           "save_pretrained", "stream", "train"]
