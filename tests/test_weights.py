"""GPT-2 checkpoints: parity with Hugging Face on the tiny fixture, both name layouts, clear errors,
and export round trips.

Reference values come from ../shared/fixtures/gpt2-tiny-hf/expected.npz, computed by Hugging Face
transformers 5.24 in float64 (see that folder's README).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tinygpt.autograd.tensor import no_grad
from tinygpt.inference.generate import generate, next_token_logits
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.formats.safetensors import load_safetensors, save_safetensors
from tinygpt.hub.gpt2 import config_from_hf, load_gpt2
from tinygpt.hub.pretrained import save_pretrained

# float32 model vs HF float64 (fixture README: HF's own float32-vs-float64 gap is under 3e-6)
PARITY_RTOL, PARITY_ATOL = 1e-4, 1e-4
LOSS_ATOL = 1e-5
REAL_GPT2 = Path(__file__).resolve().parents[1] / "weights" / "gpt2"


@pytest.fixture
def fixture_dir(shared) -> Path:
    return shared / "fixtures" / "gpt2-tiny-hf"


@pytest.fixture
def expected(fixture_dir) -> dict:
    return dict(np.load(fixture_dir / "expected.npz"))


@pytest.fixture
def model(fixture_dir) -> GPT:
    return load_gpt2(fixture_dir)


def _copy_fixture(fixture_dir: Path, dest: Path, tensors: dict) -> Path:
    """A checkpoint dir with the fixture's config.json and `tensors` as model.safetensors."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text((fixture_dir / "config.json").read_text())
    save_safetensors(tensors, dest / "model.safetensors")
    return dest


def _hub_tensors(fixture_dir: Path) -> dict:
    return dict(load_safetensors(fixture_dir / "model.safetensors"))


def _assert_close(got: np.ndarray, exp: np.ndarray) -> None:
    np.testing.assert_allclose(got, exp, rtol=PARITY_RTOL, atol=PARITY_ATOL)


# --- parity with Hugging Face -------------------------------------------------------------------

def test_config_from_fixture(model):
    cfg = model.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == \
        (50257, 128, 2, 4, 64)
    assert cfg.qkv_bias and cfg.tie_weights and cfg.dropout == 0.0 and cfg.n_inner is None
    assert not model.training


def test_config_n_ctx_fallback_and_bad_activation():
    hf = {"vocab_size": 10, "n_ctx": 8, "n_layer": 1, "n_head": 2, "n_embd": 4, "n_inner": 12}
    cfg = config_from_hf(hf)
    assert cfg.block_size == 8 and cfg.mlp_width == 12
    with pytest.raises(ValueError, match="activation_function 'gelu'"):
        config_from_hf({**hf, "activation_function": "gelu"})
    with pytest.raises(ValueError, match="missing n_head"):
        config_from_hf({k: v for k, v in hf.items() if k != "n_head"})


def test_logits_hidden_loss_match_hf(model, expected):
    idx = expected["input_ids"]
    with no_grad():
        logits = model(idx).data                                     # (2, 16, V)
        hidden = model.hidden(idx).data                              # (2, 16, C)
        _, loss = model(idx[:, :-1], idx[:, 1:])                     # 2 x 15 targets
    _assert_close(logits, expected["logits"])
    _assert_close(hidden, expected["hidden_final"])
    assert abs(float(loss.data) - float(expected["loss"])) < LOSS_ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_hf(model, expected, use_cache):
    prompt, new = expected["gen_prompt"], expected["gen_new_tokens"]
    out = generate(model, prompt[None, :], len(new), use_cache=use_cache)
    np.testing.assert_array_equal(out[0, len(prompt):], new)


@pytest.mark.parametrize("use_cache", [True, False])
def test_every_step_top5_and_logsumexp_match_hf(model, expected, use_cache):
    """Per step, so a KV-cache bug shows even where the argmax happens to agree."""
    seq = expected["gen_prompt"][None, :].astype(np.int64)
    cache = model.new_cache(1) if use_cache else None
    for step, token in enumerate(expected["gen_new_tokens"]):
        logits, cache = next_token_logits(model, seq, cache)
        row = logits[0].astype(np.float64)                           # (V,)
        top5 = np.argsort(-row, kind="stable")[:5]
        np.testing.assert_array_equal(top5, expected["gen_step_top5_ids"][step])
        _assert_close(row[top5], expected["gen_step_top5_vals"][step])
        lse = row.max() + np.log(np.exp(row - row.max()).sum())
        _assert_close(lse, expected["gen_step_logsumexp"][step])
        seq = np.concatenate([seq, [[token]]], axis=1)


# --- layouts and errors -------------------------------------------------------------------------

def test_transformers_prefixed_layout_loads_identically(model, fixture_dir, tmp_path, expected):
    """What transformers' save_pretrained writes: `transformer.` names, no masks, lm_head = wte."""
    hub = _hub_tensors(fixture_dir)
    prefixed = {f"transformer.{k}": v for k, v in hub.items() if not k.endswith(".attn.bias")}
    prefixed["lm_head.weight"] = hub["wte.weight"]
    other = load_gpt2(_copy_fixture(fixture_dir, tmp_path / "prefixed", prefixed))
    for (name, p), (name2, q) in zip(model.named_parameters(), other.named_parameters()):
        assert name == name2
        np.testing.assert_array_equal(p.data, q.data)
    with no_grad():
        np.testing.assert_array_equal(other(expected["input_ids"]).data,
                                      model(expected["input_ids"]).data)


def test_tied_lm_head_must_equal_wte(fixture_dir, tmp_path):
    hub = _hub_tensors(fixture_dir)
    hub["lm_head.weight"] = hub["wte.weight"] + np.float32(1e-3)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_gpt2(_copy_fixture(fixture_dir, tmp_path / "ckpt", hub))


def test_missing_unexpected_misshaped_in_one_error(fixture_dir, tmp_path):
    hub = _hub_tensors(fixture_dir)
    del hub["h.1.mlp.c_fc.bias"]
    hub["h.0.attn.c_proj.weight"] = np.zeros((64, 65), np.float32)
    hub["h.7.ln_1.weight"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError) as err:
        load_gpt2(_copy_fixture(fixture_dir, tmp_path / "ckpt", hub))
    msg = str(err.value)
    assert "missing: h.1.mlp.c_fc.bias (256,)" in msg
    assert "unexpected: h.7.ln_1.weight (64,)" in msg
    assert "wrong shape: h.0.attn.c_proj.weight: expected (64, 64), got (64, 65)" in msg


def test_missing_directory_names_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tinygpt download gpt2"):
        load_gpt2("gpt2", dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_gpt2(tmp_path / "no-such-dir")


# --- export ---------------------------------------------------------------------------------------

def _logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(idx).data


def test_export_hub_layout_round_trip(model, fixture_dir, tmp_path, expected):
    out = save_pretrained(model, tmp_path / "export")
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    assert hf["activation_function"] == "gelu_new" and hf["tie_word_embeddings"] is True
    assert (hf["n_positions"], hf["n_ctx"], hf["n_inner"]) == (128, 128, None)
    written = load_safetensors(out / "model.safetensors")
    hub = _hub_tensors(fixture_dir)
    assert set(written) == {k for k in hub if not k.endswith(".attn.bias")}
    for name, arr in written.items():
        np.testing.assert_array_equal(arr, hub[name])                # Conv1D [in, out], untouched
    reloaded = load_gpt2(out)
    np.testing.assert_array_equal(_logits(reloaded, expected["input_ids"]),
                                  _logits(model, expected["input_ids"]))


def test_export_untied_no_qkv_bias_round_trip(tmp_path):
    """The book's model: own head, no qkv bias. HF gets lm_head [V, C] and zero c_attn biases."""
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=8, n_inner=24)
    model = GPT(cfg, seed=3).eval()
    out = save_pretrained(model, tmp_path / "untied")
    hf = json.loads((out / "config.json").read_text())
    assert hf["tie_word_embeddings"] is False and hf["n_inner"] == 24 and "eos_token_id" not in hf
    written = load_safetensors(out / "model.safetensors")
    np.testing.assert_array_equal(written["lm_head.weight"], model.lm_head.weight.data.T)
    np.testing.assert_array_equal(written["h.0.attn.c_attn.bias"], np.zeros(24, np.float32))
    reloaded = load_gpt2(out)
    assert reloaded.lm_head is not None and reloaded.config.mlp_width == 24
    idx = np.random.default_rng(0).integers(0, 97, (2, 16))
    np.testing.assert_array_equal(_logits(reloaded, idx), _logits(model, idx))


def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path):
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1, n_embd=4))
    out = save_pretrained(model, tmp_path / "untied")
    tensors = dict(load_safetensors(out / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_safetensors(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: lm_head.weight \(11, 4\)"):
        load_gpt2(out)


def test_transformers_reads_our_export(model, tmp_path, expected):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    out = save_pretrained(model, tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        logits = hf(torch.from_numpy(expected["input_ids"])).logits.numpy()
    _assert_close(logits, expected["logits"])


# --- the real thing, when present -----------------------------------------------------------------

@pytest.mark.skipif(not (REAL_GPT2 / "model.safetensors").is_file(),
                    reason="weights/gpt2/model.safetensors not downloaded (tinygpt download gpt2)")
def test_real_gpt2_every_effort_moves_you():
    from tinygpt.text.tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer()
    model = load_gpt2(REAL_GPT2)
    out = generate(model, np.array([tok.encode("Every effort moves you")]), 25)
    # greedy continuation of OpenAI's 124M model (the book, chapter 5; Hugging Face agrees)
    assert tok.decode(out[0, 4:]).startswith(
        " forward.\n\nThe first step is to understand the importance of your work")


# --- trained models with their tokenizer ----------------------------------------------------------

def test_save_and_load_pretrained_with_a_char_tokenizer(tmp_path):
    from tinygpt.text.tokenizer import CharTokenizer
    from tinygpt.hub.pretrained import load_pretrained
    tok = CharTokenizer.from_text("hello world")
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=8, n_layer=1, n_head=2, n_embd=8))
    model.requires_grad_(False)                        # frozen parameters are saved all the same
    save_pretrained(model, tmp_path / "run", tokenizer=tok)
    loaded, loaded_tok = load_pretrained(tmp_path / "run")
    assert isinstance(loaded_tok, CharTokenizer) and loaded_tok.chars == tok.chars
    idx = np.array([tok.encode("hello")])
    np.testing.assert_array_equal(_logits(loaded, idx), _logits(model.eval(), idx))


def test_hub_directory_without_tokenizer_file_gets_gpt2s(fixture_dir):
    from tinygpt.text.tokenizer import GPT2Tokenizer
    from tinygpt.hub.pretrained import load_pretrained
    _, tok = load_pretrained(fixture_dir)
    assert isinstance(tok, GPT2Tokenizer)


def test_config_from_json_reads_both_formats(fixture_dir, tmp_path):
    from tinygpt.hub.gpt2 import config_from_json
    hf = config_from_json(fixture_dir / "config.json")
    assert (hf.n_layer, hf.n_embd, hf.block_size, hf.tie_weights) == (2, 64, 128, True)
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"n_layer": 3, "n_head": 2, "n_embd": 8, "block_size": 32}))
    assert config_from_json(ours) == GPTConfig(n_layer=3, n_head=2, n_embd=8, block_size=32)
    ours.write_text(json.dumps({"n_layers": 3}))
    with pytest.raises(ValueError, match=r"ours.json: unknown GPTConfig field\(s\) n_layers"):
        config_from_json(ours)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        config_from_json(tmp_path / "nope.json")
