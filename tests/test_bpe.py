"""Our from-scratch BPE: equal to tiktoken on arbitrary text, and training is deterministic."""
import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public
from hypothesis import example, given
from hypothesis import strategies as st

from tinygpt.text.bpe import EOT, BPETokenizer, bundled_gpt2_paths

# pieces that exercise every branch of GPT-2's regex, mixed with arbitrary Unicode below
PIECES = ["'s", "'re", "'ve", "'ll", "'d", "'m", "'t", "'S", "don't", " they're", EOT, EOT * 2,
          "<|endoftext", "|>", "\n", "\n\n", "\r\n", "   ", "\t\t", " \n ", "\u00a0", "\u3000",
          "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "😀", " 🤖🤖", "🇺🇸", "👩‍👩‍👧", "123", " 4567",
          "٣٤", "Hello", " world", "naïve", "Ünïcödé", "中文字", " ...", "!!", "--", "e\u0301"]
WHITESPACE = " \t\n\r\u00a0\u2003\x0b\x0c\x1c\x1f\x85\u2028\u3000"
# NOTE: no unassigned code points (category Cn in Python's Unicode 14 tables): the `regex` module
# and tiktoken's Rust regex use newer, different Unicode versions, and disagree on whether 4,657
# code points assigned since (U+A7CE, U+10940, ...) are letters. Every assigned one was checked.
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(ASSIGNED, max_size=8),
                           st.text(alphabet=WHITESPACE, min_size=1, max_size=6)),
                 max_size=20).map("".join)


@pytest.fixture(scope="module")
def ours() -> BPETokenizer:
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's own gpt2 definition (its loader, its regex) on the bundled local files."""
    encoder_path, vocab_path = bundled_gpt2_paths()
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files directly, cache nothing
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_path), str(encoder_path))
    finally:
        mp.undo()
    return tiktoken.Encoding("gpt2-reference", pat_str=tiktoken_ext.openai_public.r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={EOT: 50256})


@given(text=texts)
@example(text="Hello, I am")
@example(text="  \n\n  x  ")
@example(text="<|endoftext|><|endoftext|>'s 're\n\n\n 😀 1234567")
def test_encodes_exactly_like_tiktoken(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    assert ours.encode(text, allowed_special=set()) == reference.encode_ordinary(text)
    assert ours.decode(ids) == text


def test_fixed_ids_and_sizes(ours):
    assert ours.encode("Hello, world!") == [15496, 11, 995, 0]
    assert ours.encode("Hello, I am") == [15496, 11, 314, 716]
    assert ours.eot_id == 50256 and ours.n_vocab == ours.vocab_size == 50257


def test_whole_corpora_like_tiktoken(ours, reference, shared):
    for name, n_tokens in (("the-verdict.txt", 5145), ("tinyshakespeare.txt", None)):
        text = (shared / "data" / name).read_text(encoding="utf-8")
        ids = ours.encode(text)
        assert ids == reference.encode(text, allowed_special="all")
        if n_tokens is not None:
            assert len(ids) == n_tokens  # fixed value from SOURCES.md


def test_decode_bad_id(ours):
    with pytest.raises(ValueError, match="token id 50257"):
        ours.decode([0, 50257])
    with pytest.raises(ValueError, match="unknown special"):
        ours.encode("x", allowed_special={"<|fim|>"})


def test_save_load_gpt2(ours, tmp_path):
    ours.save(tmp_path / "gpt2.json")
    loaded = BPETokenizer.load(tmp_path / "gpt2.json")
    assert loaded.vocab == ours.vocab and loaded.special_tokens == ours.special_tokens
    assert loaded.encode("Hello, I am<|endoftext|>") == [15496, 11, 314, 716, 50256]


def test_from_gpt2_needs_both_paths_and_existing_files(tmp_path):
    with pytest.raises(ValueError, match="both"):
        BPETokenizer.from_gpt2(encoder_path=tmp_path / "encoder.json")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        BPETokenizer.from_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# --- training -----------------------------------------------------------------------------------

SMALL_TEXT = ("I had always thought Jack Gisburn rather a cheap genius--though a good fellow "
              "enough--so it was no great surprise to me to hear that, in the height of his "
              "glory, he had dropped his painting. " * 3 + "".join(PIECES))


@pytest.fixture(scope="module")
def trained() -> BPETokenizer:
    return BPETokenizer.train(SMALL_TEXT, vocab_size=300)


def test_first_merge_is_the_most_frequent_pair():
    # one word, "aaabdaaabac": ("a", "a") occurs 4 times, more than any other pair
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=258)
    assert tok.vocab[256] == b"aa" and tok.special_tokens == {EOT: 257}
    assert tok.decode(tok.encode("aaabdaaabac")) == "aaabdaaabac"


def test_ties_go_to_the_smallest_pair_of_ids():
    # words "ab", " cd": pairs (97, 98), (32, 99), (99, 100) occur once each; (32, 99) is smallest
    tok = BPETokenizer.train("ab cd", vocab_size=257, special_tokens=())
    assert tok.vocab[256] == b" c"


def test_training_is_deterministic_and_reaches_the_size(shared):
    text = (shared / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    first = BPETokenizer.train(text, vocab_size=320)
    assert BPETokenizer.train(text, vocab_size=320).vocab == first.vocab
    assert first.n_vocab == 320 and first.eot_id == 319
    ids = first.encode(text)
    assert len(ids) < len(text.encode("utf-8")) * 0.7  # 63 merges already compress the text
    assert first.decode(ids) == text


def test_training_never_merges_into_special_tokens():
    tok = BPETokenizer.train("<|endoftext|>" * 50 + "ab", vocab_size=270)
    assert not any(b"|" in t and len(t) > 1 for t in tok.vocab.values())
    assert tok.encode("<|endoftext|>") == [tok.eot_id]


@given(text=texts)
def test_trained_round_trip(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_trained_save_load(trained, tmp_path):
    trained.save(tmp_path / "bpe.json")
    loaded = BPETokenizer.load(tmp_path / "bpe.json")
    text = SMALL_TEXT + "<|endoftext|>"
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.vocab == trained.vocab and loaded.pattern == trained.pattern


def test_training_and_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=200"):
        BPETokenizer.train("abc", vocab_size=200)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BPETokenizer.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="x.json"):
        BPETokenizer.load(tmp_path / "x.json")
