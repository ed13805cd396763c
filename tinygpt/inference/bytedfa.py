"""Regular expressions compiled to a DFA over UTF-8 bytes, for constrained decoding.

Owns a small regex parser (the subset structured output needs), Thompson's NFA and the subset
construction to a trimmed DFA whose table is a NumPy array (S, 256). Token masks built from the
DFA are `constrain.py`'s. Byte-level, because tokens are byte strings: a token may end in the
middle of a character, and the DFA follows it there.

    python -c "from tinygpt.inference.bytedfa import compile_regex; d = compile_regex('[0-9]+'); \
print(d.matches(b'42'), d.matches(b'4a'))"

The language is always the whole string (a full match: `^` at the start and `$` at the end are
accepted and mean nothing more). Supported: literals, `.`, classes `[a-z_]` and `[^...]`,
escapes `\\d \\w \\s` (ASCII meanings) and their capitals, `\\xHH`, `\\uHHHH`, `\\n \\t \\r \\f
\\v`, groups `(...)`, `(?:...)`, `(?P<name>...)`, alternation `|`, and the quantifiers `* + ?
{m} {m,} {m,n}` (a lazy `?` after one changes nothing: the language is the same). Non-ASCII
characters are their UTF-8 bytes; a negated class and `.` match any well-formed UTF-8
character outside the class. Not supported (a ValueError): backreferences, lookarounds, anchors
in the middle, non-ASCII ranges of more than 256 characters.

State 0 of every DFA is the dead state (no continuation can match); `start` is 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_STATES = 20_000        # a DFA past this is refused: its table alone would be ~20 MB
MAX_REPEAT = 1_000         # the largest {m,n} bound written out
DEAD = 0

# well-formed UTF-8 of one non-ASCII character (RFC 3629, table 3-7 of the Unicode standard)
_UTF8_MULTI = [
    [(0xC2, 0xDF), (0x80, 0xBF)],
    [(0xE0, 0xE0), (0xA0, 0xBF), (0x80, 0xBF)],
    [(0xE1, 0xEC), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xED, 0xED), (0x80, 0x9F), (0x80, 0xBF)],
    [(0xEE, 0xEF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF0, 0xF0), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF1, 0xF3), (0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF4, 0xF4), (0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)],
]
_DIGITS = frozenset(range(0x30, 0x3A))
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SPACE = frozenset(b" \t\n\r\f\v")
_SHORTHAND = {"d": _DIGITS, "w": _WORD, "s": _SPACE}
_CONTROL = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
_ASCII = frozenset(range(128))

# --- the syntax tree: ("set", frozenset of bytes) | ("seq", [...]) | ("alt", [...]) |
#     ("repeat", node, lo, hi or None) -------------------------------------------------------

EMPTY = ("seq", [])


def _literal(ch: str) -> tuple:
    data = ch.encode("utf-8")
    return ("set", frozenset(data)) if len(data) == 1 else \
        ("seq", [("set", frozenset([b])) for b in data])


def _any_multibyte() -> tuple:
    return ("alt", [("seq", [("set", frozenset(range(lo, hi + 1))) for lo, hi in seq])
                    for seq in _UTF8_MULTI])


def _char_class(ascii_bytes: frozenset, others: list[str], negated: bool, where: str) -> tuple:
    if negated:
        if others:
            raise ValueError(f"regex {where}: a negated class with non-ASCII characters is not "
                             "supported")
        return ("alt", [("set", _ASCII - ascii_bytes), _any_multibyte()])
    parts = [("set", ascii_bytes)] if ascii_bytes else []
    return ("alt", parts + [_literal(c) for c in others])


class _Parser:
    """Recursive descent: alternation > sequence > quantified atom."""

    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r} at {self.i}: {what}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise self.error("unexpected end of pattern")
        ch = self.p[self.i]
        self.i += 1
        return ch

    def parse(self) -> tuple:
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() == "$":
            self.i += 1
        if self.i != len(self.p):
            raise self.error(f"unexpected {self.p[self.i]!r}")
        return node

    def alternation(self) -> tuple:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self) -> tuple:
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$" and self.i == len(self.p) - 1:
                break
            items.append(self.quantified())
        return ("seq", items)

    def quantified(self) -> tuple:
        node = self.atom()
        while True:
            ch = self.peek()
            if ch in ("*", "+", "?"):
                self.i += 1
                node = ("repeat", node, 0 if ch != "+" else 1, 1 if ch == "?" else None)
            elif ch == "{" and self._brace_ahead():
                lo, hi = self.braces()
                node = ("repeat", node, lo, hi)
            else:
                return node
            if self.peek() == "?":                  # lazy: the same language
                self.i += 1

    def _brace_ahead(self) -> bool:
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        return bool(body) and all(c.isdigit() or c == "," for c in body) and body[0] != ","

    def braces(self) -> tuple[int, int | None]:
        end = self.p.index("}", self.i)
        body, self.i = self.p[self.i + 1:end], end + 1
        lo, _, hi = body.partition(",")
        lo_n = int(lo)
        hi_n = lo_n if "," not in body else (int(hi) if hi else None)
        if hi_n is not None and hi_n < lo_n:
            raise self.error(f"{{{body}}}: the bounds are reversed")
        if max(lo_n, hi_n or 0) > MAX_REPEAT:
            raise self.error(f"{{{body}}}: bounds above {MAX_REPEAT} are not supported")
        return lo_n, hi_n

    def atom(self) -> tuple:
        ch = self.take()
        if ch == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or self.p.startswith("?<", self.i):
                if self.p.startswith("?<=", self.i) or self.p.startswith("?<!", self.i):
                    raise self.error("lookbehind is not supported")
                self.i = self.p.index(">", self.i) + 1
            elif self.peek() == "?":
                raise self.error("this group kind (lookaround, flags) is not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("expected )")
            self.i += 1
            return node
        if ch == "[":
            return self.char_class()
        if ch == ".":
            return ("alt", [("set", _ASCII - {0x0A}), _any_multibyte()])
        if ch == "\\":
            return self.escape(in_class=False)
        if ch in "*+?{":
            if ch == "{" and not self._brace_ahead_at(self.i - 1):
                return _literal(ch)
            raise self.error(f"nothing to repeat before {ch!r}")
        if ch in ")^$":
            raise self.error(f"unexpected {ch!r}")
        return _literal(ch)

    def _brace_ahead_at(self, i: int) -> bool:
        saved, self.i = self.i, i
        try:
            return self._brace_ahead()
        finally:
            self.i = saved

    def escape(self, in_class: bool):
        """An escape after the backslash: a node, or in a class (bytes, char or None)."""
        ch = self.take()
        if ch.lower() in _SHORTHAND:
            s = _SHORTHAND[ch.lower()]
            if ch.islower():
                return ("set", s) if not in_class else (s, None)
            if in_class:
                raise self.error(f"\\{ch} inside a class is not supported")
            return _char_class(s, [], True, repr(self.p))
        if ch in "xu":
            n = 2 if ch == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.error(f"\\{ch} needs {n} hex digits")
            self.i += n
            ch = chr(int(digits, 16))
        elif ch in _CONTROL:
            ch = _CONTROL[ch]
        elif ch.isalnum():
            raise self.error(f"\\{ch} is not supported (backreference or unknown escape)")
        return (frozenset(), ch) if in_class else _literal(ch)

    def char_class(self) -> tuple:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ascii_bytes: set[int] = set()
        others: list[str] = []
        first = True
        while first or self.peek() != "]":
            first = False
            lo_set, lo = self.class_item()
            ascii_bytes |= lo_set
            if lo is None:
                continue
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                _, hi = self.class_item()
                if hi is None or hi < lo:
                    raise self.error(f"bad range {lo!r}-{hi!r}")
                chars = range(ord(lo), ord(hi) + 1)
            else:
                chars = range(ord(lo), ord(lo) + 1)
            big = [c for c in chars if c >= 128]
            if len(big) > 256:
                raise self.error("non-ASCII ranges of more than 256 characters are not supported")
            ascii_bytes |= {c for c in chars if c < 128}
            others += [chr(c) for c in big]
        self.i += 1
        return _char_class(frozenset(ascii_bytes), others, negated, repr(self.p))

    def class_item(self) -> tuple[frozenset, str | None]:
        ch = self.take()
        if ch == "\\":
            return self.escape(in_class=True)
        return frozenset(), ch


def parse(pattern: str) -> tuple:
    """The syntax tree of `pattern`, or a ValueError saying where it is not supported."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
    return _Parser(pattern).parse()


# --- Thompson NFA -------------------------------------------------------------------------------

class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[frozenset, int]]] = []

    def state(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        """(entry, exit) states of a fragment matching `node`."""
        kind = node[0]
        a, b = self.state(), self.state()
        if kind == "set":
            self.edges[a].append((node[1], b))
        elif kind == "seq":
            cur = a
            for item in node[1]:
                s, e = self.build(item)
                self.eps[cur].append(s)
                cur = e
            self.eps[cur].append(b)
        elif kind == "alt":
            for item in node[1]:
                s, e = self.build(item)
                self.eps[a].append(s)
                self.eps[e].append(b)
        else:                                         # repeat: lo copies, then the optional rest
            _, item, lo, hi = node
            cur = a
            for _ in range(lo):
                s, e = self.build(item)
                self.eps[cur].append(s)
                cur = e
            if hi is None:
                s, e = self.build(item)
                self.eps[cur] += [s, b]
                self.eps[e] += [s, b]
            else:
                for _ in range(hi - lo):
                    s, e = self.build(item)
                    self.eps[cur] += [s, b]
                    cur = e
            self.eps[cur].append(b)
        return a, b


@dataclass(frozen=True)
class DFA:
    """A trimmed byte DFA: every live state can still reach an accepting one."""

    table: np.ndarray       # (S, 256) int32: next state; 0 is dead
    accept: np.ndarray      # (S,) bool
    pattern: str = ""
    start: int = 1

    @property
    def n_states(self) -> int:
        return self.table.shape[0]

    def walk(self, data: bytes, state: int | None = None) -> int:
        s = self.start if state is None else state
        for b in data:
            s = int(self.table[s, b])
        return s

    def matches(self, data: bytes) -> bool:
        return bool(self.accept[self.walk(data)])


def _byte_classes(sets: list[frozenset]) -> tuple[np.ndarray, list[frozenset]]:
    """Bytes that every set treats alike share a class: (class of each byte (256,), for each
    set the classes it holds). A JSON schema's ~40 sets give ~20 classes, not 256 bytes."""
    signature = {}
    byte_class = np.zeros(256, dtype=np.int64)
    for b in range(256):
        key = tuple(b in s for s in sets)
        byte_class[b] = signature.setdefault(key, len(signature))
    return byte_class, [frozenset(int(byte_class[b]) for b in s) for s in sets]


def compile_regex(pattern: str) -> DFA:
    """The DFA of `pattern` (a full match over its UTF-8 bytes)."""
    nfa = _NFA()
    entry, final = nfa.build(parse(pattern))
    distinct = sorted({s for edges in nfa.edges for s, _ in edges}, key=sorted)
    byte_class, as_classes = _byte_classes(distinct)
    class_of_set = dict(zip(distinct, as_classes))
    edges = [[(class_of_set[s], t) for s, t in out] for out in nfa.edges]
    n_classes = int(byte_class.max()) + 1

    def closure(states) -> frozenset:
        seen, todo = set(states), list(states)
        while todo:
            for t in nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    index = {frozenset(): DEAD}
    subsets = [frozenset()]
    rows = [[DEAD] * n_classes]
    todo = [closure([entry])]
    index[todo[0]] = 1
    subsets.append(todo[0])
    rows.append(None)
    while todo:
        current = todo.pop()
        row = [DEAD] * n_classes
        for c in range(n_classes):
            nxt = closure([t for s in current for classes, t in edges[s] if c in classes])
            if nxt not in index:
                if len(subsets) >= MAX_STATES:
                    raise ValueError(f"regex {pattern[:80]!r}: its DFA passes {MAX_STATES} "
                                     "states; shorten its repeats or bounds")
                index[nxt] = len(subsets)
                subsets.append(nxt)
                rows.append(None)
                todo.append(nxt)
            row[c] = index[nxt]
        rows[index[current]] = row
    table = np.array(rows, dtype=np.int32)
    accept = np.array([final in s for s in subsets])
    table, accept = _minimize(*_trim(table, accept))
    return DFA(table[:, byte_class].astype(np.int32), accept, pattern)


def _trim(table: np.ndarray, accept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Send every state that cannot reach acceptance to the dead state, so 'not dead' means
    'some continuation matches' (an empty class, [^\\x00-\\x7f] with no ASCII, makes such)."""
    live = accept.copy()
    while True:
        grown = live | live[table].any(axis=1)
        grown[DEAD] = False
        if (grown == live).all():
            break
        live = grown
    table = np.where(live[table], table, DEAD)
    if not live[1]:
        raise ValueError("the pattern matches nothing")
    return table, accept & live


def _minimize(table: np.ndarray, accept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moore's partition refinement: states that no input tells apart become one (fewer states,
    fewer token masks to compute). The dead state stays 0 and the start state 1."""
    part = np.where(np.arange(len(accept)) == DEAD, 0, np.where(accept, 1, 2))
    n = len(np.unique(part))
    while True:
        keys = np.concatenate([part[:, None], part[table]], axis=1)
        _, new = np.unique(keys, axis=0, return_inverse=True)
        new = new.reshape(-1)
        m = int(new.max()) + 1
        part = new
        if m == n:
            break
        n = m
    # renumber so that dead is 0 and start is 1, the rest in first-seen order
    order = [int(part[DEAD]), int(part[1])]
    order += [int(p) for p in dict.fromkeys(part.tolist()) if p not in order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    first = np.zeros(n, dtype=np.int64)
    first[rank[part[::-1]]] = np.arange(len(part))[::-1]          # one member of each class
    return rank[part[table[first]]].astype(np.int32), accept[first]


__all__ = ["DFA", "DEAD", "compile_regex", "parse"]
