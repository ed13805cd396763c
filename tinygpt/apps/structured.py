"""Structured output and log-probabilities for one request: the wire fields of OpenAI and Ollama
turned into `chat.complete`'s logits processor, and the recorded log-probs turned back.

OpenAI: `response_format` `{"type": "json_schema", "json_schema": {"name", "schema"}}`,
`{"type": "json_object"}` or `{"type": "text"}`; `logprobs` (bool) and `top_logprobs` (0-20).
Ollama: `format` `"json"` or a schema object; `logprobs`, `top_logprobs`. The masks are
`constrain.py`'s (compiled once per pattern and cached on the tokenizer's vocabulary), the
recording `logprobs.py`'s; `serve.py` and `ollama_api.py` call this.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tinygpt.apps.chat import stop_tokens
from tinygpt.inference.constrain import Constraint, any_object, schema_regex
from tinygpt.inference.logprobs import MAX_TOP, LogprobRecorder, chain


class FieldError(ValueError):
    """A bad request field: `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Extras:
    pattern: str | None = None        # the regex the reply must match, if any
    logprobs: bool = False
    top_logprobs: int = 0
    recorder: LogprobRecorder | None = field(default=None, repr=False)

    def processor(self, tokenizer, template: str):
        """The logits processor for one generation (a fresh recorder each time)."""
        constraint = None
        if self.pattern is not None:
            constraint = Constraint(tokenizer, self.pattern, stop_tokens(tokenizer, template)[0])
        self.recorder = LogprobRecorder(self.top_logprobs) if self.logprobs else None
        return chain(constraint.processor() if constraint else None, self.recorder)

    def entries(self, reply, tokenizer, template: str) -> list:
        """The recorded log-probs of the reply's tokens, its end token left out."""
        if self.recorder is None:
            return []
        if reply.tokens and len(self.recorder.entries) < len(reply.tokens):
            self.recorder.finish(reply.tokens[-1])
        ends = stop_tokens(tokenizer, template)[0]
        return [e for e in self.recorder.entries if e.token not in ends]


def _schema_pattern(schema: object, param: str) -> str:
    try:
        return schema_regex(schema)
    except ValueError as e:
        raise FieldError(f"'{param}': {e}", param) from None


def _logprob_fields(body: dict) -> tuple[bool, int]:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise FieldError("'logprobs' must be true or false", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP:
            raise FieldError(f"'top_logprobs' must be an integer in 0..{MAX_TOP}", "top_logprobs")
        if not logprobs:
            raise FieldError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return bool(logprobs), top or 0


def openai_extras(body: dict) -> Extras:
    """`response_format`, `logprobs`, `top_logprobs` of a chat-completions body."""
    logprobs, top = _logprob_fields(body)
    fmt = body.get("response_format")
    pattern = None
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            pattern = any_object()
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise FieldError("'response_format.json_schema.schema' must be an object",
                                 "response_format")
            pattern = _schema_pattern(spec["schema"], "response_format")
        elif kind != "text":
            raise FieldError("'response_format.type' must be text, json_object or json_schema",
                             "response_format")
    return Extras(pattern, logprobs, top)


def ollama_extras(body: dict) -> Extras:
    """`format` ("json" or a JSON schema), `logprobs`, `top_logprobs` of an Ollama body."""
    logprobs, top = _logprob_fields(body)
    fmt = body.get("format")
    if fmt in (None, ""):
        pattern = None
    elif fmt == "json":
        pattern = any_object()
    elif isinstance(fmt, dict):
        pattern = _schema_pattern(fmt, "format")
    else:
        raise FieldError("'format' must be \"json\" or a JSON schema object", "format")
    return Extras(pattern, logprobs, top)


__all__ = ["Extras", "FieldError", "ollama_extras", "openai_extras"]
