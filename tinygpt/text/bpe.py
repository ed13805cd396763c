"""Byte-level BPE from scratch: train, save/load, load GPT-2's files, encode exactly like tiktoken.

Owns the algorithm (pre-tokenise with GPT-2's regex, then merge byte pairs by rank) in plain Python
(stdlib + `regex`). The fast GPT-2 tokenizer used everywhere else is tiktoken, in `tokenizer.py`;
this file is for reading, and `tests/test_bpe.py` checks it gives tiktoken's ids on arbitrary text.

    python -m tinygpt bench tokenizer      # our BPE vs tiktoken on tiny-shakespeare

How encoding works (the same rule as tiktoken, and as GPT-2's own `encoder.py`):
1. Split the text at allowed special tokens (`<|endoftext|>`), which map straight to their ids.
2. Split the rest into "words" with GPT2_PATTERN (letters, digits, punctuation, whitespace runs).
3. Each word becomes its UTF-8 bytes, one token per byte; then, repeatedly, the adjacent pair whose
   concatenation has the lowest rank (= token id) in the vocabulary is merged, leftmost first,
   until no adjacent pair forms a token. Words repeat a lot, so results are cached per word.

Saved format (`save`/`load`): one JSON file {"format": "tinygpt-bpe", "version": 1, "pattern",
"tokens": [hex bytes of token 0, 1, ...], "special_tokens": {"<|endoftext|>": id}}. Under the rule
above the vocabulary (bytes -> rank) is all the encoder needs, so we store tokens, not merge pairs;
GPT-2's `encoder.json` + `vocab.bpe` are read by `BPETokenizer.from_gpt2`.

NOTE: `regex` and tiktoken's Rust regex carry their own Unicode tables. For code points assigned
after Unicode 14 (U+A7CE, U+10940, ... 4,657 with regex 2026.5 and tiktoken 0.14) they may disagree
on whether a character is a letter, and so split such text differently; all others encode alike.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import regex

from tinygpt.core.fileio import write_json_atomic

# GPT-2's pre-tokeniser, as tiktoken writes it. GPT-2's encoder.py has
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# which splits text the same way; the possessive `++` and `\s++$` stop long whitespace runs
# from backtracking. `\s+(?!\S)` leaves the last space of a run to start the next word.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
EOT = "<|endoftext|>"  # GPT-2's end-of-text token, id 50256
GPT2_FILES_SHA256 = {  # the hashes tiktoken's own gpt2 definition checks
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_CACHE_LIMIT = 100_000  # words kept in the per-tokenizer cache before it is cleared


# --- GPT-2's files -----------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, used to write bytes in its files.

    Printable Latin-1 bytes map to themselves; the other 68 (control bytes, space, ...) map to
    chr(256), chr(257), ... in byte order. So " Hello" is written "ĠHello" (' ' -> 'Ġ' = chr(288)).
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def read_checked(path: Path | str, sha256: str | None = None) -> bytes:
    """Read a file's bytes; if `sha256` is given, raise ValueError naming the file on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 BPE file not found: {path}")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 mismatch (expected {sha256}, got "
                         f"{hashlib.sha256(data).hexdigest()}): the file is corrupted or "
                         "not GPT-2's")
    return data


def bundled_gpt2_paths() -> tuple[Path, Path]:
    """Paths of the `encoder.json` and `vocab.bpe` shipped inside the package."""
    root = resources.files("tinygpt") / "assets"
    return Path(str(root / "encoder.json")), Path(str(root / "vocab.bpe"))


def read_gpt2_ranks(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    """Token bytes -> id from GPT-2's two files (no `<|endoftext|>`), checked against each other.

    encoder.json maps each token, written with bytes_to_unicode, to its id. vocab.bpe lists the
    50,000 merges in order; merge i creates token 256 + i, so the two must agree.
    """
    decode = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {bytes(decode[ch] for ch in token): i
             for token, i in json.loads(encoder_json).items() if token != EOT}
    merges = vocab_bpe.decode("utf-8").split("\n")[1:]  # line 0 is "#version: 0.2"
    merges = [line.split() for line in merges if line]
    for i, (left, right) in enumerate(merges):
        token = bytes(decode[ch] for ch in left + right)
        if ranks.get(token) != 256 + i:
            raise ValueError(f"vocab.bpe merge {i} ({left!r} {right!r}) does not match "
                             "encoder.json")
    return ranks


# --- the tokenizer -----------------------------------------------------------------------------

class BPETokenizer:
    """Byte-level BPE: `vocab[id] -> bytes`, plus special tokens matched before pre-tokenising."""

    name = "bpe"

    def __init__(self, tokens: list[bytes], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN):
        self.vocab: dict[int, bytes] = dict(enumerate(tokens))
        self.ranks: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
        if len(self.ranks) != len(tokens):
            raise ValueError("BPE vocabulary has duplicate tokens")
        if any(bytes([b]) not in self.ranks for b in range(256)):
            raise ValueError("BPE vocabulary must contain all 256 single bytes")
        self.special_tokens = dict(special_tokens or {})
        for name, i in self.special_tokens.items():
            if i in self.vocab:
                raise ValueError(f"special token {name!r} id {i} is already a BPE token")
        self.pattern = pattern
        self._word_re = regex.compile(pattern)
        self._cache: dict[bytes, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        """Number of ids: ordinary tokens plus special tokens (GPT-2: 50257)."""
        return len(self.vocab) + len(self.special_tokens)

    vocab_size = n_vocab

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT)

    # --- encoding --------------------------------------------------------------------------

    def _merge_word(self, word: bytes) -> list[int]:
        """BPE on one pre-tokenised word: merge the lowest-rank adjacent pair until none is left."""
        if word in self.ranks:  # tiktoken's shortcut; merging would reach the same token anyway
            return [self.ranks[word]]
        parts = [word[i:i + 1] for i in range(len(word))]
        while len(parts) > 1:
            best_i, best_rank = -1, len(self.ranks)
            for i in range(len(parts) - 1):
                rank = self.ranks.get(parts[i] + parts[i + 1], best_rank)
                if rank < best_rank:  # strict: ties go to the leftmost pair
                    best_i, best_rank = i, rank
            if best_i < 0:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self.ranks[p] for p in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as plain text."""
        ids: list[int] = []
        for word in self._word_re.findall(text):
            word = word.encode("utf-8")
            cached = self._cache.get(word)
            if cached is None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                cached = self._cache[word] = self._merge_word(word)
            ids.extend(cached)
        return ids

    def encode(self, text: str, allowed_special: Iterable[str] | str = "all") -> list[int]:
        """Text -> ids. Specials in `allowed_special` ("all" or a set) get their ids, others are
        encoded as plain text (tiktoken's encode with disallowed_special=())."""
        allowed = set(self.special_tokens if allowed_special == "all" else allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; "
                             f"this tokenizer has {sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        # longest first so that one special token that is a prefix of another cannot win
        longest_first = sorted(allowed, key=len, reverse=True)
        split = "(" + "|".join(regex.escape(s) for s in longest_first) + ")"
        ids: list[int] = []
        for i, chunk in enumerate(regex.split(split, text)):
            if i % 2:  # odd chunks are the captured special tokens
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        names = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        out = []
        for i in ids:
            token = self.vocab.get(i, names.get(i))
            if token is None:
                raise ValueError(f"token id {i} is not in the vocabulary (0..{self.n_vocab - 1})")
            out.append(token)
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; a token that splits a UTF-8 character decodes to U+FFFD, like tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- training --------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (EOT,),
              pattern: str = GPT2_PATTERN) -> BPETokenizer:
        """Learn merges on `text` until there are `vocab_size` ids (256 bytes + merges + specials).

        Each step counts adjacent pairs over the distinct words (weighted by how often each word
        occurs) and merges the most frequent pair into a new token. Ties go to the smallest pair
        of ids, so training is deterministic. Stops early if no pair is left to merge.
        """
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least "
                             f"{256 + len(special_tokens)} (256 bytes + special tokens)")
        if special_tokens:  # never merge across, or into, a special token
            text = regex.sub("|".join(regex.escape(s) for s in special_tokens), " ", text)
        word_counts = Counter(regex.findall(pattern, text))
        words = [(list(w.encode("utf-8")), n) for w, n in word_counts.items()]
        tokens = [bytes([b]) for b in range(256)]
        known = {t: i for i, t in enumerate(tokens)}

        while len(tokens) < 256 + n_merges:
            pair_counts: Counter[tuple[int, int]] = Counter()
            for ids, n in words:
                for pair in zip(ids, ids[1:]):
                    pair_counts[pair] += n
            if not pair_counts:
                break
            best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
            merged = tokens[best[0]] + tokens[best[1]]
            if merged not in known:  # ("a", "bc") can make a token ("ab", "c") already made
                known[merged] = len(tokens)
                tokens.append(merged)
            words = [(_replace_pair(ids, best, known[merged]), n) for ids, n in words]

        specials = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
        return cls(tokens, specials, pattern)

    # --- files -----------------------------------------------------------------------------

    @classmethod
    def from_gpt2(cls, encoder_path: Path | str | None = None,
                  vocab_path: Path | str | None = None) -> BPETokenizer:
        """GPT-2's tokenizer from `encoder.json` + `vocab.bpe` (default: bundled, hash-checked)."""
        if encoder_path is None and vocab_path is None:
            encoder_path, vocab_path = bundled_gpt2_paths()
            encoder = read_checked(encoder_path, GPT2_FILES_SHA256["encoder.json"])
            merges = read_checked(vocab_path, GPT2_FILES_SHA256["vocab.bpe"])
        elif encoder_path is None or vocab_path is None:
            raise ValueError("give both encoder_path and vocab_path, or neither")
        else:
            encoder, merges = read_checked(encoder_path), read_checked(vocab_path)
        ranks = read_gpt2_ranks(encoder, merges)
        tokens = sorted(ranks, key=ranks.get)
        return cls(tokens, {EOT: len(tokens)})

    def save(self, path: Path | str) -> None:
        """Write the tokenizer as one JSON file (format in the module docstring)."""
        state = {"format": "tinygpt-bpe", "version": 1, "pattern": self.pattern,
                 "tokens": [self.vocab[i].hex() for i in range(len(self.vocab))],
                 "special_tokens": self.special_tokens}
        write_json_atomic(path, state, indent=0)

    @classmethod
    def load(cls, path: Path | str) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BPE tokenizer file not found: {path}")
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != "tinygpt-bpe" or state.get("version") != 1:
            raise ValueError(f"{path}: not a tinygpt-bpe version 1 file")
        tokens = [bytes.fromhex(t) for t in state["tokens"]]
        return cls(tokens, state["special_tokens"], state["pattern"])


def _replace_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
