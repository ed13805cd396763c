"""tinygpt.core.validate and the Python API's bad-input checks: typed configs, finite numbers, JSON
objects, NaN weights (GPT-2 and Llama), tiny temperatures, leftovers of a killed run."""
import json
import math

import numpy as np
import pytest

from tinygpt import GPT, GPTConfig
from tinygpt.training.checkpoint import prepare_run_dir
from tinygpt.inference.generate import generate
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.hub.llama import load_llama_hf, save_hub
from tinygpt.training.train import TrainConfig
from tinygpt.core.validate import (check_fields, check_number, check_text, read_json_object,
                              short_list)


def test_short_list_caps_the_names():
    assert short_list(["a", "b"]) == "a, b"
    assert short_list(range(10)) == "0, 1, 2 and 7 more"


@pytest.mark.parametrize("value, message", [
    (math.nan, "x must be a finite number >= 0, got nan"),
    (math.inf, "x must be a finite number >= 0, got inf"),
    (-1.0, "x must be >= 0, got -1.0"),
])
def test_check_number(value, message):
    with pytest.raises(ValueError, match=message):
        check_number("x", value, 0.0)
    assert check_number("x", 0.5, 0.0, 1.0, hi_open=True) == 0.5


def test_check_text_names_an_undecodable_byte():
    with pytest.raises(ValueError, match=r"--prompt is not valid UTF-8 text \(byte 0xff"):
        check_text("--prompt", "a\udcff")
    assert check_text("--prompt", "héllo") == "héllo"


@pytest.mark.parametrize("cls, field, value", [
    (GPTConfig, "n_embd", "64"), (GPTConfig, "n_embd", 64.0), (GPTConfig, "tie_weights", 1),
    (TrainConfig, "batch_size", "4"), (TrainConfig, "lr", "0.1"), (TrainConfig, "out_dir", 3),
])
def test_config_types_are_checked_and_named(cls, field, value):
    with pytest.raises(TypeError, match=f"{cls.__name__}.{field} must be"):
        cls(**{field: value})


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("max_seconds", math.inf),
                                          ("beta2", 1.0), ("grad_clip", -1.0)])
def test_train_config_floats_are_finite_and_in_range(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


def test_check_fields_accepts_ints_for_floats_and_none_for_optionals():
    check_fields(TrainConfig(lr=1, min_lr=None))


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"), (b"[1]", "expected a JSON object, got list"),
    (b"{", "not valid JSON"), (b'{"\xff": 1}', "not valid UTF-8"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_read_json_object_names_the_file(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_json_object(path)
    assert str(e.value).startswith(f"{path}: ")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_json_object(tmp_path / "nope.json")


def test_tiny_temperature_is_greedy_not_nan():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
    idx = np.array([[1, 2, 3]])
    greedy = generate(model, idx, 5)
    assert np.array_equal(generate(model, idx, 5, temperature=1e-320, seed=0), greedy)


@pytest.mark.parametrize("kwargs, message", [({"eos_id": 11}, "eos_id 11"),
                                             ({"eos_id": -1}, "eos_id -1"),
                                             ({"seed": -1}, "seed must be >= 0"),
                                             ({"temperature": math.nan}, "temperature")])
def test_generate_arguments_are_checked(kwargs, message):
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
    with pytest.raises(ValueError, match=message):
        generate(model, np.array([[1]]), 2, **kwargs)


LLAMA = dict(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=8, n_inner=16)


def test_llama_nan_weight_is_named(tmp_path):
    model = Llama(LlamaConfig(**LLAMA))
    dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"].data[0, 0] = np.nan
    save_hub(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.up_proj"):
        load_llama_hf(tmp_path / "m")


def test_llama_config_far_larger_than_its_file_is_named_before_allocating(tmp_path):
    save_hub(Llama(LlamaConfig(**LLAMA)), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 10**15}))
    with pytest.raises(ValueError, match="vocab_size 1000000000000000"):
        load_llama_hf(tmp_path / "m")


def test_resume_removes_what_a_killed_run_left(tmp_path):
    from tinygpt.training.checkpoint import save_checkpoint
    save_checkpoint(tmp_path, {"w": np.zeros(2, np.float32)}, {"step": 2})
    for name in (".log.csv.abc.tmp", ".loss.png.def.tmp", "ckpt-0000003.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    prepare_run_dir(str(tmp_path), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json",
                                                         "ckpt-0000002.safetensors"]


def test_matmul_error_reports_the_shapes_passed():
    from tinygpt.autograd.tensor import Tensor
    with pytest.raises(ValueError) as e:
        Tensor(np.ones(3)) @ Tensor(np.ones(4))
    assert "(1, 3)" not in str(e.value) and "(3,) and (4,)" in str(e.value)
