"""An OpenAI-compatible HTTP server for one tinygpt model, on the standard library's http.server.

Owns the wire format: `POST /v1/chat/completions` (one JSON answer, or server-sent events with
`"stream": true`), `GET /v1/models` and `GET /v1/models/{id}`, and the JSON errors OpenAI
clients expect (`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status). The
reply itself is `chat.prepare`'s and `chat.reply`'s: the template, the context fitted, sampling.

    tinygpt serve --model ../shared/fixtures/smollm2-135m-instruct/model.gguf --port 8000
    curl -s 127.0.0.1:8000/v1/chat/completions \
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Any OpenAI client works (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`), and so
does `tinygpt evaluate --api openai --judge http://127.0.0.1:8000`. Honoured: `temperature`
(0-2, 0 is greedy), `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop` (a string or
up to 4), `stream`, `stream_options.include_usage`, and `top_k` (not OpenAI's, llama.cpp's).
`model` may name anything: there is one model, and answers carry its name. `n` must be 1.
Structured output and log-probs (`structured.py`): `response_format` (`json_schema`,
`json_object`) constrains decoding to the schema, and `logprobs` / `top_logprobs` return
OpenAI's `choices[0].logprobs.content`. Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`,
`/api/show`) is `ollama_api.py`'s, on the same server.

Limits (`http_server.Limits`, each a `tinygpt serve` flag): connections, request time, body
and prompt size, messages, and the line of requests waiting while one generates. Requests are
read by a thread each, but the model answers one at a time (`GenerationQueue`; NumPy and numba
already use both cores). The prompt is fitted to the context before a request joins the line,
`max_tokens` is clamped to the context, and a client that leaves stops its generation.

Adding a route: a `do_GET` / `do_POST` branch that reads its body with `read_json()`, checks it
into a RequestError naming the field, and generates inside `self._generate(...)`.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Callable

from tinygpt.apps.chat import Prompt, prepare, reply as sample_reply
from tinygpt.apps.http_server import (BoundedServer, GenerationQueue, JSONHandler, Limits,
                                       RequestError)
from tinygpt.apps.structured import Extras, FieldError, openai_extras
from tinygpt.inference.logprobs import openai_content

MAX_STOP = 4                      # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256              # characters per stop string (each is looked for after each token)
MAX_INT = 2**31 - 1               # largest max_tokens / top_k accepted (then clamped to the model)


class ChatServer(BoundedServer):
    """The server: the model, its tokenizer and template, and the queue generation waits in."""

    def __init__(self, address: tuple[str, int], model, tokenizer, template: str = "chatml",
                 model_name: str = "tinygpt", max_new_tokens: int = 256,
                 log: Callable[[str], None] | None = None, limits: Limits | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.model_name, self.max_new_tokens = model_name, max_new_tokens
        limits = limits or Limits()
        self.queue = GenerationQueue(limits.max_queue)
        self.created = int(time.time())
        super().__init__(address, _Handler, limits, log)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def make_server(model, tokenizer, template: str = "chatml", host: str = "127.0.0.1",
                port: int = 8000, model_name: str = "tinygpt", max_new_tokens: int = 256,
                log: Callable[[str], None] | None = None, limits: Limits | None = None
                ) -> ChatServer:
    """A bound server (port 0 picks a free port: `server.server_address[1]`); run it with
    `serve_forever()` and stop it with `shutdown()` from another thread."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return ChatServer((host, port), model, tokenizer, template, model_name, max_new_tokens, log,
                      limits)


# --- the request ------------------------------------------------------------------------------

def parse_request(body: object, default_max_tokens: int, limits: Limits | None = None
                  ) -> tuple[list[dict], dict, bool, bool]:
    """(messages, keyword arguments for `chat.reply` plus max_new_tokens, stream, include usage
    in the stream) from a chat-completions body; a `RequestError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", "body")
    messages = check_messages(body.get("messages"), limits or Limits())
    if body.get("n") not in (None, 1):
        raise RequestError("only n = 1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    kwargs = {
        "temperature": _number(body.get("temperature"), "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body.get("top_p"), "top_p", 0.0, 1.0, None, open_low=True),
        "top_k": _integer(body.get("top_k"), "top_k", 1, MAX_INT, None),
        "max_new_tokens": _integer(max_tokens, name, 1, MAX_INT, default_max_tokens),
        "seed": _integer(body.get("seed"), "seed", 0, 2**64 - 1, None),
        "stop": _stop(body.get("stop")),
    }
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    return messages, kwargs, bool(stream), bool(options.get("include_usage"))


def check_messages(messages: object, limits: Limits) -> list[dict]:
    """Chat messages as {"role", "content"} dicts within `limits`; a RequestError naming the
    first bad one (Ollama's /api/chat uses it too)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"{len(messages)} messages; the limit is {limits.max_messages} "
                           "(--max-messages)", "messages", code="too_many_messages")
    out, size = [], 0
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{k}] must be an object", f"messages[{k}]")
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role          # OpenAI's newer name
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{k}].role must be system, user or assistant, got "
                               f"{str(role)[:40]!r}", f"messages[{k}].role")
        if isinstance(content, list):           # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{k}].content: only text parts are supported",
                                   f"messages[{k}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{k}].content must be a string",
                               f"messages[{k}].content")
        try:
            size += len(content.encode("utf-8"))
        except UnicodeEncodeError:              # a lone surrogate ("\ud800"): U+FFFD, as HF
            content = content.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            size += len(content.encode("utf-8"))
        if size > limits.max_prompt_bytes:
            raise RequestError(f"the messages are over {limits.max_prompt_bytes} bytes of text, "
                               "the limit (--max-prompt-bytes)", "messages",
                               code="prompt_too_large")
        out.append({"role": role, "content": content})
    return out


def _number(value: object, name: str, lo: float, hi: float, default: float | None,
            open_low: bool = False) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a finite number", name)
    if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
        value = float("inf")                    # float(10**400) would raise
    if not math.isfinite(value) or value < lo or value > hi or (open_low and value == lo):
        low = "(" if open_low else "["
        raise RequestError(f"'{name}' must be a finite number in {low}{lo:g}, {hi:g}]", name)
    return float(value)


def _integer(value: object, name: str, lo: int, hi: int, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", name)
    if not lo <= value <= hi:
        shown = str(value) if abs(value) < 10**30 else f"about 2**{value.bit_length()}"
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {shown}", name)
    return value


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOP} strings of "
                           f"up to {MAX_STOP_CHARS} characters", "stop")
    return stops


# --- the handler ------------------------------------------------------------------------------

class _Handler(JSONHandler):
    server: ChatServer

    def do_GET(self) -> None:
        if self.headers.get("Content-Length", "0").strip() != "0" or \
                self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True         # a body we do not read ends the connection
        path = self.path.split("?")[0].rstrip("/")
        name = self.server.model_name
        if path.startswith("/api/"):
            from tinygpt.apps import ollama_api       # here: it builds on this module's checks
            ollama_api.handle(self, "GET", path)
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{name}":
            self.send_json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            self.send_json_error(RequestError(
                f"no model {path[len('/v1/models/'):][:80]!r}; this server has {name!r}",
                "model", 404, code="model_not_found"))
        elif path == "/v1/chat/completions":
            self.send_json_error(RequestError("use POST", status=405))
        else:
            self.send_json_error(RequestError(f"no endpoint {path[:80] or '/'}", status=404))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path.startswith("/api/"):
            from tinygpt.apps import ollama_api
            ollama_api.handle(self, "POST", path)
            return
        if path != "/v1/chat/completions":
            status = 405 if path.startswith("/v1/models") else 404
            self.close_connection = True         # its body, if any, is left unread
            self.send_json_error(RequestError(f"no endpoint POST {path[:80] or '/'}",
                                              status=status))
            return
        s = self.server
        try:
            body = self.read_json()
            messages, kwargs, stream, usage = parse_request(body, s.max_new_tokens, s.limits)
            extras = openai_extras(body)
            prompt = prepare(s.tokenizer, messages, s.template, s.model.config.block_size,
                             kwargs.pop("max_new_tokens"))
        except FieldError as e:
            self.send_json_error(RequestError(str(e), e.param))
            return
        except RequestError as e:
            self.send_json_error(e)
            return
        except ValueError as e:                  # e.g. a character the tokenizer lacks
            self.send_json_error(RequestError(str(e)[:300], "messages"))
            return
        if stream:
            self._generate(self._stream, prompt, kwargs, usage, extras)
        else:
            self._generate(self._answer, prompt, kwargs, extras)

    def do_PUT(self) -> None:
        self.close_connection = True
        self.send_json_error(RequestError("method not allowed", status=405))

    do_DELETE = do_PATCH = do_PUT

    def _generate(self, answer: Callable, prompt: Prompt, *args) -> None:
        """Run `answer(prompt, *args)` when it is this request's turn with the model; a 503
        with Retry-After when the line is full."""
        def waiting() -> None:
            self.log_message("waiting: another request is generating")

        try:
            with self.server.queue.turn(gone=self.client_gone, on_wait=waiting):
                self.log_message(f"generating up to {prompt.max_new_tokens} tokens after "
                                 f"{len(prompt.ids)} prompt tokens ({prompt.dropped} messages "
                                 "dropped)")
                answer(prompt, *args)
        except RequestError as e:                # QueueFull
            self.send_json_error(e)
        except ConnectionAbortedError:
            self.close_connection = True
            self.log_message("client left while waiting")

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "tinygpt"}

    def _reply(self, prompt: Prompt, kwargs: dict, on_text=None, extras: Extras | None = None):
        s = self.server
        processor = extras.processor(s.tokenizer, s.template) if extras else None
        reply = sample_reply(s.model, s.tokenizer, prompt, s.template, on_text=on_text,
                             cancelled=self.client_gone, logits_processor=processor, **kwargs)
        if reply.finish_reason == "cancelled":
            self.close_connection = True
            self.log_message(f"client left: stopped after {reply.completion_tokens} tokens")
        return reply

    def _logprobs(self, reply, extras: Extras | None, start: int = 0) -> dict | None:
        """OpenAI's `logprobs` of a choice (tokens from `start` on), or None if not asked."""
        if extras is None or not extras.logprobs:
            return None
        entries = extras.entries(reply, self.server.tokenizer, self.server.template)
        return {"content": openai_content(self.server.tokenizer, entries[start:]),
                "refusal": None}

    def _answer(self, prompt: Prompt, kwargs: dict, extras: Extras | None = None) -> None:
        try:
            reply = self._reply(prompt, kwargs, extras=extras)
        except ValueError as e:             # e.g. an id the model's vocabulary lacks
            self.send_json_error(RequestError(str(e)[:300]))
            return
        except Exception as e:
            self.server.handle_error(self.request, self.client_address)
            self.send_json_error(RequestError(f"generation failed: {e}", status=500,
                                              kind="server_error"))
            return
        self.send_json(200, {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": self._logprobs(reply, extras),
                         "finish_reason": reply.finish_reason}],
            "usage": _usage(reply)})

    def _stream(self, prompt: Prompt, kwargs: dict, include_usage: bool,
                extras: Extras | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")     # the end of the body is the end of the stream
        self.end_headers()
        self.close_connection = True
        head = self._head("chat.completion.chunk")

        sent = [0]                    # log-prob entries already sent

        def event(delta: dict, finish: str | None = None, logprobs=None) -> None:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            self._event({**head, "choices": [choice]})

        def piece(text: str) -> None:
            # a token's log-prob is known once the next step starts: a chunk carries those
            # of the tokens before its last, and the final chunk the rest
            rec = extras.recorder if extras is not None and extras.logprobs else None
            lp = None
            if rec is not None:
                lp = {"content": openai_content(self.server.tokenizer, rec.entries[sent[0]:]),
                      "refusal": None}
                sent[0] = len(rec.entries)
            event({"content": text}, logprobs=lp)

        try:
            event({"role": "assistant", "content": ""})
            reply = self._reply(prompt, kwargs, on_text=piece, extras=extras)
            if reply.finish_reason == "cancelled":
                return
            event({}, reply.finish_reason, self._logprobs(reply, extras, sent[0]))
            if include_usage:
                self._event({**head, "choices": [], "usage": _usage(reply)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.log_message("client left during the stream")
        except Exception as e:
            self.server.handle_error(self.request, self.client_address)
            try:      # the status is sent already: the error goes in the stream, as OpenAI's
                self._event({"error": {"message": f"generation failed: {e}",
                                       "type": "server_error", "param": None, "code": None}})
            except OSError:
                pass

    def _head(self, obj: str) -> dict:
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": obj,
                "created": int(time.time()), "model": self.server.model_name}

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")
        self.wfile.flush()


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


__all__ = ["ChatServer", "Limits", "RequestError", "make_server", "parse_request"]
