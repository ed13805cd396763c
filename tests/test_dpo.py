"""DPO: the book's data split and collate, sequence log-probs, the loss by hand and at ln 2,
gradients, a few training steps on a tiny model, and the command's one-line errors."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import GRAD_ATOL, GRAD_RTOL
from tests.strategies import arrays
from tinygpt.autograd.tensor import Tensor
from tinygpt.commands import cli
from tinygpt.text.data import DataLoader
from tinygpt.finetune.dpo import (DPOObjective, PreferenceDataset, count_tokens, dpo_loss,
                                  model_logprobs, read_preference_data, sequence_logprobs)
from tinygpt.finetune.instruct import split_instruction_data
from tinygpt.text.templates import format_prompt
from tinygpt.autograd.gradcheck import gradcheck
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer
from tinygpt.training.train import TrainConfig, evaluate, train

LN2 = math.log(2.0)        # the loss when policy = reference: -log sigmoid(0)
EXACT = 1e-6               # float32 forward passes of identical inputs in another batch shape

ENTRIES = [{"instruction": f"Answer question {i}", "input": "x" * (i % 3),
            "chosen": "Thank you, yes." if i % 2 else "Gladly: it is so.",
            "rejected": "No." if i % 2 else "Whatever, go away now."} for i in range(8)]


def char_tokenizer(entries=ENTRIES, template="phi3") -> CharTokenizer:
    text = "".join(format_prompt(e, template) + e["chosen"] + e["rejected"] for e in entries)
    return CharTokenizer.from_text(text)


def tiny_model(tok, seed=0) -> GPT:
    cfg = GPTConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg, seed=seed)


def dataset(tok, model=None, template="phi3", **kw) -> PreferenceDataset:
    ds = PreferenceDataset(ENTRIES, tok, template, **kw)
    if model is not None:
        ds.set_reference(model)
    return ds


# --- data ---------------------------------------------------------------------------------------

def test_book_data_split_and_tokens(shared):
    path = shared / "data" / "instruction-data-with-preference.json"
    train_e, test_e, val_e = split_instruction_data(read_preference_data(path))
    assert (len(train_e), len(test_e), len(val_e)) == (935, 110, 55)     # the book's split
    assert train_e[0]["instruction"].startswith("Evaluate the following phrase")
    tok = GPT2Tokenizer()
    ds = PreferenceDataset(train_e[:3], tok)
    e, item = train_e[0], ds.items[0]
    prompt = format_prompt(e)                    # the book's prompt + "\n\n### Response:\n"
    assert prompt.endswith("\n\n### Response:\n")
    assert item["prompt"] == tok.encode(prompt)
    assert item["chosen"] == tok.encode(prompt + e["chosen"])
    assert item["rejected"] == tok.encode(prompt + e["rejected"])
    b = ds.collate([0, 1, 2])
    T = max(len(it[s]) for it in ds.items for s in ("chosen", "rejected"))
    assert b["chosen"].shape == b["rejected"].shape == (3, T)
    for row, (entry, it) in enumerate(zip(train_e, ds.items)):
        for side in ("chosen", "rejected"):
            n = len(it[side])
            assert (b[side][row, n:] == 50256).all()              # GPT-2's end-of-text pads
            assert not b[f"{side}_mask"][row, n:].any()
            scored = b[side][row][b[f"{side}_mask"][row]].tolist()
            assert tok.decode(scored) == entry[side]                # only the response counts


def test_collate_pads_to_the_longest_and_masks_the_prompt():
    tok = char_tokenizer()
    ds = dataset(tok)
    b = ds.collate([1, 2])
    it = ds.items[1]
    n_prompt = len(format_prompt(ENTRIES[1], "phi3"))               # one char = one token
    assert it["chosen_start"] == n_prompt == len(it["prompt"])
    longest = max(len(ds.items[i][s]) for i in (1, 2) for s in ("chosen", "rejected"))
    assert b["chosen"].shape == (2, longest) and b["chosen"].dtype == np.int64
    mask = b["rejected_mask"][0]
    assert mask.tolist() == ([False] * n_prompt + [True] * len("No.")
                             + [False] * (longest - n_prompt - 3))
    assert (b["rejected"][0, n_prompt + 3:] == 0).all()             # pad id 0 without an eot
    open_mask = dataset(tok, mask_prompt=False).collate([1])["chosen_mask"][0]
    assert open_mask[:len(it["chosen"])].all() and not open_mask[len(it["chosen"]):].any()


def test_allowed_max_length_cuts_and_refuses_an_empty_response():
    tok = char_tokenizer()
    n_prompt = len(format_prompt(ENTRIES[0], "phi3"))
    ds = PreferenceDataset(ENTRIES[:1], tok, "phi3", allowed_max_length=n_prompt + 2)
    assert len(ds.items[0]["chosen"]) == n_prompt + 2
    with pytest.raises(ValueError, match="no tokens within allowed_max_length"):
        PreferenceDataset(ENTRIES[:1], tok, "phi3", allowed_max_length=n_prompt)


def test_batches_need_reference_logprobs():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="set_reference"):
        dataset(tok).batch([0, 1])


# --- log-probs and the loss ----------------------------------------------------------------------

def test_sequence_logprobs_by_hand():
    logits = Tensor(np.array([[[0.0, 1.0, 2.0], [2.0, 0.0, -1.0], [1.0, 1.0, 1.0],
                               [5.0, 0.0, 0.0]]]))                       # (1, 4, 3)
    ids = np.array([[0, 2, 0, 1]])
    mask = np.array([[False, False, True, True]])    # tokens 2 and 3, predicted at 1 and 2
    lp2 = 2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))   # log_softmax([2,0,-1])[0]
    lp3 = -math.log(3.0)                                           # uniform row
    assert sequence_logprobs(logits, ids, mask, "sum").item() == pytest.approx(lp2 + lp3)
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx((lp2 + lp3) / 2)
    # a second row scoring one token: each row is averaged over its own count
    two = Tensor(np.concatenate([logits.data, logits.data]))
    mask2 = np.array([[False, False, True, True], [False, False, False, True]])
    np.testing.assert_allclose(sequence_logprobs(two, np.repeat(ids, 2, 0), mask2).data,
                               [(lp2 + lp3) / 2, lp3])
    with pytest.raises(ValueError, match="no masked tokens"):
        sequence_logprobs(logits, ids, np.array([[True, False, False, False]]))


def test_dpo_loss_by_hand():
    pi_c, pi_r = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])
    ref_c, ref_r = np.array([-1.2, -2.0]), np.array([-1.2, -1.1])
    # (pi_c - pi_r) - (ref_c - ref_r) = [0.5, -0.1]; beta 0.1 -> -log sigmoid([0.05, -0.01])
    # = [log1p(exp(-0.05)), log1p(exp(0.01))] = [0.6684596480, 0.6981596805]
    loss, chosen, rejected = dpo_loss(Tensor(pi_c), Tensor(pi_r), ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(0.6833096642605743, rel=1e-12)
    np.testing.assert_allclose(chosen, [0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(rejected, [-0.3, 0.1], atol=1e-12)
    loss, _, _ = dpo_loss(Tensor(np.array([0.0])), Tensor(np.array([-1e4])), np.zeros(1),
                          np.zeros(1))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)     # log_sigmoid(1000) without overflow


def test_model_logprobs_equal_a_full_forward():
    tok = char_tokenizer()
    model = tiny_model(tok)
    b = dataset(tok).collate([0, 3, 4])
    grads = []
    for logprobs in (lambda: sequence_logprobs(model(b["chosen"]), b["chosen"], b["chosen_mask"]),
                     lambda: model_logprobs(model, b["chosen"], b["chosen_mask"])):
        model.zero_grad()
        lp = logprobs()                         # the second runs the head on scored rows only
        (lp * np.arange(1.0, 1 + lp.shape[0])).sum().backward()
        grads.append((lp.data, [p.grad.copy() for p in model.parameters()]))
    (full, g_full), (cropped, g_cropped) = grads
    np.testing.assert_allclose(cropped, full, rtol=1e-6)
    for a, g in zip(g_full, g_cropped):
        np.testing.assert_allclose(g, a, rtol=1e-4, atol=1e-7)


@given(st.data())
def test_sequence_logprobs_grad(data):
    N, T, V = (data.draw(st.integers(lo, hi)) for lo, hi in ((1, 3), (2, 5), (2, 4)))
    logits = data.draw(arrays((N, T, V)))
    ids = data.draw(arrays((N, T), lo=0, hi=V - 1e-9)).astype(np.int64)
    mask = data.draw(arrays((N, T), lo=0, hi=1)) > 0.5
    mask[np.arange(N), data.draw(st.integers(1, T - 1))] = True   # a token to score per row
    for reduction in ("mean", "sum"):
        assert gradcheck(lambda x: sequence_logprobs(x, ids, mask, reduction), logits,
                         rtol=GRAD_RTOL, atol=GRAD_ATOL)


@given(st.data())
def test_dpo_loss_grad(data):
    B = data.draw(st.integers(1, 4))
    pi_c, pi_r, ref_c, ref_r = (data.draw(arrays((B,), lo=-30, hi=0)) for _ in range(4))
    beta = data.draw(st.floats(0.01, 2.0))
    assert gradcheck(lambda c, r: dpo_loss(c, r, ref_c, ref_r, beta)[0], pi_c, pi_r,
                     rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_whole_model_dpo_grad():
    tok = char_tokenizer()
    model = tiny_model(tok).astype(np.float64)
    ds = dataset(tok, model)
    batch, objective = ds.batch([0, 1]), DPOObjective(beta=0.5)
    w = model.h[0].mlp.c_fc.weight
    objective(model, batch).backward()
    analytic = w.grad.copy()
    rng = np.random.default_rng(0)
    for _ in range(3):                              # central differences at random elements
        i = tuple(rng.integers(0, n) for n in w.shape)
        old = w.data[i]
        w.data[i] = old + 1e-6
        up = objective(model, batch).item()
        w.data[i] = old - 1e-6
        down = objective(model, batch).item()
        w.data[i] = old
        assert analytic[i] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-7)


# --- training -----------------------------------------------------------------------------------

def test_loss_is_ln2_and_rewards_zero_before_the_first_step():
    tok = char_tokenizer()
    model = tiny_model(tok)
    for reduction in ("mean", "sum"):
        objective = DPOObjective(reduction=reduction)
        ds = dataset(tok)
        ds.set_reference(model, reduction, batch_size=3)   # other batches than evaluated below
        scores = evaluate(model, DataLoader(ds, 4), 2, objective, objective.metrics())
        assert scores["loss"] == pytest.approx(LN2, abs=EXACT)
        for name in ("chosen_reward", "rejected_reward", "reward_margin"):
            assert scores[name] == pytest.approx(0.0, abs=10 * EXACT)


def test_loss_falls_and_margin_rises_over_a_few_steps():
    tok = char_tokenizer()
    model = tiny_model(tok, seed=1)
    objective = DPOObjective(beta=0.5)
    ds = dataset(tok, model)
    cfg = TrainConfig(batch_size=4, max_steps=8, lr=1e-2, weight_decay=0.0, eval_freq=8,
                      eval_iter=2, sample_tokens=0)
    loader = DataLoader(ds, 4, shuffle=True, seed=0)
    result = train(model, loader, DataLoader(ds, 4), cfg, loss_fn=objective,
                   metrics=objective.metrics(), count_tokens=count_tokens, progress=False)
    first, last = result.evals[0], result.evals[-1]
    assert first["train_loss"] == pytest.approx(LN2, abs=EXACT)
    assert first["val_reward_margin"] == pytest.approx(0.0, abs=10 * EXACT)
    assert last["val_loss"] < LN2 - 0.05
    assert last["val_reward_margin"] > 0.1
    assert last["val_chosen_reward"] > last["val_rejected_reward"]


def test_reduction_of_reference_and_loss_must_agree():
    tok = char_tokenizer()
    model = tiny_model(tok)
    ds = dataset(tok)
    ds.set_reference(model, "sum")
    with pytest.raises(ValueError, match="measure them alike"):
        DPOObjective(reduction="mean")(model, ds.batch([0]))
    with pytest.raises(ValueError, match="beta"):
        DPOObjective(beta=float("nan"))


# --- the command ------------------------------------------------------------------------------

@pytest.fixture
def tiny_run(tmp_path):
    """A saved tiny GPT with GPT-2's tokenizer and 40 preference entries (alpaca prompts)."""
    from tinygpt.hub.pretrained import save_pretrained
    entries = [dict(ENTRIES[i % 8], instruction=f"Task {i}") for i in range(40)]
    tok = GPT2Tokenizer()
    cfg = GPTConfig(vocab_size=tok.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=16)
    save_pretrained(GPT(cfg), tmp_path / "model", tokenizer=tok)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(entries))
    return tmp_path, data


def run_command(tmp_path, data, *extra):
    return cli.main(["finetune-dpo", "--model", str(tmp_path / "model"), "--data",
                         str(data), "--out", str(tmp_path / "run"), "--batch-size", "4",
                         "--eval-freq", "2", "--eval-iter", "1", "--max-steps", "2",
                         "--max-new-tokens", "3", "--responses", "2", *extra])


def test_command_trains_logs_and_saves(tiny_run, capsys):
    tmp_path, data = tiny_run
    assert run_command(tmp_path, data, "--lr", "1e-3") == 0
    out = capsys.readouterr().out
    assert "train 0.693" in out and "reward_margin train" in out and "s per step" in out
    assert out.count("--- before, test entry") == 2 and out.count("--- after, test entry") == 2
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0]
    assert "val_reward_margin" in header and "train_chosen_reward" in header
    shown = json.loads((tmp_path / "run" / "dpo-responses.json").read_text())
    assert len(shown) == 2 and {"response_before", "response_after"} <= set(shown[0])
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_command_with_lora_saves_adapters(tiny_run, capsys):
    pytest.importorskip("tinygpt.finetune.lora")
    tmp_path, data = tiny_run
    assert run_command(tmp_path, data, "--lora-rank", "2", "--responses", "0") == 0
    assert "trainable" in capsys.readouterr().out
    assert (tmp_path / "run" / "lora.json").is_file()


@pytest.mark.parametrize("content, message", [
    ("", "has no entries"),
    ("[]", "has no entries"),
    ("{not json", "not valid JSON"),
    ('{"instruction": "a"}', "expected a list"),
    ('[{"instruction": "a", "rejected": "b"}]', "entry 0 has no 'chosen' text"),
    ('[{"instruction": "a", "chosen": "b"}]', "entry 0 has no 'rejected' text"),
])
def test_bad_data_is_a_one_line_error(tiny_run, capsys, content, message):
    tmp_path, _ = tiny_run
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert run_command(tmp_path, bad) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("tinygpt finetune-dpo:")


@pytest.mark.parametrize("flag, value", [("--beta", "nan"), ("--beta", "0"), ("--lr", "inf"),
                                         ("--weight-decay", "-1"), ("--lora-alpha", "nan"),
                                         ("--max-seconds", "-inf"), ("--batch-size", "0")])
def test_bad_flags_are_one_line_errors_naming_the_flag(tiny_run, capsys, flag, value):
    tmp_path, data = tiny_run
    assert run_command(tmp_path, data, f"{flag}={value}") == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()                   # refused before any work
