"""The Llama family: gradient checks, causality, the KV cache, and parity with transformers on the
fixture's tiny hub-layout Llama and on the real SmolLM2-135M GGUF."""
import numpy as np
import pytest

from tinygpt import no_grad
from tinygpt.inference.generate import generate
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.hub.llama import _unpermute, load_gguf, load_llama, load_llama_hf, save_hub
from tests.conftest import MODEL32_ATOL, MODEL32_RTOL
from tests.test_nn import gradcheck_parameters, to_float64

TINY = dict(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=8, n_inner=12,
            rope_theta=100.0)


def tiny_llama(dtype=np.float64, seed: int = 0, noise: float = 0.0, **overrides) -> Llama:
    model = Llama(LlamaConfig(**{**TINY, **overrides}), seed=seed)
    if noise:
        to_float64(model, np.random.default_rng(seed + 1), noise)
    return model.astype(dtype)


@pytest.fixture(scope="module")
def smollm(request):
    from tests.conftest import SHARED
    path = SHARED / "fixtures" / "smollm2-135m-instruct" / "model.gguf"
    if not path.is_file():
        pytest.skip(f"SmolLM2 fixture not found at {path}")
    return load_gguf(path), np.load(path.parent / "expected.npz")


def _fixture(shared, *parts):
    return shared.joinpath("fixtures", "smollm2-135m-instruct", *parts)


# --- architecture ---------------------------------------------------------------------------------

def test_smollm2_parameter_count_and_names():
    model = Llama(LlamaConfig.preset("smollm2-135m"), init=False)
    assert model.num_parameters() == 134_515_008          # the fixture README's count
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.self_attn.q_proj.weight"]
    assert "lm_head.weight" not in names                  # tied to embed_tokens
    assert dict(model.named_parameters())["model.layers.0.self_attn.k_proj.weight"].shape == \
        (576, 3 * 64)                                      # 3 key/value heads of 64


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_head=4), dict(n_kv_head=1, tie_weights=False)])
def test_whole_tiny_llama_gradcheck(overrides):
    model = tiny_llama(np.float64, seed=3, noise=0.3, **overrides)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    assert gradcheck_parameters(model, lambda: model(idx))
    assert gradcheck_parameters(model, lambda: model(idx, targets)[1], seed=1)


def test_llama_is_causal_and_float32_matches_float64():
    m64 = tiny_llama(np.float64, seed=1, noise=0.3)
    m32 = tiny_llama(np.float64, seed=1, noise=0.3).astype(np.float32)
    idx = np.array([[1, 5, 2, 7, 3, 3]])
    changed = idx.copy()
    changed[0, 4:] = [9, 0]
    a, b = m64(idx).data, m64(changed).data
    np.testing.assert_array_equal(a[:, :4], b[:, :4])      # later tokens never reach earlier ones
    assert not np.allclose(a[:, 4:], b[:, 4:])
    np.testing.assert_allclose(m32(idx).data, a, rtol=MODEL32_RTOL, atol=MODEL32_ATOL)


def test_kv_cache_gives_the_logits_of_the_whole_sequence():
    model = tiny_llama(np.float64, seed=2, noise=0.3)
    idx = np.array([[3, 1, 4, 1, 5, 9, 2]])
    with no_grad():
        whole = model(idx).data
        cache = model.new_cache(1)
        steps = [model(idx[:, :4], cache=cache).data[:, -1]]
        steps += [model(idx[:, t:t + 1], cache=cache).data[:, -1] for t in range(4, 7)]
    np.testing.assert_allclose(np.stack(steps, axis=1), whole[:, 3:], rtol=1e-10, atol=1e-12)
    assert cache.k[0].shape[1] == 2                       # the cache holds the 2 KV heads only


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="n_head 4 is not a multiple of n_kv_head 3"):
        LlamaConfig(**{**TINY, "n_kv_head": 3})
    with pytest.raises(ValueError, match="n_embd must be a positive integer"):
        LlamaConfig(**{**TINY, "n_embd": "8"})
    with pytest.raises(ValueError, match="missing num_attention_heads"):
        LlamaConfig.from_hf({"vocab_size": 3}, "x/config.json")
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        LlamaConfig.from_hf({"rope_scaling": {"rope_type": "yarn"}}, "x/config.json")


def test_unpermute_restores_half_split_pairs():
    """llama.cpp stores q rows as (0, HS/2, 1, HS/2+1, ...) per head: undo gives 0..HS-1."""
    HS, n_head = 8, 2
    hf_rows = np.arange(n_head * HS, dtype=np.float32)[:, None]
    # llama.cpp's permute (convert_hf_to_gguf.py): reshape(n_head, 2, HS/2) then swap the 2 axes
    file_rows = hf_rows.reshape(n_head, 2, HS // 2, 1).swapaxes(1, 2).reshape(-1, 1)
    np.testing.assert_array_equal(_unpermute(file_rows, n_head), hf_rows)


# --- weights: hub layout ------------------------------------------------------------------------

def test_tiny_hub_llama_matches_transformers(shared):
    model = load_llama(_fixture(shared, "llama-tiny-hf"))
    expected = np.load(_fixture(shared, "llama-tiny-hf", "expected.npz"))
    with no_grad():
        logits = model(expected["input_ids"]).data
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def test_save_and_load_hub_layout_round_trip(tmp_path):
    model = tiny_llama(np.float32, seed=4, noise=0.3, tie_weights=False).astype(np.float32)
    save_hub(model, tmp_path / "out")
    again = load_llama_hf(tmp_path / "out")
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(again(idx).data, model(idx).data)
    assert again.config == model.config


def test_hub_layout_errors_name_the_file(tmp_path):
    model = tiny_llama(np.float32).astype(np.float32)
    save_hub(model, tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"hidden_size": 8', '"hidden_size": 16')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not fit.*wrong shape"):
        load_llama_hf(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object"):
        load_llama_hf(tmp_path / "m")


# --- weights: the real SmolLM2-135M from GGUF ---------------------------------------------------

def test_smollm2_gguf_logits_match_transformers(smollm):
    model, expected = smollm
    eps = model.config.rms_norm_eps                        # stored as float32 in the file
    assert eps == pytest.approx(1e-5, rel=1e-6)
    assert model.config == LlamaConfig.preset("smollm2-135m", rms_norm_eps=eps)
    with no_grad():
        logits = model(expected["prompt0_ids"][None]).data[0]
    np.testing.assert_allclose(logits, expected["prompt0_logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_smollm2_greedy_tokens_match_transformers(smollm, use_cache):
    model, expected = smollm
    prompt = expected["prompt0_ids"]
    out = generate(model, prompt[None], 20, use_cache=use_cache)
    np.testing.assert_array_equal(out[0, len(prompt):], expected["prompt0_greedy20"])
