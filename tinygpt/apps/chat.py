"""Chat: a conversation rendered in the model's template, its reply streamed token by token.

Owns `render` (a list of `{"role", "content"}` messages as one prompt text) and `encode_chat`
(its ids), `complete` (one reply: `prepare` cuts the prompt to fit the context, `reply` samples
until an end token, a stop string, `max_new_tokens` or `cancelled()`) and `ChatSession` (the
history a terminal chat keeps). The templates' text is `finetune/templates.py`'s, sampling and
the KV cache are `generate.py`'s; the HTTP server that answers with `prepare` and `reply` is
`serve.py`, and the terminal loop is in `commands/serve.py`.

    tinygpt chat --model ../shared/fixtures/smollm2-135m-instruct/model.gguf

Templates. `chatml` (SmolLM2 and other chat models) renders every role natively. The book's
`alpaca` and `phi3` are single-turn formats: a user message becomes the instruction in the
template's prompt, an assistant message is that response followed by the end token, and system
messages are left out (alpaca's preamble is its system prompt). Several turns are then several
examples in a row, each closed by `<|endoftext|>`, which is how the model saw them in training.

The context. Each reply needs room: `min(max_new_tokens, block_size // 2)` tokens are kept free,
and the oldest turns are left out of the prompt until the rest fits (the system message stays).
A single message too long even alone keeps only its last tokens. The reply never runs past
the context: `max_new_tokens` is clamped to what the prompt leaves.

Special tokens come only from the template. Message text is encoded as plain text, so a user who
types `<|im_end|>\n<|im_start|>system` writes those characters and cannot forge a turn.
`encode_chat` and `fit_prompt` build the ids message by message, each encoded once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tinygpt.inference.generate import LogitsProcessor, TextStream, stream
from tinygpt.text.templates import chatml, format_prompt, get_template

ROLES = ("system", "user", "assistant")


@dataclass
class Reply:
    text: str                 # the reply, without end token or stop string
    finish_reason: str        # "stop": an end token or stop string; "length": max_new_tokens;
                              # "cancelled": `cancelled()` said stop
    prompt_tokens: int        # ids the model was given
    completion_tokens: int    # ids it produced (the end token counts)
    dropped: int = 0          # oldest messages left out so the prompt fits the context
    tokens: list[int] = field(default_factory=list)   # the ids produced, end token included


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages as plain {"role", "content"} dicts; a ValueError naming the first bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{k}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{k}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{k}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def render(messages: Sequence[dict], template: str = "chatml") -> str:
    """The prompt text the model continues from: the conversation, then the reply header."""
    messages = check_messages(messages)
    t = get_template(template)
    if t.name == "chatml":
        return chatml(messages, add_generation_prompt=True)
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(format_prompt({"instruction": m["content"]}, t.name))
        elif m["role"] == "assistant":
            parts.append(m["content"] + t.end_token)
    if not parts or messages[-1]["role"] != "user":
        # the reply must follow a prompt header; an empty instruction still gives one
        parts.append(format_prompt({"instruction": ""}, t.name))
    return "".join(parts)


def stop_tokens(tokenizer, template: str) -> tuple[set[int], list[str]]:
    """(ids, strings) that end a reply: the template's end token as one id when the tokenizer has
    it (SmolLM2's <|im_end|>, GPT-2's <|endoftext|>), else as text; plus the tokenizer's own
    end-of-text and eos ids."""
    end = get_template(template).end_token
    ids = {i for i in (getattr(tokenizer, "eot_id", None), getattr(tokenizer, "eos_id", None))
           if i is not None}
    encoded = tokenizer.encode(end)
    if len(encoded) == 1:
        return ids | {int(encoded[0])}, []
    return ids, [end]


# --- the prompt as ids: template text with special tokens, message text as plain text -------

_HOLE = "\0"                    # stands for a message's content while a template is rendered


def _frames(template: str) -> tuple[dict, str, str, str]:
    """({role: (text before content, text after)}, prefix when there is no system message,
    suffix after a final user message, suffix otherwise), cut from the template's own render."""
    t = get_template(template)
    if t.name == "chatml":
        system = [{"role": "system", "content": ""}]
        start = len(chatml(system, add_generation_prompt=False))
        frames = {role: tuple(chatml(system + [{"role": role, "content": _HOLE}],
                                     add_generation_prompt=False)[start:].split(_HOLE))
                  for role in ROLES}
        header = chatml(system, add_generation_prompt=True)[start:]
        return frames, chatml([], add_generation_prompt=False), header, header
    frames = {"user": tuple(format_prompt({"instruction": _HOLE}, t.name).split(_HOLE)),
              "assistant": ("", t.end_token)}            # system messages are left out
    return frames, "", "", format_prompt({"instruction": ""}, t.name)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer.encode(text, allowed_special="all" if special else ()) if text else []


def _message_ids(tokenizer, frames: dict, m: dict) -> list[int]:
    """One message's ids: its frame with special tokens, its content as plain text (a user who
    types `<|im_end|>` gets those characters, not the token that ends a turn)."""
    if m["role"] not in frames:
        return []
    before, after = frames[m["role"]]
    return (_ids(tokenizer, before, True) + _ids(tokenizer, m["content"], False)
            + _ids(tokenizer, after, True))


def encode_chat(tokenizer, messages: Sequence[dict], template: str = "chatml") -> list[int]:
    """The ids of `render(messages, template)`, special tokens only where the template put them."""
    return fit_prompt(tokenizer, messages, template, None)[0]


def fit_prompt(tokenizer, messages: Sequence[dict], template: str, budget: int | None
               ) -> tuple[list[int], int]:
    """(prompt ids, messages dropped): the longest tail of the conversation whose prompt has at
    most `budget` ids (None: no limit). System messages at the start always stay; a kept
    history starts with a user message.

    One pass from the newest message back: each message is encoded once, and the walk stops at
    the first that does not fit, so older history is never tokenized."""
    messages = check_messages(messages)
    frames, prefix, after_user, after_other = _frames(template)
    n_system = 0
    while n_system < len(messages) - 1 and messages[n_system]["role"] == "system":
        n_system += 1
    system, rest = messages[:n_system], messages[n_system:]
    head = _ids(tokenizer, "" if system else prefix, True)
    for m in system:
        head += _message_ids(tokenizer, frames, m)
    tail = _ids(tokenizer, after_user if rest[-1]["role"] == "user" else after_other, True)
    limit = math.inf if budget is None else budget
    kept: list[list[int]] = []               # newest first
    size, start = len(head) + len(tail), None
    for k in range(len(rest) - 1, -1, -1):
        ids = _message_ids(tokenizer, frames, rest[k])
        if size + len(ids) > limit:
            break
        kept.append(ids)
        size += len(ids)
        if k == 0 or rest[k]["role"] != "assistant":   # never start the kept history mid-turn
            start = k
    if start is None:                        # even the last message alone is too long
        ids = head + (kept[0] if kept else _message_ids(tokenizer, frames, rest[-1])) + tail
        return ids[max(0, len(ids) - budget):], len(rest) - 1
    body = [i for ids in reversed(kept[:len(rest) - start]) for i in ids]
    return head + body + tail, start


def complete(model, tokenizer, messages: Sequence[dict], template: str = "chatml", *,
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
             on_text: Callable[[str], None] | None = None,
             cancelled: Callable[[], bool] | None = None,
             logits_processor: LogitsProcessor | None = None) -> Reply:
    """The model's reply to `messages`, streamed to `on_text(piece)` as it is decoded:
    `prepare` then `reply`."""
    prompt = prepare(tokenizer, messages, template, model.config.block_size, max_new_tokens)
    return reply(model, tokenizer, prompt, template, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, stop=stop, on_text=on_text, cancelled=cancelled,
                 logits_processor=logits_processor)


@dataclass
class Prompt:
    ids: list[int]            # the fitted prompt
    dropped: int              # oldest messages left out
    max_new_tokens: int       # the reply's length limit, clamped to the context left


def prepare(tokenizer, messages: Sequence[dict], template: str, block_size: int,
            max_new_tokens: int) -> Prompt:
    """The prompt cut to the context with room for the reply (needs no model: a server runs it
    before it waits for the model). The reply may use all the context the prompt leaves, and
    never more: `max_new_tokens` of 10**30 is the context's length."""
    room = max(1, min(max_new_tokens, block_size // 2))
    ids, dropped = fit_prompt(tokenizer, messages, template, block_size - room)
    return Prompt(ids, dropped, max(1, min(max_new_tokens, block_size - len(ids))))


def reply(model, tokenizer, prompt: Prompt, template: str = "chatml", *,
          temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
          seed: int | None = None, stop: Sequence[str] = (),
          on_text: Callable[[str], None] | None = None,
          cancelled: Callable[[], bool] | None = None,
          logits_processor: LogitsProcessor | None = None) -> Reply:
    """Sample a reply to a prepared prompt.

    Stops at an end token (not part of the text), at the first of the `stop` strings (cut
    there), after `prompt.max_new_tokens`, or when `cancelled()` turns true (checked after
    each token: a server's client has left; finish_reason "cancelled"). A piece is passed on
    only when it ends on a whole character and cannot be the start of a stop string.
    `logits_processor` is `generate.stream`'s (a JSON-schema constraint, a log-prob recorder).
    """
    ids = prompt.ids
    end_ids, end_texts = stop_tokens(tokenizer, template)
    text, stops = TextStream(tokenizer), _StopText(list(stop) + end_texts)

    def emit(piece: str) -> None:
        if piece and on_text is not None:
            on_text(piece)

    n, finish, stopped = 0, "length", False
    tokens = stream(model, np.array([ids]), prompt.max_new_tokens, temperature, top_k, top_p,
                    seed=seed, logits_processor=logits_processor)
    produced = []
    try:
        for token in tokens:
            n += 1
            produced.append(int(token[0]))
            if int(token[0]) in end_ids:
                finish = "stop"
                break
            piece, stopped = stops.push(text.push(int(token[0])))
            emit(piece)
            if stopped:
                break
            if cancelled is not None and cancelled():
                finish = "cancelled"
                break
    finally:
        tokens.close()                   # restores the model's training mode
    if not stopped:                      # bytes of an unfinished character, the held-back tail
        piece, stopped = stops.push(text.flush())
        emit(piece + stops.flush())
    if stopped:
        finish = "stop"
    return Reply(stops.text, finish, len(ids), n, prompt.dropped, produced)


class _StopText:
    """Text in, text out, cut at the first stop string; holds back a tail that could still
    become one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text, self.sent = "", 0

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to pass on, whether a stop string has come)."""
        self.text += piece
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, True
        hold = max([k for s in self.stop for k in range(1, len(s))
                    if self.text.endswith(s[:k])], default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class ChatSession:
    """A conversation with a model: `send(message)` returns the reply and keeps both turns.

    History the context cannot hold is dropped for good, oldest turns first. With a `seed`,
    turn k samples with seed + k, so a whole conversation is reproducible.
    """

    model: object
    tokenizer: object
    template: str = "chatml"
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        get_template(self.template)                  # an unknown name fails here, not mid-chat
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = 0

    def send(self, message: str, on_text: Callable[[str], None] | None = None) -> Reply:
        messages = self.history + [{"role": "user", "content": message}]
        seed = None if self.seed is None else self.seed + self.turns
        reply = complete(self.model, self.tokenizer, messages, self.template,
                         max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                         top_k=self.top_k, top_p=self.top_p, seed=seed, on_text=on_text)
        n_system = 1 if self.system else 0
        kept = messages[:n_system] + messages[n_system + reply.dropped:]
        self.history = kept + [{"role": "assistant", "content": reply.text}]
        self.turns += 1
        return reply
