"""`inference.step.decode` (one token on plain arrays) against the packed model's own forward pass:
the same kernels in the same order, so the logits must be identical, not merely close."""
import numpy as np
import pytest

from tinygpt import GPT, GPTConfig, no_grad
from tinygpt.inference import step
from tinygpt.inference.generate import generate
from tinygpt.inference.pack import pack_for_inference, set_activations
from tinygpt.kernels import decode as dk
from tinygpt.kernels import decode_layers as dl
from tinygpt.models.llama import Llama, LlamaConfig


def _models():
    gpt = GPTConfig(vocab_size=60, block_size=32, n_layer=2, n_head=2, n_embd=32, qkv_bias=True)
    llama = LlamaConfig(vocab_size=60, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                        n_embd=32, n_inner=64)
    return {"gpt tied": lambda: GPT(GPTConfig(**{**gpt.__dict__, "tie_weights": True}), seed=1),
            "gpt lm_head": lambda: GPT(gpt, seed=2),
            "llama gqa": lambda: Llama(llama, seed=3)}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("weights", ["float32", "int8", "int8x8"])
def test_a_step_gives_the_logits_of_the_forward_pass_bit_for_bit(name, weights, batch,
                                                                  monkeypatch):
    """One row runs each layer as one compiled call (decode_layers.gpt2_layer, llama_layer), except
    with int8 activations; a batch goes kernel by kernel. Both must be the forward pass, bit
    for bit."""
    model = pack_for_inference(_models()[name](), None if weights == "float32" else "int8")
    if weights == "int8x8":
        set_activations(model, "int8")
    assert step.supports(model)
    calls = []
    for fused in ("gpt2_layer", "llama_layer"):
        kernel = getattr(dl, fused)
        monkeypatch.setattr(dl, fused, lambda *a, k=kernel: calls.append(1) or k(*a))
    prompt = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])[:batch]
    with no_grad():
        ours, theirs = model.new_cache(batch), model.new_cache(batch)
        model(prompt, cache=ours)
        model(prompt, cache=theirs)
        for t in range(8):
            ids = np.array([[11 + t], [40 - t]])[:batch]
            want = model(ids, cache=theirs).data[:, -1]
            got = step.decode(model, ids, ours)
            np.testing.assert_array_equal(got, want)
            assert ours.length == theirs.length == 6 + t
            for layer in range(2):
                np.testing.assert_array_equal(ours.k[layer][:, :, :ours.length],
                                              theirs.k[layer][:, :, :theirs.length])
    one_call = batch == 1 and weights != "int8x8" and dk.matvec_f32 is dk.matvec_f32_numba
    assert len(calls) == (8 * 2 if one_call else 0)          # 8 steps of 2 layers


def test_models_the_step_cannot_run_take_the_forward_pass():
    model = _models()["gpt tied"]()
    assert not step.supports(model)                          # not packed: it may be trained
    packed = pack_for_inference(_models()["gpt tied"]())
    assert step.supports(packed)
    assert not step.supports(packed.train())                 # dropout would be on
    packed.eval().h[1].ln_2.weight.data = packed.h[1].ln_2.weight.data.astype(np.float64)
    assert not step.supports(packed)                         # the kernels are float32 only
    packed.h[1].ln_2.weight.data = packed.h[1].ln_2.weight.data.astype(np.float32)
    assert step.supports(packed)
    packed.h[0].attn.record = []                             # someone is recording attention
    assert not step.supports(packed)
    prompt = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(generate(packed, prompt, 6), generate(model, prompt, 6))
    assert len(packed.h[0].attn.record) == 6                 # every step went through the layer


def test_llama_projections_run_stacked_without_a_second_copy():
    """q, k, v (and gate, up) become one weight whose rows the layers' own weights are views of;
    where the kinds differ nothing is stacked, and both ways give the forward pass's logits."""
    from tinygpt.inference.pack import PackedWeight
    for mixed in (False, True):
        model = pack_for_inference(_models()["llama gqa"](), "int8")
        att = model.model.layers[0].self_attn
        if mixed:                                   # a float32 key projection beside int8 ones
            att.k_proj.packed = PackedWeight("f32", (att.k_proj.packed.dense(),))
        prompt, ids = np.array([[1, 2, 3]]), np.array([[4]])
        with no_grad():
            ours, theirs = model.new_cache(1), model.new_cache(1)
            model(prompt, cache=ours)
            model(prompt, cache=theirs)
            got = step.decode(model, ids, ours)
            np.testing.assert_array_equal(got, model(ids, cache=theirs).data[:, -1])
        qkv, gate_up = model.decode_plan[0]
        assert (qkv is None) == mixed and gate_up is not None
        assert np.shares_memory(gate_up.arrays[0], model.model.layers[0].mlp.up_proj.packed.arrays[0])
        if not mixed:
            assert qkv.shape == (4 * 8 + 2 * 2 * 8, 32)
            assert np.shares_memory(qkv.arrays[0], att.v_proj.packed.arrays[0])


def test_4_bit_layers_in_one_call_give_the_forward_pass_bit_for_bit(monkeypatch):
    """GGUF's Q4_1 kind (codes, scale and offset per 32) through decode_layers.llama_layer and
    gpt2_layer, every product 4-bit."""
    from tinygpt.inference.pack import PackedWeight
    from tinygpt.models.nn import Linear
    rng = np.random.default_rng(0)
    cfg = dict(vocab_size=60, block_size=32, n_layer=2)
    models = [GPT(GPTConfig(**cfg, n_head=2, n_embd=64, qkv_bias=True), seed=1),
              Llama(LlamaConfig(**cfg, n_head=4, n_kv_head=2, n_embd=64, n_inner=128), seed=3)]
    calls = []
    for fused in ("gpt2_layer", "llama_layer"):
        kernel = getattr(dl, fused)
        monkeypatch.setattr(dl, fused, lambda *a, k=kernel: calls.append(1) or k(*a))
    for model in models:
        model = pack_for_inference(model)
        for m in model.modules():
            if isinstance(m, Linear):
                O, I = m.packed.shape
                m.packed = PackedWeight("q4", (
                    rng.integers(0, 256, (O, I // 2)).astype(np.uint8),
                    (rng.random((O, I // 32)) * 0.02).astype(np.float32),
                    (rng.standard_normal((O, I // 32)) * 0.01).astype(np.float32)))
        before = len(calls)
        with no_grad():
            ours, theirs = model.new_cache(1), model.new_cache(1)
            model(np.array([[1, 2, 3]]), cache=ours)
            model(np.array([[1, 2, 3]]), cache=theirs)
            for t in range(4):
                ids = np.array([[5 + t]])
                np.testing.assert_array_equal(step.decode(model, ids, ours),
                                              model(ids, cache=theirs).data[:, -1])
        assert len(calls) - before == 4 * 2


@pytest.mark.parametrize("weights", ["float32", "int8", "4-bit"])
def test_packed_weights_lie_in_one_buffer_in_reading_order(weights):
    """`pack.gather`: every packed array is a view of one buffer, weights in the order of the
    model's attributes, q/k/v and gate/up back to back by array, so stacking them copies nothing;
    the old arrays are freed, and the model's logits do not change."""
    import weakref

    from tinygpt.inference.pack import PackedWeight, gather
    from tinygpt.models.nn import Linear
    model = pack_for_inference(_models()["llama gqa"](), "int8" if weights == "int8" else None)
    if weights == "4-bit":                                  # GGUF's Q4_1 kind, from a loader
        rng = np.random.default_rng(0)
        for m in model.modules():
            if isinstance(m, Linear):
                O, I = m.packed.shape
                m.packed = PackedWeight("q4", (rng.integers(0, 256, (O, I // 2), dtype=np.uint8),
                                               rng.random((O, I // 32), dtype=np.float32) / 8,
                                               -rng.random((O, I // 32), dtype=np.float32)))
    prompt = np.array([[1, 2, 3, 4]])
    with no_grad():
        before = model(prompt).data
    old = [weakref.ref(a) for m in model.modules() if getattr(m, "packed", None) is not None
           for a in m.packed.arrays]
    gather(model)
    assert all(r() is None for r in old)                   # each copied array was let go
    with no_grad():
        np.testing.assert_array_equal(model(prompt).data, before)
    layer = model.model.layers[1]
    att, mlp = layer.self_attn, layer.mlp
    buffer = att.q_proj.packed.arrays[0].base
    order = [model.model.embed_tokens, att.q_proj, att.k_proj, att.v_proj, att.o_proj,
             mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    assert all(a.base is buffer and a.flags.c_contiguous for m in model.modules()
               if getattr(m, "packed", None) is not None for a in m.packed.arrays)
    firsts = [m.packed.arrays[0].__array_interface__["data"][0] for m in order]
    assert firsts == sorted(firsts)                        # the order a token reads them
    for parts in ([att.q_proj, att.k_proj, att.v_proj], [mlp.gate_proj, mlp.up_proj]):
        whole = PackedWeight.stacked([m.packed for m in parts])
        assert all(a.base is buffer for a in whole.arrays)  # a view: nothing was copied
        for j, a in enumerate(whole.arrays):
            np.testing.assert_array_equal(a, np.concatenate([m.packed.arrays[j] for m in parts]))
    with no_grad():
        ours, theirs = model.new_cache(1), model.new_cache(1)
        model(prompt, cache=ours)
        model(prompt, cache=theirs)
        ids = np.array([[7]])
        np.testing.assert_array_equal(step.decode(model, ids, ours),
                                      model(ids, cache=theirs).data[:, -1])
