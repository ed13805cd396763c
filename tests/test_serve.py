"""The OpenAI-compatible server on 127.0.0.1: plain http.client, streaming and not, bad requests,
concurrent requests, the official openai package when installed, and serve -> evaluate with no
network."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.chat_fakes import ScriptedModel, save_tiny_gpt, says, tiny_gpt
from tinygpt.commands.cli import main
from tinygpt.apps.http_server import GenerationQueue, QueueFull
from tinygpt.apps.serve import make_server
from tinygpt.text.tokenizer import GPT2Tokenizer

TOK = GPT2Tokenizer()
ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def serve():
    servers = []

    def start(model, template="alpaca", **kw):
        server = make_server(model, TOK, template, port=0, model_name="tiny", **kw)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server.server_address[1]
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def request(port, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    conn.request(method, path, data, headers or {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response, payload


def post(port, body, **kw):
    response, payload = request(port, "POST", "/v1/chat/completions", body, **kw)
    return response.status, json.loads(payload) if payload.startswith(b"{") else payload


def sse_events(payload: bytes) -> list:
    events = [block[len("data: "):] for block in payload.decode().split("\n\n") if block]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- endpoints ---------------------------------------------------------------------------------

def test_models(serve):
    port = serve(ScriptedModel(says("hi")))
    response, payload = request(port, "GET", "/v1/models")
    listing = json.loads(payload)
    assert response.status == 200 and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    assert listing["data"][0]["object"] == "model"
    response, payload = request(port, "GET", "/v1/models/tiny")
    assert response.status == 200 and json.loads(payload)["id"] == "tiny"
    response, payload = request(port, "GET", "/v1/models/gpt-4")
    assert response.status == 404 and json.loads(payload)["error"]["code"] == "model_not_found"


def test_completion(serve):
    model = ScriptedModel(says("Hello there!"), block_size=128)
    port = serve(model)
    status, answer = post(port, {"model": "whatever", "messages": HELLO, "temperature": 0})
    assert status == 200 and answer["object"] == "chat.completion" and answer["model"] == "tiny"
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there!"}
    assert choice["finish_reason"] == "stop"
    n_prompt = len(model.prompts[0])
    assert answer["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 4,
                               "total_tokens": n_prompt + 4}     # "Hello", " there", "!", end


def test_streaming_sends_the_same_text_as_events(serve):
    port = serve(ScriptedModel(says("Hello there, friend!"), block_size=128))
    response, payload = request(port, "POST", "/v1/chat/completions",
                                {"messages": HELLO, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = sse_events(payload)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(pieces) == "Hello there, friend!" and len(pieces) > 3
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1


def test_max_tokens_stop_and_seed(serve):
    port = serve(ScriptedModel(says("one two three four"), block_size=128))
    status, answer = post(port, {"messages": HELLO, "max_tokens": 2})
    assert answer["choices"][0]["message"]["content"] == "one two"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2
    status, answer = post(port, {"messages": HELLO, "stop": [" three", "xyz"]})
    assert answer["choices"][0]["message"]["content"] == "one two"
    assert answer["choices"][0]["finish_reason"] == "stop"
    port = serve(tiny_gpt())
    body = {"messages": HELLO, "temperature": 1.5, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    first, again = (post(port, body)[1]["choices"][0]["message"]["content"] for _ in range(2))
    other = post(port, {**body, "seed": 8})[1]["choices"][0]["message"]["content"]
    assert first == again != other


@pytest.mark.parametrize("body, param, match", [
    ({}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "string"),
    ({"messages": HELLO, "temperature": 3}, "temperature", r"\[0, 2\]"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature", "finite number"),
    ({"messages": HELLO, "top_p": 0}, "top_p", r"\(0, 1\]"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", r"\[1, 2147483647\]"),
    ({"messages": HELLO, "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"messages": HELLO, "n": 2}, "n", "n = 1"),
    ({"messages": HELLO, "stream": "yes"}, "stream", "true or false"),
])
def test_bad_requests_are_json_errors(serve, body, param, match):
    port = serve(ScriptedModel(says("hi")))
    status, answer = post(port, body)
    assert status == 400
    assert answer["error"]["param"] == param and re.search(match, answer["error"]["message"])
    assert answer["error"]["type"] == "invalid_request_error"


def test_bad_http_is_answered_with_status_codes(serve):
    port = serve(ScriptedModel(says("hi")))
    assert post(port, None, raw="{not json")[0] == 400
    assert post(port, None, raw="[1, 2]")[0] == 400
    assert post(port, None, raw='{"messages": [{"role": "user", "content": "x"}], '
                                '"temperature": NaN}')[0] == 400
    assert request(port, "GET", "/v1/chat/completions")[0].status == 405
    assert request(port, "PUT", "/v1/chat/completions", {})[0].status == 405
    assert request(port, "POST", "/v1/completions", {})[0].status == 404
    assert request(port, "GET", "/")[0].status == 404
    # no Content-Length, and one far too large: a raw socket says what it likes
    for head, status in ((b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
                         (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 999999999\r\n\r\n", b"413")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head)
            assert s.recv(100).split()[1] == status
    status, answer = post(port, {"messages": HELLO})            # still serving
    assert status == 200


def test_a_second_request_waits_for_the_first(serve):
    model = ScriptedModel(says("a b c d e"), block_size=128, delay=0.02)
    port = serve(model)
    results = []

    def ask(stream):
        body = {"messages": HELLO, "stream": stream}
        response, payload = request(port, "POST", "/v1/chat/completions", body)
        results.append((response.status, payload))

    threads = [threading.Thread(target=ask, args=(k % 2 == 0,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(status for status, _ in results) == [200] * 4
    assert model.max_active == 1                  # never two generations at once
    for status, payload in results:
        text = ("".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(payload))
                if payload.startswith(b"data:") else
                json.loads(payload)["choices"][0]["message"]["content"])
        assert text == "a b c d e"


def test_the_generation_queue_is_bounded_and_a_leaver_gives_up_its_place():
    queue, order = GenerationQueue(max_waiting=1), []
    gone = threading.Event()

    def wait(name, leaves=False):
        try:
            with queue.turn(gone=gone.is_set if leaves else (lambda: False)):
                order.append(name)
        except ConnectionAbortedError:
            order.append(name + " left")

    with queue.turn():
        waiter = threading.Thread(target=wait, args=("B", True))
        waiter.start()
        for _ in range(1000):
            if queue.waiting == 1:
                break
            waiter.join(timeout=0.01)
        with pytest.raises(QueueFull) as full:           # one waits already: the line is full
            with queue.turn():
                pass
        assert full.value.status == 503 and full.value.retry_after >= 1
        gone.set()                                        # B's client leaves while it waits
        waiter.join(timeout=10)
        assert order == ["B left"] and queue.waiting == 0
    with queue.turn():                                    # free again
        order.append("C")
    assert order == ["B left", "C"] and not queue.busy()


def test_client_leaving_mid_stream_frees_the_server(serve):
    port = serve(ScriptedModel(says("word " * 30), block_size=256, delay=0.01))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        body = json.dumps({"messages": HELLO, "stream": True}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(20).startswith(b"HTTP/1.1 200")
    status, answer = post(port, {"messages": HELLO, "max_tokens": 3})
    assert status == 200 and answer["choices"][0]["message"]["content"] == "word word word"


# --- the official client -------------------------------------------------------------------------

def test_openai_package(serve):
    openai = pytest.importorskip("openai")
    port = serve(ScriptedModel(says("Hello from tinygpt."), block_size=128))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                           timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    answer = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, seed=1)
    assert answer.choices[0].message.content == "Hello from tinygpt."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == len(says("Hello from tinygpt."))
    chunks = client.chat.completions.create(model="tiny", messages=HELLO, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from tinygpt."
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=5)


# --- serve, then evaluate against it: the loop with no network -----------------------------------

def test_evaluate_against_our_own_server(serve, tmp_path, capsys):
    # a judge that always answers 85 (and once something else)
    port = serve(ScriptedModel(says("85"), block_size=512))
    entries = [{"instruction": f"Say {k}", "input": "", "output": f"{k}",
                "model_response": f"{k}"} for k in range(3)]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(entries))
    code = main(["evaluate", "--responses", str(path), "--api", "openai", "--judge",
                 f"http://127.0.0.1:{port}", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "Number of scores: 3 of 3" in out and "Average score: 85.00" in out


def test_serve_command_then_evaluate(tmp_path, capsys):
    """`serve` a tiny random GPT from its folder in a process of its own, score against it (a
    random model answers prose: nothing parses), then Ctrl-C stops the server cleanly."""
    model_dir = save_tiny_gpt(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "tinygpt", "serve", "--model",
                          model_dir, "--port", "0", "--max-tokens", "4"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = p.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert url, banner + p.stderr.read()
        entries = [{"instruction": "Say hi", "input": "", "output": "hi", "model_response": "hi"},
                   {"instruction": "Say bye", "input": "", "output": "bye", "model_response": ""}]
        path = tmp_path / "responses.json"
        path.write_text(json.dumps(entries))
        code = main(["evaluate", "--responses", str(path), "--api", "openai", "--judge",
                     url.group(0), "--quiet"])
        out = capsys.readouterr().out
        # the empty response scores 0 without a query; the random model's answer is listed
        assert code == 0 and "Number of scores: 1 of 2" in out and "entry 0:" in out
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in err


def test_serve_command_bad_flags_and_busy_port(tmp_path, capsys):
    model_dir = save_tiny_gpt(tmp_path / "tiny")
    assert main(["serve", "--model", model_dir, "--port", "70000"]) == 2
    assert "--port must be in [0, 65535], got 70000" in capsys.readouterr().err
    for flag, value in (("--request-timeout", "nan"), ("--request-timeout", "0"),
                        ("--request-timeout", "-1"), ("--max-connections", "0"),
                        ("--max-queue", "-1"), ("--max-body", "10"), ("--max-prompt-bytes", "0"),
                        ("--max-messages", "-5")):
        assert main(["serve", "--model", model_dir, flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--model", model_dir, "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and err.count("\n") == 1
    assert main(["serve", "--model", str(tmp_path / "nothing-here")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
