"""The judge's score as data: the JSON schema it is asked to answer in, the answer parsed, the
expected score read from the score's top log-probabilities, and a histogram of the scores.

A small judge asked for "the integer number only" often answers with words; asked with a JSON
schema (OpenAI's `response_format`, Ollama's `format`; `tinygpt serve` constrains decoding to
it) every answer is `{"score": N}` with 0 <= N <= 100. `judge.py` sends the request and falls
back to the book's free-text prompt when the server refuses the schema.

Expected score. With `logprobs`, the judge's answer comes with the top alternatives of each
token. At the token where the score's digits begin, each alternative is a different score: its
digits, followed by the digits the judge actually wrote after that token (an alternative that
ends the number, or starts with 0, is that number alone; digits past 100 are dropped). The
expected score is the probability-weighted mean over the alternatives that give a score 0-100,
renormalised. With SmolLM2's one-digit tokens "85" becomes 0.6 x 85 + 0.3 x 95 + 0.1 x 15 if
"8", "9" and "1" were the alternatives; with GPT-2's "85" as one token it is exact.
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

SCORE_MIN, SCORE_MAX = 0, 100
SCORE_SCHEMA = {"type": "object",
                "properties": {"score": {"type": "integer", "minimum": SCORE_MIN,
                                         "maximum": SCORE_MAX}},
                "required": ["score"], "additionalProperties": False}
TOP_LOGPROBS = 20           # alternatives asked for per token (OpenAI's and Ollama's maximum)
_JSON_SCORE = re.compile(r'"score"\s*:\s*')
_INTEGER = re.compile(r"[+-]?\d+")
_ASCII_INTEGER = re.compile(r"[0-9]{1,3}")


def structured_fields(api: str, logprobs: bool = False) -> dict:
    """The request fields that ask `api` for `{"score": N}` (and the score's log-probs)."""
    fields: dict = {}
    if api == "ollama":
        fields["format"] = SCORE_SCHEMA
    else:
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "score", "strict": True, "schema": SCORE_SCHEMA}}
    if logprobs:
        fields.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
    return fields


def parse_score(answer: str) -> int | None:
    """The score in an answer: `{"score": N}`, or as in the book `int(answer)`; only integers
    0-100 count (None otherwise)."""
    text = answer.strip()
    value: object = None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        value = obj.get("score") if isinstance(obj, dict) else None
        if isinstance(value, bool) or not isinstance(value, int):
            return None
    elif _ASCII_INTEGER.fullmatch(text):    # int() would also take "1_0" and other scripts' digits
        value = int(text)
    else:
        return None
    return value if SCORE_MIN <= value <= SCORE_MAX else None


def _score_start(text: str) -> int | None:
    """Index in `text` of the score's first digit."""
    m = _JSON_SCORE.search(text)
    if m:
        return m.end() if m.end() < len(text) and text[m.end()].isdigit() else None
    m = re.search(r"\d", text)
    return m.start() if m else None


def _value(alt_digits: str, later: str) -> int | None:
    if not alt_digits:
        return None
    if alt_digits.startswith("0"):
        return 0 if alt_digits == "0" else None
    digits = alt_digits + later
    while digits and int(digits) > SCORE_MAX and len(digits) > len(alt_digits):
        digits = digits[:-1]
    value = int(digits)
    return value if value <= SCORE_MAX else None


def expected_score(logprobs: Sequence[dict]) -> float | None:
    """The expected score from an answer's tokens `[{"token", "logprob", "top_logprobs":
    [{"token", "logprob"}, ...]}, ...]` (OpenAI's and Ollama's shape); None if the answer has
    no score or no alternatives."""
    texts = [e.get("token", "") if isinstance(e, dict) else "" for e in logprobs]
    full = "".join(texts)
    start = _score_start(full)
    if start is None:
        return None
    pos = 0
    for k, t in enumerate(texts):
        if pos + len(t) > start:
            break
        pos += len(t)
    else:
        return None
    pre = texts[k][:start - pos]                    # text of the token before the digits
    own = re.match(r"\d*", texts[k][start - pos:]).group()
    number = re.match(r"\d*", full[start:]).group()
    later = number[len(own):] if texts[k][start - pos:] == own else ""
    total = weighted = 0.0
    for alt in logprobs[k].get("top_logprobs") or []:
        tok, lp = alt.get("token", ""), alt.get("logprob")
        if not isinstance(tok, str) or not isinstance(lp, (int, float)) or not tok.startswith(pre):
            continue
        rest = tok[len(pre):]
        digits = re.match(r"\d*", rest).group()
        value = _value(digits, later if digits == rest else "")
        if value is None:
            continue
        p = math.exp(lp)
        total += p
        weighted += p * value
    return weighted / total if total > 0 else None


def histogram(scores: Sequence[float], width: int = 10) -> list[tuple[str, int]]:
    """(label, count) for 0-9, 10-19, ..., 90-99 and 100 (`width` points per bar)."""
    bins = [0] * (SCORE_MAX // width + 1)
    for s in scores:
        bins[min(int(s) // width, len(bins) - 1)] += 1
    labels = [f"{lo}-{lo + width - 1}" for lo in range(0, SCORE_MAX, width)] + [str(SCORE_MAX)]
    return list(zip(labels, bins))


def format_histogram(scores: Sequence[float], bar: int = 40) -> list[str]:
    """Text lines: label, count and a bar of '#' scaled to the largest bin."""
    rows = histogram(scores)
    top = max((n for _, n in rows), default=0) or 1
    return [f"  {label:>6} {n:4d} {'#' * math.ceil(n * bar / top) if n else ''}"
            for label, n in rows]


__all__ = ["SCORE_SCHEMA", "expected_score", "format_histogram", "histogram", "parse_score",
           "structured_fields"]
