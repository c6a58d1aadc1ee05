"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server, for the storage-fault tests.

``FaultProxy(upstream)`` listens on 127.0.0.1 at a free port and forwards every request to ``upstream``
(``http://127.0.0.1:PORT`` of moto), one upstream connection per request. The test gives it a schedule:
a list of ``Fault`` rules, each matching requests by method and a substring of the path (the bucket/key),
applied to the ``every``-th matching request, ``times`` times in all (``None``: forever). A request that
matches a rule with budget left gets that rule's fault instead of (or on top of) the real answer:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body, what S3 answers when a prefix is throttled;
- ``reset``: the connection is closed with a TCP reset before any answer (``SO_LINGER`` 0);
- ``slow``: the real answer, after ``delay`` seconds;
- ``truncate``: the real status and headers (its ``Content-Length`` too), then half the body, then a reset:
  a connection lost mid-body;
- ``short``: the real status, half the body and a ``Content-Length`` rewritten to match: a body cut short
  by a middlebox that no HTTP client can detect; only a size check against the object's length can.

``proxy.log`` lists every request as ``(method, path, fault or None)``: what the test asserts was injected.
Plain ``http.server`` threads; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "reset", "slow", "truncate", "short")
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)
# Headers that belong to one hop and are not forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


@dataclass
class Fault:
    """Inject ``kind`` into requests whose method is ``method`` (any when None) and whose path contains
    ``path``: the ``every``-th of them (1: each), ``times`` times in all (None: forever)."""

    kind: str
    method: str | None = "GET"
    path: str = ""
    every: int = 1
    times: int | None = 1
    delay: float = 1.0  # seconds, for "slow"
    seen: int = 0
    injected: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r}: one of {FAULTS}")

    def take(self, method: str, path: str) -> bool:
        """Whether this request gets the fault (counts it)."""
        if (self.method is not None and method != self.method) or self.path not in path:
            return False
        if self.times is not None and self.injected >= self.times:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.injected += 1
        return True


class FaultProxy:
    """The proxy; a context manager. ``url`` is its endpoint (give it as ``endpoint_url``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.schedule: list[Fault] = []
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def set_schedule(self, faults: list[Fault]) -> None:
        """Replace the schedule (and clear the log)."""
        with self._lock:
            self.schedule = list(faults)
            self.log = []

    def injected(self) -> dict[str, int]:
        """How many of each fault were injected since the schedule was set."""
        with self._lock:
            counts: dict[str, int] = {}
            for _, _, fault in self.log:
                if fault is not None:
                    counts[fault] = counts.get(fault, 0) + 1
            return counts

    def decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            fault = next((f for f in self.schedule if f.take(method, path)), None)
            self.log.append((method, path, fault.kind if fault else None))
            return fault

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass

    def do_GET(self) -> None:
        self._forward()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout: close() sends RST, the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _forward(self) -> None:
        body = self._body()
        fault = self.owner.decide(self.command, self.path)
        kind = fault.kind if fault else None
        if kind == "reset":
            return self._reset()
        if kind == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN_BODY)
            return
        if kind == "slow":
            time.sleep(fault.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reason, out_headers = response.status, response.reason, response.getheaders()
        finally:
            upstream.close()
        cut = kind in ("truncate", "short") and self.command == "GET" and len(data) > 1
        sent = data[: len(data) // 2] if cut else data
        self.send_response(status, reason)
        for name, value in out_headers:
            low = name.lower()
            if low in _HOP or (low == "content-length" and self.command != "HEAD"):
                continue  # a HEAD answer keeps the object's length; a body's is set below
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(sent) if kind == "short" else len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(sent)
        if kind == "truncate" and cut:
            self.wfile.flush()
            self._reset()
