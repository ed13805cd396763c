"""Judge: score a model's responses 0-100 by asking a larger model, as the book's chapter 7 does.

Owns the book's scoring prompt (byte for byte), the two wire formats a judge speaks, one request
under a deadline, its retries and the scoring loop. The instruction part of the prompt is
`finetune/templates.py`'s `format_input`; responses come from instruction fine-tuning (each
entry's "model_response"). Standard library HTTP only.

    ollama serve & ollama pull llama3
    tinygpt evaluate --responses instruction-data-with-response.json

Wire formats:
- Ollama, `POST /api/chat` (default http://127.0.0.1:11434): the book's request, options seed
  123, temperature 0, num_ctx 2048; the answer streams back as one JSON object per line, each
  with a piece of `message.content`, the last with `"done": true`.
- OpenAI-compatible, `POST /v1/chat/completions` (llama.cpp, vLLM, `tinygpt serve`, ...): the
  answer is `choices[0].message.content`.

One request (`query`) gets `timeout` seconds for the whole answer, connecting (the name lookup
included), headers and every byte of the body (`http_client.py`): a watchdog timer cuts the
connection when they are up, so a judge that sends a byte every few seconds, or a stream that
never ends, cannot hold a run. Redirects are never followed: the request, and the API key with
it, goes only to the address given. At most `MAX_ANSWER_BYTES` are read.

`query_with_retries` asks again after a failed connection, a time-out, HTTP 429 or 5xx, waiting
backoff, 2 x backoff, 4 x backoff, ... seconds (or the server's Retry-After, if longer), each wait
at most `MAX_WAIT`; so one entry takes at most (retries + 1) x timeout + retries x MAX_WAIT
seconds before the run ends with one line saying what failed. Other refusals end it at once.

The book parses an answer with `int()`. Here only an integer from 0 to 100 (white space around
it allowed) is a score (`parse_score`); anything else (prose, 150, -5, "1_0", which int() reads
as 10) is counted and listed, never averaged. An empty response scores 0 without asking.
The score is asked for as `{"score": N}` under a JSON schema (`scoring.py`), which `tinygpt
serve` decodes inside; a server that refuses the schema is asked in the book's free text from then
on. `scoring="expected"` also reads the score's top log-probabilities (an expected score).
"""
from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import math
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from tinygpt.apps.http_client import Deadline, Watchdog, connect, connection
from tinygpt.apps.scoring import expected_score, parse_score, structured_fields
from tinygpt.core.validate import check_number
from tinygpt.text.templates import format_input

# chapter 7, section 7.8, byte for byte
JUDGE_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, score the model "
                "response `{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")
OLLAMA_URL = "http://127.0.0.1:11434"
OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}     # the book's
ENDPOINTS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
RESPONSE_KEY = "model_response"      # the book's name for the fine-tuned model's answer

MAX_TIMEOUT = 3600.0          # seconds for one answer
MAX_RETRIES = 10              # tries after the first
MAX_WAIT = 60.0               # seconds of any one wait between tries (backoff or Retry-After)
MAX_ANSWER_BYTES = 1 << 20    # a score is a few bytes; a long-winded judge's stream ~100 KiB


class JudgeError(RuntimeError):
    """The judge cannot be asked (down, model missing, bad reply): one line for the user."""


class _Retryable(OSError):
    """An answer that may improve by asking again (HTTP 429 or 5xx), with the server's
    Retry-After in seconds if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


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
    try:
        parts.port                                   # a port that is not a number, or > 65535
    except ValueError:
        raise ValueError(f"judge URL {url!r} has no valid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
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


def check_settings(timeout: float, retries: int, backoff: float, prefix: str = "") -> None:
    """ValueError naming the setting (with `prefix`, the flag: "--timeout") unless the timeout
    is in (0, MAX_TIMEOUT], retries in [0, MAX_RETRIES] and backoff in [0, MAX_WAIT]."""
    check_number(f"{prefix}timeout", timeout, 0.0, MAX_TIMEOUT, lo_open=True)
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"{prefix}retries must be an integer, got {retries!r}")
    check_number(f"{prefix}retries", retries, 0, MAX_RETRIES)
    check_number(f"{prefix}backoff", backoff, 0.0, MAX_WAIT)


# --- one request --------------------------------------------------------------------------------

def query(prompt: str, model: str = "llama3", url: str | None = None, api: str = "ollama", *,
          timeout: float = 120.0, api_key: str | None = None) -> str:
    """The judge's whole answer to one prompt as the book asks: one request, all of it within
    `timeout` seconds. Raises `JudgeError` for answers that will not improve by asking again,
    `OSError` (or `http.client.HTTPException`) for those that might."""
    return query_answer(prompt, model, url, api, timeout=timeout, api_key=api_key).text


def query_answer(prompt: str, model: str = "llama3", url: str | None = None,
                 api: str = "ollama", *, timeout: float = 120.0, api_key: str | None = None,
                 structured: bool = False, logprobs: bool = False) -> Answer:
    """`query` with the schema and log-probs options: the answer and its log-probs."""
    target = endpoint(url, api)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {_header_safe(api_key)}"
    data = json.dumps(request_body(prompt, model, api, structured, logprobs)).encode("utf-8")
    with _post(target, data, headers, timeout, (model, api, structured)) as lines:
        if api == "ollama":
            return _read_ndjson(lines, target)
        return _read_completion(b"".join(lines), target)


@contextlib.contextmanager
def _post(target: str, data: bytes, headers: dict, timeout: float,
          asked: tuple[str, str]) -> Iterator[Iterator[bytes]]:
    """POST `data` to `target` once and yield the lines of a 2xx answer, each read before the
    deadline `timeout` seconds from now: a timer then shuts the socket down, which ends any
    read at once, and the answer is a time-out however much of it came. `asked` is (model,
    api, structured), for the messages of a refusal."""
    conn, path, proxy_headers = connection(urllib.parse.urlsplit(target), timeout)
    watchdog, response = Watchdog(timeout), None
    try:
        try:
            connect(conn, timeout)
            watchdog.watch(conn.sock)       # held here: conn lets go of it after the headers
            if watchdog.fired:
                raise Deadline(f"no whole answer within {timeout:g} s")
            conn.request("POST", path, body=data, headers={**headers, **proxy_headers})
            response = conn.getresponse()
            if not 200 <= response.status < 300:
                raise _refusal(response, target, *asked)
            yield _lines(response, target)
        except Exception:
            if watchdog.fired:
                raise Deadline(f"no whole answer within {timeout:g} s") from None
            raise
        if watchdog.fired:                       # the answer may look complete but was cut
            raise Deadline(f"no whole answer within {timeout:g} s")
    finally:
        watchdog.cancel()
        if response is not None:
            response.close()
        conn.close()


def _lines(response: http.client.HTTPResponse, target: str) -> Iterator[bytes]:
    """The body's lines, at most MAX_ANSWER_BYTES of them in all."""
    left = MAX_ANSWER_BYTES
    while line := response.readline(left + 1):
        left -= len(line)
        if left < 0:
            raise JudgeError(f"{target} sent more than {MAX_ANSWER_BYTES >> 10} KiB without "
                             "finishing its answer")
        yield line


def _read_ndjson(lines: Iterator[bytes], target: str) -> Answer:
    """Ollama's stream: one JSON object per line, each with a piece of the answer, until the
    one with "done": true. A stream that ends before it was cut short (asked again)."""
    answer, logprobs = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            part = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JudgeError(f"{target} sent a line that is not JSON: {line[:80]!r}") from None
        if not isinstance(part, dict):
            raise JudgeError(f"{target} sent {type(part).__name__}, not a JSON object")
        if "error" in part:
            raise JudgeError(f"{target}: {str(part['error'])[:200]}")
        message = part.get("message")
        content = message.get("content", "") if isinstance(message, dict) else ""
        answer.append(content if isinstance(content, str) else "")
        if isinstance(part.get("logprobs"), list):
            logprobs += part["logprobs"]
        if part.get("done"):
            return Answer("".join(answer), logprobs)
    raise _Retryable(f"{target} ended its stream before the line with \"done\": true")


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


def _header_safe(api_key: str) -> str:
    """The key, unless it holds what an HTTP header cannot carry (the key itself never shown)."""
    for k, ch in enumerate(api_key):
        if not " " < ch <= "~":
            raise ValueError(f"the API key has a character an HTTP header cannot carry at "
                             f"position {k} (a space, line break or non-ASCII letter)")
    return api_key


class SchemaRefused(JudgeError):
    """The server does not take a JSON schema (or log-probs): ask in free text instead."""


def _refusal(response: http.client.HTTPResponse, target: str, model: str,
             api: str, structured: bool = False) -> Exception:
    """The exception for a non-2xx answer: `_Retryable` for 429 and 5xx, `SchemaRefused` for a
    4xx that names the schema we sent, else `JudgeError`."""
    code = response.status
    if 300 <= code < 400:
        where = response.getheader("Location") or "no Location"
        return JudgeError(f"{target} answered HTTP {code}, a redirect to {where[:200]}: not "
                          "followed, so the request and any API key go only to the address "
                          "given; pass the judge's own address with --judge")
    detail = _error_text(response)
    if code >= 500 or code == 429:
        return _Retryable(f"{target} answered HTTP {code}: {detail}",
                          _retry_after(response.getheader("Retry-After")))
    if structured and code in (400, 422) and any(
            w in detail.lower() for w in ("response_format", "format", "schema", "logprob")):
        return SchemaRefused(f"{target} refused the score's JSON schema: {detail}")
    if code == 404 and "model" in detail.lower():
        hint = f"; pull it with `ollama pull {model}`" if api == "ollama" else ""
        return JudgeError(f"the judge at {target} has no model {model!r} ({detail}){hint}")
    if code == 404:
        return JudgeError(f"{target} has no such endpoint (HTTP 404); is it an "
                          f"{'Ollama' if api == 'ollama' else 'OpenAI-compatible'} server? "
                          "(--api)")
    hint = " (is OPENAI_API_KEY set to the judge's key?)" if code in (401, 403) else ""
    return JudgeError(f"the judge at {target} refused the request: HTTP {code}: {detail}{hint}")


def _error_text(response: http.client.HTTPResponse) -> str:
    """An error answer's message, from its JSON "error" if it has one; one short line."""
    try:
        body = response.read(4096).decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        body = ""
    try:
        err = json.loads(body).get("error", body)
    except (json.JSONDecodeError, AttributeError):
        err = body.strip() or response.reason
    if isinstance(err, dict):
        err = err.get("message", err)
    return " ".join(str(err).split())[:200]


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delay-seconds or an HTTP date), None if unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


# --- retries ------------------------------------------------------------------------------------

def query_with_retries(prompt: str, model: str = "llama3", url: str | None = None,
                       api: str = "ollama", *, timeout: float = 120.0, retries: int = 3,
                       backoff: float = 1.0, api_key: str | None = None,
                       sleep: Callable[[float], None] = time.sleep, structured: bool = False,
                       logprobs: bool = False) -> Answer:
    """`query_answer`, tried again after a failed connection, a time-out, HTTP 429 or 5xx, at most
    `retries` times; waits as the module docstring says. Then a `JudgeError`."""
    check_settings(timeout, retries, backoff)
    target = endpoint(url, api)
    for attempt in range(retries + 1):
        try:
            return query_answer(prompt, model, url, api, timeout=timeout, api_key=api_key,
                                structured=structured, logprobs=logprobs)
        except JudgeError:
            raise
        # HTTPException: a server that closes mid-answer or sends a garbled status line
        except (OSError, http.client.HTTPException) as e:
            if attempt == retries:
                raise JudgeError(_gave_up(e, target, api, model, retries + 1, timeout)) from None
            sleep(retry_wait(attempt, backoff, getattr(e, "retry_after", None)))
    raise AssertionError("unreachable")


def retry_wait(attempt: int, backoff: float, retry_after: float | None = None) -> float:
    """Seconds before try `attempt + 1`: backoff x 2^attempt, or the server's Retry-After if
    longer, never more than MAX_WAIT."""
    wait = backoff * 2.0 ** min(attempt, 60)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, MAX_WAIT)


def _gave_up(e: Exception, target: str, api: str, model: str, tries: int,
             timeout: float) -> str:
    times = f"{tries} {'try' if tries == 1 else 'tries'}"
    if isinstance(e, Deadline):
        return (f"the judge at {target} gave no whole answer within {timeout:g} s ({times}); "
                "a slow judge needs a larger --timeout")
    if isinstance(e, _Retryable):
        return f"the judge kept failing ({times}): {e}"
    reason = getattr(e, "reason", None) or e
    if api == "ollama":
        how = f"start it with `ollama serve` (and `ollama pull {model}`)"
    else:
        how = "start an OpenAI-compatible server there, e.g. `tinygpt serve --model PATH`"
    return f"cannot reach the judge at {target} ({reason}; {times}); {how}"


# --- scores -------------------------------------------------------------------------------------

def score_responses(entries: Sequence[dict], model: str = "llama3", url: str | None = None,
                    api: str = "ollama", *, response_key: str = RESPONSE_KEY,
                    template: str = "alpaca", timeout: float = 120.0, retries: int = 3,
                    backoff: float = 1.0, api_key: str | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    log: Callable[[str], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep, structured: bool = True,
                    scoring: str = "integer") -> Scores:
    """Ask the judge for every entry's score. `progress(done, total)` after each entry;
    `log(line)` for each answer that is not a score, and once if the judge refuses the schema.
    `structured=False` asks as the book does; `scoring="expected"` also reads each score's top
    log-probabilities into `Scores.expected`."""
    if scoring not in ("integer", "expected"):
        raise ValueError(f"scoring must be integer or expected, got {scoring!r}")
    for k, entry in enumerate(entries):           # every entry checked before the first query
        if not isinstance(entry, dict):
            raise ValueError(f"entry {k} is not a JSON object")
        for key in ("instruction", "output", response_key):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"entry {k} has no {key!r} text")
    endpoint(url, api)                            # a bad URL or setting fails before any work
    check_settings(timeout, retries, backoff)
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
                    log(f"Not a score from 0 to 100: {answer.text[:200]!r} (entry {k})")
            else:
                result.scores.append(score)
                expected = expected_score(answer.logprobs) if answer.logprobs else None
                if expected is not None:
                    result.expected.append(expected)
        if progress is not None:
            progress(k + 1, len(entries))
    return result
