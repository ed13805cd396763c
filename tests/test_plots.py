"""Pictures (tinygpt/apps/plots.py, checkpoint.py's run curves, the attention/tokenize/plot-lr commands):
each PNG is written, decodes, has its size and is not blank; the attention weights drawn are the
ones the forward pass used, checked against q and k by hand for GPT-2 and Llama; the tokenize
command's ids and byte spans."""
import importlib.util
import math
import sys

import numpy as np
import pytest

import tinygpt.training.checkpoint
import tinygpt.apps.plots
from tinygpt import no_grad
from tinygpt.commands import cli
from tinygpt.training.checkpoint import plot_losses, write_log
from tinygpt.commands import plots as commands
from tinygpt.apps.plots import attention_maps, confusion_matrix, record_attention, token_spans
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer
from tinygpt.training.train import TrainConfig
from tests.test_llama import tiny_llama
from tests.test_model import tiny_model

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the plot extra) not installed")
EXACT = dict(rtol=1e-12, atol=1e-14)       # float64: the same arithmetic in another order


def read_png(path, shape: tuple[int, int]) -> np.ndarray:
    """Decode `path`, check its (height, width) and that it is not one flat colour."""
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[:2] == shape
    assert img[..., :3].var() > 1e-3, "the picture is blank"
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())   # atomic: no leftovers
    return img


# --- attention weights are the forward's -------------------------------------------------------

def _softmax_causal(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(HS)) with keys after the query masked.  (NH, T, HS) -> (NH, T, T)"""
    T, HS = q.shape[-2:]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(HS)
    s[:, np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _heads(x: np.ndarray, n: int) -> np.ndarray:
    """(T, n * HS) -> (n, T, HS)"""
    return x.reshape(x.shape[0], n, -1).transpose(1, 0, 2)


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate (n, T, HS) by position, pairs (i, i + HS/2), written out from the RoPE paper."""
    T, HS = x.shape[-2:]
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, HS, 2) / HS)[None, :]   # (T, HS/2)
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :HS // 2], x[..., HS // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_gpt2_attention_maps_equal_softmax_of_q_and_k():
    model = tiny_model(np.float64, noise=0.5)
    ids = [3, 1, 4, 1, 5, 9, 2]
    maps = attention_maps(model, ids)                                    # (L, NH, T, T)
    NH, C = model.config.n_head, model.config.n_embd
    assert maps.shape == (model.config.n_layer, NH, len(ids), len(ids))
    with no_grad():
        x = model.embed(np.array([ids]), 0)
        for layer, block in enumerate(model.blocks()):
            qkv = block.attn.c_attn(block.ln_1(x)).data[0]               # (T, 3C)
            q, k = _heads(qkv[:, :C], NH), _heads(qkv[:, C:2 * C], NH)
            np.testing.assert_allclose(maps[layer], _softmax_causal(q, k), **EXACT)
            x = block(x)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, **EXACT)


def test_llama_attention_maps_equal_softmax_of_rotated_q_and_k():
    model = tiny_llama(np.float64, noise=0.5)                # 4 query heads share 2 kv heads
    cfg = model.config
    ids = [2, 7, 1, 8, 2, 8]
    maps = attention_maps(model, ids)
    with no_grad():
        x = model.embed(np.array([ids]), 0)
        for layer, block in enumerate(model.blocks()):
            h = block.input_layernorm(x)
            attn = block.self_attn
            q = _rope(_heads(attn.q_proj(h).data[0], cfg.n_head), cfg.rope_theta)
            k = _rope(_heads(attn.k_proj(h).data[0], cfg.n_kv_head), cfg.rope_theta)
            k = np.repeat(k, cfg.n_head // cfg.n_kv_head, axis=0)   # query head h reads h // 2
            np.testing.assert_allclose(maps[layer], _softmax_causal(q, k), rtol=1e-10,
                                       atol=1e-12)            # RoPE tables: cos/sin rounding
            x = block(x)


def test_recording_is_the_kernels_own_array_and_stops_after_the_block():
    model = tiny_model(np.float64)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    with record_attention(model) as maps:
        model(idx)                                       # training mode: a graph, grads possible
    assert [m.shape for m in maps] == [(2, 2, 3, 3)] * model.config.n_layer
    assert all(block.attn.record is None for block in model.blocks())
    model(idx)
    assert len(maps) == model.config.n_layer             # nothing recorded after the block
    cached = tiny_model(np.float32)             # a one-token decode step records, through the
    cache = cached.new_cache(1)                 # general kernel instead of the in-place one
    with no_grad(), record_attention(cached) as maps:
        cached(np.array([[1, 2]]), cache=cache)
        cached(np.array([[3]]), cache=cache)
    assert [m.shape for m in maps] == [(1, 2, 2, 2)] * 2 + [(1, 2, 1, 3)] * 2
    np.testing.assert_allclose(maps[-1].sum(axis=-1), 1.0, rtol=1e-6)


# --- pictures ------------------------------------------------------------------------------------

@needs_mpl
def test_attention_command_on_the_gpt2_fixture(shared, tmp_path, capsys):
    out = tmp_path / "attn.png"
    assert cli.main(["attention", "--model", str(shared / "fixtures/gpt2-tiny-hf"),
                          "--prompt", "Every effort moves you", "--all-layers",
                          "--out", str(out)]) == 0
    # 2 layers x 4 heads, 4 tokens: panels of 1.44 in, figure (4 * 1.44 + 0.8) x (2 * 1.44 + 0.8)
    read_png(out, (368, 656))
    assert "2 layers x 4 heads over 4 tokens" in capsys.readouterr().out
    assert cli.main(["attention", "--model", str(shared / "fixtures/gpt2-tiny-hf"),
                          "--prompt", "hi", "--layer", "5", "--out", str(out)]) == 2
    assert "layer 5 is not in this model's 0..1" in capsys.readouterr().err


@needs_mpl
def test_attention_of_one_llama_layer_wraps_its_heads(tmp_path):
    from tinygpt.apps.plots import plot_attention
    model = tiny_llama(np.float32, noise=0.5)
    tok = CharTokenizer("abcdefghijklm")                          # 13 ids, the tiny vocab
    maps = plot_attention(model, tok, "abcab", tmp_path / "a.png", layers=[-1])
    assert maps.shape == (1, 4, 5, 5)
    # 4 heads in a 2 x 2 grid, panels of max(1.4, 0.16 * 5 + 0.8) = 1.6 in: (2 * 1.6 + 0.8) square
    read_png(tmp_path / "a.png", (400, 400))


def test_tokenize_prints_ids_and_byte_spans(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli.main(["tokenize", "Hello, I am"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out                            # captured stdout is not a terminal
    lines = out.splitlines()
    assert lines[0] == "Hello|,|·I|·am"
    rows = [line.split() for line in lines[2:6]]
    # GPT-2 BPE: "Hello, I am" -> [15496, 11, 314, 716] (STYLE.md's fixed value)
    assert [int(r[1]) for r in rows] == [15496, 11, 314, 716]
    assert [" ".join(r[2:4]) for r in rows] == ["[0, 5)", "[5, 6)", "[6, 8)", "[8, 11)"]
    assert lines[6] == "4 tokens, 11 bytes, 11 characters (gpt2)"


def test_byte_spans_cover_the_utf8_text_even_inside_characters():
    text = "naïve — ok 🙂"
    for tok in (GPT2Tokenizer(), CharTokenizer.from_text(text)):
        spans = token_spans(tok, text)
        assert b"".join(s.bytes for s in spans) == text.encode("utf-8")
        assert [s.start for s in spans[1:]] == [s.end for s in spans[:-1]]
        assert spans[-1].end == len(text.encode("utf-8"))
    assert [s.end - s.start for s in token_spans(CharTokenizer.from_text("aé"), "aé")] == [1, 2]


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Terminal:
        def isatty(self):
            return True
    spans = token_spans(GPT2Tokenizer(), "Hello, I am")
    coloured = commands.format_tokens(spans, colour=True)
    assert coloured[0].count("\x1b[0m") == 4 and "|" not in coloured[0]
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert commands.use_colour(Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not commands.use_colour(Terminal())


def test_tokenize_with_a_model_file_and_errors(shared, capsys):
    gguf = shared / "fixtures/smollm2-135m-instruct/model.gguf"
    if not gguf.is_file():
        pytest.skip("SmolLM2 fixture missing")
    assert cli.main(["tokenize", "Hello world", "--tokenizer", str(gguf)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "Hello|·world"
    assert cli.main(["tokenize", "x", "--tokenizer", "no-such-thing"]) == 2
    assert "not gpt2, char, or an existing file" in capsys.readouterr().err


@needs_mpl
def test_tokenize_png(tmp_path):
    out = tmp_path / "tokens.png"
    assert cli.main(["tokenize", "Hello, I am", "--png", str(out)]) == 0
    read_png(out, (117, 300))          # one line of 17 cells: the 3 in minimum width, 1.17 in tall


@needs_mpl
def test_plot_lr_from_flags_and_from_a_config(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert cli.main(["plot-lr", "--lr", "6e-4", "--warmup", "20", "--min-lr", "6e-5",
                          "--max-steps", "200", "--out", str(out)]) == 0
    read_png(out, (350, 600))
    config = tmp_path / "train.json"
    config.write_text('{"lr": 1e-3, "warmup": 5, "max_steps": 50, "min_lr": 0.0}')
    assert cli.main(["plot-lr", "--config", str(config), "--out", str(out)]) == 0
    assert "lr 0.001, warmup 5 steps, cosine to 0 at step 50" in capsys.readouterr().out
    config.write_text('{"lr": 1e-3, "learning_rate": 2}')
    assert cli.main(["plot-lr", "--config", str(config), "--out", str(out)]) == 2
    assert "not TrainConfig fields: learning_rate" in capsys.readouterr().err
    assert cli.main(["plot-lr", "--lr", "1e-3", "--out", str(out)]) == 2


def _rows(n: int, **extra_columns) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"step": 10 * i, "epoch": 1, "tokens_seen": 640 * i, "lr": 1e-3,
               "train_loss": 3.0 / (i + 1), "val_loss": 3.2 / (i + 1), "train_ppl": 1.0,
               "val_ppl": 1.0}
        row.update({k: f(i) for k, f in extra_columns.items()})
        rows.append(row)
    return rows


@needs_mpl
def test_write_log_draws_the_schedule_beside_the_losses(tmp_path):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=3, max_steps=40)
    write_log(_rows(3), tmp_path, lambda s: cfg.lr_at(s, 40), 40)
    read_png(tmp_path / "loss.png", (350, 600))
    read_png(tmp_path / "lr.png", (350, 600))
    (tmp_path / "lr.png").unlink()
    write_log(_rows(3), tmp_path)                        # no schedule given: no lr.png
    assert not (tmp_path / "lr.png").exists()


@needs_mpl
def test_training_writes_lr_png(tmp_path):
    from tinygpt.training.train import train
    model = tiny_model(np.float32)
    rng = np.random.default_rng(0)
    batches = [(x, np.roll(x, -1, axis=1)) for x in rng.integers(0, 11, (4, 2, 8))]
    train(model, batches, batches[:1], TrainConfig(context_length=8, batch_size=2, max_steps=4,
                                                   warmup=2, eval_freq=2, eval_iter=1,
                                                   sample_tokens=0, out_dir=str(tmp_path)),
          progress=False)
    read_png(tmp_path / "lr.png", (350, 600))


@needs_mpl
def test_classifier_and_dpo_logs_get_a_second_panel(tmp_path):
    acc = _rows(4, train_accuracy=lambda i: 0.5 + 0.1 * i, val_accuracy=lambda i: 0.5 + 0.09 * i,
                test_loss=lambda i: 3.1 / (i + 1), test_accuracy=lambda i: 0.5 + 0.08 * i)
    assert plot_losses(acc, tmp_path / "acc.png")
    read_png(tmp_path / "acc.png", (350, 1200))
    dpo = _rows(4, train_reward_margin=lambda i: 0.2 * i, val_reward_margin=lambda i: 0.1 * i)
    assert plot_losses(dpo, tmp_path / "dpo.png")
    read_png(tmp_path / "dpo.png", (350, 1200))
    nan = _rows(2, val_accuracy=lambda i: math.nan)      # a metric never measured: no panel
    assert plot_losses(nan, tmp_path / "nan.png")
    read_png(tmp_path / "nan.png", (350, 600))


@needs_mpl
def test_confusion_matrix(tmp_path):
    from tinygpt.apps.plots import plot_confusion
    labels, predictions = [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]
    assert confusion_matrix(labels, predictions, 2).tolist() == [[1, 1], [1, 2]]
    plot_confusion(labels, predictions, ["ham", "spam"], tmp_path / "cm.png")
    read_png(tmp_path / "cm.png", (260, 320))            # (1.2 + 0.7 * 2 + 0.6) x 2.6 in
    with pytest.raises(ValueError, match="outside the 2 classes"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_without_matplotlib_run_curves_are_skipped_silently(tmp_path, monkeypatch):
    monkeypatch.setattr(tinygpt.training.checkpoint, "pyplot", lambda: None)
    write_log(_rows(2), tmp_path, lambda s: 1e-3, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
    monkeypatch.setattr(tinygpt.apps.plots, "pyplot", lambda: None)
    with pytest.raises(ImportError, match=r"pip install 'tinygpt\[plot\]'"):
        tinygpt.apps.plots.lr_schedule_figure(TrainConfig(max_steps=10))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot-lr", "--lr", "1e-3", "--max-steps", "9",
                          "--out", str(tmp_path / "x.png")]) == 2
