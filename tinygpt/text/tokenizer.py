"""Tokenizers with one interface: GPT-2 BPE through tiktoken (offline), and characters.

Owns `GPT2Tokenizer` (tiktoken's fast Rust BPE, built from the `encoder.json` + `vocab.bpe` bundled
in `tinygpt/assets/`, each checked against its sha256 - tiktoken never touches the network) and
`CharTokenizer` (one id per character, for tiny-shakespeare-sized experiments). The BPE algorithm
itself, written out in Python, is in `bpe.py`; turning ids into training batches is `data.py`.

    python -c "from tinygpt.text.tokenizer import *; print(get_tokenizer('gpt2').encode('Hello'))"

Both tokenizers have `name`, `encode(text, allowed_special=...) -> list[int]`, `decode(ids) -> str`,
`n_vocab` (alias `vocab_size`) and `eot_id` (None for characters). `save_tokenizer` and
`load_tokenizer` keep the one a model was trained with beside it, in `tinygpt-tokenizer.json`.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from tinygpt.text.bpe import (EOT, GPT2_FILES_SHA256, GPT2_PATTERN, BPETokenizer, bundled_gpt2_paths,
                         read_checked, read_gpt2_ranks)
from tinygpt.core.fileio import write_json_atomic
from tinygpt.core.validate import read_json_object

EOT_ID = 50256       # GPT-2's <|endoftext|>, the id after the 50,256 ordinary tokens
GPT2_VOCAB_SIZE = 50257
# beside a saved model; not Hugging Face's tokenizer.json, which hub directories may hold
TOKENIZER_FILE = "tinygpt-tokenizer.json"


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding built from the bundled files (built once, then cached)."""
    encoder_path, vocab_path = bundled_gpt2_paths()
    encoder = read_checked(encoder_path, GPT2_FILES_SHA256["encoder.json"])
    merges = read_checked(vocab_path, GPT2_FILES_SHA256["vocab.bpe"])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                             mergeable_ranks=read_gpt2_ranks(encoder, merges),
                             special_tokens={EOT: EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids); "Hello, I am" -> [15496, 11, 314, 716]."""

    name = "gpt2"

    def __init__(self):
        self._enc = gpt2_encoding()

    @property
    def n_vocab(self) -> int:
        return self._enc.n_vocab

    vocab_size = n_vocab

    @property
    def eot_id(self) -> int:
        return self._enc.eot_token

    def encode(self, text: str,
               allowed_special: Iterable[str] | str = frozenset({EOT})) -> list[int]:
        """Text -> ids. `<|endoftext|>` becomes 50256 if allowed, else it is plain text."""
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, on tiktoken's thread pool."""
        return self._enc.encode_batch(texts, allowed_special={EOT}, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the GPT-2 vocabulary "
                             f"(0..{self.n_vocab - 1})")
        return self._enc.decode(ids)


class CharTokenizer:
    """One id per character: the id is the position in the sorted set of a text's characters."""

    name = "char"
    eot_id = None

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character (was the text empty?)")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    vocab_size = n_vocab

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Text -> ids; `allowed_special` is only there for the shared interface (no specials)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            position = text.index(e.args[0])
            raise ValueError(f"character {e.args[0]!r} (at position {position}) is not in the "
                             f"{self.n_vocab}-character vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the character vocabulary "
                             f"(0..{self.n_vocab - 1})")
        return "".join(self.chars[i] for i in ids)

    def save(self, path: Path | str) -> None:
        """Write the vocabulary as JSON: {"type": "char", "chars": [...]}."""
        write_json_atomic(path, {"type": "char", "chars": self.chars})

    @classmethod
    def load(cls, path: Path | str) -> CharTokenizer:
        path = Path(path)
        state = read_json_object(path, "character vocabulary")
        if state.get("type") != "char":
            raise ValueError(f"{path}: not a character-tokenizer vocabulary (expected type 'char')")
        return cls.from_list(state.get("chars"), path)

    @classmethod
    def from_list(cls, chars: object, source: str | Path) -> CharTokenizer:
        """The vocabulary a JSON file (`source`) lists, or an error naming the file."""
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ValueError(f"{source}: chars must be a list of single characters")
        try:
            return cls(chars)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


Tokenizer = GPT2Tokenizer | CharTokenizer | BPETokenizer


def get_tokenizer(name: str = "gpt2", text: str | None = None,
                  vocab_path: Path | str | None = None) -> Tokenizer:
    """A tokenizer by name: "gpt2", or "char" built from `text` or loaded from `vocab_path`."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if vocab_path is not None:
            return CharTokenizer.load(vocab_path)
        if text is None:
            raise ValueError("the char tokenizer needs text= (to build its vocabulary) "
                             "or vocab_path=")
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {name!r}: choose 'gpt2' or 'char'")


def save_tokenizer(tok: Tokenizer, directory: Path | str) -> Path:
    """Write `directory/tinygpt-tokenizer.json`: GPT-2's BPE by name ({"type": "gpt2"}, its files
    are bundled), a character vocabulary or a trained BPE vocabulary in full; a Llama-family
    model's `HFTokenizer` as the hub's own tokenizer.json (`HFTokenizer.save_pretrained`)."""
    path = Path(directory) / TOKENIZER_FILE
    if isinstance(tok, GPT2Tokenizer):
        write_json_atomic(path, {"type": "gpt2"})
    elif isinstance(tok, (CharTokenizer, BPETokenizer)):
        tok.save(path)
    elif type(tok).__name__ == "HFTokenizer":              # a Llama-family model's: the hub's files
        return tok.save_pretrained(directory)
    else:
        raise TypeError(f"cannot save a {type(tok).__name__}: not a tinygpt tokenizer")
    return path


def load_tokenizer(directory: Path | str) -> Tokenizer:
    """The tokenizer `save_tokenizer` wrote into `directory`; GPT-2's when there is none (a
    Hugging Face GPT-2 directory)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return GPT2Tokenizer()
    state = read_json_object(path, "tokenizer file")
    kind = state.get("type", state.get("format"))
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer.load(path)
    if kind == "tinygpt-bpe":
        return BPETokenizer.load(path)
    raise ValueError(f"{path}: unknown tokenizer {kind!r} (expected gpt2, char or "
                     "tinygpt-bpe)")
