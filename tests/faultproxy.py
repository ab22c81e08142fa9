"""A fault-injecting HTTP proxy between an S3 client and an S3 endpoint, both on loopback.

For a seeded fraction of requests it answers as a struggling object store does: 503 SlowDown or
500 InternalError (with S3's XML error body), a connection reset, or silence past the client's
read timeout. Everything else goes to the upstream endpoint unchanged. Resets and stalls come
before the request is forwarded or, for `after_forward` of them, after it: the store applied a
write whose answer the client never saw, so a retry must be idempotent.

What it injected is counted by kind. It is bounded in time: a stall lasts `stall_seconds` at most,
no fault is injected after `fault_window` seconds, and `stop()` ends stalls, closes every
connection and joins the threads. Only loopback addresses are accepted, on both sides.
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal_error", "reset", "stall")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_body(code: str, message: str, resource: str) -> bytes:
    """S3's XML error document, as botocore parses it (Code, Message, Resource, RequestId)."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()


class FaultProxy:
    """`with FaultProxy(upstream, rate=0.1, seed=0) as proxy:` point the client at `proxy.url`."""

    def __init__(self, upstream: str, rate: float, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 stall_seconds: float = 3.0, after_forward: float = 0.5, fault_window: float = 900.0):
        target = urlsplit(upstream)
        if target.scheme != "http" or not _is_loopback(target.hostname or ""):
            raise ValueError(f"upstream must be http:// on a loopback address, got {upstream!r}")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds or not 0 <= rate <= 1:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS} and 0 <= rate <= 1 (got {kinds}, {rate})")
        self.upstream = (target.hostname, target.port or 80)
        self.rate, self.kinds, self.stall_seconds, self.after_forward = rate, tuple(kinds), stall_seconds, after_forward
        self.fault_window = fault_window
        self.counts: Counter = Counter()  # by fault kind; also "requests", "forwarded", "after_forward"
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._started = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end stalls, close client connections, join every thread."""
        if self._server is None:
            return
        self._stopping.set()  # ends stalls
        self._server.shutdown()  # no new connections
        deadline = time.monotonic() + timeout
        while True:  # a handler waiting for a keep-alive request wakes up when its socket is shut down
            with self._lock:
                conns, busy = list(self._connections), [t for t in self._workers if t.is_alive()]
            if not busy or time.monotonic() > deadline:
                break
            for conn in conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            time.sleep(0.05)
        self._server.server_close()  # joins the handler threads (they are not daemons)
        self._thread.join(timeout)
        self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions -----------------------------------------------------------------------
    def decide(self) -> tuple[str | None, bool]:
        """(fault kind or None, whether a reset/stall comes after forwarding); seeded, in arrival order."""
        with self._lock:
            self.counts["requests"] += 1
            if time.monotonic() - self._started > self.fault_window:
                return None, False
            draw, kind, late = self._rng.random(), self._rng.choice(self.kinds), self._rng.random()
            if draw >= self.rate:
                return None, False
            after = kind in ("reset", "stall") and late < self.after_forward
            self.counts[kind] += 1
            if after:
                self.counts["after_forward"] += 1
            return kind, after

    def injected(self) -> dict[str, int]:
        """Faults injected so far, by kind."""
        with self._lock:
            return {k: self.counts[k] for k in self.kinds}

    def alive_threads(self) -> list[threading.Thread]:
        """The proxy's threads still running: none after `stop()`."""
        with self._lock:
            workers = [t for t in self._workers if t.is_alive()]
        return workers + ([self._thread] if self._thread is not None and self._thread.is_alive() else [])

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)
            if add:  # kept after the connection ends: `alive_threads` checks they really exit
                self._workers.add(threading.current_thread())


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins them: stop() leaves no thread behind
    block_on_close = True
    proxy: FaultProxy

    def process_request_thread(self, request, client_address):
        self.proxy._track(request, True)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.proxy._track(request, False)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 60  # an idle keep-alive connection is closed after this

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def log_message(self, *args) -> None:  # quiet: the counts tell what happened
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        kind, after = self.proxy.decide()
        if kind in _ERRORS:
            status, code, message = _ERRORS[kind]
            self._respond(status, {"Content-Type": "application/xml"}, error_body(code, message, self.path.split("?")[0]))
            return
        if kind is not None and not after:
            self._fail(kind)
            return
        try:
            status, headers, data = self._forward(body)
        except OSError as exc:  # the upstream is gone: say so, as a gateway would
            self._respond(502, {"Content-Type": "text/plain"}, f"upstream: {exc}".encode())
            return
        with self.proxy._lock:
            self.proxy.counts["forwarded"] += 1
        if kind is not None:
            self._fail(kind)  # applied upstream; the answer is lost
            return
        self._respond(status, headers, data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP], data
        finally:
            conn.close()

    def _respond(self, status: int, headers, data: bytes) -> None:
        items = headers.items() if isinstance(headers, dict) else headers
        self.send_response_only(status)
        has_length = False
        for k, v in items:
            if k.lower() == "content-length":
                if self.command == "HEAD":  # HEAD keeps the object's length, and has no body
                    has_length = True
                    self.send_header(k, v)
                continue
            self.send_header(k, v)
        if not has_length:
            self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _fail(self, kind: str) -> None:
        """A reset (RST, not a clean close) or a stall past the client's read timeout, then close."""
        if kind == "stall":
            self.proxy._stopping.wait(self.proxy.stall_seconds)
        else:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            if kind == "stall":
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.connection.close()  # with SO_LINGER 0: RST, as a dropped connection looks
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
