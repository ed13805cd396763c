"""The HTTP side of `tinygpt serve` that knows nothing of models: what a hostile client meets.

Owns the limits (`Limits`, one `tinygpt serve` flag each), the server that caps connections
(`BoundedServer`: a connection past `max_connections` is answered 503 at once, by the accepting
thread, so threads and memory stay bounded), the handler base that reads one request under a
deadline and answers every failure with a JSON error (`JSONHandler`), and the queue for the
one thing the server does one at a time (`GenerationQueue`: a bounded number wait, the rest are
told 503 and when to come back). `serve.py` adds the routes and the model.

What a client can count on, each tested in tests/test_serve_limits.py against a real process:
- the request line, headers and body must all arrive within `request_timeout` seconds of the
  server starting to wait for them (a keep-alive connection idle that long is closed), else 408;
- anything that is not `METHOD PATH HTTP/1.x`, headers of at most MAX_HEAD bytes and at most
  `max_body` bytes of Content-Length body is answered with a 4xx JSON error naming what was
  wrong (the request line, a header, the body, a field), and the server keeps serving;
- a client that leaves is noticed between tokens (`client_gone`) and its generation stops.
"""
from __future__ import annotations

import http.client
import io
import json
import math
import re
import select
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from tinygpt.validate import check_number

MAX_LINE = 8192                   # bytes of request line; longer is 414
MAX_HEAD = 65536                  # bytes of all headers together; more is 431
_DIGITS = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Limits:
    """What one server lets a client do (each is a `tinygpt serve` flag of the same name)."""
    request_timeout: float = 10.0  # seconds to send request line, headers and body; idle keep-alive
    max_connections: int = 32      # open connections (one thread each); more are answered 503
    max_queue: int = 4             # requests waiting while one generates; more are answered 503
    max_body: int = 1 << 20        # bytes of request body (413 beyond)
    max_prompt_bytes: int = 1 << 18  # bytes of message text in one request (400 beyond)
    max_messages: int = 1024       # messages in one request (400 beyond)

    def check(self) -> None:
        """A ValueError naming the flag of the first limit out of range."""
        check_number("--request-timeout", self.request_timeout, 0, 3600, lo_open=True)
        for flag, value, lo in (("--max-connections", self.max_connections, 1),
                                ("--max-queue", self.max_queue, 0),
                                ("--max-body", self.max_body, 64),
                                ("--max-prompt-bytes", self.max_prompt_bytes, 1),
                                ("--max-messages", self.max_messages, 1)):
            check_number(flag, value, lo)


class RequestError(ValueError):
    """A bad request: sent back as a JSON error with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code
        self.retry_after = retry_after


def error_payload(e: RequestError) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}}


# --- the server: connections capped ------------------------------------------------------------

class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `limits.max_connections` of them. A connection past the
    cap is answered 503 with Retry-After by the accepting thread and closed a second later
    (closing at once could reset the connection before the client reads the answer)."""

    daemon_threads = True         # a client that hangs does not keep the process alive
    request_queue_size = 1024     # connections the kernel holds before accept (socketserver: 5)

    def __init__(self, address: tuple[str, int], handler, limits: Limits,
                 log: Callable[[str], None] | None = None):
        limits.check()
        self.limits, self.log = limits, log or (lambda line: None)
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._refused: list[tuple[float, socket.socket]] = []   # (close after, socket)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)     # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        e = RequestError(f"the server has {self.limits.max_connections} connections open, its "
                         "limit (--max-connections); try again", status=503, kind="server_error",
                         code="too_many_connections", retry_after=1)
        data = json.dumps(error_payload(e)).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)            # the accepting thread never waits on a client
            request.send(head.encode() + data)    # a fresh socket's buffer takes 300 bytes
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        if len(self._refused) >= 4 * self.limits.max_connections:
            self._close_refused(everything=True)
        self._refused.append((time.monotonic() + 1.0, request))

    def service_actions(self) -> None:
        """Called by serve_forever between requests: drain and close refused connections."""
        self._close_refused()

    def _close_refused(self, everything: bool = False) -> None:
        now, keep = time.monotonic(), []
        for until, s in self._refused:
            done = False
            try:
                for _ in range(16):               # whatever the client sent, unread, is dropped
                    if not s.recv(65536):
                        done = True               # b"": the client closed its side
                        break
            except BlockingIOError:
                pass
            except OSError:
                done = True
            if done or everything or now >= until:
                s.close()
            else:
                keep.append((until, s))
        self._refused = keep

    def server_close(self) -> None:
        self._close_refused(everything=True)
        super().server_close()

    def handle_error(self, request, client_address) -> None:
        # socketserver prints tracebacks to stderr; a library hands them to its log instead
        self.log(f"error while serving {client_address[0]}:\n{traceback.format_exc()}")


# --- one request, read under a deadline --------------------------------------------------------

class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, each read allowed only the time left to the request's deadline."""

    def __init__(self, handler: JSONHandler):
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        h = self.handler
        left = h.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        h.connection.settimeout(left)
        n = h.connection.recv_into(buffer)
        h.got_bytes = h.got_bytes or n > 0
        return n


class _HeadLimit:
    """The connection as http.client's header parser reads it, line by line, with MAX_HEAD
    bytes in all (it allows 100 lines of 64 KB each)."""

    def __init__(self, rfile):
        self.rfile, self.left = rfile, MAX_HEAD

    def readline(self, limit: int = -1) -> bytes:
        line = self.rfile.readline(min(limit if limit >= 0 else MAX_HEAD, self.left) + 1)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"headers of more than {MAX_HEAD} bytes")
        return line


class JSONHandler(BaseHTTPRequestHandler):
    """Reads one request at a time under `server.limits`: the request line, headers and body
    within `request_timeout`, every error answered as JSON with a status line (an HTTP/0.9 line,
    a bad version, a bad Content-Length alike). Subclasses add `do_GET` / `do_POST`."""

    protocol_version = "HTTP/1.1"       # keep-alive for JSON answers; streams close at the end
    default_request_version = "HTTP/1.1"  # errors before the version is known still get a status
    server_version = "tinygpt"
    server: BoundedServer

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self))
        self.deadline, self.got_bytes, self.answered = time.monotonic(), False, False

    def log_message(self, format: str, *args) -> None:
        text = "".join(c if c.isprintable() else "?" for c in format % args)   # no escapes
        self.server.log(f"{self.address_string()} {text}")

    def handle_one_request(self) -> None:
        limits = self.server.limits
        self.deadline = time.monotonic() + limits.request_timeout
        self.got_bytes = self.answered = False
        self.command, self.requestline = None, ""
        self.request_version = self.default_request_version
        try:
            if self._read_head():
                self.connection.settimeout(limits.request_timeout)   # for writing the answer
                getattr(self, "do_" + self.command)()
                self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            if self.got_bytes and not self.answered:
                self._try_error(RequestError(
                    f"the request did not arrive within {limits.request_timeout:g} s "
                    "(--request-timeout)", status=408, code="request_timeout"))
        except ConnectionError:                   # reset, broken pipe, left while waiting
            self.close_connection = True
        except Exception:
            self.close_connection = True
            self.server.handle_error(self.request, self.client_address)
            if not self.answered:
                self._try_error(RequestError("internal error", status=500, kind="server_error"))

    def _read_head(self) -> bool:
        """The request line and headers; False once an error has been answered or the client
        closed before sending anything."""
        line = self.rfile.readline(MAX_LINE + 1)
        self.raw_requestline, self.got_bytes = line, bool(line)    # (a pipelined one was read)
        if not line:
            self.close_connection = True
            return False
        self.requestline = line.decode("iso-8859-1").rstrip("\r\n")[:200]
        if len(line) > MAX_LINE:
            self.send_error(414, f"the request line is longer than {MAX_LINE} bytes")
            return False
        words = line.decode("iso-8859-1").split()
        if not line.endswith(b"\n") or len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.send_error(400, f"bad request line {self.requestline[:80]!r}: expected "
                            "'METHOD /path HTTP/1.1'")
            return False
        body, self.rfile = self.rfile, _HeadLimit(self.rfile)
        try:
            if not self.parse_request():          # version, headers; errors come as JSON
                return False
        finally:
            self.rfile = body
        if not hasattr(self, "do_" + self.command):
            self.close_connection = True
            self.send_json_error(RequestError(f"method {self.command[:20]!r} is not supported",
                                              "method", status=501))
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's errors (bad version, too many headers, ...) as JSON, param naming the
        part of the request."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        param = "request line" if self.command is None else "headers"
        self.send_json_error(RequestError(text, param, status=code))

    def read_json(self) -> object:
        """The body as JSON: Content-Length required (chunked is 411), at most `max_body`
        bytes, nesting Python can parse; a RequestError naming the header or the body."""
        limit = self.server.limits.max_body
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise RequestError("Transfer-Encoding (chunked) bodies are not supported; send "
                               "Content-Length",
                               "Transfer-Encoding", status=411)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self.close_connection = True
            raise RequestError("a request body with Content-Length is required",
                               "Content-Length", status=411)
        text = lengths[0].strip()
        if len(lengths) > 1 or not _DIGITS.fullmatch(text):
            self.close_connection = True          # the body is left unread: the connection is spent
            raise RequestError(f"Content-Length must be one non-negative integer, got "
                               f"{', '.join(lengths)[:40]!r}", "Content-Length")
        n = int(text)
        if n > limit:
            self.close_connection = True
            raise RequestError(f"Content-Length is {n} bytes; the limit is {limit} (--max-body)",
                               "Content-Length", status=413)
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise RequestError(f"the body ended after {len(raw)} of {n} bytes (Content-Length)",
                               "Content-Length")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(f"the request body is not UTF-8 ({e.reason} at byte {e.start})",
                               "body") from None
        except RecursionError:
            raise RequestError("the request body nests too deeply to parse", "body") from None
        except ValueError as e:                   # JSONDecodeError, or an integer of 5000 digits
            raise RequestError(f"the request body is not valid JSON ({str(e)[:200]})",
                               "body") from None

    def client_gone(self) -> bool:
        """Whether the client has closed its side (or the connection broke): checked between
        tokens, without waiting. Bytes already sent (a pipelined request) do not count."""
        try:
            poll = select.poll()
            poll.register(self.connection, select.POLLIN | select.POLLERR | select.POLLHUP)
            if not poll.poll(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json_error(self, e: RequestError) -> None:
        headers = {} if e.retry_after is None else {"Retry-After": str(e.retry_after)}
        self.send_json(e.status, error_payload(e), headers)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.answered = True
        super().send_response(code, message)

    def _try_error(self, e: RequestError) -> None:
        try:
            self.connection.settimeout(self.server.limits.request_timeout)
            self.send_json_error(e)
            self.wfile.flush()
        except OSError:
            pass


# --- one generation at a time ------------------------------------------------------------------

class QueueFull(RequestError):
    pass


class GenerationQueue:
    """A lock with a bounded line: `turn()` waits for it behind at most `max_waiting` others,
    else raises QueueFull (503, Retry-After from how long the last generation took). A waiter
    whose client leaves (`gone()`) gives up its place."""

    def __init__(self, max_waiting: int):
        self.max_waiting, self.waiting, self.last_seconds = max_waiting, 0, 1.0
        self._lock, self._line = threading.Lock(), threading.Lock()

    def busy(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def turn(self, gone: Callable[[], bool] = lambda: False,
             on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold the lock for the `with` body; `on_wait()` is called if this request has to
        join the line."""
        with self._line:
            got = self._lock.acquire(blocking=False)
            if not got:
                if self.waiting >= self.max_waiting:
                    wait = math.ceil(self.last_seconds * (self.waiting + 1))
                    raise QueueFull(f"the server is generating with {self.waiting} requests "
                                    f"waiting, its limit (--max-queue); try again", status=503,
                                    kind="server_error", code="queue_full",
                                    retry_after=max(1, min(wait, 3600)))
                self.waiting += 1
        if not got:
            on_wait()
            try:
                while not self._lock.acquire(timeout=0.1):
                    if gone():
                        raise ConnectionAbortedError("the client left while waiting")
            finally:
                with self._line:
                    self.waiting -= 1
        start = time.monotonic()
        try:
            yield
        finally:
            self.last_seconds = time.monotonic() - start
            self._lock.release()


__all__ = ["BoundedServer", "GenerationQueue", "JSONHandler", "Limits", "QueueFull",
           "RequestError", "error_payload"]
