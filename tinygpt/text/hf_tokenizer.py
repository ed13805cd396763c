"""Byte-level BPE tokenizers of Hugging Face models (SmolLM2, ...) built from the model's own files.

Owns `HFTokenizer`, built from a `tokenizer.json` (the Hugging Face tokenizers format) or from
the token lists a GGUF file carries (`tokenizer.ggml.tokens`, `.merges`, ...), and
`apply_chat_template`, the ChatML prompt SmolLM2-Instruct was tuned on. GPT-2's own tokenizer
is in `tokenizer.py`; the BPE algorithm written out step by step is in `bpe.py`; reading GGUF
files is `gguf.py`'s job.

    python -m pytest tests/test_hf_tokenizer.py -q    # SmolLM2's ids, checked against the fixture

How Hugging Face encodes, and how we get the same ids fast:
1. Added tokens (`<|im_start|>`, ...) are cut out of the text first and map straight to their ids.
2. The rest is split into words by the pre-tokenizer's regex (GPT-2's, or GPT-2's after putting
   every digit in a word of its own), and each word becomes its UTF-8 bytes, one token per byte.
3. BPE: Hugging Face repeatedly merges the adjacent pair that comes first in the *merge list*.
   tiktoken merges the pair whose concatenation has the lowest *id*, and returns a word that is
   itself a token without merging at all. The two rules agree only for some vocabularies, so the
   constructor checks (`_tiktoken_rule_is_exact`); SmolLM2's passes, and tiktoken's Rust does the
   work. A vocabulary that fails is encoded by `_merge_by_priority`, Hugging Face's rule in Python.
4. SmolLM2 has no token for 21 of the 256 bytes (0x04, 0xF1, ...; most never occur in UTF-8).
   With no unknown token and no byte fallback Hugging Face drops such a byte from its word and
   merges the bytes around it. tiktoken would fail on it, so it gets a placeholder id past the
   vocabulary, and a text whose ids contain one is encoded again the Python way.

NOTE: SmolLM2's GGUF says `tokenizer.ggml.pre = "smollm"`, which llama.cpp splits digits for (the
original tokenizer.json's Digits step). The fixture's tokenizer.json, written by transformers from
that GGUF, has a plain ByteLevel pre-tokenizer. The two give different ids only where whitespace
comes before a digit ("a  1": Ġ Ġ 1 against ĠĠ 1). Each constructor follows its own input.

NOTE: tiktoken's regex, the `regex` module and the tokenizers package each carry their own
Unicode tables. Tried on every code point (one at a time, between letters, spaces and digits)
all three give the same ids, except on 13 that Unicode 17 made digits (U+11DE0-U+11DE9,
U+16FF4-U+16FF6): tiktoken does not count them as numbers, so "smollm" does not split them off.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import regex
import tiktoken

from tinygpt.text.bpe import GPT2_PATTERN, bytes_to_unicode
from tinygpt.core.validate import read_json_object

# Hugging Face's Sequence[Digits(individual_digits=True), ByteLevel] as one regex: every digit is a
# word (`\p{N}` first); the text between digits is split by GPT-2's regex, so a digit ends a word
# as the end of the text does: ` ?\p{N}++` goes, and `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`.
SMOLLM_PATTERN = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++"""
                  r"""|\s++$|\s+(?![^\s\p{N}])|\s""")
# pre-tokenizers by llama.cpp's `tokenizer.ggml.pre` names
PRE_TOKENIZER_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # `tokenizer.ggml.token_type` values of added tokens
EOT = "<|endoftext|>"                   # SmolLM2's document separator, id 0
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_CACHE_LIMIT = 100_000  # words kept in the Python path's cache before it is cleared
_BYTE_OF_CHAR = {ch: b for b, ch in bytes_to_unicode().items()}


class HFTokenizer:
    """Byte-level BPE from a vocabulary and a merge list, encoding like Hugging Face tokenizers.

    `tokens[i]` is token i written with GPT-2's byte-to-character map (" the" is "Ġthe");
    `merges` are pairs ("Ġ", "t") or strings "Ġ t", highest priority first; `special_tokens`
    maps each added token's text to its id; `pre` names the pre-tokenizer (PRE_TOKENIZER_PATTERNS).
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str | Sequence[str]],
                 special_tokens: Mapping[str, int], pre: str = "gpt2", eos_id: int | None = None,
                 name: str = "hf-bpe", source: str = "tokenizer lists"):
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise ValueError(f"{source}: unknown pre-tokenizer {pre!r} "
                             f"(supported: {', '.join(PRE_TOKENIZER_PATTERNS)})")
        self.name, self.pre, self.eos_id = name, pre, eos_id
        self.special_tokens = dict(special_tokens)
        self._n_vocab = len(tokens)
        for text, i in self.special_tokens.items():
            if not 0 <= i < len(tokens):
                raise ValueError(f"{source}: special token {text!r} has id {i}, outside "
                                 f"0..{len(tokens) - 1}")
        special_ids = set(self.special_tokens.values())
        self.ranks = _token_bytes(tokens, special_ids, source)        # bytes -> id
        self.merge_priority = _merge_priority(merges, self.ranks, source)
        self._word_re = regex.compile(PRE_TOKENIZER_PATTERNS[pre])
        self._cache: dict[bytes, list[int]] = {}
        # tiktoken matches special tokens in no set order; HF takes the longest
        prefix_free = not any(a != b and b.startswith(a) for a in special_tokens
                              for b in special_tokens)
        self.tiktoken_exact = prefix_free and _tiktoken_rule_is_exact(self.ranks,
                                                                      self.merge_priority)
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in self.ranks]
        placeholders = {b: len(tokens) + k for k, b in enumerate(missing)}
        self._has_placeholders = bool(missing)
        self._enc = tiktoken.Encoding(name=name, pat_str=PRE_TOKENIZER_PATTERNS[pre],
                                      mergeable_ranks={**self.ranks, **placeholders},
                                      special_tokens=self.special_tokens)

    # --- constructors ----------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(cls, path: Path | str, name: str = "hf-bpe") -> HFTokenizer:
        """A Hugging Face `tokenizer.json` (byte-level BPE); eos from `tokenizer_config.json`
        beside it, if there is one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        state = _read_json(path)
        model = state.get("model") if isinstance(state, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise ValueError(f"{path}: not a BPE tokenizer (model type {kind!r})")
        _check_hf_options(path, state, model)
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not vocab:
            raise ValueError(f"{path}: model.vocab is missing or empty")
        if not isinstance(merges, list):
            raise ValueError(f"{path}: model.merges is missing")
        added = {t["content"]: t["id"] for t in state.get("added_tokens") or []}
        tokens = _tokens_by_id({**vocab, **added}, path)
        eos_id = _eos_from_config(path.with_name("tokenizer_config.json"), {**vocab, **added})
        return cls(tokens, merges, added, _pre_tokenizer_name(path, state.get("pre_tokenizer")),
                   eos_id=eos_id, name=name, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, object], name: str = "hf-bpe",
                           source: str = "GGUF metadata") -> HFTokenizer:
        """The tokenizer a GGUF file describes, from its metadata as a plain dict of GGUF keys."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}, not 'gpt2' "
                             "(byte-level BPE)")
        tokens, merges = (metadata.get(f"tokenizer.ggml.{k}") for k in ("tokens", "merges"))
        if not isinstance(tokens, (list, tuple)) or not isinstance(merges, (list, tuple)):
            raise ValueError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
        types = metadata.get("tokenizer.ggml.token_type")  # a NumPy array from gguf.py
        types = [1] * len(tokens) if types is None else [int(t) for t in types]
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
        specials = {tokens[i]: i for i, t in enumerate(types)
                    if t in (GGUF_CONTROL, GGUF_USER_DEFINED)}
        return cls(tokens, merges, specials, str(metadata.get("tokenizer.ggml.pre", "gpt2")),
                   eos_id=metadata.get("tokenizer.ggml.eos_token_id"), name=name, source=source)

    def save_pretrained(self, directory: Path | str) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` into `directory`, as a hub folder
        holds them: just the fields `from_tokenizer_json` reads back, so a fine-tuned model's
        folder carries its tokenizer. Returns the tokenizer.json path."""
        from tinygpt.text.bpe import bytes_to_unicode
        from tinygpt.core.fileio import write_json_atomic
        char = bytes_to_unicode()                        # byte -> GPT-2's printable character

        def written(b: bytes) -> str:
            return "".join(char[x] for x in b)

        vocab = {written(b): i for b, i in self.ranks.items()}
        merges = [f"{written(a)} {written(b)}" for (a, b), _ in
                  sorted(self.merge_priority.items(), key=lambda item: item[1])]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        pre = byte_level if self.pre == "gpt2" else {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t, i in self.special_tokens.items()]
        directory = Path(directory)
        write_json_atomic(directory / "tokenizer.json", {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
            "decoder": {**byte_level}, "model": {
                "type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                "merges": merges}})
        names = {i: t for t, i in self.special_tokens.items()}
        config = {"eos_token": names[self.eos_id]} if self.eos_id in names else {}
        write_json_atomic(directory / "tokenizer_config.json", config)
        return directory / "tokenizer.json"

    # --- the shared tokenizer interface ----------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of ids, added tokens included (SmolLM2: 49152)."""
        return self._n_vocab

    vocab_size = n_vocab

    @property
    def eot_id(self) -> int | None:
        """`<|endoftext|>`, the document separator (SmolLM2: 0); chats end at `eos_id` instead."""
        return self.special_tokens.get(EOT)

    def encode(self, text: str, allowed_special: Iterable[str] | str = "all") -> list[int]:
        """Text -> ids. Added tokens in `allowed_special` ("all" or a set) get their ids, others
        are plain text. No BOS is added."""
        allowed = set(self.special_tokens if allowed_special == "all" else allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; "
                             f"this tokenizer has {sorted(self.special_tokens)}")
        if not self.tiktoken_exact:
            return self._encode_python(text, allowed)
        ids = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        if self._has_placeholders and ids and max(ids) >= self._n_vocab:
            return self._encode_python(text, allowed)  # a byte with no token: drop it like HF
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the bytes of their tokens (an added token gives its text in UTF-8)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary (0..{self._n_vocab - 1})")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; a token that splits a UTF-8 character decodes to U+FFFD, like tiktoken
        (a streaming decoder holds such ids back until the character is whole)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- the Hugging Face rule in Python ---------------------------------------------------

    def _encode_python(self, text: str, allowed: set[str]) -> list[int]:
        """Encode by steps 1-4 of the module docstring, merging by merge-list priority."""
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # as tiktoken
        chunks = [text]
        if allowed:  # longest first, so a special token that is a prefix of another cannot win
            longest_first = sorted(allowed, key=len, reverse=True)
            chunks = regex.split("(" + "|".join(map(regex.escape, longest_first)) + ")", text)
        ids: list[int] = []
        for k, chunk in enumerate(chunks):
            if k % 2:  # odd chunks are the captured special tokens
                ids.append(self.special_tokens[chunk])
                continue
            for word in self._word_re.findall(chunk):
                word = word.encode("utf-8")
                cached = self._cache.get(word)
                if cached is None:
                    if len(self._cache) >= _CACHE_LIMIT:
                        self._cache.clear()
                    cached = self._cache[word] = self._merge_by_priority(word)
                ids.extend(cached)
        return ids

    def _merge_by_priority(self, word: bytes) -> list[int]:
        """BPE on one word: merge the adjacent pair earliest in the merge list until none is left
        (ties: leftmost). Bytes with no token of their own are dropped first."""
        parts = [word[i:i + 1] for i in range(len(word)) if word[i:i + 1] in self.ranks]
        while len(parts) > 1:
            best_i, best = -1, math.inf
            for i in range(len(parts) - 1):
                priority = self.merge_priority.get((parts[i], parts[i + 1]), best)
                if priority < best:
                    best_i, best = i, priority
            if best_i < 0:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self.ranks[p] for p in parts]


def _tiktoken_rule_is_exact(ranks: dict[bytes, int],
                            priority: dict[tuple[bytes, bytes], int]) -> bool:
    """True if merging by the merged token's id (tiktoken) gives merge-list BPE's ids on every word.

    (a) The ids of merge results must rise with merge priority; then among listed pairs both rules
    pick the same one. (b) tiktoken may also merge an unlisted pair that concatenates to a token
    ("a" + "bc" = "abc", listed as "ab" + "c"), and returns a word that is a token as that token.
    Neither can happen if merging each token's own bytes by ids uses only listed pairs and ends
    at the token: inside a longer word each final token is built from its own bytes exactly as it
    is built alone (pairs across its edges never merged), so a wrong step in any word would be a
    wrong step in building one token alone. Checking SmolLM2's 49k tokens takes about 0.5 s.
    """
    by_priority = sorted(priority, key=priority.get)
    ids = [ranks[a + b] for a, b in by_priority]
    if any(x >= y for x, y in zip(ids, ids[1:])):
        return False
    for token in ranks:
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 1:
            best_i, best = -1, math.inf
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1], best)
                if rank < best:
                    best_i, best = i, rank
            if best_i < 0 or (parts[best_i], parts[best_i + 1]) not in priority:
                return False  # stuck before reaching the token, or an unlisted pair
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return True


# --- reading the lists -------------------------------------------------------------------------

def _token_bytes(tokens: Sequence[str], special_ids: set[int], source: str) -> dict[bytes, int]:
    """Ordinary tokens, written with GPT-2's byte-to-character map, as bytes -> id."""
    ranks: dict[bytes, int] = {}
    for i, token in enumerate(tokens):
        if i in special_ids:
            continue
        try:
            raw = bytes(_BYTE_OF_CHAR[ch] for ch in token)
        except (KeyError, TypeError):
            raise ValueError(f"{source}: token {i} ({token!r}) is not written byte-level "
                             "(GPT-2's byte-to-character map)") from None
        if not raw or raw in ranks:
            raise ValueError(f"{source}: token {i} ({token!r}) is empty or repeats token "
                             f"{ranks.get(raw)}")
        ranks[raw] = i
    return ranks


def _merge_priority(merges: Sequence[str | Sequence[str]], ranks: dict[bytes, int],
                    source: str) -> dict[tuple[bytes, bytes], int]:
    """(left bytes, right bytes) -> position in the merge list (a repeated pair keeps its last
    position, as Hugging Face's map does)."""
    priority: dict[tuple[bytes, bytes], int] = {}
    for k, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        try:
            left, right = (bytes(_BYTE_OF_CHAR[ch] for ch in part) for part in pair)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{source}: merge {k} ({merge!r}) is not two byte-level "
                             "tokens") from None
        if left not in ranks or right not in ranks or left + right not in ranks:
            raise ValueError(f"{source}: merge {k} ({merge!r}) names a token that is not in "
                             "the vocabulary")
        priority[left, right] = k
    return priority


def _read_json(path: Path) -> dict:
    return read_json_object(path, "tokenizer file")


def _check_hf_options(path: Path, state: dict, model: dict) -> None:
    """Refuse tokenizer.json options this class does not reproduce, rather than differ quietly."""
    normalizer, decoder = state.get("normalizer"), state.get("decoder")
    if normalizer is not None:
        raise ValueError(f"{path}: normalizer {_kind(normalizer)!r} is not supported "
                         "(byte-level BPE has none)")
    if _kind(decoder) != "ByteLevel":
        raise ValueError(f"{path}: not byte-level (decoder {_kind(decoder)!r}, expected "
                         "'ByteLevel')")
    for key, plain in (("dropout", None), ("unk_token", None), ("byte_fallback", False),
                       ("continuing_subword_prefix", ""), ("end_of_word_suffix", ""),
                       ("ignore_merges", False)):
        if model.get(key) not in (plain, None):
            raise ValueError(f"{path}: model.{key} = {model[key]!r} is not supported")
    added = state.get("added_tokens") or []
    if not isinstance(added, list) or not all(_is_added_token(t) for t in added):
        raise ValueError(f"{path}: added_tokens is not a list of {{'id', 'content'}} entries")
    for token in added:
        if any(token.get(k) for k in ("lstrip", "rstrip", "single_word")):
            raise ValueError(f"{path}: added token {token.get('content')!r} uses lstrip/rstrip/"
                             "single_word, which is not supported")


def _is_added_token(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("content"), str)
            and isinstance(entry.get("id"), int))


def _kind(section: object) -> object:
    """The "type" of a tokenizer.json section, or the section itself if it has none."""
    return section.get("type") if isinstance(section, dict) else section


def _pre_tokenizer_name(path: Path, pre: object) -> str:
    """`pre_tokenizer` of a tokenizer.json -> a PRE_TOKENIZER_PATTERNS name."""
    def byte_level(p: object) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel"
                and p.get("use_regex", True) and not p.get("add_prefix_space", False))

    if byte_level(pre):
        return "gpt2"
    kind = _kind(pre)
    steps = pre.get("pretokenizers") if isinstance(pre, dict) else None
    if (kind == "Sequence" and isinstance(steps, list) and len(steps) == 2
            and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1])):
        return "smollm"
    raise ValueError(f"{path}: pre-tokenizer {kind!r} is not supported (expected ByteLevel "
                     "without a prefix space, or Digits(individual_digits) + ByteLevel)")


def _tokens_by_id(vocab: dict[str, int], path: Path) -> list[str]:
    """{token: id} with ids 0..N-1 -> [token 0, token 1, ...]."""
    tokens: list[str | None] = [None] * len(vocab)
    for token, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < len(vocab) or tokens[i] is not None:
            raise ValueError(f"{path}: vocabulary ids are not 0..{len(vocab) - 1}, each once "
                             f"(token {token!r} has id {i!r})")
        tokens[i] = token
    return tokens


def _eos_from_config(config_path: Path, vocab: dict[str, int]) -> int | None:
    if not config_path.is_file():
        return None
    config = _read_json(config_path)
    eos = config.get("eos_token") if isinstance(config, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return vocab.get(eos)


# --- chat --------------------------------------------------------------------------------------

def apply_chat_template(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                        default_system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT) -> str:
    """A conversation as SmolLM2's ChatML prompt, exactly as its `chat_template.jinja` renders it.

    `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, preceded by a system message with
    `default_system_prompt` when the first message is not one, and followed by
    `<|im_start|>assistant\\n` when `add_generation_prompt` (the model writes the reply after it).
    """
    parts = []
    for k, message in enumerate(messages):
        role, content = (message.get(key) if isinstance(message, Mapping) else None
                         for key in ("role", "content"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {k} needs string 'role' and 'content', got {message!r}")
        if k == 0 and role != "system" and default_system_prompt is not None:
            parts.append(f"{IM_START}system\n{default_system_prompt}{IM_END}\n")
        parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
