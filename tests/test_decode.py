"""Generation mode: the decode kernels against their twins and the format's definition, and packed
models (float32 rows, int8, kept-quantized GGUF) against the unpacked model they came from."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygpt import GPT, GPTConfig, no_grad
from tinygpt.kernels import decode as dk
from tinygpt.inference.generate import generate
from tinygpt.inference.pack import PackedWeight, pack_for_inference, packed_bytes
from tinygpt.models.llama import Llama, LlamaConfig
from tests.conftest import TWIN32_ATOL, TWIN32_RTOL

dims = st.integers(1, 4)


def _rng(seed):
    return np.random.default_rng(seed)


@given(M=st.integers(1, 9), O=st.integers(1, 40), groups=st.integers(1, 3),
       seed=st.integers(0, 999))
def test_matvec_kernels_agree_with_twins_and_definition(M, O, groups, seed):
    """Up to 9 rows of x and 40 outputs: the 4-bit prompt kernel's 4 x 4 blocks, the rows of x
    and the weight rows they leave, and more than one task of 16 weight rows."""
    rng = _rng(seed)
    I = 32 * groups
    x = rng.standard_normal((M, I)).astype(np.float32)
    w = rng.standard_normal((O, I)).astype(np.float32)
    np.testing.assert_allclose(dk.matvec_f32_numba(w, x), x @ w.T, rtol=TWIN32_RTOL, atol=1e-5)
    np.testing.assert_allclose(dk.matvec_f32_ref(w, x), x @ w.T, rtol=TWIN32_RTOL, atol=1e-5)
    for group in (None, 32):
        q, scale = dk.quantize_int8(w, group)
        G = I if group is None else group
        definition = (q.astype(np.float64).reshape(O, -1, G) * scale[:, :, None]).reshape(O, I)
        want = x.astype(np.float64) @ definition.T
        for kernel in (dk.matvec_i8_numba, dk.matvec_i8_ref):
            np.testing.assert_allclose(kernel(q, scale, x), want, rtol=1e-4, atol=1e-4)
    codes = rng.integers(0, 256, (O, I // 2), dtype=np.uint8)
    d, mn = (rng.standard_normal((O, groups)).astype(np.float32) for _ in range(2))
    # GGUF Q4_1: byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble)
    c = codes.reshape(O, groups, 16).astype(np.float64)
    q4 = np.concatenate([c % 16, c // 16], axis=-1)
    definition = (q4 * d[:, :, None] + mn[:, :, None]).reshape(O, I)
    want = x.astype(np.float64) @ definition.T
    for kernel in (dk.matvec_q4_numba, dk.matvec_q4_ref):
        np.testing.assert_allclose(kernel(codes, d, mn, x), want, rtol=1e-4, atol=1e-3)


@given(B=st.integers(1, 2), KV=st.integers(1, 3), group=st.integers(1, 3),
       length=st.integers(1, 9), seed=st.integers(0, 999))
def test_attend_one_reads_the_cache_in_place(B, KV, group, length, seed):
    rng = _rng(seed)
    NH, HS, capacity = KV * group, 8, 12
    q = rng.standard_normal((B, NH, HS)).astype(np.float32)
    k, v = (rng.standard_normal((B, KV, capacity, HS)).astype(np.float32) for _ in range(2))
    want = dk.attend_one_ref(q, k, v, length)
    np.testing.assert_allclose(dk.attend_one_numba(q, k, v, length), want, rtol=TWIN32_RTOL,
                               atol=TWIN32_ATOL)
    k[:, :, length:] = np.nan                       # positions past the length are never read
    assert np.isfinite(dk.attend_one_numba(q, k, v, length)).all()


def test_int8_quantization_error_is_bounded_by_half_a_step():
    w = _rng(0).standard_normal((16, 64)).astype(np.float32)
    q, scale = dk.quantize_int8(w, 32)
    q_t, _ = dk.quantize_int8(np.asfortranarray(w), 32)     # a Linear's (in, out) weight, .T
    assert q_t.flags.c_contiguous and np.array_equal(q_t, q)  # rows stay rows: kernels stream
    back = (q.reshape(16, 2, 32) * scale[:, :, None]).reshape(16, 64)
    assert np.all(np.abs(back - w) <= scale.repeat(32, axis=1) / 2 + 1e-7)
    assert np.abs(q).max() == 127


def _tiny_gpt(**overrides):
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, qkv_bias=True,
                    **overrides)
    return GPT(cfg, seed=1)


@pytest.mark.parametrize("tie", [True, False])
def test_packed_float32_gpt_generates_the_same_tokens(tie):
    model, packed = _tiny_gpt(tie_weights=tie), _tiny_gpt(tie_weights=tie)
    pack_for_inference(packed)
    assert packed.h[0].attn.c_attn.weight is None and packed.h[0].attn.c_attn.packed.kind == "f32"
    prompt = np.array([[3, 1, 4, 1, 5]])
    with no_grad():
        np.testing.assert_allclose(packed(prompt).data, model(prompt).data, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(generate(packed, prompt, 20), generate(model, prompt, 20))


def test_int8_gpt_is_close_and_four_times_smaller():
    model, packed = _tiny_gpt(tie_weights=True), _tiny_gpt(tie_weights=True)
    pack_for_inference(packed, "int8")
    prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with no_grad():
        a, b = model(prompt).data, packed(prompt).data
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    matrices = sum(p.data.nbytes for n, p in model.named_parameters() if p.ndim == 2)
    others = sum(p.data.nbytes for n, p in model.named_parameters() if p.ndim != 2)
    assert packed_bytes(packed) - others < 0.3 * matrices


def test_a_packed_model_refuses_to_train():
    packed = pack_for_inference(_tiny_gpt())
    with pytest.raises(ValueError, match="quantize must be one of"):
        PackedWeight.from_rows(np.zeros((2, 2)), "int4")
    assert packed.h[0].mlp.c_fc.weight is None
    assert all(p.ndim == 1 for p in packed.parameters())          # only norms and biases left


def test_packed_llama_with_gqa_matches_unpacked():
    cfg = LlamaConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      n_inner=64)
    model, packed = Llama(cfg, seed=2), pack_for_inference(Llama(cfg, seed=2))
    prompt = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(generate(packed, prompt, 12), generate(model, prompt, 12))


def test_kept_quantized_smollm2_decodes_like_transformers(shared):
    from tinygpt.hub.llama import load_gguf
    path = shared / "fixtures" / "smollm2-135m-instruct" / "model.gguf"
    expected = np.load(path.parent / "expected.npz")
    model = load_gguf(path, keep_quantized=True)
    assert packed_bytes(model) < 120e6                   # 98 MB file, not 540 MB of float32
    with no_grad():
        logits = model(expected["prompt0_ids"][None]).data[0]
    np.testing.assert_allclose(logits, expected["prompt0_logits"], rtol=1e-4, atol=1e-4)
    out = generate(model, expected["prompt0_ids"][None], 20)
    np.testing.assert_array_equal(out[0, -20:], expected["prompt0_greedy20"])


def test_packed_generation_runs_on_the_numpy_twins_without_numba():
    """TINYGPT_NUMBA=0 picks every decode twin, and a packed model still generates its tokens."""
    import os
    import subprocess
    import sys
    code = ("import numpy as np; from tinygpt import GPT, GPTConfig, generate, "
            "pack_for_inference; from tinygpt.kernels import decode as dk; "
            "assert dk.matvec_i8 is dk.matvec_i8_ref and dk.attend_one is dk.attend_one_ref; "
            "cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32); "
            "p = np.array([[1, 2, 3]]); a = generate(GPT(cfg, seed=1), p, 10); "
            "b = generate(pack_for_inference(GPT(cfg, seed=1)), p, 10); "
            "assert (a == b).all(), (a, b)")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TINYGPT_NUMBA": "0"},
                   check=True)


@given(M=dims, O=st.integers(1, 40), blocks=st.integers(1, 4), seed=st.integers(0, 999))
def test_int8_activation_kernels_agree_with_twins_and_definition(M, O, blocks, seed):
    """Q8_0 activations: the twins agree bit for bit on the quantization, and the int8 x int8 and
    4-bit x int8 products equal the float64 product of the rounded activations and the weights."""
    rng = _rng(seed)
    I = 32 * blocks
    x = (rng.standard_normal((M, I)) * rng.choice([1e-3, 1, 50], (M, I))).astype(np.float32)
    x[0, :32] = 0.0                                              # an all-zero block: scale 0
    quantized = dk.quantize_q8_0_numba(x)
    for mine, twin in zip(quantized, dk.quantize_q8_0_ref(x)):
        assert mine.dtype == twin.dtype
        np.testing.assert_array_equal(mine, twin)
    xq, xs, xsum = quantized
    rounded = (xq.astype(np.float64).reshape(M, blocks, 32) * xs[:, :, None]).reshape(M, I)
    assert np.abs(rounded - x).max() <= np.abs(x).max() / 254 * 1.0001     # half a step at most
    np.testing.assert_array_equal(xsum, xq.reshape(M, blocks, 32).sum(axis=-1))
    w = rng.standard_normal((O, I)).astype(np.float32)
    for group in (None, 32):
        q, scale = dk.quantize_int8(w, group)
        want = rounded @ dk.dequantize_i8_ref(q, scale).astype(np.float64).T
        for kernel in (dk.matvec_i8_q8_numba, dk.matvec_i8_q8_ref):
            np.testing.assert_allclose(kernel(q, scale, xq, xs), want, rtol=1e-4, atol=1e-3)
    codes = rng.integers(0, 256, (O, I // 2), dtype=np.uint8)
    d, mn = (rng.standard_normal((O, blocks)).astype(np.float32) for _ in range(2))
    want = rounded @ dk.dequantize_q4_ref(codes, d, mn).astype(np.float64).T
    for kernel in (dk.matvec_q4_q8_numba, dk.matvec_q4_q8_ref):
        np.testing.assert_allclose(kernel(codes, d, mn, xq, xs, xsum), want, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(dk.dequantize_q4_numba(codes, d, mn), dk.dequantize_q4_ref(codes, d, mn),
                               rtol=TWIN32_RTOL, atol=TWIN32_ATOL)
    np.testing.assert_array_equal(dk.dequantize_i8_numba(q, scale), dk.dequantize_i8_ref(q, scale))


def test_float32_products_agree_for_every_number_of_rows():
    """PackedWeight.matmul picks the row kernel, W @ x^T on BLAS or x @ W^T on BLAS by the number
    of rows; each is x @ W^T to float32 rounding, on either side of both switches."""
    from tinygpt.inference.pack import BLAS_MIN_ROWS, BLAS_TALL_ROWS, PackedWeight
    rng = _rng(5)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    packed = PackedWeight.from_rows(w)
    for M in (1, BLAS_MIN_ROWS - 1, BLAS_MIN_ROWS, BLAS_TALL_ROWS - 1, BLAS_TALL_ROWS):
        x = rng.standard_normal((M, 40)).astype(np.float32)
        y = packed.matmul(x)
        assert y.shape == (M, 48) and y.dtype == np.float32 and y.flags.c_contiguous
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64),
                                   rtol=1e-5, atol=1e-5)


def test_int8_activations_agree_between_one_row_and_many():
    """A packed weight with int8 activations gives (to float32 rounding) the same product for a
    row decoded alone (int8 x int8 kernel) as inside a prompt (the rounded row, float kernel)."""
    from tinygpt.inference.pack import DEQUANTIZE_MIN_ROWS, set_activations
    model = set_activations(pack_for_inference(_tiny_gpt(), "int8"), "int8")
    rng = _rng(3)
    for packed in (model.h[0].attn.c_attn.packed, model.h[1].mlp.c_proj.packed):
        assert packed.activations == "int8"
        x = rng.standard_normal((DEQUANTIZE_MIN_ROWS + 1, packed.shape[1])).astype(np.float32)
        alone = np.concatenate([packed.matmul(row[None]) for row in x])
        np.testing.assert_allclose(packed.matmul(x), alone, rtol=1e-5, atol=1e-5)
        assert not np.allclose(alone, x @ packed.dense().T, rtol=1e-7, atol=1e-7)  # x was rounded
    with pytest.raises(ValueError, match="activations must be one of"):
        set_activations(model, "int4")


@given(B=st.integers(1, 2), KV=st.integers(1, 3), group=st.integers(1, 3), pos=st.integers(0, 5),
       rotate=st.booleans(), seed=st.integers(0, 999))
def test_rope_append_twins_agree_bit_for_bit(B, KV, group, pos, rotate, seed):
    from tinygpt.autograd.fused import _rotate, rope_tables
    rng = _rng(seed)
    NH, HS = KV * group, 8
    qkv = rng.standard_normal((B, (NH + 2 * KV) * HS)).astype(np.float32)
    cos, sin = rope_tables(HS, 6)
    caches = [[np.zeros((B, KV, 6, HS), np.float32) for _ in range(2)] for _ in range(2)]
    q = [kernel(qkv, NH, KV, cos, sin, pos, *cache, rotate) for kernel, cache in
         zip((dk.rope_append_numba, dk.rope_append_ref), caches)]
    np.testing.assert_array_equal(q[0], q[1])
    np.testing.assert_array_equal(caches[0][0], caches[1][0])
    np.testing.assert_array_equal(caches[0][1], caches[1][1])
    want_q = qkv[:, :NH * HS].reshape(B, NH, 1, HS)
    if rotate:                                         # the layer's own rotation, to the bit
        want_q = _rotate(want_q, cos[pos:pos + 1], sin[pos:pos + 1])
    np.testing.assert_array_equal(q[0], want_q[:, :, 0])
    np.testing.assert_array_equal(caches[0][1][:, :, pos].reshape(B, -1), qkv[:, (NH + KV) * HS:])


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_1", "Q4_0"])
def test_gguf_blocks_kept_quantized_decode_to_the_files_weights(ggml_type):
    """PackedWeight.from_gguf keeps Q8_0 as int8 rows and Q4_1 and Q4_0 as 4-bit codes with a
    scale and offset per 32 (Q4_0's d (code - 8) as offset -8 d): the packed weights are exactly
    what formats.gguf.dequantize reads from the same bytes, and their products agree with it."""
    from tinygpt.formats.gguf import GGUFTensor, dequantize
    from tinygpt.inference.pack import PackedWeight
    rng = _rng(7)
    O, I = 5, 96
    scales = {"Q8_0": 1, "Q4_1": 2, "Q4_0": 1}[ggml_type]            # f16 values per block
    codes = {"Q8_0": 32, "Q4_1": 16, "Q4_0": 16}[ggml_type]          # bytes of codes per block
    heads = (rng.standard_normal((O * I // 32, scales)) * 0.05).astype(np.float16).view(np.uint8)
    body = rng.integers(0, 256, (O * I // 32, codes), dtype=np.uint8)
    data = np.concatenate([heads.reshape(O * I // 32, -1), body], axis=1).reshape(-1)
    tensor = GGUFTensor("w", ggml_type, (O, I), 0, data)
    packed = PackedWeight.from_gguf(tensor)
    assert packed.kind == ("i8" if ggml_type == "Q8_0" else "q4") and packed.shape == (O, I)
    np.testing.assert_array_equal(packed.dense(), dequantize(tensor))
    x = rng.standard_normal((3, I)).astype(np.float32)
    for rows in (x[:1], x):
        np.testing.assert_allclose(packed.matmul(rows), rows @ dequantize(tensor).T,
                                   rtol=1e-5, atol=1e-5)
