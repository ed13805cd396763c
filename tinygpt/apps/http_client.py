"""An HTTP request under one deadline, the judge's transport: the connection (the host's name
lookup included), the request and every byte of the answer end within `timeout` seconds, and a
proxy from the environment is used as urllib would. `judge.py` asks and reads the answers.

    python -m pytest tests/test_judge.py -q
"""
from __future__ import annotations

import base64
import http.client
import socket
import threading
import urllib.parse
import urllib.request

LOOPBACK = ("127.0.0.1", "localhost", "::1")   # a judge on this machine is never reached by proxy


class Deadline(TimeoutError):
    """No whole answer within the time allowed."""


def connect(conn: http.client.HTTPConnection, timeout: float) -> None:
    """conn.connect() within `timeout`: the host name's lookup (getaddrinfo) knows no socket
    timeout, so the connection is made on a thread the deadline can stop waiting for (a lookup
    that hangs then ends on its own; its socket goes with the abandoned connection)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            conn.connect()
        except BaseException as e:             # handed to the caller below
            failed.append(e)

    thread = threading.Thread(target=run, name="judge-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Deadline(f"no connection to {conn.host} within {timeout:g} s (name lookup or "
                       "connect)")
    if failed:
        raise failed[0]


class Watchdog:
    """Shuts the socket it watches down after `seconds` unless cancelled first; `fired` says if
    it did. A shut-down socket makes a blocked read return at once (end of file)."""

    def __init__(self, seconds: float):
        self.sock, self.fired = None, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def watch(self, sock: socket.socket) -> None:
        self.sock = sock
        if self.fired:                        # it found no socket to shut down: now
            self._fire()

    def _fire(self) -> None:
        self.fired = True
        sock = self.sock
        if sock is not None:
            try:                              # the plain socket's shutdown, also under TLS
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self.timer.cancel()


def connection(parts: urllib.parse.SplitResult,
               timeout: float) -> tuple[http.client.HTTPConnection, str, dict]:
    """(connection, request path, extra headers) to the judge: direct, or through the proxy the
    environment names (http_proxy, https_proxy, no_proxy) as urllib would; a judge on this
    machine always directly. Through a proxy, plain http asks it for the full URL (with the
    proxy's credentials as a header); https tunnels to the judge (CONNECT)."""
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = None
    if parts.hostname not in LOOPBACK and not urllib.request.proxy_bypass(parts.hostname):
        proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return kind(parts.hostname, parts.port, timeout=timeout), path, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = {}
    if p.username:
        user = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(user.encode()).decode()}
    conn = kind(p.hostname, p.port, timeout=timeout)
    if parts.scheme == "https":
        conn.set_tunnel(parts.hostname, parts.port, headers=auth)
        return conn, path, {}
    return conn, urllib.parse.urlunsplit(parts), auth
