"""Llama weights from the two places users get them: a Hugging Face hub folder or a GGUF file.

Hub layout (`HuggingFaceTB/SmolLM2-135M-Instruct` as downloaded): `config.json` of
`LlamaForCausalLM` and `model.safetensors` with names such as `model.layers.0.self_attn.q_proj.weight`
stored (out, in) like `torch.nn.Linear`. Our `Linear` is (in, out), so each matrix is transposed
once while it is read; names are used as they are.

GGUF (llama.cpp's single file): metadata `llama.*` gives the config, tensors have llama.cpp's
names (`blk.0.attn_q.weight`, ...), listed below, and may be quantized (Q8_0, Q4_1, ...); each is
dequantized to float32 once, here. NOTE: llama.cpp's converter permutes the rows of attn_q and
attn_k so that its RoPE can rotate adjacent pairs (x[2i], x[2i+1]); Hugging Face's (and ours)
rotates (x[i], x[i + HS/2]), so the permutation is undone on load (`_unpermute`).

    python -c "from tinygpt.hub.llama import load_llama; print(load_llama('../shared/fixtures/smollm2-135m-instruct/model.gguf').config)"
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinygpt.core import runtime
from tinygpt.core.fileio import write_json_atomic
from tinygpt.formats.gguf import dequantize, read_gguf
from tinygpt.inference.pack import gather, pack_for_inference
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.models.nn import mismatch_report, shape_mismatches
from tinygpt.formats.safetensors import load_safetensors, save_safetensors
from tinygpt.core.validate import check_finite, read_json_object
from tinygpt.text.hf_tokenizer import HFTokenizer

# llama.cpp's tensor names -> ours (Hugging Face's); {i} is the layer
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def config_from_gguf(metadata: dict, source: str) -> LlamaConfig:
    """A LlamaConfig from GGUF metadata (`general.architecture` must be llama)."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: architecture {arch!r} is not supported here (llama; GPT-2 "
                         "checkpoints load from the hub layout)")

    def get(key, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata llama.{key} is missing")
        return value

    n_head = int(get("attention.head_count"))
    n_embd = int(get("embedding_length"))
    vocab = metadata.get("llama.vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{source}: neither llama.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens)
    head_dim = int(get("rope.dimension_count", n_embd // n_head))
    return LlamaConfig(vocab_size=int(vocab), block_size=int(get("context_length")),
                       n_layer=int(get("block_count")), n_head=n_head,
                       n_kv_head=int(get("attention.head_count_kv", n_head)), n_embd=n_embd,
                       n_inner=int(get("feed_forward_length")),
                       head_dim=None if head_dim == n_embd // n_head else head_dim,
                       rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=float(get("rope.freq_base", 10000.0)),
                       tie_weights="output.weight" not in metadata.get("_tensor_names", ()))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows (0, 1, 2, 3, ...) of the file are
    (0, HS/2, 1, HS/2 + 1, ...) of Hugging Face's.   w: (n_head * HS, C), rows per output."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = GGUF_NAMES.get(".".join(["blk", "{i}"] + parts[2:]))
        return pattern.format(i=parts[1]) if pattern else None
    return GGUF_NAMES.get(name)


def load_gguf(path: str | os.PathLike, keep_quantized: bool = False) -> Llama:
    """A Llama with the weights of a GGUF file, each dequantized to float32 once; or, with
    `keep_quantized`, packed for generation (`inference.PackedWeight.from_gguf`: Q8_0, Q4_1 and Q4_0
    blocks stay quantized), a model that generates but does not train."""
    path = Path(path)
    return _load_gguf(path, *read_gguf(path), keep_quantized=keep_quantized)


def _load_gguf(path: Path, metadata: dict, tensors: dict, keep_quantized: bool = False,
               pack: str | None = None) -> Llama:
    cfg = config_from_gguf({**metadata, "_tensor_names": tuple(tensors)}, str(path))
    if keep_quantized or pack is not None:
        runtime.return_freed_memory()      # each tensor read, packed, gathered leaves at once
    model = Llama(cfg, init=False)
    params = dict(model.named_parameters())
    mapped = {}
    for name, t in tensors.items():
        ours = _gguf_name(name)
        if ours is None:
            if name.startswith("rope_freqs"):       # precomputed RoPE factors: ours are computed
                continue
            raise ValueError(f"{path}: tensor {name!r} is not part of a Llama model")
        mapped[ours] = t
    _check_fit(path, params, {n: _our_shape(n, t.shape) for n, t in mapped.items()})
    for ours, t in mapped.items():
        heads = {"q_proj.weight": cfg.n_head, "k_proj.weight": cfg.n_kv_head}.get(
            ours.rpartition("self_attn.")[2])
        if len(t.shape) == 2 and (keep_quantized or pack is not None):
            _pack_gguf_tensor(model, ours, t, heads, None if keep_quantized else pack, str(path))
            continue
        w = dequantize(t)                                     # (out, in) rows, or a vector
        check_finite(ours, w, path)
        if heads is not None:
            w = _unpermute(w, heads)
        params[ours].data = _to_ours(ours, w)
    if keep_quantized or pack is not None:
        return gather(model).eval()                     # one buffer, in the order a token reads
    return model


def _pack_gguf_tensor(model: Llama, name: str, t, heads: int | None, pack: str | None,
                      source: str = "GGUF file") -> None:
    """Put matrix `t` in the place of parameter `name`, packed (out, in) for generation: as the
    file's blocks (pack None), or dequantized to "float32" or "int8" rows. GGUF's matrices are
    already rows per output, so nothing is transposed."""
    from tinygpt.inference.pack import PackedWeight
    if pack is None:
        packed = PackedWeight.from_gguf(t)
    else:
        w = dequantize(t)
        check_finite(name, w, source)
        packed = PackedWeight.from_rows(w, None if pack == "float32" else pack)
    for a in packed.arrays:                            # the blocks' float scales, or the rows
        check_finite(name, a, source)
    if heads is not None:                              # llama.cpp's q/k row order, undone
        order = _unpermute(np.arange(t.shape[0])[:, None], heads)[:, 0]
        packed = PackedWeight(packed.kind, tuple(np.ascontiguousarray(a[order])
                                                 for a in packed.arrays))
    module = model.get_submodule(name.rpartition(".")[0])
    module.packed, module.weight = packed, None


def _is_matrix_of_linear(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def _our_shape(name: str, shape: tuple) -> tuple:
    return tuple(reversed(shape)) if _is_matrix_of_linear(name) else tuple(shape)


def _to_ours(name: str, w: np.ndarray) -> np.ndarray:
    """Transpose a torch-layout (out, in) Linear weight to ours (in, out); one aligned copy."""
    if _is_matrix_of_linear(name):
        return np.ascontiguousarray(w.T, dtype=np.float32)
    return np.array(w, dtype=np.float32, order="C")


def _check_fit(path: Path, params: dict, shapes: dict) -> None:
    problems = mismatch_report(*shape_mismatches({n: p.shape for n, p in params.items()},
                                                 shapes))
    if problems:
        raise ValueError(f"{path}: weights do not fit the Llama config: " + "; ".join(problems))


MODEL_TYPE, MODEL = "llama", Llama      # the adapter interface `pretrained.py` dispatches on


def load_gguf_file(path: Path, metadata: dict, tensors: dict, pack: str | None = None
                   ) -> tuple[Llama, HFTokenizer]:
    """(Llama in eval mode, the tokenizer in its metadata) from a read GGUF file; `pack` as in
    `pretrained.load_pretrained` ("gguf" keeps the quantized blocks)."""
    tokenizer = HFTokenizer.from_gguf_metadata(metadata, source=str(path))
    model = _load_gguf(Path(path), metadata, tensors, keep_quantized=pack == "gguf",
                       pack=None if pack == "gguf" else pack)
    return model.eval(), tokenizer


def load_hub(path: str | os.PathLike, pack: str | None = None) -> tuple[Llama, HFTokenizer]:
    """(Llama in eval mode, its tokenizer.json) from a hub folder."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: a Llama folder needs its tokenizer.json")
    tokenizer = HFTokenizer.from_tokenizer_json(path / "tokenizer.json")
    model = load_llama_hf(path)
    if pack is not None:
        pack_for_inference(model, None if pack == "float32" else pack)
    return model.eval(), tokenizer


def load_llama_hf(dir: str | os.PathLike) -> Llama:
    """A Llama from a hub folder: config.json (LlamaForCausalLM) + model.safetensors."""
    dir = Path(dir)
    cfg = LlamaConfig.from_hf(read_json_object(dir / "config.json", "config.json"),
                              str(dir / "config.json"))
    path = dir / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{dir}: no model.safetensors beside config.json")
    arrays = load_safetensors(path)
    asked = 4 * cfg.n_embd * (cfg.vocab_size + cfg.n_layer * (4 * cfg.n_embd + 3 * cfg.n_inner))
    if asked > 2 * path.stat().st_size + (1 << 20):     # before allocating: not a MemoryError
        raise ValueError(f"{dir / 'config.json'}: vocab_size {cfg.vocab_size}, num_hidden_layers "
                         f"{cfg.n_layer}, hidden_size {cfg.n_embd} need about {asked / 1e6:,.0f} "
                         f"MB of weights, but model.safetensors holds "
                         f"{path.stat().st_size / 1e6:,.1f} MB")
    model = Llama(cfg, init=False)
    params = dict(model.named_parameters())
    if cfg.tie_weights:
        arrays.pop("lm_head.weight", None)                  # transformers may write the tied copy
    _check_fit(path, params, {n: _our_shape(n, a.shape) for n, a in arrays.items()})
    for name, a in arrays.items():
        check_finite(name, a, path)
        params[name].data = _to_ours(name, a)
    return model


def save_hub(model: Llama, dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors in the hub layout transformers reads."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: (np.ascontiguousarray(p.data.T) if _is_matrix_of_linear(n) else p.data)
               for n, p in model.named_parameters()}
    save_safetensors({n: np.asarray(a, np.float32) for n, a in tensors.items()},
                     dir / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(dir / "config.json", model.config.to_hf())
    return dir


def load_llama(path: str | os.PathLike) -> Llama:
    """A `.gguf` file or a hub-layout folder."""
    path = Path(path)
    if path.suffix == ".gguf" or path.is_file():
        return load_gguf(path)
    return load_llama_hf(path)


__all__ = ["load_llama", "load_gguf", "load_llama_hf", "save_hub", "config_from_gguf"]
