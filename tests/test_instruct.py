"""Instruction data, the book's split and collate, responses, and `finetune-instruct` end to end."""
import json

import numpy as np
import pytest

from tinygpt import GPT, GPTConfig
from tinygpt.commands.cli import main
from tinygpt.finetune.instruct import (InstructionDataset, collate, end_token_id,
                                       generate_responses, read_instruction_data, respond,
                                       save_responses, split_instruction_data)
from tinygpt.text.templates import format_prompt
from tinygpt.text.tokenizer import get_tokenizer
from tinygpt.hub.pretrained import save_pretrained

E = 50256
ENTRIES = [{"instruction": f"Say {w}.", "input": "" if i % 2 else "loudly", "output": w}
           for i, w in enumerate("one two three four five six seven eight nine ten eleven "
                                 "twelve thirteen fourteen fifteen sixteen seventeen eighteen "
                                 "nineteen twenty".split())]


@pytest.fixture(scope="module")
def gpt2_tok():
    return get_tokenizer("gpt2")


# --- reading --------------------------------------------------------------------------------------

def test_reads_json_and_jsonl_alike(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ENTRIES[:3]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(e) for e in ENTRIES[:3]) + "\n\n")
    assert read_instruction_data(tmp_path / "a.json") == ENTRIES[:3]
    assert read_instruction_data(tmp_path / "a.jsonl") == ENTRIES[:3]


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("[]", "no entries"),
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]',
     "entry 1 has no 'output' text"),
    ('{"output": "y"}\n', "line 1 has no 'instruction' text"),
    ('{"instruction": "x", "output": "y"}\n{oops\n', "line 2 is not valid JSON"),
    ('[{"instruction": "x", "output": "y"},', "not valid JSON"),
    ('[["x", "y"]]', "entry 0 is a list, not an object"),
    ('[{"instruction": "x", "input": 3, "output": "y"}]', "'input' is not text"),
])
def test_bad_data_is_a_one_line_error_naming_the_entry(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        read_instruction_data(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instruction data not found"):
        read_instruction_data(tmp_path / "nope.json")


def test_the_books_split_in_file_order(shared):
    data = read_instruction_data(shared / "data" / "instruction-data.json")
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == data            # no shuffle
    assert [len(s) for s in split_instruction_data(ENTRIES)] == [17, 2, 1]


# --- collate --------------------------------------------------------------------------------------

def test_collate_matches_the_books_test_vector():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]
    assert targets.tolist() == [[1, 2, 3, 4, E], [6, E, -100, -100, -100],
                                [8, 9, E, -100, -100]]
    assert inputs.dtype == targets.dtype == np.int64


def test_collate_with_other_ids_masking_and_truncation():
    # padding found by position: an end token inside an item stays a target
    inputs, targets = collate([[9, 2, 9, 8], [7]], end_id=2, pad_id=0)
    assert inputs.tolist() == [[9, 2, 9, 8], [7, 2, 0, 0]]
    assert targets.tolist() == [[2, 9, 8, 2], [2, -100, -100, -100]]
    inputs, targets = collate([[10, 11, 12, 13], [14, 15]], end_id=2, prompt_lengths=[3, 1])
    assert targets.tolist() == [[-100, -100, 13, 2], [15, 2, -100, -100]]
    inputs, targets = collate([[1, 2, 3, 4, 5], [6]], allowed_max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [6, E, E]] and targets.tolist() == [[2, 3, 4],
                                                                             [E, -100, -100]]


# --- the dataset -----------------------------------------------------------------------------------

def test_dataset_is_the_books_text_and_end_token(gpt2_tok):
    entry = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    ds = InstructionDataset([entry], gpt2_tok)
    book = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.")
    assert ds.encoded == [gpt2_tok.encode(book)] and ds.end_id == E == ds.pad_id
    x, y = ds.batch(np.array([0]))
    assert x[0].tolist() == gpt2_tok.encode(book) and y[0, -1] == E


def test_mask_prompt_hides_the_instruction_only(gpt2_tok):
    ds = InstructionDataset(ENTRIES[:2], gpt2_tok, mask_prompt=True)
    x, y = ds.batch(np.array([0, 1]))
    for b in range(2):
        n_prompt = ds.prompt_lengths[b]
        assert (y[b, :n_prompt - 1] == -100).all() and y[b, n_prompt - 1] != -100
        assert y[b, len(ds.encoded[b]) - 1] == E


def test_long_entries_are_counted_and_cut(gpt2_tok):
    long = {"instruction": "word " * 200, "output": "ok"}
    ds = InstructionDataset([long, ENTRIES[1]], gpt2_tok, allowed_max_length=64)
    assert ds.n_truncated == 1
    x, y = ds.batch(np.array([0, 1]))
    assert x.shape == y.shape == (2, 64)


def test_chatml_ends_at_im_end_and_keeps_it_as_a_target(shared):
    from tinygpt.text.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_tokenizer_json(shared / "fixtures" / "smollm2-135m-instruct" /
                                          "tokenizer" / "tokenizer.json")
    ds = InstructionDataset(ENTRIES[:2], tok, "chatml")
    assert ds.end_id == ds.pad_id == 2
    x, y = ds.batch(np.array([0, 1]))
    n = len(ds.encoded[1])
    # <|im_end|> closes the system and user turns too; only the padding is ignored
    assert (y[1, :n] != -100).all() and (y[1, n:] == -100).all()
    assert (y[1] == 2).sum() == 3 and y[1, n - 1] == 2


def test_a_template_whose_end_token_the_tokenizer_lacks_is_an_error(gpt2_tok):
    with pytest.raises(ValueError, match="does not have as one token"):
        end_token_id(gpt2_tok, "chatml")
    assert end_token_id(gpt2_tok, "phi3") == E


# --- responses -------------------------------------------------------------------------------------

def rigged_gpt(token: int) -> GPT:
    """A GPT that always predicts `token`: the final norm outputs a constant one-hot vector and
    the head maps it to a logit of 10 for `token`, 0 elsewhere."""
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=1, n_embd=4),
                seed=0)
    model.ln_f.weight.data[:] = 0.0
    model.ln_f.bias.data[:] = [1.0, 0.0, 0.0, 0.0]
    model.lm_head.weight.data[:] = 0.0
    model.lm_head.weight.data[0, token] = 10.0
    return model.eval()


def test_respond_strips_the_prompt_and_stops_at_the_end_token(gpt2_tok):
    hi = gpt2_tok.encode(" hi")[0]
    assert respond(rigged_gpt(hi), gpt2_tok, ENTRIES[0], max_new_tokens=3) == "hi hi hi"
    assert respond(rigged_gpt(E), gpt2_tok, ENTRIES[0], max_new_tokens=3) == ""
    seen = []
    texts = generate_responses(rigged_gpt(hi), gpt2_tok, ENTRIES[:2], "phi3", max_new_tokens=2,
                               on_response=lambda i, r: seen.append(i))
    assert texts == ["hi hi", "hi hi"] and seen == [0, 1]
    assert format_prompt(ENTRIES[0], "phi3").endswith("<|assistant|>:\n")


def test_save_responses_writes_them_beside_each_entrys_inputs(tmp_path):
    path = save_responses(ENTRIES[:2], ["a", "b"], tmp_path / "r.json")
    saved = json.loads(path.read_text())
    assert saved == [{**ENTRIES[0], "model_response": "a"}, {**ENTRIES[1], "model_response": "b"}]
    with pytest.raises(ValueError, match="2 entries but 1 responses"):
        save_responses(ENTRIES[:2], ["a"], tmp_path / "r.json")


# --- the command -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=8,
                          qkv_bias=True, tie_weights=True), seed=0)
    save_pretrained(model, root / "base", tokenizer=get_tokenizer("gpt2"))
    (root / "data.json").write_text(json.dumps(ENTRIES))
    return root


def _args(root, out, *extra):
    return ["finetune-instruct", "--model", str(root / "base"), "--data", str(root / "data.json"),
            "--out", str(out), "--batch-size", "4", "--max-steps", "2", "--eval-freq", "2",
            "--eval-iter", "1", "--max-new-tokens", "3", "--sample-tokens", "2", *extra]


@pytest.mark.parametrize("extra", [(), ("--lora-rank", "2", "--mask-prompt")])
def test_finetune_instruct_trains_and_saves_responses(tiny_run, tmp_path, capsys, extra):
    assert main(_args(tiny_run, tmp_path / "run", *extra)) == 0
    out = capsys.readouterr().out
    assert "sample (val entry 0):" in out and "held-out loss (all 1 val entries)" in out
    per_step = float(out.split(" s per step")[0].rsplit(" ", 1)[-1])
    assert per_step >= 0
    saved = json.loads((tmp_path / "run" / "instruction-data-with-response.json").read_text())
    assert [e["instruction"] for e in saved] == ["Say eighteen.", "Say nineteen."]
    assert all(isinstance(e["model_response"], str) for e in saved)
    lora = (tmp_path / "run" / "lora.json").is_file()
    assert lora == bool(extra) and (tmp_path / "run" / "model.safetensors").is_file() != lora
    if extra:
        # rank 2, C = 8: c_attn 3 parts 2*(8*3 + 3*8), c_proj 2*(8+8), c_fc and mlp.c_proj
        # 2*(8+32) each, the (untied) head 2*(8+50257)
        assert f"trainable parameters: {96 + 32 + 80 + 80 + 100_530:,} of" in out


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr must be a finite number >= 0"),
    ("--lora-alpha", "0", "--lora-alpha must be a finite number > 0"),
    ("--max-seconds", "inf", "--max-seconds must be a finite number"),
    ("--batch-size", "0", "--batch-size must be positive"),
    ("--allowed-max-length", "1", "--allowed-max-length must be at least 2"),
])
def test_bad_flags_are_one_line_errors(tiny_run, tmp_path, capsys, flag, value, message):
    assert main(_args(tiny_run, tmp_path / "run", flag, value)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_bad_data_file_is_a_one_line_error(tiny_run, tmp_path, capsys):
    (tmp_path / "empty.json").write_text("  \n")
    args = _args(tiny_run, tmp_path / "run")
    args[args.index("--data") + 1] = str(tmp_path / "empty.json")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("empty.json: the file is empty") and "\n" not in err


def test_the_demo_runs_the_command_with_its_settings(tiny_run, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "demos" / "instruct.py"
    spec = importlib.util.spec_from_file_location("instruct_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    argv = ["--model", str(tiny_run / "base"), "--data", str(tiny_run / "data.json"), "--out",
            str(tmp_path / "demo"), "--minutes", "1", "--test-size", "1", "--batch-size", "4",
            "--max-steps", "1", "--eval-iter", "1", "--max-new-tokens", "2", "--sample-tokens",
            "1"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 16, lr 0.0005, 1 min" in out and "1 test responses" in out
    assert (tmp_path / "demo" / "lora.json").is_file()
