"""`load_pretrained` and `save_pretrained`: one dispatcher for every model family.

Whatever a command's `--model` names (a GPT-2 or SmolLM2 name, a hub-layout folder, a training
run's folder, a `.gguf` file), this module finds which family it is and hands the path to that
family's adapter. An adapter is a module with the same small interface:

    MODEL_TYPE                      config.json's `model_type`, GGUF's `general.architecture`
    MODEL                           the model class it builds (and saves)
    load_hub(folder, pack)          -> (model, tokenizer) from config.json + model.safetensors
    save_hub(model, folder)         -> folder, in the hub layout transformers reads back
    load_gguf_file(path, metadata, tensors, pack)   -> (model, tokenizer); only where GGUF has it

Each adapter owns its config translation (from the hub's config.json or GGUF metadata) and its
name map (hub or llama.cpp names -> ours). A third family is one new module and one line in
`FAMILIES`. `pack` readies a model for generation only (`inference/pack.py`): "float32" or
"int8" rows, or "gguf" to keep a GGUF file's quantized blocks.

    python -c "import tinygpt; print(tinygpt.load_pretrained('smollm2-135m-instruct')[0].config)"
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from tinygpt.core.validate import read_json_object
from tinygpt.formats.gguf import read_gguf
from tinygpt.hub import gpt2, llama
from tinygpt.hub.download import resolve_gpt2
from tinygpt.models.gpt import CausalLM
from tinygpt.text.tokenizer import Tokenizer, save_tokenizer

FAMILIES: dict[str, ModuleType] = {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama}
CONFIG_FILE = "config.json"


def load_pretrained(path_or_name: str | os.PathLike, dir: str | os.PathLike = "weights", *,
                    download: bool = True, pack: str | None = None) -> tuple[CausalLM, Tokenizer]:
    """(model in eval mode, its tokenizer) from a name, a hub folder, a run folder or a `.gguf`.

    Names are looked up in `dir/<name>/` and the Hugging Face cache, then downloaded
    (`download=False` raises FileNotFoundError instead, naming `tinygpt download <name>`).
    """
    path = Path(path_or_name)
    if path.suffix == ".gguf":
        metadata, tensors = read_gguf(path)
        arch = metadata.get("general.architecture")
        family = FAMILIES.get(arch)
        if family is None or not hasattr(family, "load_gguf_file"):
            raise ValueError(f"{path}: architecture {arch!r} is not supported here ("
                             f"{', '.join(n for n, f in FAMILIES.items() if hasattr(f, 'load_gguf_file'))}"
                             "; GPT-2 checkpoints load from the hub layout)")
        return family.load_gguf_file(path, metadata, tensors, pack)
    if pack == "gguf":
        raise ValueError(f"{path}: pack 'gguf' keeps a GGUF file's blocks; this is not a .gguf")
    model_type = _model_type(path)
    if model_type is None:        # a name, a run folder, or a folder whose problem is named there
        path = resolve_gpt2(path_or_name, dir, download=download)
        model_type = _model_type(path)
    family = FAMILIES.get(model_type or gpt2.MODEL_TYPE)   # GPT-2's config.json may lack the key
    if family is None:
        raise ValueError(f"{path / CONFIG_FILE}: model_type {model_type!r} is not one tinygpt "
                         f"loads ({', '.join(FAMILIES)})")
    return family.load_hub(path, pack)


def save_pretrained(model: CausalLM, dir: str | os.PathLike,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` in its family's hub layout (`dir/model.safetensors` + `dir/config.json`),
    and `tokenizer` (if given) beside them, so `load_pretrained(dir)` gets both back. Frozen
    parameters are saved like the others; each file is replaced atomically."""
    family = next((f for f in FAMILIES.values() if isinstance(model, f.MODEL)), None)
    if family is None:
        raise TypeError(f"save_pretrained: no hub layout for a {type(model).__name__} "
                        f"(families: {', '.join(FAMILIES)})")
    directory = family.save_hub(model, Path(dir))
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return directory


def _model_type(path: Path) -> str | None:
    """`model_type` of a folder's config.json, or None when there is none to read (the resolver
    or the family's loader then says what is wrong with it)."""
    try:
        return read_json_object(path / CONFIG_FILE).get("model_type")
    except (OSError, ValueError):
        return None
