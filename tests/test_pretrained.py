"""`load_pretrained`/`save_pretrained` dispatch on the family table: a third family is one module
with the adapter interface and one line in `FAMILIES`."""
import types

import numpy as np
import pytest

from tinygpt import GPT, GPTConfig
from tinygpt.hub import gpt2, llama, pretrained
from tinygpt.text.tokenizer import get_tokenizer

TINY = dict(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=8)


def test_every_family_has_the_adapter_interface():
    for name, family in pretrained.FAMILIES.items():
        assert family.MODEL_TYPE == name
        for attr in ("MODEL", "load_hub", "save_hub"):
            assert hasattr(family, attr), f"{name} adapter lacks {attr}"
    assert hasattr(llama, "load_gguf_file") and not hasattr(gpt2, "load_gguf_file")


def test_a_third_family_is_one_table_line(tmp_path, monkeypatch):
    """A fake family registered under its model_type gets the folder, and saves its own model."""
    seen = []

    class Toy:
        pass

    toy = types.SimpleNamespace(
        MODEL_TYPE="toy", MODEL=Toy,
        load_hub=lambda folder, pack: seen.append((folder, pack)) or ("model", "tok"),
        save_hub=lambda model, folder: (folder.mkdir(parents=True), folder)[1])
    monkeypatch.setitem(pretrained.FAMILIES, "toy", toy)
    (tmp_path / "config.json").write_text('{"model_type": "toy"}')
    assert pretrained.load_pretrained(tmp_path, pack="int8") == ("model", "tok")
    assert seen == [(tmp_path, "int8")]
    assert pretrained.save_pretrained(Toy(), tmp_path / "out") == tmp_path / "out"


def test_an_unknown_model_type_names_the_file_and_the_families(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(ValueError, match=r"config\.json: model_type 'mamba' .*gpt2, llama"):
        pretrained.load_pretrained(tmp_path)


def test_a_gpt2_round_trip_goes_through_the_gpt2_adapter(tmp_path):
    model = GPT(GPTConfig(**TINY), seed=0)
    pretrained.save_pretrained(model, tmp_path, tokenizer=get_tokenizer("gpt2"))
    back, tok = pretrained.load_pretrained(tmp_path)
    assert type(back) is GPT and tok.encode("Hello, I am") == [15496, 11, 314, 716]
    loaded = dict(back.named_parameters())
    for name, p in model.named_parameters():
        assert np.array_equal(p.data, loaded[name].data), name


def test_saving_a_model_of_no_family_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="no hub layout for a object"):
        pretrained.save_pretrained(object(), tmp_path)
