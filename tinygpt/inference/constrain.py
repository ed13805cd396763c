"""Constrained decoding: at each step only tokens that keep the output inside a regular expression
or a JSON schema can be chosen.

Owns JSON schema -> regex (`schema_regex`), the vocabulary as byte strings (`Vocabulary`), the
token mask of each DFA state (`TokenGuide`, computed on first use and cached) and the logits
processor `generate` calls (`Constraint`). Regex -> byte DFA is `bytedfa.py`'s.

    from tinygpt.inference.constrain import Constraint
    c = Constraint.from_schema(tok, {"type": "object", "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 100}}}, eos_ids={tok.eot_id})
    ids = generate(model, prompt, 20, logits_processor=c.processor(prompt.shape[1]))

A token mask. The DFA runs over bytes and a token is a byte string, so from a state s a token is
allowed when the DFA, fed its bytes from s, never dies. All tokens are walked at once, one byte
column at a time (tokens sorted by length, so column j touches only tokens longer than j): ~320k
table look-ups for GPT-2's vocabulary, a few milliseconds per state, once per state. Each state
keeps the allowed ids and the state after each, so a step costs a cached lookup plus one masked
copy of the logits. End tokens are allowed exactly in accepting states; a state that accepts and
has no way on allows only them.

JSON schema subset: `type` object (`properties`, every property written in the schema's order:
that validates whether or not it is `required`), string (`minLength`, `maxLength`, `enum`),
integer (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`), number, boolean, null,
array (`items`, `minItems`, `maxItems`), `enum`, `const`, `anyOf`, and a list of types. The
layout is json.dumps's: `{"a": 1, "b": [true, null]}`, no other whitespace (a small model
offered free whitespace may spend its whole budget on newlines). `{"type": "json_object"}`
(any object) is written as objects nested at most `ANY_DEPTH` deep.
"""
from __future__ import annotations

import json
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from tinygpt.inference.bytedfa import DEAD, DFA, compile_regex

ANY_DEPTH = 3            # nesting of objects/arrays an unconstrained JSON value may use
GUIDE_CACHE = 32         # compiled patterns kept per vocabulary

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
# finite as a float: at most 15 digits before the point and a two-digit exponent (1e999 is inf)
NUMBER = r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?(?:[eE][+-]?[0-9]{1,2})?"
INTEGER = r"(?:0|-?[1-9][0-9]*)"
_META = set(r"\.^$|?*+()[]{}")


def escape(text: str) -> str:
    """`text` as a regex matching exactly it."""
    return "".join("\\" + c if c in _META else c for c in text)


# --- integer ranges -----------------------------------------------------------------------------

def _same_length(a: str, b: str) -> str:
    """Decimal strings a <= b of one length: a regex for every number between them."""
    if not a:
        return ""
    if a == b:
        return a
    if len(a) == 1:
        return f"[{a}-{b}]"
    if a[0] == b[0]:
        return a[0] + _same_length(a[1:], b[1:])
    n = len(a) - 1
    parts = [a[0] + _group(_same_length(a[1:], "9" * n)),
             b[0] + _group(_same_length("0" * n, b[1:]))]
    if int(b[0]) - int(a[0]) > 1:
        parts.insert(1, f"[{int(a[0]) + 1}-{int(b[0]) - 1}][0-9]{{{n}}}")
    return "(?:" + "|".join(parts) + ")"


def _group(r: str) -> str:
    return r if len(r) <= 1 or r.startswith("(?:") and r.endswith(")") else "(?:" + r + ")"


def _natural_range(lo: int, hi: int | None) -> list[str]:
    """Regexes (no leading zeros) for lo <= n <= hi, n >= 0; hi None is unbounded."""
    parts, digits = [], len(str(lo))
    top = hi if hi is not None else 10 ** digits - 1
    while lo <= top:
        end = min(top, 10 ** len(str(lo)) - 1)
        parts.append(_same_length(str(lo), str(end)))
        lo = end + 1
    if hi is None:
        parts.append(f"[1-9][0-9]{{{digits},}}")
    return parts


def integer_regex(lo: int | None, hi: int | None) -> str:
    """A regex for the integers lo <= n <= hi in JSON (either bound may be None)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"integer range is empty: minimum {lo} > maximum {hi}")
    if lo is None and hi is None:
        return INTEGER
    parts = []
    if hi is None or hi >= 0:                                    # n >= max(lo, 0)
        parts += _natural_range(max(lo or 0, 0), hi)
    if lo is None or lo < 0:                                     # -n for 1 <= n <= -lo
        neg_top = None if lo is None else -lo
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        parts += ["-" + _group(r) for r in _natural_range(neg_lo, neg_top)]
    return "(?:" + "|".join(parts) + ")"


# --- JSON schema -> regex -----------------------------------------------------------------------

def _bound(schema: dict, key: str, where: str) -> int | None:
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"schema {where}: {key} must be a finite number, got {v!r}")
    return v


def _int_bounds(schema: dict, where: str) -> tuple[int | None, int | None]:
    lo, hi = _bound(schema, "minimum", where), _bound(schema, "maximum", where)
    xlo, xhi = _bound(schema, "exclusiveMinimum", where), _bound(schema, "exclusiveMaximum", where)
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    if xlo is not None:
        lo = max(lo, math.floor(xlo) + 1) if lo is not None else math.floor(xlo) + 1
    if xhi is not None:
        hi = min(hi, math.ceil(xhi) - 1) if hi is not None else math.ceil(xhi) - 1
    return lo, hi


def _count(schema: dict, lo_key: str, hi_key: str, where: str) -> tuple[int, int | None]:
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for k, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"schema {where}: {k} must be a non-negative integer, got {v!r}")
    if hi is not None and hi < lo:
        raise ValueError(f"schema {where}: {hi_key} {hi} < {lo_key} {lo}")
    return lo, hi


def _repeat(lo: int, hi: int | None) -> str:
    return f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"


def _items(item: str, lo: int, hi: int | None) -> str:
    """item, item, ... between lo and hi times, comma-separated."""
    if hi == 0:
        return ""
    rest = _repeat(max(lo - 1, 0), None if hi is None else hi - 1)
    body = f"{item}(?:, {item}){rest}"
    return body if lo >= 1 else f"(?:{body})?"


def any_json(depth: int = ANY_DEPTH) -> str:
    """Any JSON value with objects and arrays nested at most `depth` deep."""
    value = f'(?:"{STRING_CHAR}*"|{NUMBER}|true|false|null)'
    for _ in range(depth):
        pair = f'"{STRING_CHAR}*": {value}'
        value = f"(?:{value}|\\{{{_items(pair, 0, None)}\\}}|\\[{_items(value, 0, None)}\\])"
    return value


def any_object(depth: int = ANY_DEPTH) -> str:
    pair = f'"{STRING_CHAR}*": {any_json(depth - 1)}'
    return f"\\{{{_items(pair, 0, None)}\\}}"


def schema_regex(schema: object, where: str = "#") -> str:
    """A regex whose every match is a JSON text valid under `schema` (the subset above)."""
    if schema is True or schema == {}:
        return any_json()
    if not isinstance(schema, dict):
        raise ValueError(f"schema {where}: must be an object, got {type(schema).__name__}")
    for key in ("$ref", "oneOf", "allOf", "not", "if", "patternProperties"):
        if key in schema:
            raise ValueError(f"schema {where}: {key} is not supported")
    if "const" in schema:
        return escape(json.dumps(schema["const"]))
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"schema {where}: enum must be a non-empty list")
        return "(?:" + "|".join(escape(json.dumps(v)) for v in values) + ")"
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise ValueError(f"schema {where}: anyOf must be a non-empty list")
        return "(?:" + "|".join(schema_regex(s, f"{where}/anyOf/{k}")
                                for k, s in enumerate(options)) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        if not kind:
            raise ValueError(f"schema {where}: type must not be an empty list")
        return "(?:" + "|".join(schema_regex({**schema, "type": t}, where) for t in kind) + ")"
    if kind is None:
        return any_object() if "properties" in schema else any_json()
    if kind == "object":
        return _object_regex(schema, where)
    if kind == "array":
        lo, hi = _count(schema, "minItems", "maxItems", where)
        item = schema_regex(schema.get("items", {}), f"{where}/items")
        return f"\\[{_items(item, lo, hi)}\\]"
    if kind == "string":
        for key in ("pattern", "format"):
            if key in schema:
                raise ValueError(f"schema {where}: string {key} is not supported")
        lo, hi = _count(schema, "minLength", "maxLength", where)
        return f'"{STRING_CHAR}{_repeat(lo, hi)}"'
    if kind == "integer":
        return integer_regex(*_int_bounds(schema, where))
    if kind == "number":
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum")):
            raise ValueError(f"schema {where}: bounds on a number are not supported "
                             "(use type integer for a range)")
        return NUMBER
    if kind == "boolean":
        return "(?:true|false)"
    if kind == "null":
        return "null"
    raise ValueError(f"schema {where}: unknown type {kind!r}")


def _object_regex(schema: dict, where: str) -> str:
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError(f"schema {where}: properties must be an object")
    if not props:
        return "\\{\\}" if schema.get("additionalProperties") is False else any_object()
    pairs = [escape(json.dumps(name)) + ": " + schema_regex(sub, f"{where}/properties/{name}")
             for name, sub in props.items()]
    return "\\{" + ", ".join(pairs) + "\\}"


# --- the vocabulary and its masks ---------------------------------------------------------------

def token_bytes(tokenizer) -> list[bytes | None]:
    """Each id's bytes; None for special tokens (they are never part of constrained text)."""
    n = tokenizer.n_vocab
    special = set(getattr(tokenizer, "special_tokens", {}).values())
    special |= {i for i in (getattr(tokenizer, "eot_id", None),
                            getattr(tokenizer, "eos_id", None)) if i is not None}
    if hasattr(tokenizer, "ranks"):                                   # HFTokenizer, BPETokenizer
        out: list[bytes | None] = [None] * n
        for data, i in tokenizer.ranks.items():
            if i < n and i not in special:
                out[i] = data
        return out
    if hasattr(tokenizer, "_enc"):                                    # GPT2Tokenizer (tiktoken)
        return [None if i in special else tokenizer._enc.decode_single_token_bytes(i)
                for i in range(n)]
    return [None if i in special else tokenizer.decode([i]).encode("utf-8") for i in range(n)]


class Vocabulary:
    """A tokenizer's byte strings laid out for walking a DFA over all of them at once."""

    def __init__(self, tokens: list[bytes | None]):
        lengths = np.array([len(t) if t else 0 for t in tokens], dtype=np.int64)
        self.n = len(tokens)
        self.order = np.argsort(-lengths, kind="stable")         # longest first
        self.lengths = lengths[self.order]
        width = int(self.lengths.max(initial=0))
        self.columns = np.zeros((width, self.n), dtype=np.uint8)  # byte j of each sorted token
        for k, i in enumerate(self.order):
            t = tokens[i]
            if t:
                self.columns[:len(t), k] = np.frombuffer(t, dtype=np.uint8)
        # how many sorted tokens are longer than j, for each column j
        self.active = [int((self.lengths > j).sum()) for j in range(width)]
        self.n_text = int((self.lengths > 0).sum())
        self.guides: OrderedDict[str, TokenGuide] = OrderedDict()

    def walk(self, dfa: DFA, state: int) -> np.ndarray:
        """The state after each token from `state`, by token id (DEAD for special tokens)."""
        cur = np.full(self.n, state, dtype=np.int32)
        table = dfa.table
        for j, k in enumerate(self.active):
            cur[:k] = table[cur[:k], self.columns[j, :k]]
        cur[self.n_text:] = DEAD                               # empty byte strings: specials
        out = np.empty_like(cur)
        out[self.order] = cur
        return out

    def guide(self, pattern: str) -> TokenGuide:
        """The (cached) guide for `pattern`; the least recently used of `GUIDE_CACHE` goes."""
        if pattern in self.guides:
            self.guides.move_to_end(pattern)
            return self.guides[pattern]
        g = TokenGuide(compile_regex(pattern), self)
        self.guides[pattern] = g
        if len(self.guides) > GUIDE_CACHE:
            self.guides.popitem(last=False)
        return g


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocabulary(tokenizer) -> Vocabulary:
    """The tokenizer's `Vocabulary`, built once per tokenizer object."""
    v = _VOCABS.get(tokenizer)
    if v is None:
        v = _VOCABS[tokenizer] = Vocabulary(token_bytes(tokenizer))
    return v


@dataclass
class StateMask:
    ids: np.ndarray          # allowed token ids, sorted (end tokens not included)
    next: np.ndarray         # the DFA state after each of them
    accept: bool             # end tokens allowed here
    bias: dict = field(default_factory=dict)   # end ids -> (V,) float32: 0 allowed, -inf not

    def logit_bias(self, eos_ids: np.ndarray, n_vocab: int) -> np.ndarray:
        """Added to the logits: one vectorised add per step instead of a gather and scatter."""
        key = eos_ids.tobytes()
        b = self.bias.get(key)
        if b is None:
            b = np.full(n_vocab, -np.inf, dtype=np.float32)
            b[self.ids] = 0.0
            if self.accept:
                b[eos_ids] = 0.0
            self.bias[key] = b
        return b


@dataclass
class TokenGuide:
    """A DFA and a vocabulary: per state, which tokens may come next (computed once)."""

    dfa: DFA
    vocab: Vocabulary
    masks: dict[int, StateMask] = field(default_factory=dict)

    def mask(self, state: int) -> StateMask:
        m = self.masks.get(state)
        if m is None:
            after = self.vocab.walk(self.dfa, state)
            ids = np.flatnonzero(after != DEAD)
            m = self.masks[state] = StateMask(ids, after[ids], bool(self.dfa.accept[state]))
        return m

    def advance(self, state: int, token: int) -> int:
        """The state after `token`; DEAD if the token was not allowed."""
        m = self.mask(state)
        k = np.searchsorted(m.ids, token)
        return int(m.next[k]) if k < len(m.ids) and m.ids[k] == token else DEAD


class Constraint:
    """A pattern for one tokenizer and its end ids: hands `generate` a fresh processor per run."""

    def __init__(self, tokenizer, pattern: str, eos_ids: Iterable[int]):
        self.guide = vocabulary(tokenizer).guide(pattern)
        self.eos_ids = np.array(sorted({int(i) for i in eos_ids}), dtype=np.int64)
        if not len(self.eos_ids):
            raise ValueError("constrained decoding needs an end token id to finish on")

    @classmethod
    def from_schema(cls, tokenizer, schema: object, eos_ids: Iterable[int]) -> Constraint:
        return cls(tokenizer, schema_regex(schema), eos_ids)

    @classmethod
    def from_regex(cls, tokenizer, pattern: str, eos_ids: Iterable[int]) -> Constraint:
        return cls(tokenizer, pattern, eos_ids)

    def processor(self, prompt_length: int | None = None) -> ConstrainedLogits:
        """A fresh processor; without `prompt_length`, the first call's sequence is the prompt."""
        return ConstrainedLogits(self, prompt_length)


class ConstrainedLogits:
    """`generate`'s logits processor for one sequence: follows the tokens chosen so far
    (`seq[:, prompt_length:]`) through the DFA and masks the logits of every other token."""

    def __init__(self, constraint: Constraint, prompt_length: int | None = None):
        self.c, self.seen, self.state = constraint, prompt_length, constraint.guide.dfa.start

    def __call__(self, seq: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if seq.shape[0] != 1:
            raise ValueError("constrained decoding runs one sequence at a time (batch 1)")
        guide = self.c.guide
        if self.seen is None:
            self.seen = seq.shape[1]
        for token in seq[0, self.seen:]:
            if self.state != DEAD and int(token) not in self.c.eos_ids:
                self.state = guide.advance(self.state, int(token))
        self.seen = seq.shape[1]
        if self.state == DEAD:
            raise ValueError("constrained decoding: a token outside the pattern was chosen")
        m = guide.mask(self.state)
        if not len(m.ids) and not m.accept:
            raise ValueError("constrained decoding: no token of this vocabulary continues the "
                             "pattern here")
        return logits + m.logit_bias(self.c.eos_ids, logits.shape[-1])

    @property
    def finished(self) -> bool:
        """True once the text so far is a whole match."""
        return bool(self.c.guide.dfa.accept[self.state])


__all__ = ["Constraint", "ConstrainedLogits", "TokenGuide", "Vocabulary", "any_json", "any_object",
           "integer_regex", "schema_regex", "token_bytes", "vocabulary"]
