"""Fake judges on 127.0.0.1 for the judge tests: well-behaved ones in both wire formats, and
the raw answers of misbehaving ones (a byte every few seconds, a stream that never ends)."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# two entries of the book's instruction data, with a fine-tuned model's responses
ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.",
     "model_response": "The car is as fast as a bullet."},
    {"instruction": "What type of cloud is typically associated with thunderstorms?", "input": "",
     "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
     "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud."},
]


class FakeJudge:
    """A judge on 127.0.0.1 whose answers come from `answer(body)`: (status, lines) or (status,
    lines, headers), sent with a Content-Length; or a function `write(wfile)` that writes the raw
    answer itself (slow, endless, broken ones). Records each request's path and JSON body, and
    its headers; a GET (what a followed redirect becomes) is recorded with body None."""

    def __init__(self, answer, delay: float = 0.0, host: str = "127.0.0.1"):
        self.requests, self.headers, self.answer, self.delay = [], [], answer, delay
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append((self.path, None))
                fake.headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                fake.headers.append(dict(self.headers))
                time.sleep(fake.delay)
                reply = fake.answer(body)
                try:
                    if callable(reply):
                        reply(self.wfile)
                        return
                    status, lines, *headers = reply
                    data = "".join(lines).encode()
                    self.send_response(status)
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:                 # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def dripping(*pieces: bytes, every: float, repeat: bytes | None = None, seconds: float = 5.0):
    """A raw answer: `pieces` one by one, then `repeat` again and again, `every` seconds apart,
    for at most `seconds` (so a test that fails still ends), stopping when the client leaves."""
    def write(wfile):
        end = time.monotonic() + seconds
        for k in range(int(seconds / every) + len(pieces)):
            piece = pieces[k] if k < len(pieces) else repeat
            if piece is None or time.monotonic() > end:
                return
            wfile.write(piece)
            wfile.flush()
            time.sleep(every)
    return write


def ollama_says(*pieces):
    """Ollama's NDJSON stream: one line per piece, then the done line."""
    lines = [json.dumps({"model": "llama3", "message": {"role": "assistant", "content": p},
                         "done": False}) + "\n" for p in pieces]
    return 200, lines + [json.dumps({"model": "llama3", "done": True}) + "\n"]


def openai_says(text):
    return 200, [json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                   "content": text}}]})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_judges():
    """The body of a `judge` fixture: yields `start(answer, delay, host)`, which starts a
    FakeJudge; all are closed after the test."""
    servers = []

    def start(answer, delay=0.0, host="127.0.0.1"):
        servers.append(FakeJudge(answer, delay, host))
        return servers[-1]
    yield start
    for s in servers:
        s.close()
