"""SmolLM2's tokenizer from its own files: fixture ids, round trips, chat prompt, bad input.

The fixture (../shared/fixtures/smollm2-135m-instruct/README.md) holds the model's tokenizer.json
and the ids Hugging Face transformers computed; tests that need it skip when it is absent. The
parity tests against the `tokenizers` package run only where it is installed (it is not a
dependency of tinygpt).
"""
import copy
import json

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import SHARED
from tinygpt.text.hf_tokenizer import (GGUF_CONTROL, SMOLLM2_SYSTEM_PROMPT, HFTokenizer,
                                  apply_chat_template)

FIXTURE = SHARED / "fixtures" / "smollm2-135m-instruct"
TOKENIZER_JSON = FIXTURE / "tokenizer" / "tokenizer.json"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
            "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
            "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
            "<jupyter_output>", "<jupyter_script>", "<empty_output>"]  # ids 0..16

# text a learner might type: letters, digits, emoji (one, joined, flags), combining marks,
# whitespace runs, newlines, contractions and SmolLM2's added tokens
PIECES = ["  ", "   ", "\n", "\n\n", "\t", " \n ", " 1", "  12", "'s", "'LL", "e\u0301",
          "\u0915\u094d\u0937", "👍", "👩\u200d👩\u200d👧", "🇫🇷", "<|im_start|>", "<|im_end|>",
          "<|endoftext|>"]
texts = st.lists(st.one_of(st.characters(categories=("L", "M", "N", "P", "S", "Zs")),
                           st.sampled_from(PIECES)), max_size=40).map("".join)
# any assigned character, control characters included (SmolLM2 has no token for 0x04, ...);
# unassigned ones are left out because Unicode tables of different ages disagree on them
any_texts = st.lists(st.one_of(st.characters(exclude_categories=("Cs", "Cn")),
                                 st.sampled_from(PIECES + ["\x04", "!\x04!"])),
                     max_size=40).map("".join)


def gguf_metadata(state: dict) -> dict:
    """tokenizer.json's lists as model.gguf stores them (checked once against the real file:
    same tokens and merges, the 17 added tokens have type 3, pre "smollm", eos 2)."""
    vocab = state["model"]["vocab"]
    added = {t["id"] for t in state["added_tokens"]}
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": sorted(vocab, key=vocab.get),
            "tokenizer.ggml.merges": [" ".join(pair) for pair in state["model"]["merges"]],
            "tokenizer.ggml.token_type": np.array([GGUF_CONTROL if i in added else 1
                                                   for i in range(len(vocab))], dtype=np.int32),
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2}


def with_digits(state: dict) -> dict:
    """The same tokenizer.json with the pre-tokenizer SmolLM's own tokenizer had."""
    state = copy.deepcopy(state)
    state["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, state["pre_tokenizer"]]}
    return state


@pytest.fixture(scope="module")
def state() -> dict:
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"SmolLM2 fixture not found at {TOKENIZER_JSON}")
    return json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(state) -> HFTokenizer:
    return HFTokenizer.from_tokenizer_json(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def gguf_tok(state) -> HFTokenizer:
    return HFTokenizer.from_gguf_metadata(gguf_metadata(state))


@pytest.fixture(scope="module")
def meta(state) -> dict:
    return json.loads((FIXTURE / "meta.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def expected(state):
    return np.load(FIXTURE / "expected.npz")


# --- the fixture's ids -------------------------------------------------------------------------

def test_fixture_texts(tok, gguf_tok, meta, expected):
    for t in (tok, gguf_tok):
        for i, text in enumerate(meta["texts"]):
            assert t.encode(text) == meta["tokens"][str(i)] == expected[f"text{i}_ids"].tolist()
        assert t.encode(meta["prompt0"]["text"]) == expected["prompt0_ids"].tolist()
        assert t.decode(expected["text1_ids"]) == meta["texts"][1]


def test_chat_prompt_text_and_ids(tok, gguf_tok, meta, expected):
    prompt = apply_chat_template([{"role": "user", "content": meta["chat0"]["question"]}])
    assert prompt == meta["chat0"]["prompt_text"]
    assert tok.encode(prompt) == gguf_tok.encode(prompt) == expected["chat0_ids"].tolist()
    reply = expected["chat0_greedy40"].tolist()
    assert tok.decode(reply) == meta["chat0"]["reply"] and reply[-1] == tok.eos_id == 2


def test_the_real_gguf_file(meta, expected):
    gguf = pytest.importorskip("tinygpt.formats.gguf")  # the reader lives there; this class needs none
    if not (FIXTURE / "model.gguf").is_file():
        pytest.skip(f"{FIXTURE / 'model.gguf'} not found")
    metadata, _ = gguf.read_gguf(FIXTURE / "model.gguf")
    t = HFTokenizer.from_gguf_metadata(metadata, source="model.gguf")
    assert t.pre == "smollm" and t.eos_id == 2 and len(t.special_tokens) == 17
    assert t.encode(meta["texts"][1]) == expected["text1_ids"].tolist()
    prompt = apply_chat_template([{"role": "user", "content": meta["chat0"]["question"]}])
    assert t.encode(prompt) == expected["chat0_ids"].tolist()


def test_sizes_and_ids(tok, gguf_tok):
    for t in (tok, gguf_tok):
        assert t.n_vocab == t.vocab_size == 49152
        assert t.eot_id == 0 and t.eos_id == 2
        assert t.tiktoken_exact  # SmolLM2's merges are ordered like their ids: the fast path
    assert tok.pre == "gpt2" and gguf_tok.pre == "smollm"


def test_no_bos_and_fixed_ids(tok):
    # fixed values from the tokenizers package 0.23.3 on the fixture's tokenizer.json
    assert tok.encode("Every effort moves you") == [8600, 3867, 7488, 346]
    assert tok.encode("x<|im_start|>y") == [104, 1, 105]
    assert tok.encode("") == []


def test_digits_split_only_for_the_gguf_pre_tokenizer(tok, gguf_tok):
    # "smollm" (llama.cpp, and SmolLM's own Digits step) makes every digit a word, so a space
    # before one stays with the spaces before it: "  " is one token (256 = "ĠĠ", merge 4)
    assert tok.encode("a  1") == [81, 216, 216, 33]
    assert gguf_tok.encode("a  1") == [81, 256, 33]
    assert tok.encode("a 12") == gguf_tok.encode("a 12") == [81, 216, 33, 34]


# --- special tokens ----------------------------------------------------------------------------

def test_special_tokens(tok):
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIALS)}
    for i, special in enumerate(SPECIALS):
        assert tok.encode(special) == [i] and tok.decode([i]) == special
        as_text = tok.encode(special, allowed_special=())
        assert len(as_text) > 1 and tok.decode(as_text) == special
    both = "<|im_start|>user<|im_end|>"
    assert tok.encode(both, allowed_special={"<|im_end|>"})[-1] == 2
    assert 1 not in tok.encode(both, allowed_special={"<|im_end|>"})
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<|fim|>"})


# --- round trips, bytes without a token, streaming ---------------------------------------------

@given(text=texts)
@example(text="Hello, world! It's 2026 and café prices rose 12.5%.")
@example(text="  \n\n  x  \t\n 👩\u200d👩\u200d👧🇫🇷 e\u0301  1 ½ ²")
def test_decode_inverts_encode(tok, gguf_tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert gguf_tok.decode(gguf_tok.encode(text)) == text


@given(text=any_texts)
@example(text="!\x04!\x06 a\x13b")
def test_fast_path_equals_the_python_rule(tok, gguf_tok, text):
    for t in (tok, gguf_tok):
        assert t.encode(text) == t._encode_python(text, set(t.special_tokens))
        assert t.encode(text, allowed_special=()) == t._encode_python(text, set())


def test_bytes_without_a_token_are_dropped_like_hugging_face(tok):
    # SmolLM2 has no token for byte 0x04; Hugging Face drops it and merges around it
    # (fixed values from the tokenizers package 0.23.3)
    assert tok.encode("!\x04!") == [10095] == tok.encode("!!")
    assert tok.encode("a\x04b") == [81, 82]
    assert tok.encode("\x04") == []


def test_streaming_holds_back_split_characters(tok):
    from tinygpt.inference.generate import TextStream
    text = "naïve café 👩\u200d👩\u200d👧 🇫🇷 日本語 ½"
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some tokens split a character
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_decode_bad_id(tok):
    for bad in (49152, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is not in the vocabulary") as e:
            tok.decode([1, bad])
        assert "\n" not in str(e.value)


# --- chat template -----------------------------------------------------------------------------

def test_default_system_prompt_is_the_templates(state):
    template = (FIXTURE / "tokenizer" / "chat_template.jinja").read_text(encoding="utf-8")
    assert f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n" in template


def test_chat_template_turns():
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    assert apply_chat_template(own_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert apply_chat_template([{"role": "user", "content": "Hi"}],
                               add_generation_prompt=False) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert apply_chat_template([]) == "<|im_start|>assistant\n"  # as the jinja template renders
    with pytest.raises(ValueError, match="message 1 needs"):
        apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "user"}])


def test_same_prompt_as_the_finetune_templates():
    # two definitions of one format until one imports the other: they must not drift apart
    templates = pytest.importorskip("tinygpt.text.templates")
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]):
        for add in (True, False):
            assert apply_chat_template(messages, add) == templates.chatml(messages, add)


# --- tiny tokenizers: when tiktoken's rule is not Hugging Face's ---------------------------------

def tiny_json(tokens: list[str], merges: list[str], **changes) -> dict:
    """A tokenizer.json in the format the fixture's is in, with its own small vocabulary."""
    state = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
             "normalizer": None,
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                               "trim_offsets": True, "use_regex": True},
             "post_processor": None,
             "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                         "use_regex": True},
             "model": {"type": "BPE", "dropout": None, "unk_token": None,
                       "continuing_subword_prefix": "", "end_of_word_suffix": "",
                       "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                       "vocab": {t: i for i, t in enumerate(tokens)},
                       "merges": [m.split(" ") for m in merges]}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            state[section][field] = value
        else:
            state[section] = value
    return state


def write_json(path, state: dict):
    path.write_text(json.dumps(state), encoding="utf-8")
    return path


# (tokens, merges, word, Hugging Face's ids, tiktoken's rule exact?)
TINY_CASES = [
    # "bc" merges first, and ("a", "bc") is not a listed merge although "abc" is a token
    (["a", "b", "c", "bc", "ab", "abc"], ["b c", "a b", "ab c"], "abc", [0, 3], False),
    # merge priority says "ab" first, the ids say "bc" (3 < 4)
    (["a", "b", "c", "bc", "ab"], ["a b", "b c"], "abc", [4, 2], False),
    (["a", "b", "c", "ab", "abc"], ["a b", "ab c"], "abcab", [4, 3], True),
]


@pytest.mark.parametrize("tokens, merges, word, ids, exact", TINY_CASES)
def test_merge_priority_when_tiktoken_would_differ(tmp_path, tokens, merges, word, ids, exact):
    path = write_json(tmp_path / "tokenizer.json", tiny_json(tokens, merges))
    tok = HFTokenizer.from_tokenizer_json(path)
    assert tok.tiktoken_exact == exact
    assert tok.encode(word) == ids and tok.decode(ids) == word
    lists = HFTokenizer(tokens, merges, special_tokens={})
    assert lists.encode(word) == ids


# --- bad input ---------------------------------------------------------------------------------

BAD_JSONS = [
    ({"model__type": "WordPiece"}, "not a BPE tokenizer"),
    ({"decoder": {"type": "Metaspace"}}, "not byte-level"),
    ({"pre_tokenizer": {"type": "Metaspace"}}, "pre-tokenizer 'Metaspace' is not supported"),
    ({"pre_tokenizer": None}, "pre-tokenizer None is not supported"),
    ({"normalizer": {"type": "NFC"}}, "normalizer 'NFC' is not supported"),
    ({"model__vocab": None}, "model.vocab is missing"),
    ({"model__merges": None}, "model.merges is missing"),
    ({"model__merges": [["a", "z"]]}, "merge 0 .* not in the vocabulary"),
    ({"model__merges": [["a", "b", "c"]]}, "merge 0 .* not two byte-level tokens"),
    ({"model__vocab": {"a": 0, "中": 1}}, "token 1 .* not written byte-level"),
    ({"model__vocab": {"a": 0, "b": 2}}, "vocabulary ids are not 0..1"),
    ({"model__byte_fallback": True}, "model.byte_fallback = True is not supported"),
    ({"added_tokens": [{"id": 0, "content": "a", "lstrip": True}]}, "lstrip"),
    ({"added_tokens": "<s>"}, "added_tokens is not a list"),
]


@pytest.mark.parametrize("changes, message", BAD_JSONS)
def test_bad_tokenizer_json(tmp_path, changes, message):
    path = write_json(tmp_path / "tokenizer.json", tiny_json(["a", "b", "ab"], ["a b"], **changes))
    with pytest.raises(ValueError, match=message) as e:
        HFTokenizer.from_tokenizer_json(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE",', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        HFTokenizer.from_tokenizer_json(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        HFTokenizer.from_tokenizer_json(tmp_path / "missing.json")


def test_bad_gguf_metadata():
    good = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "gpt2"}
    assert HFTokenizer.from_gguf_metadata(good).encode("abba") == [2, 1, 0]
    for changes, message in (({"tokenizer.ggml.model": "llama"}, "not 'gpt2'"),
                             ({"tokenizer.ggml.pre": "qwen2"}, "unknown pre-tokenizer 'qwen2'"),
                             ({"tokenizer.ggml.merges": None}, "merges is missing"),
                             ({"tokenizer.ggml.merges": ["a c"]}, "merge 0")):
        with pytest.raises(ValueError, match=message) as e:
            HFTokenizer.from_gguf_metadata({**good, **changes}, source="model.gguf")
        assert str(e.value).startswith("model.gguf: ") and "\n" not in str(e.value)


# --- optional: the tokenizers package as the reference -----------------------------------------

@pytest.fixture(scope="module")
def reference(state, tmp_path_factory):
    """The tokenizers package on the fixture's file, and on it with SmolLM's Digits step."""
    tokenizers = pytest.importorskip("tokenizers")
    digits = write_json(tmp_path_factory.mktemp("digits") / "tokenizer.json", with_digits(state))
    return (tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON)),
            tokenizers.Tokenizer.from_file(str(digits)), HFTokenizer.from_tokenizer_json(digits))


@given(text=any_texts)
@example(text="a  1\n\n  12 ½x²  \t3")
@example(text="!\x04!<|im_start|>\x06 \U00050000")
def test_same_ids_as_the_tokenizers_package(tok, gguf_tok, reference, text):
    plain, digits, ours_digits = reference
    assert tok.encode(text) == plain.encode(text, add_special_tokens=False).ids
    want = digits.encode(text, add_special_tokens=False).ids
    assert gguf_tok.encode(text) == ours_digits.encode(text) == want
    ids = tok.encode(text)
    assert tok.decode(ids) == plain.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("tokens, merges, word, ids, exact", TINY_CASES)
def test_tiny_cases_like_the_tokenizers_package(tmp_path, tokens, merges, word, ids, exact):
    tokenizers = pytest.importorskip("tokenizers")
    path = write_json(tmp_path / "tokenizer.json", tiny_json(tokens, merges))
    assert tokenizers.Tokenizer.from_file(str(path)).encode(word).ids == ids


def test_whole_corpus_like_the_tokenizers_package(tok, reference):
    plain, digits, _ = reference
    text = (SHARED / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    assert tok.encode(text) == plain.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("which", ["tok", "gguf_tok"])
def test_save_pretrained_round_trips_through_tokenizer_json(which, request, meta, tmp_path):
    """A fine-tuned model's folder carries its tokenizer as the hub's tokenizer.json; read back,
    it encodes like the original (the GGUF one keeps its digit-splitting pre-tokenizer)."""
    original = request.getfixturevalue(which)
    path = original.save_pretrained(tmp_path)
    again = HFTokenizer.from_tokenizer_json(path)
    for text in meta["texts"] + ["a  1", "x\u00e9\u4e2d 12345 <|im_end|>"]:
        assert again.encode(text) == original.encode(text)
    assert (again.eos_id, again.pre, again.n_vocab) == (original.eos_id, original.pre,
                                                        original.n_vocab)
