"""The judge against fake servers on 127.0.0.1 that misbehave: redirects (to another host, with
an API key), a byte every few hundred milliseconds, a stream that never ends, HTML, invalid JSON,
500 and 429 (with Retry-After), answers that are too long, scores out of range; and proxies.

Every case ends in bounded time with one line; the deadline tests check the clock."""
import json
import time

import pytest

from tests.judge_fakes import ENTRIES, dripping, fake_judges, ollama_says, openai_says
from tinygpt.apps.judge import (MAX_ANSWER_BYTES, MAX_WAIT, JudgeError, parse_score, query,
                                query_with_retries, retry_wait, score_responses)
from tinygpt.commands.cli import main

HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
NOT_DONE = (json.dumps({"message": {"role": "assistant", "content": ""}, "done": False})
            + "\n").encode()


@pytest.fixture
def judge():
    yield from fake_judges()


@pytest.fixture
def responses(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ENTRIES[:1]))
    return str(path)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- redirects: never followed, the key never leaves the host given --------------------------

@pytest.mark.parametrize("status, other_host", [(302, True), (307, False)])
def test_redirects_are_not_followed_and_the_key_stays(judge, responses, capsys, monkeypatch,
                                                      status, other_host):
    other = judge(lambda body: openai_says("99"))
    where = (other.url.replace("127.0.0.1", "localhost") if other_host else other.url) + "/v1"
    fake = judge(lambda body: (status, [], {"Location": where + "/chat/completions"}))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    assert main(["evaluate", "--api", "openai", "--responses", responses, "--judge",
                 fake.url + "/v1", "--quiet"]) == 2
    err = one_line(capsys)
    assert f"HTTP {status}, a redirect to {where}/chat/completions" in err and "not followed" in err
    assert fake.url in err and "sk-secret" not in err
    assert fake.headers[0]["Authorization"] == "Bearer sk-secret"    # sent where it was told
    assert len(fake.requests) == 1 and other.requests == []          # not retried, not followed


# --- deadlines: --timeout bounds the whole answer --------------------------------------------

@pytest.mark.parametrize("answer, api", [
    (dripping(HEAD, every=0.1, repeat=b" "), "openai"),              # a byte every 0.1 s
    (dripping(b"HTTP/1.0 200 OK\r\n", every=0.1, repeat=b"X"), "openai"),   # headers, slowly
    (dripping(HEAD, every=0.05, repeat=NOT_DONE), "ollama"),          # never "done"
], ids=["body-drip", "header-drip", "endless-stream"])
def test_a_slow_answer_ends_at_the_deadline(judge, answer, api):
    fake = judge(lambda body: answer)
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"no whole answer within 0.5 s \(1 try\)"):
        query_with_retries("p", url=fake.url, api=api, timeout=0.5, retries=0)
    assert 0.45 < time.monotonic() - start < 1.5


def test_evaluate_timeout_bounds_a_dripping_judge(judge, responses, capsys):
    fake = judge(lambda body: dripping(HEAD, every=0.3, repeat=b" "))
    start = time.monotonic()
    assert main(["evaluate", "--api", "openai", "--responses", responses, "--judge", fake.url,
                 "--timeout", "1", "--retries", "1", "--backoff", "0", "--quiet"]) == 2
    seconds = time.monotonic() - start
    assert "no whole answer within 1 s (2 tries)" in one_line(capsys)
    assert 1.9 < seconds < 3.5 and len(fake.requests) == 2


def test_an_answer_within_the_deadline_is_read_whole(judge):
    pieces = [json.dumps({"message": {"content": d}, "done": False}).encode() + b"\n"
              for d in "85"]
    fake = judge(lambda body: dripping(HEAD, *pieces, b'{"done": true}\n', every=0.1))
    assert query("p", url=fake.url, timeout=3.0) == "85"


# --- bad answers: retried when they may improve, never averaged ------------------------------

def test_server_errors_and_rate_limits_are_retried_then_one_line(judge):
    fake = judge(lambda body: (500, ["<html><body>Internal\nerror</body></html>"]))
    waits = []
    with pytest.raises(JudgeError) as e:
        query_with_retries("p", url=fake.url, retries=2, backoff=0.5, sleep=waits.append)
    assert "kept failing (3 tries)" in str(e.value) and "HTTP 500: <html><body>Internal error" \
        in str(e.value) and "\n" not in str(e.value)
    assert waits == [0.5, 1.0] and len(fake.requests) == 3


@pytest.mark.parametrize("retry_after, wait", [
    ("2", 2.0),                                      # longer than the backoff: honoured
    ("0", 1.0),                                      # shorter: the backoff
    ("100000", MAX_WAIT),                            # capped
    ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_WAIT),     # an HTTP date, capped
    ("soon", 1.0),                                   # unreadable: ignored
])
def test_retry_after_is_honoured_within_the_cap(judge, retry_after, wait):
    answers = iter([(429, ['{"error": "slow down"}'], {"Retry-After": retry_after}),
                    openai_says("70")])
    fake = judge(lambda body: next(answers))
    waits = []
    assert query_with_retries("p", url=fake.url, api="openai", backoff=1.0,
                              sleep=waits.append).text == "70"
    assert waits == [wait]


def test_backoff_doubles_up_to_the_cap():
    assert [retry_wait(k, 1.5) for k in range(7)] == [1.5, 3, 6, 12, 24, 48, MAX_WAIT]
    assert retry_wait(10_000, 60.0) == MAX_WAIT and retry_wait(3, 0.0) == 0.0


@pytest.mark.parametrize("api, status, lines, match", [
    ("openai", 200, ["<html>It works!</html>"], "did not answer with an OpenAI chat completion"),
    ("openai", 200, ['{"choices": [{"message": '], "did not answer with an OpenAI"),
    ("ollama", 200, ['{"message": {"content": "8"}, "done": fal\n'], "not JSON"),
    ("openai", 200, ["x" * (MAX_ANSWER_BYTES + 1)], "more than 1024 KiB"),
    ("openai", 401, ['{"error": {"message": "bad key"}}'], "HTTP 401: bad key.*OPENAI_API_KEY"),
])
def test_answers_that_will_not_improve_end_at_once(judge, api, status, lines, match):
    fake = judge(lambda body: (status, lines))
    with pytest.raises(JudgeError, match=match):
        query_with_retries("p", url=fake.url, api=api, sleep=lambda s: None)
    assert len(fake.requests) == 1


def test_a_stream_cut_before_done_is_asked_again(judge):
    answers = iter([(200, [NOT_DONE.decode()]), ollama_says("64")])
    fake = judge(lambda body: next(answers))
    assert query_with_retries("p", url=fake.url, sleep=lambda s: None).text == "64"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("answer, score", [
    ("85", 85), (" 100\n", 100), ("0", 0), ("007", 7),
    ("150", None), ("-5", None), ("101", None), ("1_0", None), ("+85", None), ("85.0", None),
    ("eighty", None), ("\u0668\u0665", None), ("", None), ("85 points", None), ("1000", None),
])
def test_only_integers_from_0_to_100_are_scores(answer, score):
    assert parse_score(answer) == score


def test_out_of_range_scores_are_counted_not_averaged(judge):
    answers = iter(["150", "-5", "1_0", "eighty", "100", "40"])
    fake = judge(lambda body: openai_says(next(answers)))
    logged = []
    result = score_responses(ENTRIES * 3, url=fake.url, api="openai", log=logged.append)
    assert result.scores == [100, 40] and result.average == 70 and result.total == 6
    assert [k for k, _ in result.unparsed] == [0, 1, 2, 3] and len(logged) == 4
    assert "'150'" in logged[0] and "0 to 100" in logged[0]


def test_evaluate_lists_out_of_range_scores(judge, responses, capsys):
    fake = judge(lambda body: openai_says("150"))
    assert main(["evaluate", "--api", "openai", "--responses", responses, "--judge", fake.url,
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 answers were not an integer from 0 to 100" in out and "entry 0: '150'" in out
    assert "Number of scores: 0 of 1" in out and "Average score: none" in out


# --- the key and the way there ---------------------------------------------------------------

def test_a_key_a_header_cannot_carry_is_refused_before_sending(judge, responses, capsys,
                                                               monkeypatch):
    fake = judge(lambda body: openai_says("50"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret\r\nX-Injected: 1")
    assert main(["evaluate", "--api", "openai", "--responses", responses, "--judge", fake.url,
                 "--quiet"]) == 2
    err = one_line(capsys)
    assert "API key" in err and "position 9" in err and "secret" not in err
    assert fake.requests == []


def test_a_remote_judge_is_asked_through_the_proxy(judge, monkeypatch):
    proxy = judge(lambda body: openai_says("33"))
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url.replace("http://", "http://me:p%40ss@"))
    # judge.invalid never resolves: only the proxy is connected to
    assert query("p", url="http://judge.invalid:8000", api="openai", timeout=5.0) == "33"
    assert proxy.requests[0][0] == "http://judge.invalid:8000/v1/chat/completions"
    assert proxy.headers[0]["Proxy-Authorization"] == "Basic bWU6cEBzcw=="    # me:p@ss


def test_a_judge_on_this_machine_is_never_asked_through_a_proxy(judge, monkeypatch):
    fake = judge(lambda body: openai_says("12"))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")           # nothing listens there
    assert query("p", url=fake.url, api="openai", timeout=5.0) == "12"
