"""Ollama's HTTP API on `tinygpt serve`: `POST /api/chat`, `POST /api/generate`, `GET /api/tags`,
`POST /api/show`, `GET /api/version`, so `ollama`'s Python client and code written for Ollama
(the book's `query_model`) work unchanged against `tinygpt serve --port 11434`.

Owns the translation of an Ollama request into `chat.complete`'s arguments (`options`:
temperature, top_k, top_p, seed, num_predict, num_ctx, stop) and the answer's wire format:
streamed NDJSON by default (one JSON object per line, each with a piece of `message.content` or
`response`, the last with `"done": true`, `done_reason` and the counts and durations in
nanoseconds), or one object with `"stream": false`. Errors are `{"error": "..."}` with a 4xx/5xx
status. `format` and `logprobs` are `structured.py`'s. The HTTP server itself is `serve.py`'s.

    tinygpt serve --model ../shared/fixtures/smollm2-135m-instruct/model.gguf --port 11434
    curl -s 127.0.0.1:11434/api/chat -d '{"model": "x", "messages": [{"role": "user",
        "content": "Hi"}], "stream": false}'

As in Ollama, a request may name any model (there is one, and answers carry its name), and the
sampling defaults are Ollama's: temperature 0.8, top_k 40, top_p 0.9. `num_ctx` may only
shrink the model's context; `raw`, `images`, `tools` and `suffix` are refused.
"""
from __future__ import annotations

import functools
import json
import math
import time
from datetime import datetime, timezone

from tinygpt.apps.chat import prepare, reply as sample_reply
from tinygpt.inference.logprobs import ollama_logprobs
from tinygpt.apps.serve import check_messages
from tinygpt.apps.structured import ollama_extras

OLLAMA_VERSION = "0.6.3"           # the API version these answers follow
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}     # Ollama's own


class OllamaError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def handle(handler, method: str, path: str) -> None:
    """Answer one request under /api/ on `serve.py`'s handler."""
    routes = {("POST", "/api/chat"): _chat, ("POST", "/api/generate"): _generate,
              ("GET", "/api/tags"): _tags, ("POST", "/api/show"): _show,
              ("GET", "/api/version"): _version, ("GET", "/api/ps"): _tags}
    route = routes.get((method, path))
    try:
        if route is None:
            known = {p for _, p in routes}
            if method == "POST":
                handler.close_connection = True       # its body is left unread
            raise OllamaError(f"{'method not allowed:' if path in known else 'no endpoint'} "
                              f"{method} {path[:80]}", 405 if path in known else 404)
        body = handler.read_json() if method == "POST" else {}
        if not isinstance(body, dict):
            raise OllamaError("the request body must be a JSON object")
        route(handler, body)
    except ValueError as e:           # OllamaError, RequestError, FieldError, a tokenizer's
        _send(handler, getattr(e, "status", 400), {"error": str(e)[:300]},
              getattr(e, "retry_after", None))


def _send(handler, status: int, payload: dict, retry_after: int | None = None) -> None:
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    handler.send_json(status, payload, headers)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --- the request ------------------------------------------------------------------------------

def _number(options: dict, name: str, lo: float, hi: float) -> float | None:
    v = options.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise OllamaError(f"options.{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _integer(options: dict, name: str, lo: int) -> int | None:
    v = options.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise OllamaError(f"options.{name} must be an integer >= {lo}, got {v!r}")
    return v


def generation_args(body: dict, default_max_tokens: int, block_size: int) -> dict:
    """`chat.complete`'s keyword arguments from an Ollama body's `options` (and `keep_alive`,
    `think`, ... ignored, as Ollama ignores options a model lacks)."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError("'options' must be an object")
    temperature = _number(options, "temperature", 0.0, 2.0)
    top_p = _number(options, "top_p", 0.0, 1.0)
    top_k = _integer(options, "top_k", 0)
    num_predict = options.get("num_predict")
    if num_predict is not None and (isinstance(num_predict, bool)
                                    or not isinstance(num_predict, int) or num_predict < -2):
        raise OllamaError(f"options.num_predict must be an integer >= -2, got {num_predict!r}")
    num_ctx = _integer(options, "num_ctx", 1)
    stop = options.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise OllamaError("options.stop must be a string or a list of strings")
    max_new = default_max_tokens if num_predict is None or num_predict < 0 else num_predict
    if num_ctx is not None:
        max_new = min(max_new, max(num_ctx - 1, 1))
    return {"temperature": DEFAULTS["temperature"] if temperature is None else temperature,
            "top_k": top_k or (DEFAULTS["top_k"] if top_k is None else None),
            # top_p 0 keeps only the likeliest token; generate wants a mass above 0
            "top_p": DEFAULTS["top_p"] if top_p is None else max(top_p, 1e-9),
            "seed": _seed(options),
            "max_new_tokens": max(max_new, 1), "stop": stop,
            "context": None if num_ctx is None or num_ctx >= block_size else num_ctx,
            "zero": num_predict == 0}


def _seed(options: dict) -> int | None:
    seed = options.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:
        return None                                  # Ollama's -1: a random seed
    return _integer(options, "seed", 0)


def _messages(handler, body: dict) -> list[dict]:
    messages = body.get("messages")
    if isinstance(messages, list):
        for k, m in enumerate(messages):
            if isinstance(m, dict) and (m.get("images") or m.get("tool_calls")):
                raise OllamaError(f"messages[{k}]: images and tool calls are not supported")
    return check_messages(messages, handler.server.limits)


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise OllamaError("'stream' must be true or false")
    return stream


# --- the answers ------------------------------------------------------------------------------

def _chat(handler, body: dict) -> None:
    for key in ("tools",):
        if body.get(key):
            raise OllamaError(f"'{key}' is not supported")
    if body.get("messages") == []:               # Ollama: an empty chat only loads the model
        _send(handler, 200, {"model": handler.server.model_name, "created_at": _now(),
                             "message": {"role": "assistant", "content": ""}, "done": True,
                             "done_reason": "load"})
        return
    _run(handler, body, _messages(handler, body),
         lambda piece: {"message": {"role": "assistant", "content": piece}})


def _generate(handler, body: dict) -> None:
    for key in ("raw", "images", "suffix"):
        if body.get(key):
            raise OllamaError(f"'{key}' is not supported")
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise OllamaError("'prompt' and 'system' must be strings")
    if not prompt:
        _send(handler, 200, {"model": handler.server.model_name, "created_at": _now(),
                             "response": "", "done": True, "done_reason": "load"})
        return
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    messages = check_messages(messages, handler.server.limits)
    _run(handler, body, messages, lambda piece: {"response": piece})


def _run(handler, body: dict, messages: list[dict], shape) -> None:
    """Check the request, fit the prompt, then generate when it is this request's turn."""
    s = handler.server
    stream = _stream_flag(body)
    args = generation_args(body, s.max_new_tokens, s.model.config.block_size)
    extras = ollama_extras(body)
    zero, context = args.pop("zero"), args.pop("context")
    prompt = prepare(s.tokenizer, messages, s.template, context or s.model.config.block_size,
                     args.pop("max_new_tokens"))
    handler._generate(functools.partial(_answer, handler), prompt, args, extras, stream, zero,
                      shape)


def _answer(handler, prompt, args: dict, extras, stream: bool, zero: bool, shape) -> None:
    s = handler.server
    head = {"model": s.model_name}
    if stream:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True

    def line(payload: dict) -> None:
        handler.wfile.write(json.dumps(payload).encode("utf-8") + b"\n")
        handler.wfile.flush()

    sent = [0]

    def piece(text: str) -> None:
        out = {**head, "created_at": _now(), **shape(text), "done": False}
        if extras.recorder is not None:     # a token's log-prob is known a step later
            out["logprobs"] = ollama_logprobs(s.tokenizer, extras.recorder.entries[sent[0]:])
            sent[0] = len(extras.recorder.entries)
        line(out)

    start = time.perf_counter_ns()
    try:
        processor = extras.processor(s.tokenizer, s.template)
        reply = None if zero else sample_reply(
            s.model, s.tokenizer, prompt, s.template, on_text=piece if stream else None,
            cancelled=handler.client_gone, logits_processor=processor, **args)
        if reply is not None and reply.finish_reason == "cancelled":
            handler.close_connection = True
            return
        took = time.perf_counter_ns() - start
        final = {**head, "created_at": _now(),
                 **shape("" if stream or reply is None else reply.text), "done": True,
                 "done_reason": "stop" if reply is None else reply.finish_reason,
                 "total_duration": took, "load_duration": 0,
                 "prompt_eval_count": len(prompt.ids), "prompt_eval_duration": 0,
                 "eval_count": 0 if reply is None else reply.completion_tokens,
                 "eval_duration": took}
        if extras.logprobs and reply is not None:
            entries = extras.entries(reply, s.tokenizer, s.template)
            final["logprobs"] = ollama_logprobs(s.tokenizer, entries[sent[0]:])
        if stream:
            line(final)
        else:
            _send(handler, 200, final)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        handler.log_message("client left during the stream")
    except Exception as e:
        s.handle_error(handler.request, handler.client_address)
        status = 400 if isinstance(e, ValueError) else 500
        try:          # a stream's status is sent already: the error is its last line
            line({"error": f"generation failed: {e}"}) if stream else \
                _send(handler, status, {"error": f"generation failed: {e}"})
        except OSError:
            pass


def _details(server) -> dict:
    model = server.model
    n = sum(p.data.size for _, p in model.named_parameters()) \
        if hasattr(model, "named_parameters") else 0
    family = type(model).__name__.lower()
    return {"parent_model": "", "format": "tinygpt", "family": family, "families": [family],
            "parameter_size": f"{n / 1e6:.0f}M" if n >= 1e6 else "", "quantization_level": ""}


def _tags(handler, body: dict) -> None:
    s = handler.server
    stamp = datetime.fromtimestamp(s.created, timezone.utc).isoformat().replace("+00:00", "Z")
    name = s.model_name
    _send(handler, 200, {"models": [{"name": name, "model": name, "modified_at": stamp,
                                     "size": 0, "digest": "", "details": _details(s)}]})


def _show(handler, body: dict) -> None:
    s = handler.server
    cfg = s.model.config
    info = {f"tinygpt.{k}": v for k, v in vars(cfg).items()
            if isinstance(v, (int, float, str, bool))}
    _send(handler, 200, {"modelfile": f"FROM {s.model_name}\n", "parameters": "",
                         "template": s.template, "details": _details(s), "model_info": info,
                         "capabilities": ["completion"],
                         "modified_at": datetime.fromtimestamp(s.created, timezone.utc)
                         .isoformat().replace("+00:00", "Z")})


def _version(handler, body: dict) -> None:
    _send(handler, 200, {"version": OLLAMA_VERSION})


__all__ = ["OLLAMA_VERSION", "OllamaError", "generation_args", "handle"]
