"""GPT-2 through tiktoken (offline, hash-checked) and the character tokenizer."""
import json
import shutil

import pytest
import tiktoken
import tiktoken.load

from tinygpt.text import bpe
from tinygpt.text import tokenizer
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def test_gpt2_fixed_ids(gpt2):
    # fixed values: tiktoken "gpt2" (and the book, ch02) give these ids
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2.eot_id == 50256
    assert gpt2.n_vocab == gpt2.vocab_size == 50257
    assert get_tokenizer("gpt2").encode("Hello, I am") == [15496, 11, 314, 716]


def test_gpt2_endoftext_allowed_by_default_else_text(gpt2):
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    as_text = gpt2.encode("a<|endoftext|>b", allowed_special=())
    assert 50256 not in as_text and gpt2.decode(as_text) == "a<|endoftext|>b"


def test_gpt2_decode_round_trip_and_bad_id(gpt2):
    text = "It's 2024:\n\n  naïve café 😀 <|endoftext|>"
    assert gpt2.decode(gpt2.encode(text)) == text
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([1, 50257])


def test_the_verdict_has_5145_tokens(gpt2, shared):
    # fixed value from shared/data/SOURCES.md (tiktoken "gpt2")
    text = (shared / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    assert len(gpt2.encode(text)) == 5145


def test_ranks_equal_tiktokens_own_loader(monkeypatch):
    # tiktoken's reference loader, on the bundled local files, with its disk cache switched off
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    encoder_path, vocab_path = bpe.bundled_gpt2_paths()
    reference = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_path), str(encoder_path))
    assert tokenizer.gpt2_encoding()._mergeable_ranks == reference


def test_building_the_encoding_never_uses_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken tried to fetch something")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    tokenizer.gpt2_encoding.cache_clear()
    try:
        assert GPT2Tokenizer().encode("Hello, I am") == [15496, 11, 314, 716]
    finally:
        tokenizer.gpt2_encoding.cache_clear()


@pytest.mark.parametrize("corrupt", ["encoder.json", "vocab.bpe"])
def test_hash_mismatch_names_the_file(tmp_path, monkeypatch, corrupt):
    paths = []
    for src in bpe.bundled_gpt2_paths():
        dst = tmp_path / src.name
        shutil.copy(src, dst)
        paths.append(dst)
    with open(tmp_path / corrupt, "ab") as f:
        f.write(b"\n")
    monkeypatch.setattr(tokenizer, "bundled_gpt2_paths", lambda: tuple(paths))
    tokenizer.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match=f"{corrupt}: sha256 mismatch"):
            GPT2Tokenizer()
    finally:
        tokenizer.gpt2_encoding.cache_clear()


def test_encoding_is_cached():
    assert tokenizer.gpt2_encoding() is tokenizer.gpt2_encoding()


# --- characters ---------------------------------------------------------------------------------

def test_char_tokenizer_sorted_vocab_and_round_trip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.n_vocab == tok.vocab_size == 8 and tok.eot_id is None and tok.name == "char"
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("low herd")) == "low herd"


def test_char_tokenizer_unknown_char_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"character 'z' \(at position 2\)"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="token id 3"):
        tok.decode([0, 3])


def test_char_tokenizer_save_load(tmp_path, shared):
    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = get_tokenizer("char", text=text)
    assert tok.n_vocab == 65  # tiny-shakespeare's 65 characters (GPTConfig's default vocab_size)
    tok.save(tmp_path / "vocab.json")
    loaded = get_tokenizer("char", vocab_path=tmp_path / "vocab.json")
    assert loaded.chars == tok.chars and loaded.encode(text[:1000]) == tok.encode(text[:1000])


def test_char_tokenizer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CharTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match="other.json"):
        CharTokenizer.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="text="):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="'gpt3'"):
        get_tokenizer("gpt3")


def test_save_and_load_tokenizer_every_kind(tmp_path):
    from tinygpt.text.bpe import BPETokenizer
    from tinygpt.text.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer
    text = "the cat sat on the mat; the dog sat too. " * 5
    for tok in (GPT2Tokenizer(), CharTokenizer.from_text(text), BPETokenizer.train(text, 270)):
        save_tokenizer(tok, tmp_path)
        loaded = load_tokenizer(tmp_path)
        assert type(loaded) is type(tok) and loaded.encode(text) == tok.encode(text)
    assert (tmp_path / TOKENIZER_FILE).stat().st_size < 10_000
    save_tokenizer(GPT2Tokenizer(), tmp_path)
    assert (tmp_path / TOKENIZER_FILE).stat().st_size < 100       # GPT-2's by name only
    (tmp_path / TOKENIZER_FILE).write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        load_tokenizer(tmp_path)
    assert isinstance(load_tokenizer(tmp_path / "empty"), GPT2Tokenizer)   # hub dirs: GPT-2's
