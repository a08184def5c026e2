"""A fault-injecting HTTP proxy for the S3 tests: listens on 127.0.0.1 (a free port), forwards every
request to the moto server (tests/s3server.py) and, on rules, acts instead:
  slowdown     answers `503 SlowDown` with S3's XML error body (the request never reaches moto)
  no-such-upload  answers `404 NoSuchUpload` (what some stores answer a retried, already completed
               CompleteMultipartUpload; moto completes it again)
  cut          cuts the connection in the middle of the request's body (never reaches moto)
  hold         holds the request until released, then cuts it (never reaches moto)
  forward-cut  forwards the request (moto carries it out), then cuts the connection before the
               client sees the answer: a lost answer to a request that took effect
  truncate     forwards the request and sends the answer's headers and half its body, then cuts
               the connection (a GET dropped mid-body)
stop() makes the proxy look like a killed server (open connections reset, new ones refused);
start() listens again on the same port.

A rule matches a request by method, a substring of its query (`partNumber=` is UploadPart,
`uploads` CreateMultipartUpload, `uploadId=` with POST CompleteMultipartUpload) and a regular
expression searched in its path (`/bucket/key`; "" matches any), and fires for the first..last
matching request (1-based, `last=None`: every one from `first` on). The proxy counts what it saw
and what it did, so a test can assert that the faults really happened.

    with FaultProxy(upstream) as proxy:
        proxy.add("PUT", "partNumber=", "slowdown", first=1, last=2)
        proxy.add("PUT", "", "forward-cut", path="/checkpoint[.]bin$")      # the commit record's PUT
        with proxy.environment():      # AWS_ENDPOINT_URL points at the proxy, restored afterwards
            ...

Limits: plain HTTP/1.1 with Content-Length bodies (what boto3 sends with checksums "when_required");
no chunked uploads, no TLS. It changes nothing in what it forwards (moto checks no signatures, so the
Host header the client signed for the proxy does not matter)."""
from __future__ import annotations

import http.client
import os
import re
import socket
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

ANSWERS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
           "no-such-upload": (404, "Not Found", "NoSuchUpload", "The specified upload does not exist.")}
ACTIONS = (*ANSWERS, "cut", "hold", "forward-cut", "truncate")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Rule:
    method: str
    query: str                 # a substring of the query string ("" matches any)
    action: str                # one of ACTIONS
    path: str = ""             # a regular expression searched in the path ("" matches any)
    first: int = 1
    last: int | None = None
    seen: int = 0              # matching requests so far
    fired: int = 0             # requests the rule acted on
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str, query: str) -> bool:
        return method == self.method and self.query in query and re.search(self.path, path) is not None


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, str]] = []      # (method, path, query) of every request
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.connections: set[socket.socket] = set()            # open client connections, for stop()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:       # quiet
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy.connections.add(self.connection)

            def finish(self) -> None:
                with proxy.lock:
                    proxy.connections.discard(self.connection)
                super().finish()

            def _any(self) -> None:
                try:
                    proxy._handle(self)
                except (ConnectionError, TimeoutError):     # the client went away (killed): drop it
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._handler = Handler
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self._listen()
        self.url = f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        self.server = _Server(("127.0.0.1", self.port), self._handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Serve (again, after stop(): on the same port, so the client's endpoint stays valid)."""
        if self.server is None:
            self._listen()
        threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True).start()

    def stop(self) -> None:
        """Stop as a killed server does: held requests and open connections are reset, and nothing
        listens on the port any more (a new connection is refused)."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()              # first: a retry must find nothing listening
        self.server = None
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            _reset(connection)
        self.release()

    def add(self, method: str, query: str, action: str, first: int = 1, last: int | None = None,
            path: str = "") -> Rule:
        assert action in ACTIONS, action
        rule = Rule(method, query, action, path, first, last)
        with self.lock:
            self.rules.append(rule)
        return rule

    def release(self) -> None:
        """Let every held request go: its connection is closed without an answer."""
        for rule in self.rules:
            rule.released.set()

    def count(self, method: str, query: str = "", path: str = "") -> int:
        """How many requests of this kind reached the proxy (faulted or forwarded)."""
        with self.lock:
            return sum(1 for m, p, q in self.requests if m == method and query in q and re.search(path, p))

    def wait_for(self, method: str, query: str, n: int = 1, timeout: float = 60, path: str = "") -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: sum(1 for m, p, q in self.requests if m == method and query in q
                                                     and re.search(path, p)) >= n, timeout)

    @contextmanager
    def environment(self) -> Iterator[str]:
        """AWS_ENDPOINT_URL points at the proxy inside the block (pyckpt's client cache is keyed on the
        AWS_* variables, so a new client is made); the variable is restored afterwards."""
        before = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = self.url
        try:
            yield self.url
        finally:
            if before is None:
                os.environ.pop("AWS_ENDPOINT_URL", None)
            else:
                os.environ["AWS_ENDPOINT_URL"] = before

    # -- one request ----------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path, _, query = req.path.partition("?")
        rule = None
        with self.arrived:
            self.requests.append((req.command, path, query))
            for candidate in self.rules:
                if candidate.matches(req.command, path, query):
                    candidate.seen += 1
                    if candidate.seen >= candidate.first and (candidate.last is None or candidate.seen <= candidate.last):
                        candidate.fired += 1
                        rule = candidate
                        break
            self.arrived.notify_all()
        length = int(req.headers.get("Content-Length") or 0)
        if rule is not None and rule.action == "cut":
            req.rfile.read(length // 2)            # half the body, then the connection is gone
            _drop(req)
            return
        body = req.rfile.read(length) if length else b""
        if rule is not None and rule.action == "hold":
            rule.released.wait()
            _drop(req)
            return
        if rule is not None and rule.action in ANSWERS:
            status, reason, code, message = ANSWERS[rule.action]
            error = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                     '</Message><RequestId>FAULT</RequestId><HostId>fault-proxy</HostId></Error>').encode()
            req.send_response(status, reason)                  # with a Date header, as S3 sends
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(error)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(error)
            return
        self._forward(req, body, rule.action if rule is not None else "")     # forward-cut, truncate or plain

    def _forward(self, req: BaseHTTPRequestHandler, body: bytes, fault: str = "") -> None:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
            conn.request(req.command, req.path, body=body if body or req.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if fault == "forward-cut":                  # moto did it; the client never hears so
            _drop(req)
            return
        req.send_response_only(resp.status, resp.reason)     # moto's own Date header, not a second one
        for key, value in resp.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                req.send_header(key, value)
        # a HEAD answer has no body but says the object's length
        req.send_header("Content-Length", resp.getheader("Content-Length", str(len(data)))
                        if req.command == "HEAD" else str(len(data)))
        req.end_headers()
        if fault == "truncate":                     # half the body, then the connection is closed
            req.wfile.write(data[: len(data) // 2])
            req.close_connection = True
        elif req.command != "HEAD":
            req.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:     # a connection stop() reset: quiet
        pass


def _reset(connection: socket.socket) -> None:
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _drop(req: BaseHTTPRequestHandler) -> None:
    """Close the client's connection at once, without an answer (a reset, as a dying server gives)."""
    req.close_connection = True
    try:
        req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
