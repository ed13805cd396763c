"""`tinygpt generate`: greedy output on the tiny GPT-2 fixture, streaming decode, and bad inputs.

The expected continuation is the fixture's `gen_new_tokens`, computed by Hugging Face transformers
(../shared/fixtures/gpt2-tiny-hf/README.md).
"""
import subprocess
import sys

import numpy as np
import pytest

from tinygpt.commands.cli import main
from tinygpt.inference.generate import TextStream
from tinygpt.text.tokenizer import GPT2Tokenizer


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture
def fixture_dir(shared):
    return shared / "fixtures" / "gpt2-tiny-hf"


@pytest.fixture
def expected(fixture_dir) -> dict:
    return dict(np.load(fixture_dir / "expected.npz"))


@pytest.mark.parametrize("cache_flag", [[], ["--no-cache"]])
def test_greedy_output_matches_fixture(fixture_dir, expected, tok, capsys, cache_flag):
    prompt = tok.decode(expected["gen_prompt"])          # "Hello, I'm a language model,"
    new = expected["gen_new_tokens"]
    rc = main(["generate", "--model", str(fixture_dir), "--prompt", prompt,
               "--max-new-tokens", str(len(new)), "--verbose"] + cache_flag)
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == prompt + tok.decode(new) + "\n"
    assert f"{len(new)} tokens in" in err and "tokens/s" in err


def test_eos_stops_generation(fixture_dir, expected, tok, capsys):
    """Stops at the first eos and does not print it."""
    prompt, new = tok.decode(expected["gen_prompt"]), expected["gen_new_tokens"]
    eos = int(new[2])
    first = list(new).index(eos)
    rc = main(["generate", "--model", str(fixture_dir), "--prompt", prompt, "--eos", str(eos),
               "--max-new-tokens", "20"])
    assert rc == 0
    assert capsys.readouterr().out == prompt + tok.decode(new[:first]) + "\n"


def test_sampling_is_reproducible_with_seed(fixture_dir, capsys):
    argv = ["generate", "--model", str(fixture_dir), "--prompt", "Once upon a time",
            "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "7",
            "--max-new-tokens", "8"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_random_init_preset_smoke(capsys):
    rc = main(["generate", "--model", "char-tiny", "--random-init", "--prompt", "Hi",
               "--max-new-tokens", "3"])
    assert rc == 0 and capsys.readouterr().out.startswith("Hi")


def test_text_stream_holds_back_split_characters(tok):
    ids = tok.encode("é😀 naïve")                       # the emoji spans two byte-level tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "é😀 naïve"
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
])
def test_bad_values_are_one_line_exit_2(fixture_dir, capsys, flags, message):
    rc = main(["generate", "--model", str(fixture_dir), "--prompt", "Hi"] + flags)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_missing_weights_point_to_download(tmp_path, capsys):
    rc = main(["generate", "--model", "gpt2", "--dir", str(tmp_path), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert str(tmp_path / "gpt2" / "model.safetensors") in err
    assert "tinygpt download gpt2" in err and "weights/README.md" in err


def test_missing_directory_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path / "nope") in err


def test_unknown_flag_is_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "Hi", "--temprature", "1"])
    assert exit_.value.code == 2


def test_python_dash_m_streams_to_stdout(fixture_dir, expected, tok):
    prompt = tok.decode(expected["gen_prompt"])
    run = subprocess.run([sys.executable, "-m", "tinygpt", "generate", "--model", str(fixture_dir),
                          "--prompt", prompt, "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == prompt + tok.decode(expected["gen_new_tokens"][:5]) + "\n"


@pytest.mark.slow
def test_generate_runs_the_real_smollm2_gguf_in_every_weight_mode(shared, capsys):
    """The chat reply of the fixture, through the CLI, float32 rows, int8 and the file's blocks."""
    import json
    fixture = shared / "fixtures" / "smollm2-135m-instruct"
    meta = json.loads((fixture / "meta.json").read_text())
    for quantize in ("none", "gguf"):
        assert main(["generate", "--model", str(fixture / "model.gguf"), "--prompt",
                         meta["prompt0"]["text"], "--max-new-tokens", "20",
                         "--quantize", quantize]) == 0
        out = capsys.readouterr().out
        assert out == meta["prompt0"]["text"] + meta["prompt0"]["greedy_text"] + "\n"


def test_generate_quantize_gguf_needs_a_gguf(tmp_path, capsys):
    assert main(["generate", "--model", "gpt2", "--random-init", "--prompt", "hi",
                     "--quantize", "gguf"]) == 2
    assert "--quantize gguf needs a .gguf" in capsys.readouterr().err
