"""An OpenAI-compatible HTTP server for one tinygpt model, on the standard library's http.server.

Owns the wire format: `POST /v1/chat/completions` (one JSON answer, or server-sent events with
`"stream": true`), `GET /v1/models` and `GET /v1/models/{id}`, and the JSON errors OpenAI
clients expect (`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status). The
reply itself is `chat.complete`'s: the model's template, the context fitted, sampling.

    tinygpt serve --model ../shared/fixtures/smollm2-135m-instruct/model.gguf --port 8000
    curl -s 127.0.0.1:8000/v1/chat/completions \
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Any OpenAI client works (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`), and so
does `tinygpt evaluate --api openai --judge http://127.0.0.1:8000`. Honoured: `temperature`
(0-2, 0 is greedy), `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop` (a string or
up to 4), `stream`, `stream_options.include_usage`, and `top_k` (not OpenAI's, llama.cpp's).
`model` may name anything: there is one model, and answers carry its name. `n` must be 1.

Requests are read by a thread each, but the model answers one at a time: a second request waits
for the lock while the first is generating (NumPy and numba already use both cores).
"""
from __future__ import annotations

import json
import math
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from tinygpt import ollama_api
from tinygpt.chat import complete
from tinygpt.logprobs import openai_content
from tinygpt.structured import FieldError, openai_extras

MAX_BODY = 8 * 1024 * 1024        # bytes; a prompt of a few thousand tokens is ~50 KB
MAX_STOP = 4                      # OpenAI's limit on stop strings


class RequestError(ValueError):
    """A bad request: sent back as a JSON error with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


class ChatServer(ThreadingHTTPServer):
    """The server: the model, its tokenizer and template, and the lock generation holds."""

    daemon_threads = True         # a client that hangs does not keep the process alive

    def __init__(self, address: tuple[str, int], model, tokenizer, template: str = "chatml",
                 model_name: str = "tinygpt", max_new_tokens: int = 256,
                 log: Callable[[str], None] | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.model_name, self.max_new_tokens = model_name, max_new_tokens
        self.log = log or (lambda line: None)
        self.lock = threading.Lock()
        self.created = int(time.time())
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        # socketserver prints tracebacks to stderr; a library hands them to its log instead
        self.log(f"error while serving {client_address[0]}:\n{traceback.format_exc()}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def make_server(model, tokenizer, template: str = "chatml", host: str = "127.0.0.1",
                port: int = 8000, model_name: str = "tinygpt", max_new_tokens: int = 256,
                log: Callable[[str], None] | None = None) -> ChatServer:
    """A bound server (port 0 picks a free port: `server.server_address[1]`); run it with
    `serve_forever()` and stop it with `shutdown()` from another thread."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return ChatServer((host, port), model, tokenizer, template, model_name, max_new_tokens, log)


# --- the request ------------------------------------------------------------------------------

def parse_request(body: object, default_max_tokens: int) -> tuple[list[dict], dict, bool, bool]:
    """(messages, keyword arguments for `chat.complete`, stream, include usage in the stream)
    from a chat-completions body; a `RequestError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    if body.get("n") not in (None, 1):
        raise RequestError("only n = 1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs = {
        "temperature": _number(body.get("temperature"), "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body.get("top_p"), "top_p", 0.0, 1.0, None, open_low=True),
        "top_k": _integer(body.get("top_k"), "top_k", 1, None),
        "max_new_tokens": _integer(max_tokens, "max_tokens", 1, default_max_tokens),
        "seed": _integer(body.get("seed"), "seed", None, None),
        "stop": _stop(body.get("stop")),
    }
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    return messages, kwargs, bool(stream), bool(options.get("include_usage"))


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{k}] must be an object", f"messages[{k}]")
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role          # OpenAI's newer name
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{k}].role must be system, user or assistant, got "
                               f"{role!r}", f"messages[{k}].role")
        if isinstance(content, list):           # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{k}].content: only text parts are supported",
                                   f"messages[{k}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{k}].content must be a string",
                               f"messages[{k}].content")
        out.append({"role": role, "content": content})
    return out


def _number(value: object, name: str, lo: float, hi: float, default: float | None,
            open_low: bool = False) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a finite number", name)
    if value < lo or value > hi or (open_low and value == lo):
        low = "(" if open_low else "["
        raise RequestError(f"'{name}' must be in {low}{lo:g}, {hi:g}], got {value}", name)
    return float(value)


def _integer(value: object, name: str, lo: int | None, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", name)
    if lo is not None and value < lo:
        raise RequestError(f"'{name}' must be >= {lo}, got {value}", name)
    return value


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) for s in stops)):
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOP} strings", "stop")
    return stops


# --- the handler ------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive for JSON answers; streams close at the end
    server_version = "tinygpt"
    timeout = 60                        # seconds a client may take to send its request
    server: ChatServer

    def log_message(self, format: str, *args) -> None:
        self.server.log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        name = self.server.model_name
        if path.startswith("/api/"):
            ollama_api.handle(self, "GET", path)
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{name}":
            self._send_json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            self._send_error(RequestError(f"no model {path[len('/v1/models/'):]!r}; this server "
                                          f"has {name!r}", "model", 404, code="model_not_found"))
        elif path == "/v1/chat/completions":
            self._send_error(RequestError("use POST", status=405))
        else:
            self._send_error(RequestError(f"no endpoint {path or '/'}", status=404))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path.startswith("/api/"):
            ollama_api.handle(self, "POST", path)
            return
        if path != "/v1/chat/completions":
            status = 405 if path.startswith("/v1/models") else 404
            self.close_connection = True         # its body, if any, is left unread
            self._send_error(RequestError(f"no endpoint POST {path or '/'}", status=status))
            return
        try:
            body = self._read_json()
            messages, kwargs, stream, usage = parse_request(body, self.server.max_new_tokens)
            extras = openai_extras(body)
        except FieldError as e:
            self._send_error(RequestError(str(e), e.param))
            return
        except RequestError as e:
            self._send_error(e)
            return
        if self.server.lock.locked():
            self.log_message("waiting: another request is generating")
        with self.server.lock:                 # one generation at a time; the others wait here
            if stream:
                self._stream(messages, kwargs, usage, extras)
            else:
                self._answer(messages, kwargs, extras)

    def do_PUT(self) -> None:
        self.close_connection = True
        self._send_error(RequestError("method not allowed", status=405))

    do_DELETE = do_PATCH = do_PUT

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "tinygpt"}

    def _read_json(self) -> object:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length",
                               status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a request body with Content-Length is required", status=411)
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY:
            self.close_connection = True      # the body is left unread: the connection is spent
            raise RequestError(f"the request body is {n} bytes; the limit is {MAX_BODY}",
                               status=413)
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None

    def _reply(self, messages: list[dict], kwargs: dict, on_text=None, extras=None):
        s = self.server
        processor = extras.processor(s.tokenizer, s.template) if extras else None
        return complete(s.model, s.tokenizer, messages, s.template, on_text=on_text,
                        logits_processor=processor, **kwargs)

    def _logprobs(self, reply, extras, start: int = 0) -> dict | None:
        """OpenAI's `logprobs` of a choice (tokens from `start` on), or None if not asked."""
        if extras is None or not extras.logprobs:
            return None
        entries = extras.entries(reply, self.server.tokenizer, self.server.template)
        return {"content": openai_content(self.server.tokenizer, entries[start:]),
                "refusal": None}

    def _answer(self, messages: list[dict], kwargs: dict, extras=None) -> None:
        try:
            reply = self._reply(messages, kwargs, extras=extras)
        except ValueError as e:             # e.g. an id the model's vocabulary lacks
            self._send_error(RequestError(str(e)))
            return
        except Exception as e:
            self.server.handle_error(self.request, self.client_address)
            self._send_error(RequestError(f"generation failed: {e}", status=500,
                                          kind="server_error"))
            return
        self._send_json(200, {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": self._logprobs(reply, extras),
                         "finish_reason": reply.finish_reason}],
            "usage": _usage(reply)})

    def _stream(self, messages: list[dict], kwargs: dict, include_usage: bool,
                extras=None) -> None:
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
            rec = extras.recorder if extras is not None and extras.logprobs else None
            lp = None
            if rec is not None:       # the tokens decoded since the last piece
                lp = {"content": openai_content(self.server.tokenizer, rec.entries[sent[0]:]),
                      "refusal": None}
                sent[0] = len(rec.entries)
            event({"content": text}, logprobs=lp)

        try:
            event({"role": "assistant", "content": ""})
            reply = self._reply(messages, kwargs, on_text=piece, extras=extras)
            event({}, reply.finish_reason, self._logprobs(reply, extras, sent[0]))
            if include_usage:
                self._event({**head, "choices": [], "usage": _usage(reply)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
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

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind,
                                             "param": e.param, "code": e.code}})


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


__all__ = ["ChatServer", "RequestError", "make_server", "parse_request"]
