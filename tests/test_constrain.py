"""Constrained decoding (tinygpt/bytedfa.py, tinygpt/constrain.py): the regex DFA against Python's
`re`, integer ranges, and random JSON schemas whose every constrained output parses and
validates, on GPT-2's and SmolLM2's vocabularies."""
import json
import math
import re
from collections import deque

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from tinygpt.inference.bytedfa import DEAD, compile_regex
from tinygpt.inference.constrain import (Constraint, any_object, integer_regex, schema_regex, token_bytes,
                               vocabulary)
from tinygpt.inference.generate import generate
from tinygpt.text.tokenizer import GPT2Tokenizer
from tests.strategies import json_schemas
from tests.test_model import tiny_model

SMOLLM2_TOKENIZER = "fixtures/smollm2-135m-instruct/tokenizer/tokenizer.json"
MAX_STEPS = 400          # tokens a random constrained walk may take before it must have ended


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    from tests.conftest import SHARED
    from tinygpt.text.hf_tokenizer import HFTokenizer
    path = SHARED / SMOLLM2_TOKENIZER
    if not path.is_file():
        pytest.skip(f"SmolLM2 tokenizer not found at {path}")
    return HFTokenizer.from_tokenizer_json(path)


# --- the regex DFA ------------------------------------------------------------------------------

PATTERNS = [r"[0-9]+", r"a|bc*", r"(?:ab){2,3}", r"x?y+z*", r"[^a-c]{1,2}d", r"\d{2}-\w+",
            r"(a|b)*abb", r".é?", r"[a-cx-z]*[^\s]", r"(?P<n>[0-9]{1,3})(?:\.[0-9]+)?"]


@pytest.mark.parametrize("pattern", PATTERNS)
@given(text=st.text(st.sampled_from("abcdxyz0159-_ .é\n€"), max_size=7))
def test_dfa_matches_exactly_what_python_re_fullmatches(pattern, text):
    dfa = compile_regex(pattern)
    assert dfa.matches(text.encode("utf-8")) == bool(re.fullmatch(pattern, text))


def test_dfa_state_is_dead_exactly_when_no_continuation_matches():
    dfa = compile_regex(r"ab(?:c|d)")
    assert dfa.walk(b"ab") != DEAD and not dfa.accept[dfa.walk(b"ab")]
    assert dfa.walk(b"ac") == DEAD and dfa.walk(b"abcd") == DEAD
    # a negated class follows a multi-byte character byte by byte, and rejects a broken one
    neg = compile_regex(r"[^a]")
    assert neg.matches("€".encode()) and not neg.matches(b"\xe2\x82") and neg.walk(b"\xe2") != DEAD
    assert neg.walk(b"\xc0") == DEAD                         # never a UTF-8 lead byte


@pytest.mark.parametrize("pattern, needle", [
    (r"(a", "expected )"), (r"a\1", "backreference"), (r"(?=a)", "not supported"),
    (r"*a", "nothing to repeat"), (r"a{5,2}", "reversed"), (r"a{2000}", "above"),
    (r"[^é]", "non-ASCII"), (r"[\u0100-\u2000]", "256"), ("[a-", "end of pattern"),
])
def test_unsupported_or_broken_regexes_say_where(pattern, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        compile_regex(pattern)


# --- integer ranges -----------------------------------------------------------------------------

@given(lo=st.none() | st.integers(-2000, 2000), hi=st.none() | st.integers(-2000, 2000))
@example(lo=0, hi=100)
@example(lo=-10, hi=None)
@example(lo=None, hi=-7)
@example(lo=9, hi=10)
def test_integer_regex_matches_the_range_and_nothing_else(lo, hi):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    dfa = compile_regex(integer_regex(lo, hi))
    for n in range(-2100, 2101, 7) if lo is None or hi is None else range(lo - 12, hi + 13):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert dfa.matches(str(n).encode()) == inside, n
    assert not dfa.matches(b"-0") and not dfa.matches(b"007") and not dfa.matches(b"")


# --- JSON schemas, validated --------------------------------------------------------------------

def _valid(value, schema) -> bool:
    """The subset of JSON schema validation these schemas use."""
    if "enum" in schema:
        return any(value == v and type(value) is type(v) for v in schema["enum"])
    kind = schema["type"]
    if kind == "object":
        return (isinstance(value, dict) and set(value) == set(schema["properties"])
                and all(_valid(value[k], s) for k, s in schema["properties"].items()))
    if kind == "array":
        return (isinstance(value, list)
                and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf)
                and all(_valid(v, schema["items"]) for v in value))
    if kind == "integer":
        return (type(value) is int and value >= schema.get("minimum", -math.inf)
                and value <= schema.get("maximum", math.inf))
    if kind == "number":
        return type(value) in (int, float) and math.isfinite(value)
    if kind == "string":
        return (isinstance(value, str)
                and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf))
    return {"boolean": bool, "null": type(None)}[kind] is type(value)


def _distance_to_accept(dfa) -> np.ndarray:
    """Fewest bytes from each state to an accepting one (BFS on the reversed table)."""
    dist = np.full(dfa.n_states, np.iinfo(np.int64).max)
    back = [[] for _ in range(dfa.n_states)]
    for s in range(1, dfa.n_states):
        for t in set(dfa.table[s].tolist()):
            back[t].append(s)
    todo = deque(np.flatnonzero(dfa.accept).tolist())
    dist[list(todo)] = 0
    while todo:
        t = todo.popleft()
        for s in back[t]:
            if dist[s] > dist[t] + 1:
                dist[s] = dist[t] + 1
                todo.append(s)
    return dist


def _random_constrained_text(tok, schema, seed: int) -> str:
    """Decode under the schema with random logits: half the steps a random allowed token, half
    the allowed token that brings the end nearest, so the walk both wanders and ends."""
    eos = tok.eot_id if tok.eot_id is not None else tok.eos_id
    c = Constraint.from_schema(tok, schema, [eos])
    dist = _distance_to_accept(c.guide.dfa)
    rng = np.random.default_rng(seed)
    proc, seq = c.processor(0), np.zeros((1, 0), dtype=np.int64)
    for _ in range(MAX_STEPS):
        logits = proc(seq, rng.standard_normal((1, tok.n_vocab)).astype(np.float32))[0]
        allowed = np.flatnonzero(np.isfinite(logits))
        assert len(allowed), "a live state with no allowed token"
        if rng.random() < 0.5:
            token = int(rng.choice(allowed))
        elif eos in allowed:
            token = eos
        else:
            m = c.guide.mask(proc.state)
            token = int(m.ids[np.argmin(dist[m.next] + rng.random(len(m.ids)))])
        if token == eos:
            return tok.decode(seq[0].tolist())
        seq = np.concatenate([seq, [[token]]], axis=1)
    raise AssertionError(f"no end after {MAX_STEPS} tokens: {tok.decode(seq[0].tolist())!r}")


@settings(max_examples=5)
@given(schema=json_schemas(), seed=st.integers(0, 2 ** 31))
@example(schema={"type": "object", "properties": {
    "score": {"type": "integer", "minimum": 0, "maximum": 100}}}, seed=0)
def test_every_constrained_output_parses_and_validates_gpt2(gpt2, schema, seed):
    text = _random_constrained_text(gpt2, schema, seed)
    assert _valid(json.loads(text), schema), text


@settings(max_examples=5)
@given(schema=json_schemas(), seed=st.integers(0, 2 ** 31))
def test_every_constrained_output_parses_and_validates_smollm2(smollm2, schema, seed):
    text = _random_constrained_text(smollm2, schema, seed)
    assert _valid(json.loads(text), schema), text


@given(seed=st.integers(0, 2 ** 31))
@settings(max_examples=5)
def test_json_object_gives_an_object(gpt2, seed):
    eos = gpt2.eot_id
    c = Constraint(gpt2, any_object(), [eos])
    dist = _distance_to_accept(c.guide.dfa)
    rng = np.random.default_rng(seed)
    proc, seq = c.processor(0), np.zeros((1, 0), dtype=np.int64)
    for _ in range(MAX_STEPS):
        logits = proc(seq, rng.standard_normal((1, gpt2.n_vocab)))[0]
        m = c.guide.mask(proc.state)
        if np.isfinite(logits[eos]):
            break
        token = int(m.ids[np.argmin(dist[m.next] + 3 * rng.random(len(m.ids)))])
        seq = np.concatenate([seq, [[token]]], axis=1)
    assert isinstance(json.loads(gpt2.decode(seq[0].tolist())), dict)


def test_special_tokens_have_no_bytes_and_end_only_a_whole_match(gpt2):
    assert token_bytes(gpt2)[gpt2.eot_id] is None
    c = Constraint(gpt2, r"[0-9]{2}", [gpt2.eot_id])
    proc = c.processor(1)
    seq = np.array([[gpt2.eot_id]])            # the prompt is not constrained
    logits = proc(seq, np.zeros((1, gpt2.n_vocab)))
    assert np.isneginf(logits[0, gpt2.eot_id])
    allowed = {gpt2.decode([i]) for i in np.flatnonzero(np.isfinite(logits[0]))}
    assert "42" in allowed and "4" in allowed and "423" not in allowed and " 4" not in allowed
    seq = np.array([[gpt2.eot_id] + gpt2.encode("42")])
    logits = proc(seq, np.zeros((1, gpt2.n_vocab)))
    assert np.flatnonzero(np.isfinite(logits[0])).tolist() == [gpt2.eot_id]


def test_masks_are_cached_per_state(gpt2):
    c = Constraint(gpt2, r"(?:ab)+", [gpt2.eot_id])
    first = c.guide.mask(c.guide.dfa.start)
    assert c.guide.mask(c.guide.dfa.start) is first
    assert vocabulary(gpt2).guide(r"(?:ab)+") is c.guide


def test_generate_takes_the_processor_and_stays_in_the_schema(gpt2):
    model = tiny_model(np.float32, seed=3, noise=0.5, vocab_size=gpt2.n_vocab, block_size=64)
    schema = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0,
                                                         "maximum": 100},
                                               "ok": {"type": "boolean"}}}
    c = Constraint.from_schema(gpt2, schema, [gpt2.eot_id])
    prompt = np.array([gpt2.encode("Score:")])
    for seed in range(3):
        out = generate(model, prompt, 40, temperature=1.0, seed=seed, eos_id=gpt2.eot_id,
                       logits_processor=c.processor(prompt.shape[1]))
        ids = out[0, prompt.shape[1]:].tolist()
        assert ids[-1] == gpt2.eot_id, gpt2.decode(ids)
        value = json.loads(gpt2.decode(ids[:-1]))
        assert _valid(value, schema)


@pytest.mark.parametrize("schema, needle", [
    ({"type": "object", "properties": {"a": {"$ref": "#/x"}}}, "#/properties/a: $ref"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "empty"),
    ({"type": "number", "minimum": 0}, "bounds on a number"),
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"type": "widget"}, "unknown type"),
    ({"type": "integer", "minimum": float("nan")}, "finite"),
    ({"type": "array", "items": {"type": "null"}, "minItems": -1}, "minItems"),
    ({"enum": []}, "enum"),
])
def test_unsupported_schemas_name_the_place(schema, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        schema_regex(schema)
