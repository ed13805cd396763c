"""LoRA: the book's parameter counts, exact equality before training, merge/unmerge, adapters saved
and loaded (and refused for another base or rank), gradients against central differences."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import GRAD_ATOL, GRAD_RTOL
from tests.strategies import arrays
from tests.test_nn import gradcheck_parameters
from tinygpt import GPT, GPTConfig
from tinygpt.autograd import functional as F
from tinygpt.autograd.tensor import Tensor
from tinygpt.finetune.lora import (ADAPTER_CONFIG, LoRALinear, apply_lora, base_fingerprint,
                                   load_adapter, lora_layers, merge, save_adapter, unload,
                                   unmerge)
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.models.nn import Linear
from tinygpt.training.train import TrainConfig, train
from tinygpt.hub.gpt2 import load_gpt2
from tinygpt.hub.pretrained import save_pretrained

MERGE_ATOL = 1e-5        # the bound: merged vs unmerged float32 logits


def tiny_gpt(seed=0, tie=True) -> GPT:
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16,
                    qkv_bias=True, tie_weights=tie)
    return GPT(cfg, seed=seed).eval()


def tiny_llama(seed=0) -> Llama:
    cfg = LlamaConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                      n_inner=24)
    return Llama(cfg, seed=seed).eval()


def randomize_b(model, seed=1, scale=0.1):
    """Pretend training happened: B away from zero, so the adapters change the outputs."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = (rng.standard_normal(layer.lora_B.shape) * scale).astype(np.float32)


IDX = np.array([[1, 5, 7, 3, 9, 2], [4, 4, 8, 0, 1, 6]])


# --- the counts ------------------------------------------------------------------------

def test_gpt2_124m_with_two_class_head_counts_as_the_book():
    # appendix E: GPT-2 small (qkv bias) whose out_head is replaced by Linear(768, 2)
    model = GPT(GPTConfig.preset("gpt2", qkv_bias=True), init=False)
    model.lm_head = Linear(768, 2, np.random.default_rng(0))
    assert model.num_parameters() == 124_441_346
    assert apply_lora(model, rank=16, alpha=16) == 2_666_528
    assert model.num_parameters(trainable_only=True) == 2_666_528
    assert model.num_parameters() == 124_441_346 + 2_666_528       # base kept, frozen


@pytest.mark.parametrize("tie", [False, True])
def test_gpt2_medium_rank_16_counts_as_the_book(tie):
    # tied (as loaded from the hub) is untied first, so both give the book's out_head adapter
    model = GPT(GPTConfig.preset("gpt2-medium", qkv_bias=True, tie_weights=tie), init=False)
    assert apply_lora(model, rank=16, alpha=16) == 7_898_384
    assert model.config.tie_weights is False


def test_fused_qkv_gets_one_adapter_per_part():
    model = tiny_gpt()
    apply_lora(model, rank=3, alpha=6)
    layer = model.h[0].attn.c_attn
    assert (layer.parts, layer.lora_A.shape, layer.lora_B.shape) == (3, (16, 9), (9, 16))
    assert model.h[0].mlp.c_fc.lora_B.shape == (3, 64)


# --- initialisation, freezing, targets -------------------------------------------------------

def test_init_is_kaiming_uniform_on_rank_and_zero_b_from_the_given_generator():
    lin = Linear(64, 32, np.random.default_rng(0))
    a = LoRALinear(lin, rank=4, alpha=8, rng=np.random.default_rng(7))
    b = LoRALinear(lin, rank=4, alpha=8, rng=np.random.default_rng(7))
    assert np.array_equal(a.lora_A.data, b.lora_A.data)
    assert np.abs(a.lora_A.data).max() <= 0.5 and np.abs(a.lora_A.data).max() > 0.45  # 1/sqrt(4)
    assert not a.lora_B.data.any()
    assert a.weight is lin.weight and a.bias is lin.bias and a.scaling == 2.0


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_outputs_equal_the_base_model_exactly_before_training(make):
    model = make()
    before = model(IDX).data
    apply_lora(model, rank=4, alpha=8)
    assert np.array_equal(model(IDX).data, before)


def test_names_of_base_weights_are_kept_and_only_adapters_train():
    model = tiny_gpt(tie=False)
    names = [n for n, _ in model.named_parameters()]
    apply_lora(model, rank=2, alpha=2)
    after = [n for n, _ in model.named_parameters()]
    assert [n for n in after if "lora_" not in n] == names
    trainable = [n for n, _ in model.named_trainable_parameters()]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)


def test_targets_choose_a_subset_and_a_bad_target_is_an_error():
    model = tiny_llama()
    n = apply_lora(model, rank=2, alpha=4, targets=["q_proj", "v_proj"])
    assert sorted(lora_layers(model)) == [f"model.layers.{i}.self_attn.{p}_proj"
                                          for i in range(2) for p in "qv"]
    assert n == 2 * (2 * (16 + 16) + 2 * (16 + 8))
    assert model.lm_head is None                     # the tied head was not a target
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(tiny_llama(), rank=2, alpha=4, targets=["c_attn"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2, alpha=4)


def test_training_moves_only_the_adapters():
    model = tiny_gpt()
    apply_lora(model, rank=2, alpha=4)
    base = {n: p.data.copy() for n, p in model.named_parameters() if "lora_" not in n}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (4, 8))
    batches = [(x, np.roll(x, -1, axis=1))]
    result = train(model, batches, None, TrainConfig(max_steps=30, lr=1e-2, eval_freq=30,
                                                    eval_iter=1, sample_tokens=0),
                   progress=False)
    assert result.evals[-1]["train_loss"] < result.evals[0]["train_loss"] - 0.1
    assert all(np.array_equal(p.data, base[n]) for n, p in model.named_parameters()
               if "lora_" not in n)


# --- merge and unmerge --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_merged_and_unmerged_logits_agree(make):
    model = make()
    apply_lora(model, rank=4, alpha=8)
    randomize_b(model)
    base_logits = make()(IDX).data
    unmerged = model(IDX).data
    assert np.abs(unmerged - base_logits).max() > 1e-2        # the adapters do something
    fingerprint = base_fingerprint(model)
    merge(model)
    assert base_fingerprint(model) != fingerprint
    np.testing.assert_allclose(model(IDX).data, unmerged, rtol=0, atol=MERGE_ATOL)
    unmerge(model)
    np.testing.assert_array_equal(model(IDX).data, unmerged)          # the base W restored
    assert base_fingerprint(model) == fingerprint


def test_a_merged_model_saves_as_a_plain_hub_model(tmp_path):
    model = tiny_gpt(tie=True)
    apply_lora(model, rank=4, alpha=8)
    randomize_b(model)
    expected = model(IDX).data
    save_pretrained(unload(model), tmp_path)
    plain = load_gpt2(tmp_path)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    np.testing.assert_allclose(plain(IDX).data, expected, rtol=0, atol=MERGE_ATOL)


# --- adapters on disk ---------------------------------------------------------------------------

def test_adapter_round_trip_and_its_small_file(tmp_path):
    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8, targets=["attn", "lm_head"])
    randomize_b(model)
    expected = model(IDX).data
    save_adapter(model, tmp_path, targets=["attn", "lm_head"], base_name="tiny")
    fresh = tiny_gpt()
    config = load_adapter(fresh, tmp_path)
    assert (config["rank"], config["alpha"], config["targets"]) == (4, 8.0, ["attn", "lm_head"])
    np.testing.assert_array_equal(fresh(IDX).data, expected)
    size = (tmp_path / "lora.safetensors").stat().st_size
    n_adapter = model.num_parameters(trainable_only=True)
    assert size < 4 * n_adapter + 4096


def test_adapter_for_another_base_or_rank_is_refused(tmp_path):
    model = tiny_gpt(seed=0)
    apply_lora(model, rank=4, alpha=8)
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="another base model.*weights"):
        load_adapter(tiny_gpt(seed=1), tmp_path)
    with pytest.raises(ValueError, match="another base model.*config"):
        load_adapter(GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2,
                                   n_embd=16, qkv_bias=True, tie_weights=True)), tmp_path)
    with pytest.raises(ValueError, match="trained on a GPT, not a Llama"):
        load_adapter(tiny_llama(), tmp_path)
    other_rank = tiny_gpt(seed=0)
    apply_lora(other_rank, rank=2, alpha=8)
    with pytest.raises(ValueError, match="rank 4 alpha 8, but the model's LoRA layers have "
                                         "rank 2 alpha 8"):
        load_adapter(other_rank, tmp_path)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(merge(model), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_gpt(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_adapter(tiny_gpt(), tmp_path / "nowhere")


def test_fingerprint_sees_a_changed_weight():
    model = tiny_gpt()
    before = base_fingerprint(model)
    model.h[1].mlp.c_fc.weight.data[0, 0] += 1.0          # element 0 is always in the sample
    assert base_fingerprint(model) != before


# --- gradients ----------------------------------------------------------------------------------

@given(st.integers(0, 2**16), st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 4),
       st.integers(1, 3), st.booleans(), st.data())
def test_lora_linear_gradcheck(seed, rank, parts, n_in, out_per_part, bias, data):
    rng = np.random.default_rng(seed)
    layer = LoRALinear(Linear(n_in, parts * out_per_part, rng, bias=bias, std=1.0), rank,
                       alpha=2.0 * rank, rng=rng, parts=parts)
    for p in layer.parameters():
        p.data = p.data.astype(np.float64)
    layer.lora_B.data = rng.standard_normal(layer.lora_B.shape)
    x = data.draw(arrays((2, 3, n_in)))
    assert gradcheck_parameters(layer, lambda: layer(Tensor(x)), seed=seed)
    assert gradcheck(lambda t: layer(t), x, rtol=GRAD_RTOL, atol=GRAD_ATOL, seed=seed)


@pytest.mark.parametrize("parts", [1, 3])
def test_the_fused_op_is_linear_plus_delta(parts):
    rng = np.random.default_rng(4)
    layer = LoRALinear(Linear(5, 6, rng), rank=2, alpha=3.0, rng=rng, parts=parts)
    layer.lora_B.data = rng.standard_normal(layer.lora_B.shape).astype(np.float32)
    x = Tensor(rng.standard_normal((2, 3, 5)).astype(np.float32))
    expected = F.linear(x, layer.weight, layer.bias) + layer.delta(x)
    np.testing.assert_allclose(layer(x).data, expected.data, rtol=1e-5, atol=1e-6)


def test_delta_weight_is_the_delta_of_the_output():
    rng = np.random.default_rng(3)
    layer = LoRALinear(Linear(5, 6, rng), rank=2, alpha=3.0, rng=rng, parts=3)
    layer.lora_B.data = rng.standard_normal(layer.lora_B.shape).astype(np.float32)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(layer.delta(Tensor(x)).data, x @ layer.delta_weight().data,
                               rtol=1e-5, atol=1e-6)
    # part i of the output only sees A_i and B_i
    A, B = layer.lora_A.data, layer.lora_B.data
    part1 = x @ A[:, 2:4] @ B[2:4] * 1.5
    np.testing.assert_allclose(layer.delta(Tensor(x)).data[:, 2:4], part1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_head_weight_includes_the_heads_adapter(make):
    # classifiers and DPO multiply by head_weight(); the forward calls lm_head: both must agree
    model = make()
    apply_lora(model, rank=2, alpha=4)
    randomize_b(model)
    via_matrix = F.linear(model.hidden(IDX), model.head_weight()).data
    np.testing.assert_allclose(model(IDX).data, via_matrix, rtol=1e-5, atol=1e-5)
    merge(model)
    np.testing.assert_allclose(F.linear(model.hidden(IDX), model.head_weight()).data,
                               via_matrix, rtol=1e-5, atol=1e-5)


def test_lora_on_a_tied_head_shares_the_embedding_and_merging_leaves_it_alone():
    """The untied head is a view of the embedding table (no 113 MB copy for SmolLM2)."""
    model = Llama(LlamaConfig.preset("llama-tiny"), seed=0)
    table = model.model.embed_tokens.weight
    before = table.data.copy()
    apply_lora(model, rank=2, alpha=4.0)
    assert np.shares_memory(model.lm_head.weight.data, table.data)
    model.lm_head.lora_B.data[:] = 0.5                  # a non-zero adapter to fold in
    merge(model)
    assert not np.shares_memory(model.lm_head.weight.data, table.data)
    unmerge(model)
    np.testing.assert_array_equal(table.data, before)
    np.testing.assert_array_equal(model.lm_head.weight.data, before.T)
