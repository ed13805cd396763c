"""Judge: score a model's responses 0-100 by asking a larger model, as the book's chapter 7 does.

Owns the book's scoring prompt (byte for byte), the two wire formats a judge speaks and the
scoring loop. The instruction part of the prompt is `finetune/templates.py`'s `format_input`;
responses come from instruction fine-tuning (each entry's "model_response"). Standard library
HTTP only.

    ollama serve & ollama pull llama3
    tinygpt evaluate --responses instruction-data-with-response.json

Wire formats:
- Ollama, `POST /api/chat` (default http://127.0.0.1:11434): the book's request, options seed
  123, temperature 0, num_ctx 2048; the answer streams back as one JSON object per line, each
  with a piece of `message.content`.
- OpenAI-compatible, `POST /v1/chat/completions` (llama.cpp, vLLM, `tinygpt serve`, ...): the
  answer is `choices[0].message.content`.

The score is asked for as JSON, `{"score": N}` under a schema with 0 <= N <= 100 (`scoring.py`:
Ollama's `format`, OpenAI's `response_format`; `tinygpt serve` decodes inside it, so even a
135M judge answers with a number). A server that refuses the schema (a 4xx naming it) is asked
again with the book's free-text prompt, and so is every later entry. With `scoring="expected"`
the score's top log-probabilities are asked for too, and each entry also gets its expected
score. A free-text answer is parsed with `int()` as in the book; only integers 0-100 count, and
an answer that is not one is counted and listed, never averaged. An empty response scores 0 without asking. Connection failures, time-outs
and 5xx answers are retried with exponential backoff; a judge that is down or lacks the model
ends the run with one line saying how to start it.
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tinygpt.finetune.templates import format_input
from tinygpt.scoring import expected_score, parse_score, structured_fields

# chapter 7, section 7.8, byte for byte
JUDGE_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, score the model "
                "response `{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")
OLLAMA_URL = "http://127.0.0.1:11434"
OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}     # the book's
ENDPOINTS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
RESPONSE_KEY = "model_response"      # the book's name for the fine-tuned model's answer
LOOPBACK = ("127.0.0.1", "localhost", "::1")   # a judge on this machine is never reached by proxy


class JudgeError(RuntimeError):
    """The judge cannot be asked (down, model missing, bad reply): one line for the user."""


@dataclass
class Scores:
    scores: list[int] = field(default_factory=list)              # parsed scores, in entry order
    unparsed: list[tuple[int, str]] = field(default_factory=list)  # (entry index, answer)
    total: int = 0                                                # entries scored or tried
    expected: list[float] = field(default_factory=list)   # expected scores, where logprobs came
    structured: bool = True       # False once the judge refused the schema (book's free text)

    @property
    def expected_average(self) -> float | None:
        return sum(self.expected) / len(self.expected) if self.expected else None

    @property
    def average(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None


def judge_prompt(entry: dict, response_key: str = RESPONSE_KEY, template: str = "alpaca") -> str:
    """The book's scoring prompt for one entry; `{prompt}` is the instruction part alone."""
    return JUDGE_PROMPT.format(prompt=format_input(entry, template), output=entry["output"],
                               response=entry[response_key])


def endpoint(url: str | None, api: str) -> str:
    """The URL to POST to: a bare server address gets the API's path (`/api/chat`,
    `/v1/chat/completions`), a `.../v1` base gets `/chat/completions`; a full path is kept."""
    if api not in ENDPOINTS:
        raise ValueError(f"unknown judge API {api!r}; choose ollama or openai")
    url = (url or OLLAMA_URL).rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"judge URL {url!r} is not an http:// or https:// address")
    if parts.path in ("", "/"):
        return url + ENDPOINTS[api]
    if api == "openai" and parts.path.endswith("/v1"):
        return url + "/chat/completions"
    return url


def request_body(prompt: str, model: str, api: str, structured: bool = False,
                 logprobs: bool = False) -> dict:
    """The book's request; `structured` adds the score's JSON schema, `logprobs` asks for the
    tokens' top log-probabilities."""
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        body = {"model": model, "messages": messages, "options": dict(OLLAMA_OPTIONS)}
    else:
        body = {"model": model, "messages": messages, "temperature": 0,
                "seed": OLLAMA_OPTIONS["seed"]}
    if structured:
        body.update(structured_fields(api, logprobs))
    elif logprobs:
        body.update(logprobs=True, top_logprobs=structured_fields(api, True)["top_logprobs"])
    return body


@dataclass
class Answer:
    text: str
    logprobs: list = field(default_factory=list)    # [{"token", "logprob", "top_logprobs"}]


def query(prompt: str, model: str = "llama3", url: str | None = None, api: str = "ollama", *,
          timeout: float = 120.0, api_key: str | None = None) -> str:
    """The judge's whole answer to one prompt (one attempt), as the book asks. Raises
    `JudgeError` for answers that will not improve by asking again, `OSError` for those that
    might."""
    return query_answer(prompt, model, url, api, timeout=timeout, api_key=api_key).text


def query_answer(prompt: str, model: str = "llama3", url: str | None = None,
                 api: str = "ollama", *, timeout: float = 120.0, api_key: str | None = None,
                 structured: bool = False, logprobs: bool = False) -> Answer:
    """`query` with the schema and log-probs options: the answer and its log-probs."""
    target = endpoint(url, api)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(request_body(prompt, model, api, structured, logprobs)).encode("utf-8")
    req = urllib.request.Request(target, data=data, headers=headers, method="POST")
    direct = urllib.parse.urlsplit(target).hostname in LOOPBACK
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}) if direct else
                                         urllib.request.ProxyHandler())
    try:
        with opener.open(req, timeout=timeout) as response:
            if api == "ollama":
                return _read_ndjson(response, target)
            return _read_completion(response.read(), target)
    except urllib.error.HTTPError as e:
        detail = _error_text(e)
        if e.code >= 500 or e.code == 429:
            raise OSError(f"{target} answered HTTP {e.code}: {detail}") from None
        if structured and e.code in (400, 422) and _names_schema(detail):
            raise SchemaRefused(f"{target} refused the score's JSON schema: {detail}") from None
        raise JudgeError(_refusal(e.code, detail, target, model, api)) from None


class SchemaRefused(JudgeError):
    """The server does not take a JSON schema (or log-probs): ask in free text instead."""


def _names_schema(detail: str) -> bool:
    return any(w in detail.lower() for w in ("response_format", "format", "schema", "logprob"))


def _read_ndjson(response, target: str) -> Answer:
    """Ollama's stream: one JSON object per line, each with a piece of the answer."""
    answer, logprobs = [], []
    for line in response:
        if not line.strip():
            continue
        try:
            part = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JudgeError(f"{target} sent a line that is not JSON: {line[:80]!r}") from None
        if not isinstance(part, dict):
            raise JudgeError(f"{target} sent {type(part).__name__}, not a JSON object")
        if "error" in part:
            raise JudgeError(f"{target}: {part['error']}")
        content = (part.get("message") or {}).get("content", "")
        answer.append(content if isinstance(content, str) else "")
        if isinstance(part.get("logprobs"), list):
            logprobs += part["logprobs"]
        if part.get("done"):
            break
    return Answer("".join(answer), logprobs)


def _read_completion(body: bytes, target: str) -> Answer:
    try:
        choice = json.loads(body)["choices"][0]
        content = choice["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise JudgeError(f"{target} did not answer with an OpenAI chat completion "
                         f"(choices[0].message.content): {body[:80]!r}") from None
    logprobs = (choice.get("logprobs") or {}).get("content") if isinstance(choice, dict) else None
    return Answer(content if isinstance(content, str) else "",
                  logprobs if isinstance(logprobs, list) else [])


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", errors="replace")
    except OSError:
        return e.reason or ""
    try:
        err = json.loads(body).get("error", body)
    except (json.JSONDecodeError, AttributeError):
        return body.strip()[:200] or str(e.reason)
    if isinstance(err, dict):
        err = err.get("message", err)
    return str(err)[:200]


def _refusal(code: int, detail: str, target: str, model: str, api: str) -> str:
    if code == 404 and "model" in detail.lower():
        hint = f"; pull it with `ollama pull {model}`" if api == "ollama" else ""
        return f"the judge at {target} has no model {model!r} ({detail}){hint}"
    if code == 404:
        return (f"{target} has no such endpoint (HTTP 404); is it an "
                f"{'Ollama' if api == 'ollama' else 'OpenAI-compatible'} server? (--api)")
    return f"the judge at {target} refused the request: HTTP {code}: {detail}"


def _down(target: str, api: str, model: str, reason: object) -> str:
    if api == "ollama":
        how = f"start it with `ollama serve` (and `ollama pull {model}`)"
    else:
        how = "start an OpenAI-compatible server there, e.g. `tinygpt serve --model PATH`"
    return f"cannot reach the judge at {target} ({reason}); {how}"


def query_with_retries(prompt: str, model: str = "llama3", url: str | None = None,
                       api: str = "ollama", *, timeout: float = 120.0, retries: int = 3,
                       backoff: float = 1.0, api_key: str | None = None,
                       sleep: Callable[[float], None] = time.sleep, structured: bool = False,
                       logprobs: bool = False) -> Answer:
    """`query_answer`, tried again after backoff, 2 x backoff, 4 x backoff, ... seconds when
    the connection fails, times out or the server answers 5xx; then a `JudgeError`."""
    for attempt in range(retries + 1):
        try:
            return query_answer(prompt, model, url, api, timeout=timeout, api_key=api_key,
                                structured=structured, logprobs=logprobs)
        except JudgeError:
            raise
        # HTTPException: a server that closes mid-answer or sends a garbled status line
        except (OSError, http.client.HTTPException) as e:
            if attempt == retries:
                reason = getattr(e, "reason", None) or e
                raise JudgeError(_down(endpoint(url, api), api, model, reason)) from None
            sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def score_responses(entries: Sequence[dict], model: str = "llama3", url: str | None = None,
                    api: str = "ollama", *, response_key: str = RESPONSE_KEY,
                    template: str = "alpaca", timeout: float = 120.0, retries: int = 3,
                    backoff: float = 1.0, api_key: str | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    log: Callable[[str], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep, structured: bool = True,
                    scoring: str = "integer") -> Scores:
    """Ask the judge for every entry's score. `progress(done, total)` after each entry;
    `log(line)` for each answer that is not an integer, and once if the judge refuses the
    schema. `structured=False` asks as the book does; `scoring="expected"` also reads each
    score's top log-probabilities into `Scores.expected`."""
    if scoring not in ("integer", "expected"):
        raise ValueError(f"scoring must be integer or expected, got {scoring!r}")
    for k, entry in enumerate(entries):           # every entry checked before the first query
        if not isinstance(entry, dict):
            raise ValueError(f"entry {k} is not a JSON object")
        for key in ("instruction", "output", response_key):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"entry {k} has no {key!r} text")
    endpoint(url, api)                            # a bad URL fails before any work
    result = Scores(total=len(entries), structured=structured)
    for k, entry in enumerate(entries):
        if not entry[response_key].strip():
            result.scores.append(0)
        else:
            ask = dict(timeout=timeout, retries=retries, backoff=backoff, api_key=api_key,
                       sleep=sleep, logprobs=scoring == "expected")
            prompt = judge_prompt(entry, response_key, template)
            try:
                answer = query_with_retries(prompt, model, url, api,
                                            structured=result.structured, **ask)
            except SchemaRefused as e:
                if log is not None:
                    log(f"{e}; asking in free text, as the book does")
                result.structured = False
                answer = query_with_retries(prompt, model, url, api, structured=False, **ask)
            score = parse_score(answer.text)
            if score is None:
                result.unparsed.append((k, answer.text))
                if log is not None:
                    log(f"Could not convert score: {answer.text!r} (entry {k})")
            else:
                result.scores.append(score)
                expected = expected_score(answer.logprobs) if answer.logprobs else None
                if expected is not None:
                    result.expected.append(expected)
        if progress is not None:
            progress(k + 1, len(entries))
    return result
