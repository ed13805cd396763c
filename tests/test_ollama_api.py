"""Ollama's API on `tinygpt serve` (ollama_api.py), with the `ollama` package as the client and
the book's own `query_model` unchanged: streamed NDJSON, "stream": false, options, format,
logprobs, /api/tags, /api/show, and errors as {"error": ...}."""
import json
import urllib.request

import pytest

from tests.chat_fakes import ScriptedModel, says
from tests.test_serve import request, serve  # noqa: F401 (fixture)
from tests.test_serve_structured import _noisy_gpt
from tinygpt.apps.ollama_api import generation_args

ollama = pytest.importorskip("ollama")
HELLO = [{"role": "user", "content": "Say hello"}]


def client(port):
    return ollama.Client(host=f"http://127.0.0.1:{port}", timeout=30)


def query_model(prompt, model="llama3", url="http://localhost:11434/api/chat"):
    # chapter 7, section 7.8, as printed (the URL is the test's)
    data = {
        "model": model,
        "messages": [
            {"role": "user", "content": prompt}
        ],
        "options": {
            "seed": 123,
            "temperature": 0,
            "num_ctx": 2048
        }
    }
    payload = json.dumps(data).encode("utf-8")
    request = urllib.request.Request(url, data=payload, method="POST")
    request.add_header("Content-Type", "application/json")
    response_data = ""
    with urllib.request.urlopen(request) as response:
        while True:
            line = response.readline().decode("utf-8")
            if not line:
                break
            response_json = json.loads(line)
            response_data += response_json["message"]["content"]
    return response_data


def test_the_books_query_model_works_unchanged(serve):
    port = serve(ScriptedModel(says("Hello from tinygpt."), block_size=128))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    urllib.request.install_opener(opener)               # 127.0.0.1 never through a proxy
    try:
        assert query_model("Hi", url=f"http://127.0.0.1:{port}/api/chat") == "Hello from tinygpt."
    finally:
        urllib.request.install_opener(None)


def test_chat_streamed_and_not(serve):
    port = serve(ScriptedModel(says("Hello from tinygpt."), block_size=128))
    c = client(port)
    parts = list(c.chat(model="llama3", messages=HELLO, stream=True))
    assert "".join(p.message.content for p in parts) == "Hello from tinygpt."
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == len(says("Hello from tinygpt."))
    assert parts[-1].model == "tiny" and len(parts) > 2
    whole = c.chat(model="anything", messages=HELLO, options={"temperature": 0, "seed": 1})
    assert whole.message.content == "Hello from tinygpt." and whole.message.role == "assistant"
    assert whole.done and whole.prompt_eval_count > 0


def test_generate_and_num_predict(serve):
    port = serve(ScriptedModel(says("one two three four five"), block_size=128))
    c = client(port)
    answer = c.generate(model="x", prompt="Count", options={"num_predict": 2, "temperature": 0})
    assert answer.response == "one two" and answer.done_reason == "length"
    parts = list(c.generate(model="x", prompt="Count", system="Be brief", stream=True))
    assert "".join(p.response for p in parts) == "one two three four five"


def test_format_schema_and_json(serve):
    port = serve(_noisy_gpt())
    c = client(port)
    schema = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0,
                                                         "maximum": 100}}}
    for seed in range(3):
        r = c.chat(model="x", messages=HELLO, format=schema,
                   options={"seed": seed, "temperature": 1.0})
        assert 0 <= json.loads(r.message.content)["score"] <= 100
    r = c.chat(model="x", messages=HELLO, format=schema, logprobs=True, top_logprobs=2,
               options={"temperature": 0})
    assert "".join(e.token for e in r.logprobs) == r.message.content
    assert all(len(e.top_logprobs) <= 2 and e.logprob <= 0 for e in r.logprobs)


def test_tags_show_version(serve):
    port = serve(ScriptedModel(says("hi"), block_size=128))
    c = client(port)
    assert [m.model for m in c.list().models] == ["tiny"]
    shown = c.show("tiny")
    assert shown.template == "alpaca" and shown.modelinfo["tinygpt.block_size"] == 128
    response, payload = request(port, "GET", "/api/version")
    assert response.status == 200 and "version" in json.loads(payload)


@pytest.mark.parametrize("body, match", [
    ({"messages": "hi"}, "messages"),
    ({"messages": HELLO, "options": {"temperature": -1}}, "options.temperature"),
    ({"messages": HELLO, "options": {"num_predict": -5}}, "options.num_predict"),
    ({"messages": HELLO, "options": {"seed": "x"}}, "options.seed"),
    ({"messages": HELLO, "format": "yaml"}, "format"),
    ({"messages": HELLO, "format": {"type": "number", "minimum": 1}}, "format"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
])
def test_bad_requests_are_ollama_errors(serve, body, match):
    port = serve(ScriptedModel(says("hi"), block_size=128))
    response, payload = request(port, "POST", "/api/chat", {"model": "x", **body})
    assert response.status == 400 and match in json.loads(payload)["error"]
    response, payload = request(port, "GET", "/api/chat")
    assert response.status == 405 and "error" in json.loads(payload)
    response, payload = request(port, "POST", "/api/pull", {"model": "x"})
    assert response.status == 404 and "no endpoint" in json.loads(payload)["error"]


def test_ollama_client_raises_on_errors(serve):
    port = serve(ScriptedModel(says("hi"), block_size=128))
    with pytest.raises(ollama.ResponseError, match="temperature"):
        client(port).chat(model="x", messages=HELLO, options={"temperature": 9})


def test_options_follow_ollamas_defaults():
    args = generation_args({}, 256, 2048)
    assert (args["temperature"], args["top_k"], args["top_p"]) == (0.8, 40, 0.9)
    assert args["max_new_tokens"] == 256 and args["seed"] is None and args["context"] is None
    args = generation_args({"options": {"temperature": 0, "seed": 123, "num_ctx": 512,
                                        "num_predict": -1, "top_k": 0, "stop": "\n"}}, 256, 2048)
    assert args["temperature"] == 0 and args["seed"] == 123 and args["top_k"] is None
    assert args["context"] == 512 and args["stop"] == ["\n"] and args["max_new_tokens"] == 256
    assert generation_args({"options": {"seed": -1}}, 8, 64)["seed"] is None
