"""`tinygpt evaluate`, `tinygpt chat` and `tinygpt serve`: the command-line side of judge.py,
chat.py and serve.py (flags, model loading, printing). User errors are raised as ValueError.

    tinygpt chat \
        --model ../shared/fixtures/smollm2-135m-instruct/model.gguf
    tinygpt serve --model MODEL --port 8000 &
    tinygpt evaluate --responses FILE --api openai \
        --judge http://127.0.0.1:8000
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tinygpt.core.validate import check_number
from tinygpt.text.templates import TEMPLATES

DEFAULT_JUDGE = {"ollama": "http://127.0.0.1:11434", "openai": "http://127.0.0.1:8000"}


def add_parsers(sub) -> None:
    _add_evaluate(sub)
    _add_chat(sub)
    _add_serve(sub)


# --- model loading ----------------------------------------------------------------------------

def load_model(spec: str, quantize: str = "none") -> tuple[object, object, str]:
    """(model packed for generation, tokenizer, template name) from anything `--model` names
    (`hub.pretrained.load_pretrained`: a .gguf file, a Llama or GPT-2 folder, a run, a GPT-2 name).
    Llama models are chat models (chatml); GPT-2 models get the book's alpaca template."""
    from tinygpt.models.llama import Llama
    from tinygpt.hub.pretrained import load_pretrained
    pack = {"none": "float32"}.get(quantize, quantize)
    model, tok = load_pretrained(spec, download=False, pack=pack)
    return model, tok, "chatml" if isinstance(model, Llama) else "alpaca"


def _load(args) -> tuple[object, object, str]:
    model, tok, template = load_model(args.model, getattr(args, "quantize", "none"))
    return model, tok, args.template or template


def _add_quantize(p) -> None:
    p.add_argument("--quantize", choices=("none", "int8", "gguf"), default="none",
                   help="weights for decoding: float32 rows (default), int8, or a .gguf "
                   "file's own quantized blocks (gguf)")


# --- flag checks ------------------------------------------------------------------------------

def _check(name: str, value: float | None, lo: float, hi: float | None = None,
           **open_ends: bool) -> None:
    """validate.check_number for a flag that may be left unset (None)."""
    if value is not None:
        check_number(name, value, lo, hi, **open_ends)


def _add_sampling(p) -> None:
    p.add_argument("--template", choices=tuple(TEMPLATES), default=None,
                   help="prompt format (default: chatml for Llama models, alpaca for GPT-2)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")


def _check_sampling(args) -> None:
    _check("--temperature", args.temperature, 0.0)
    _check("--top-p", args.top_p, 0.0, 1.0, lo_open=True)
    _check("--top-k", args.top_k, 1)


# --- evaluate ---------------------------------------------------------------------------------

def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score model responses 0-100 with a judge model "
                       "(Ollama or an OpenAI-compatible server)",
                       description="Ask a judge model to score each entry's response with the "
                       "book's prompt, then print how many scores parsed and their average. "
                       "Start the judge first: `ollama serve` and `ollama pull llama3`, or "
                       "`tinygpt serve --model PATH` with --api openai.")
    p.add_argument("--responses", required=True, help="JSON list or JSONL of entries with "
                   "instruction, input, output and the response")
    p.add_argument("--judge", default=None, help="judge URL (default http://127.0.0.1:11434 "
                   "for ollama, http://127.0.0.1:8000 for openai)")
    p.add_argument("--judge-model", default="llama3", help="model the judge runs (default llama3)")
    p.add_argument("--api", choices=("ollama", "openai"), default="ollama",
                   help="wire format: Ollama's /api/chat or OpenAI's /v1/chat/completions")
    p.add_argument("--response-key", default="model_response",
                   help="entry field holding the response (default model_response)")
    p.add_argument("--template", choices=tuple(TEMPLATES), default="alpaca",
                   help="format of the instruction shown to the judge (default alpaca)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for one whole answer, "
                   "at most 3600 (default 120)")
    p.add_argument("--retries", type=int, default=3, help="tries again after a failed connection, "
                   "a time-out, HTTP 429 or 5xx, at most 10 (default 3)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, "
                   "doubling after each, every wait at most 60 (default 1)")
    p.add_argument("--scoring", choices=("integer", "expected"), default="integer",
                   help="integer: the judge's score (default); expected: also the score's "
                   "expected value from its top log-probabilities")
    p.add_argument("--free-text", action="store_true",
                   help="ask as the book does, without the score's JSON schema (by default "
                   "the score is asked for as {\"score\": 0-100}, and a judge that refuses "
                   "the schema is asked in free text)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_evaluate)


def read_entries(path: str) -> list[dict]:
    """Entries from a JSON list or a JSONL file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a list of entries")
    return data


def run_evaluate(args) -> int:
    from tqdm import tqdm

    from tinygpt.apps.judge import JudgeError, check_settings, score_responses
    check_settings(args.timeout, args.retries, args.backoff, prefix="--")
    from tinygpt.apps.scoring import format_histogram
    entries = read_entries(args.responses)
    bar = tqdm(total=len(entries), desc="Scoring entries", disable=args.quiet, file=sys.stderr)
    try:
        result = score_responses(
            entries, args.judge_model, args.judge or DEFAULT_JUDGE[args.api], args.api,
            response_key=args.response_key, template=args.template, timeout=args.timeout,
            retries=args.retries, backoff=args.backoff,
            api_key=os.environ.get("OPENAI_API_KEY") if args.api == "openai" else None,
            progress=lambda done, total: bar.update(done - bar.n),
            log=lambda line: bar.write(line, file=sys.stderr) if "free text" in line else None,
            structured=not args.free_text, scoring=args.scoring)
    except JudgeError as e:
        raise ValueError(str(e)) from None
    finally:
        bar.close()
    if result.unparsed:
        print(f"{len(result.unparsed)} answers were not an integer from 0 to 100, left out of "
              "the average:")
        for k, answer in result.unparsed:
            print(f"  entry {k}: {answer[:200]!r}")
    how = "JSON schema" if result.structured else "free text, as the book"
    print(f"Number of scores: {len(result.scores)} of {result.total} (asked in {how})")
    if result.average is None:
        print("Average score: none (no answer was a score from 0 to 100)")
        return 0
    print(f"Average score: {result.average:.2f}")
    if args.scoring == "expected":
        if result.expected_average is None:
            print("Expected score: none (the judge sent no log-probabilities)")
        else:
            print(f"Expected score: {result.expected_average:.2f} (from the top "
                  f"log-probabilities of {len(result.expected)} scores)")
    print("Histogram of scores:")
    for line in format_histogram(result.scores):
        print(line)
    return 0


# --- chat -------------------------------------------------------------------------------------

def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal (Ctrl-D or Ctrl-C ends)",
                       description="A chat loop: each line you type is wrapped in the model's "
                       "template with as much of the conversation as fits its context, and the "
                       "reply streams back. /reset forgets the conversation; Ctrl-D, Ctrl-C or "
                       "/quit ends.")
    p.add_argument("--model", required=True, help=".gguf file, Llama hub folder, GPT-2 name, "
                   "training run or model folder")
    p.add_argument("--system", default=None, help="system message (chatml)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")
    _add_sampling(p)
    _add_quantize(p)
    p.set_defaults(run=run_chat)


def run_chat(args, stdin=None, stdout=None) -> int:
    from tinygpt.apps.chat import ChatSession
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    _check_sampling(args)
    _check("--max-new-tokens", args.max_new_tokens, 1)
    interactive = stdin.isatty()
    try:
        model, tok, template = _load(args)
        session = ChatSession(model, tok, template, system=args.system,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        if interactive:
            print(f"chatting with {args.model} ({template}); /reset forgets, Ctrl-D ends",
                  file=sys.stderr)
        while True:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = stdin.readline()
            if not line:                                      # Ctrl-D / end of input
                break
            message = line.rstrip("\n")
            if message.strip() in ("/quit", "/exit"):
                break
            if message.strip() == "/reset":
                session.reset()
                continue
            if not message.strip():
                continue
            session.send(message, on_text=lambda piece: (stdout.write(piece), stdout.flush()))
            stdout.write("\n")
            stdout.flush()
    except KeyboardInterrupt:                                 # Ctrl-C: end quietly
        pass
    if interactive:
        stdout.write("\n")
    stdout.flush()
    return 0


# --- serve ------------------------------------------------------------------------------------

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible /v1/chat/completions server for a "
                       "model", description="Serve one model over HTTP the way OpenAI's API "
                       "does (/v1/chat/completions, streaming or not, and /v1/models) and "
                       "the way Ollama's does (/api/chat, /api/generate, /api/tags, /api/show; "
                       "--port 11434 for code written for Ollama), with JSON-schema output "
                       "(response_format, format) and logprobs; one generation at a time, on "
                       "127.0.0.1 unless --host says otherwise. "
                       "Ctrl-C stops.")
    p.add_argument("--model", required=True, help=".gguf file, Llama hub folder, GPT-2 name, "
                   "training run or model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    p.add_argument("--template", choices=tuple(TEMPLATES), default=None,
                   help="prompt format (default: chatml for Llama models, alpaca for GPT-2)")
    p.add_argument("--name", default=None, help="model id in answers (default: from --model)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="longest reply when a request sets no max_tokens (default 256)")
    p.add_argument("--quiet", action="store_true", help="no request log on stderr")
    from tinygpt.apps.http_server import Limits
    d = Limits()
    limits = p.add_argument_group("limits (what one client can make the server do)")
    limits.add_argument("--request-timeout", type=float, default=d.request_timeout,
                        help="seconds a client has to send each request, headers and body; "
                        f"an idle connection is closed after as long (default "
                        f"{d.request_timeout:g})")
    limits.add_argument("--max-connections", type=int, default=d.max_connections,
                        help="open connections, a thread each; more are answered 503 "
                        f"(default {d.max_connections})")
    limits.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting while one generates; more are answered 503 with "
                        f"Retry-After (default {d.max_queue})")
    limits.add_argument("--max-body", type=int, default=d.max_body,
                        help=f"bytes of request body (default {d.max_body})")
    limits.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes,
                        help=f"bytes of message text in a request (default {d.max_prompt_bytes})")
    limits.add_argument("--max-messages", type=int, default=d.max_messages,
                        help=f"messages in a request (default {d.max_messages})")
    _add_quantize(p)
    p.set_defaults(run=run_serve)


def run_serve(args, ready=None) -> int:
    """`ready(server)` is called once it listens (tests use it to learn the port)."""
    from tinygpt.apps.http_server import Limits
    from tinygpt.apps.serve import make_server
    _check("--port", args.port, 0, 65535)
    _check("--max-tokens", args.max_tokens, 1)
    limits = Limits(args.request_timeout, args.max_connections, args.max_queue, args.max_body,
                    args.max_prompt_bytes, args.max_messages)
    limits.check()                              # before the model loads: a bad flag fails fast
    model, tok, template = _load(args)
    name = args.name or Path(args.model.rstrip("/")).stem or "tinygpt"
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        server = make_server(model, tok, template, args.host, args.port, name, args.max_tokens,
                             log, limits)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"serving {name} ({template}) on {server.url} (POST /chat/completions, GET /models; "
          f"Ollama's POST /api/chat and /api/generate); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --- standalone entry point (until cli.py registers these commands) ----------------------------
