"""tinygpt: a GPT built from first principles in NumPy.

The public API, bottom layer first (README "Reading order"): the autograd engine (`Tensor`,
`no_grad`), the ops (`tinygpt.autograd.functional`), `gradcheck`, the models (`GPTConfig`, `GPT`,
`LlamaConfig`, `Llama`), tokenizers and data, generation (and `pack_for_inference`), training,
and weights (`load_pretrained` reads GPT-2 and Llama folders, GPT-2 names and .gguf files).
Stage 3 lives in `tinygpt.finetune` (classify, instruct, lora, dpo, templates).
"""
from tinygpt.core import runtime

runtime.set_blas_spin()     # before NumPy loads OpenBLAS: see runtime.py

from tinygpt.autograd import functional  # noqa: E402
from tinygpt.autograd.tensor import Tensor, no_grad
from tinygpt.text.data import DataLoader, GPTDataset, MemmapDataset, create_dataloader, prepare
from tinygpt.inference.generate import generate, stream
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.inference.pack import pack_for_inference
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.training.optim import SGD, AdamW
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer
from tinygpt.training.train import TrainConfig, train
from tinygpt.hub.weights import load_gpt2, load_pretrained, save_pretrained

__all__ = ["AdamW", "CharTokenizer", "DataLoader", "GPT", "GPT2Tokenizer", "GPTConfig",
           "GPTDataset", "Llama", "LlamaConfig", "MemmapDataset", "SGD", "Tensor", "TrainConfig",
           "create_dataloader", "functional", "generate", "get_tokenizer", "gradcheck",
           "load_gpt2", "load_pretrained", "no_grad", "pack_for_inference", "prepare",
           "save_pretrained", "stream", "train"]
