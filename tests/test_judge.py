"""The judge against fake servers on 127.0.0.1: both wire formats, a slow one, one that answers
prose, one that is down, one without the model; and the `evaluate` command."""
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.judge_fakes import ENTRIES, fake_judges, free_port, ollama_says, openai_says
from tinygpt.apps.judge import (JudgeError, endpoint, judge_prompt, query_with_retries,
                                score_responses)
from tinygpt.commands.cli import main
from tinygpt.apps.scoring import SCORE_SCHEMA, expected_score, histogram, parse_score


class FakeJudge:
    """A judge on 127.0.0.1 whose answers come from `answer(body) -> (status, lines)`; records
    each request's path and JSON body."""

    def __init__(self, answer, delay: float = 0.0):
        self.requests, self.answer, self.delay = [], answer, delay
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                time.sleep(fake.delay)
                status, lines = fake.answer(body)
                data = "".join(lines).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:                 # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    yield from fake_judges()


def no_sleep(waits):
    return waits.append


# --- the prompt and the URL --------------------------------------------------------------------

def test_prompt_is_the_books_byte_for_byte():
    # chapter 7's f-string in generate_model_scores, written out for the first entry
    expected = ("Given the input `Below is an instruction that describes a task. Write a "
                "response that appropriately completes the request.\n\n### Instruction:\n"
                "Rewrite the sentence using a simile.\n\n### Input:\nThe car is very fast.` "
                "and correct output `The car is as fast as lightning.`, score the model "
                "response `The car is as fast as a bullet.` on a scale from 0 to 100, where "
                "100 is the best score. Respond with the integer number only.")
    assert judge_prompt(ENTRIES[0]) == expected
    assert "### Input" not in judge_prompt(ENTRIES[1])       # empty input: no input section


def test_endpoint_paths():
    assert endpoint(None, "ollama") == "http://127.0.0.1:11434/api/chat"
    assert endpoint("http://h:1/", "openai") == "http://h:1/v1/chat/completions"
    assert endpoint("http://h:1/v1", "openai") == "http://h:1/v1/chat/completions"
    assert endpoint("http://h:1/custom/chat", "ollama") == "http://h:1/custom/chat"
    for bad in ("h:1", "ftp://h/"):
        with pytest.raises(ValueError, match="http"):
            endpoint(bad, "ollama")
    with pytest.raises(ValueError, match="ollama or openai"):
        endpoint(None, "anthropic")


# --- both wire formats ---------------------------------------------------------------------------

def test_ollama_streams_ndjson_with_the_books_options(judge):
    fake = judge(lambda body: ollama_says("8", "5"))
    result = score_responses(ENTRIES, url=fake.url, structured=False)
    assert result.scores == [85, 85] and result.unparsed == [] and result.total == 2
    assert result.average == 85
    path, body = fake.requests[0]
    assert path == "/api/chat"
    assert body == {"model": "llama3", "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
                    "messages": [{"role": "user", "content": judge_prompt(ENTRIES[0])}]}


def test_by_default_the_score_is_asked_for_under_a_schema(judge):
    fake = judge(lambda body: ollama_says('{"score": ', '7', '0}'))
    result = score_responses(ENTRIES, url=fake.url)
    assert result.scores == [70, 70] and result.structured
    body = fake.requests[0][1]
    assert body["format"] == SCORE_SCHEMA and body["options"]["seed"] == 123
    fake = judge(lambda body: openai_says('{"score": 101}'))           # out of range: not a score
    result = score_responses(ENTRIES[:1], url=fake.url, api="openai")
    assert result.scores == [] and result.unparsed == [(0, '{"score": 101}')]
    assert fake.requests[0][1]["response_format"]["json_schema"]["schema"] == SCORE_SCHEMA


def test_a_judge_that_refuses_the_schema_is_asked_as_the_book_does(judge):
    def answer(body):
        if "response_format" in body:
            return 400, [json.dumps({"error": {"message": "response_format is not supported"}})]
        return openai_says("64")
    fake = judge(answer)
    logged = []
    result = score_responses(ENTRIES, url=fake.url, api="openai", log=logged.append)
    assert result.scores == [64, 64] and not result.structured
    assert ["response_format" in b for _, b in fake.requests] == [True, False, False]
    assert len(logged) == 1 and "free text" in logged[0]


def test_expected_score_from_the_top_logprobs(judge):
    def token(t, lp, tops):
        return {"token": t, "logprob": lp, "top_logprobs": [{"token": a, "logprob": b}
                                                            for a, b in tops]}
    ln = math.log
    tokens = [token('{"score": ', 0.0, [('{"score": ', 0.0)]),
              token("8", ln(0.5), [("8", ln(0.5)), ("9", ln(0.25)), ("1", ln(0.25))]),
              token("5", ln(0.9), [("5", ln(0.9))]), token("}", 0.0, [("}", 0.0)])]

    def answer(body):
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        return 200, [json.dumps({"choices": [{"message": {"content": '{"score": 85}'},
                                              "logprobs": {"content": tokens}}]})]
    fake = judge(answer)
    result = score_responses(ENTRIES[:1], url=fake.url, api="openai", scoring="expected")
    assert result.scores == [85]
    assert result.expected == [pytest.approx(0.5 * 85 + 0.25 * 95 + 0.25 * 15)]


@pytest.mark.parametrize("tokens, expected", [
    ([("Score: ", []), ("85", [("85", 0.5), ("90", 0.25), ("hello", 0.25)])], (85 + 45) / 1.5 / 1.0),
    ([("1", [("1", 0.5), ("0", 0.5)]), ("00", [("00", 1.0)])], 50.0),      # "0" is 0, 100 kept
    ([("2", [("2", 1.0)])], 2.0),
    ([("none", [("none", 1.0)])], None),
])
def test_expected_score_completes_each_alternative_with_the_later_digits(tokens, expected):
    entries = [{"token": t, "logprob": 0.0,
                "top_logprobs": [{"token": a, "logprob": math.log(p)} for a, p in tops]}
               for t, tops in tokens]
    got = expected_score(entries)
    assert got == (None if expected is None else pytest.approx(expected))


def test_parse_score_and_histogram():
    assert [parse_score(a) for a in ("85", " 7\n", '{"score": 100}', '{"score": true}', "101",
                                      "-1", "8.5", '{"score": "9"}', "{bad")] == \
        [85, 7, 100, None, None, None, None, None, None]
    rows = dict(histogram([0, 9, 10, 55, 99, 100, 100]))
    assert rows["0-9"] == 2 and rows["10-19"] == 1 and rows["90-99"] == 1 and rows["100"] == 2
    assert sum(rows.values()) == 7 and len(rows) == 11


def test_openai_format(judge):
    answers = iter(["90", " 40\n"])                    # int() ignores surrounding white space
    fake = judge(lambda body: openai_says(next(answers)))
    result = score_responses(ENTRIES, "judge-7b", fake.url + "/v1", "openai")
    assert result.scores == [90, 40] and result.average == 65
    path, body = fake.requests[1]
    assert path == "/v1/chat/completions" and body["model"] == "judge-7b"
    assert body["temperature"] == 0 and body["messages"][0]["content"] == judge_prompt(ENTRIES[1])


def test_prose_answers_are_counted_and_listed_not_averaged(judge):
    answers = iter(["The response deserves 85 points.", "70", "85.5"])
    fake = judge(lambda body: ollama_says(next(answers)))
    logged, progress = [], []
    result = score_responses(ENTRIES + ENTRIES[:1], url=fake.url, log=logged.append,
                             progress=lambda done, total: progress.append((done, total)))
    assert result.scores == [70] and result.average == 70 and result.total == 3
    assert result.unparsed == [(0, "The response deserves 85 points."), (2, "85.5")]
    assert len(logged) == 2 and "85 points" in logged[0]
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_empty_response_scores_zero_without_a_query(judge):
    fake = judge(lambda body: ollama_says("60"))
    entries = [dict(ENTRIES[0], model_response="  \n"), ENTRIES[1]]
    result = score_responses(entries, url=fake.url)
    assert result.scores == [0, 60] and len(fake.requests) == 1


def test_bad_entries_fail_before_any_query(judge):
    fake = judge(lambda body: ollama_says("60"))
    for bad, what in ((ENTRIES + [{"instruction": "x", "output": "y"}], "model_response"),
                      (ENTRIES + [{"output": "y", "model_response": "z"}], "instruction"),
                      (ENTRIES + [["not", "an", "entry"]], "not a JSON object")):
        with pytest.raises(ValueError, match=what):
            score_responses(bad, url=fake.url)
    assert fake.requests == []


# --- slow, failing and missing judges ------------------------------------------------------------

def test_slow_judge_within_the_timeout(judge):
    fake = judge(lambda body: ollama_says("77"), delay=0.3)
    assert score_responses(ENTRIES[:1], url=fake.url, timeout=5.0).scores == [77]


def test_too_slow_judge_is_retried_then_one_line(judge):
    fake = judge(lambda body: ollama_says("77"), delay=1.0)
    waits = []
    with pytest.raises(JudgeError, match=r"no whole answer within 0.2 s \(3 tries\).*--timeout") \
            as e:
        query_with_retries("p", url=fake.url, timeout=0.2, retries=2, backoff=0.5,
                           sleep=no_sleep(waits))
    assert waits == [0.5, 1.0] and "\n" not in str(e.value) and len(fake.requests) == 3


def test_a_name_lookup_that_hangs_ends_within_the_timeout(monkeypatch):
    """getaddrinfo ignores socket timeouts (a dead DNS server hangs it for minutes): the
    connection is given up on at --timeout all the same, and tried again as a time-out."""
    import socket
    release, lookups = threading.Event(), []

    def hanging_lookup(host, *args, **kwargs):
        lookups.append(host)
        release.wait(30)
        raise socket.gaierror("released by the test")
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    start = time.monotonic()
    try:
        with pytest.raises(JudgeError, match=r"no whole answer within 0.3 s \(2 tries\)"):
            query_with_retries("p", url="http://judge.example:8080", timeout=0.3, retries=1,
                               backoff=0.0)
    finally:
        release.set()
    assert time.monotonic() - start < 5 and lookups == ["judge.example"] * 2


def test_server_errors_are_retried(judge):
    answers = iter([(503, ['{"error": "loading model"}']), ollama_says("42")])
    fake = judge(lambda body: next(answers))
    waits = []
    assert score_responses(ENTRIES[:1], url=fake.url, sleep=no_sleep(waits)).scores == [42]
    assert len(fake.requests) == 2 and waits == [1.0]


@pytest.mark.parametrize("api, hint", [("ollama", "`ollama serve` (and `ollama pull llama3`)"),
                                       ("openai", "tinygpt serve")])
def test_judge_down_says_how_to_start_it(api, hint):
    waits = []
    with pytest.raises(JudgeError) as e:
        score_responses(ENTRIES, url=f"http://127.0.0.1:{free_port()}", api=api, retries=3,
                        sleep=no_sleep(waits))
    assert hint in str(e.value) and "cannot reach" in str(e.value)
    assert waits == [1.0, 2.0, 4.0]                      # exponential backoff


def test_model_not_pulled_is_not_retried(judge):
    fake = judge(lambda body: (404, ['{"error":"model \\"llama3\\" not found, try pulling it '
                                     'first"}']))
    with pytest.raises(JudgeError, match="no model 'llama3'.*`ollama pull llama3`"):
        score_responses(ENTRIES, url=fake.url, sleep=no_sleep([]))
    assert len(fake.requests) == 1


@pytest.mark.parametrize("api, lines, match", [
    ("ollama", ["<html>busy</html>\n"], "not JSON"),
    ("ollama", ['{"error": "out of memory"}\n'], "out of memory"),
    ("openai", ['{"result": "85"}'], "choices"),
])
def test_replies_that_are_not_the_format(judge, api, lines, match):
    fake = judge(lambda body: (200, lines))
    with pytest.raises(JudgeError, match=match):
        score_responses(ENTRIES, url=fake.url, api=api)


# --- the command -------------------------------------------------------------------------------

def test_evaluate_prints_count_and_average(judge, tmp_path, capsys):
    answers = iter(["80", "I would say 50", "90"])
    fake = judge(lambda body: openai_says(next(answers)))
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in ENTRIES + ENTRIES[:1]) + "\n")
    code = main(["evaluate", "--responses", str(path), "--api", "openai", "--judge", fake.url,
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Number of scores: 2 of 3" in out and "Average score: 85.00" in out
    assert "entry 1: 'I would say 50'" in out


@pytest.mark.parametrize("args, message", [
    (["--timeout", "nan"], "--timeout must be a finite number in (0, 3600], got nan"),
    (["--timeout", "0"], "--timeout must be in (0, 3600], got 0"),
    (["--timeout", "1e300"], "--timeout must be in (0, 3600], got 1e+300"),
    (["--timeout", "inf"], "--timeout must be a finite number"),
    (["--backoff", "-1"], "--backoff must be in [0, 60], got -1"),
    (["--backoff", "1e300"], "--backoff must be in [0, 60], got 1e+300"),
    (["--retries", "-1"], "--retries must be in [0, 10], got -1"),
    (["--retries", "100"], "--retries must be in [0, 10], got 100"),
])
def test_evaluate_bad_flags_are_one_line(tmp_path, capsys, args, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(ENTRIES))
    assert main(["evaluate", "--responses", str(path)] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_evaluate_bad_files_and_judge_down_are_one_line(tmp_path, capsys):
    empty, broken = tmp_path / "empty.json", tmp_path / "broken.jsonl"
    empty.write_text("")
    broken.write_text('{"instruction": "a"}\n{oops\n')
    for path, message in ((empty, "empty"), (broken, "line 2 is not JSON"),
                          (tmp_path / "missing.json", "No such file")):
        assert main(["evaluate", "--responses", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    good = tmp_path / "r.json"
    good.write_text(json.dumps(ENTRIES))
    assert main(["evaluate", "--responses", str(good), "--judge",
                 f"http://127.0.0.1:{free_port()}", "--retries", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ollama serve" in err and err.count("\n") == 1
