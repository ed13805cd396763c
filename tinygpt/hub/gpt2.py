"""OpenAI's GPT-2 checkpoints in the Hugging Face layout: load them into `GPT`, write `GPT` back.

This module owns the mapping between a hub checkpoint directory (`model.safetensors` +
`config.json`) and a `GPT`: the config translation, the name and shape checks, and reading the
tensors straight into the model's own arrays. Every trained model is saved the same way, with the
tokenizer it used beside it (`save_pretrained(model, dir, tokenizer)`), so `load_pretrained` takes
a training run, a hub-layout folder or a GPT-2 name alike: this is the GPT-2 adapter that
`pretrained.py` dispatches to. The file format itself is `formats/safetensors.py`'s; finding or
downloading the directory is `download.py`'s.

The mapping is almost the identity, because our attribute names are GPT-2's and `Linear.weight` is
stored (in, out) like GPT-2's Conv1D:

    hub file                              tinygpt parameter
    wte.weight [V, C], wpe.weight [T, C]  same names, same shapes
    h.<i>.attn.c_attn.weight [C, 3C] ...  same names, same shapes (no transposes)
    transformer.<name>                    <name>   (the prefix `save_pretrained` in transformers adds)
    h.<i>.attn.bias, .attn.masked_bias    ignored: causal masks, not parameters
    lm_head.weight [V, C]                 tied: must equal wte.weight, not stored twice;
                                          untied (tie_word_embeddings false): lm_head.weight^T (C, V)

Memory: a 124M model is 498 MB of float32. We build the model once and read each tensor's bytes
from the file directly into its parameter array (`readinto`), so the weights are never held twice
(a memory map would add the file's pages to the resident set as they are copied).

    python -c "from tinygpt.hub.gpt2 import load_gpt2; print(load_gpt2('gpt2').config)"
"""
from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Callable, BinaryIO

import numpy as np

from tinygpt.hub.download import resolve_gpt2
from tinygpt.core.fileio import write_json_atomic
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.models.nn import mismatch_report, shape_mismatches
from tinygpt.formats.safetensors import Header, load_safetensors, read_header, save_safetensors
from tinygpt.text.tokenizer import EOT_ID, Tokenizer, load_tokenizer
from tinygpt.core.validate import check_finite, read_json_object, short_list

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
HF_PREFIX = "transformer."                             # names written by transformers' save_pretrained
MASK = re.compile(r"h\.\d+\.attn\.(masked_)?bias")     # causal-mask buffers in older hub files
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # tanh-form GELU, as ours
ROWS_PER_READ = 4096                                   # rows of lm_head compared per read (12 MB)


# --- config ---------------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> GPTConfig:
    """A `GPTConfig` from a Hugging Face GPT-2 `config.json` (as a dict), for inference."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json: model_type {hf['model_type']!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_TANH:
        raise ValueError(f"config.json: activation_function {act!r} is not supported; tinygpt's "
                         f"GELU is the tanh form ({', '.join(GELU_TANH)})")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
    block_size = hf.get("n_positions", hf.get("n_ctx"))
    if block_size is None:
        missing.append("n_positions")
    if missing:
        raise ValueError(f"config.json: missing {', '.join(missing)}")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=block_size, n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], n_inner=hf.get("n_inner"),
                     dropout=0.0, qkv_bias=True,
                     tie_weights=hf.get("tie_word_embeddings", True),
                     layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


HF_ONLY_KEYS = ("model_type", "n_positions", "n_ctx", "architectures", "activation_function")


def config_from_json(path: str | os.PathLike) -> GPTConfig:
    """A `GPTConfig` from a JSON file of its fields, or from a Hugging Face GPT-2 `config.json`
    (recognised by keys such as `model_type` or `n_positions`)."""
    path = Path(path)
    d = read_json_object(path, "model config")
    if any(k in d for k in HF_ONLY_KEYS):
        return _config_from_hf_file(d, path)
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{path}: unknown GPTConfig field(s) {short_list(unknown)} (known: "
                         f"{', '.join(sorted(known))})")
    try:
        return GPTConfig(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _config_from_hf_file(hf: dict, path: Path) -> GPTConfig:
    """`config_from_hf`, its errors naming the file (a wrong type or range included)."""
    try:
        return config_from_hf(hf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {str(e).removeprefix('config.json: ')}") from None


def config_to_hf(cfg: GPTConfig) -> dict:
    """The Hugging Face GPT-2 `config.json` keys for `cfg` (what transformers reads back)."""
    hf = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.block_size,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": cfg.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.vocab_size > EOT_ID:                   # GPT-2's tokenizer: <|endoftext|> both ends
        hf["bos_token_id"] = hf["eos_token_id"] = EOT_ID
    return hf


# --- loading --------------------------------------------------------------------------------------

MODEL_TYPE, MODEL = "gpt2", GPT          # the adapter interface `pretrained.py` dispatches on


def load_hub(directory: str | os.PathLike, pack: str | None = None) -> tuple[GPT, Tokenizer]:
    """(GPT-2 in eval mode, the tokenizer saved beside it, else GPT-2's) from a hub folder."""
    return load_gpt2(directory, pack=pack), load_tokenizer(directory)


def load_gpt2(path_or_name: str | os.PathLike, dir: str | os.PathLike = "weights", *,
              download: bool = True, pack: str | None = None) -> GPT:
    """GPT-2 from a checkpoint directory or a name (gpt2, gpt2-medium, ...), in eval mode.

    Names are looked up in `dir/<name>/` and the Hugging Face cache, then downloaded
    (`download=False` raises FileNotFoundError instead, naming `tinygpt download <name>`).
    `pack="float32"` or `"int8"` packs each weight for generation as soon as it is read
    (`inference/pack.py`), so the float32 training layout never exists whole.
    """
    directory = resolve_gpt2(path_or_name, dir, download=download)
    cfg = _config_from_hf_file(read_json_object(directory / CONFIG_FILE, "config.json"),
                               directory / CONFIG_FILE)
    header = read_header(directory / WEIGHTS_FILE)
    _check_config_fits(directory, cfg, header)      # before allocating what the config asks for
    model = GPT(cfg, init=False)                    # every weight is read from the file
    on_tensor = None
    if pack is not None:
        from tinygpt.inference.pack import packer
        on_tensor = packer(model, pack)
    load_weights(model, directory / WEIGHTS_FILE, on_tensor)
    if pack is not None:
        from tinygpt.inference.pack import gather
        gather(model)                                   # one buffer, in the order a token reads
    return model.eval()


def _check_config_fits(directory: Path, cfg: GPTConfig, header: Header) -> None:
    """A config.json asking for far more weights than model.safetensors holds (vocab_size 10^15,
    5000 layers) is an error naming its sizes, before the model is allocated: a MemoryError
    otherwise. Smaller mismatches are listed tensor by tensor by `_check_names`."""
    V, T, L, C = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    per_layer = 2 * 4 * C * C + 4 * C * cfg.mlp_width     # attention and MLP matrices
    asked = 4 * (V * C + T * C + L * per_layer)           # float32 bytes, biases left out
    if asked > 2 * header.file_size + (1 << 20):
        raise ValueError(f"{directory / CONFIG_FILE}: vocab_size {V}, block_size {T}, n_layer {L}, "
                         f"n_embd {C} need about {asked / 1e6:,.0f} MB of weights, but "
                         f"{WEIGHTS_FILE} holds {header.file_size / 1e6:,.1f} MB")


def load_weights(model: GPT, path: str | os.PathLike,
                 on_tensor: Callable[[str], None] | None = None) -> None:
    """Read a hub-layout safetensors file into `model`'s parameters, in place.

    Every missing, unexpected or mis-shaped tensor is listed, by name and shape, in one ValueError.
    `on_tensor(name)` is called as soon as parameter `name` holds its weights (packing for
    generation frees each one right away).
    """
    path = Path(path)
    header = read_header(path)
    params = dict(model.named_parameters())
    stored = {_strip(name): name for name in header.tensors if not _is_mask(name)}  # ours -> file
    shapes = {ours: header.tensors[name].shape for ours, name in stored.items()}
    head = stored.pop("lm_head.weight", None)          # checked apart: HF stores it [V, C]
    shapes.pop("lm_head.weight", None)
    if model.lm_head is not None:
        params.pop("lm_head.weight")
    _check_names(path, params, shapes, model, head and header.tensors[head].shape)
    with open(path, "rb") as f:
        for name, p in params.items():
            _read_into(f, path, header, stored[name], p.data)
            check_finite(stored[name], p.data, path)
            if name == "wte.weight" and model.lm_head is None and head is not None:
                _check_tied_head(f, path, header, head, p.data)
            if on_tensor is not None:
                on_tensor(name)
        if model.lm_head is not None:
            vc = np.empty(header.tensors[head].shape, np.float32)             # (V, C)
            _read_into(f, path, header, head, vc)
            check_finite(head, vc, path)
            model.lm_head.weight.data = np.ascontiguousarray(vc.T)             # (C, V)
            if on_tensor is not None:
                on_tensor("lm_head.weight")


def _strip(name: str) -> str:
    return name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name


def _is_mask(name: str) -> bool:
    return MASK.fullmatch(_strip(name)) is not None


def _check_names(path: Path, params: dict, shapes: dict, model: GPT,
                 head_shape: tuple | None) -> None:
    """Raise one ValueError listing every missing, unexpected or mis-shaped tensor."""
    missing, unexpected, misshaped = shape_mismatches({n: p.shape for n, p in params.items()},
                                                      shapes)
    V, C = model.config.vocab_size, model.config.n_embd
    if head_shape is None and model.lm_head is not None:
        missing.append(f"lm_head.weight {(V, C)} (config.json has tie_word_embeddings false)")
    elif head_shape is not None and head_shape != (V, C):
        misshaped.append(f"lm_head.weight: expected {(V, C)}, got {head_shape}")
    problems = mismatch_report(missing, unexpected, misshaped)
    if problems:
        raise ValueError(f"{path}: tensors do not fit a GPT-2 of {model.config.n_layer} layers, "
                         f"n_embd {C}: " + "; ".join(problems))


def _read_into(f: BinaryIO, path: Path, header: Header, name: str, out: np.ndarray) -> None:
    """Copy tensor `name` from the open file into `out` (C-contiguous float32, its shape)."""
    info = header.tensors[name]
    if info.dtype != "F32" or not np.little_endian:
        # F16/BF16/F64: convert through a read-only view; rare for GPT-2, so not memory-tuned
        np.copyto(out, load_safetensors(path)[name], casting="same_kind")
        return
    f.seek(header.data_start + info.begin)
    if f.readinto(out.reshape(-1).view(np.uint8)) != info.end - info.begin:
        raise ValueError(f"{path}: file ended while reading {name} (truncated?)")


def _check_tied_head(f: BinaryIO, path: Path, header: Header, name: str, wte: np.ndarray) -> None:
    """With tied weights a stored lm_head.weight is accepted only if it equals wte exactly.

    Compared a block of rows at a time, so the check never holds a second (V, C) matrix.
    """
    V, C = wte.shape
    info = header.tensors[name]
    if info.dtype != "F32" or not np.little_endian:
        same = np.array_equal(load_safetensors(path)[name], wte)
    else:
        same = True
        for start in range(0, V, ROWS_PER_READ):
            rows = np.empty((min(ROWS_PER_READ, V - start), C), np.float32)
            f.seek(header.data_start + info.begin + start * C * rows.itemsize)
            f.readinto(rows.reshape(-1).view(np.uint8))
            if not np.array_equal(rows, wte[start:start + len(rows)]):
                same = False                          # no need to read the rest
                break
    if not same:
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight, but config.json ties "
                         "them (tie_word_embeddings true or absent)")


# --- saving ---------------------------------------------------------------------------------------

def save_hub(model: GPT, directory: str | os.PathLike) -> Path:
    """Write `model` as `directory/model.safetensors` + `config.json` in the hub's GPT-2 layout.

    Names carry no prefix and weights stay (in, out), as in the hub file; float32. A model without
    qkv bias gets zero c_attn biases (same function). An untied head is written as HF's
    `lm_head.weight` [V, C] with `tie_word_embeddings: false`.
    """
    directory, cfg = Path(directory), model.config
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(p.data, np.float32) for name, p in model.named_parameters()}
    if model.lm_head is not None:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].T                # (V, C)
    for i in range(cfg.n_layer):
        tensors.setdefault(f"h.{i}.attn.c_attn.bias", np.zeros(3 * cfg.n_embd, np.float32))
    # transformers refuses safetensors files whose metadata lacks a known "format"
    save_safetensors(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_FILE, config_to_hf(cfg), indent=2, sort_keys=True)
    return directory
