"""A fault-injecting HTTP/1.1 reverse proxy for an S3 endpoint (moto), loopback only.

Every request is forwarded verbatim (method, path and query, headers including ``Host``
and ``Authorization``, body) so that SigV4 signatures still validate upstream. Faults
are drawn from a seeded generator at configurable rates:

``error500``     answer 500 InternalError (S3 XML error body), nothing forwarded
``slowdown503``  answer 503 SlowDown (S3 XML error body), nothing forwarded
``reset``        abort the connection with a TCP RST, no response, nothing forwarded
``close``        close the connection cleanly (FIN), no response, nothing forwarded
``drop_after``   forward (the request takes effect upstream), then close with no response
``delay``        wait ``delay`` seconds, then forward normally
``truncate``     forward, send the real status, headers and ``Content-Length`` but only
                 ``truncate_fraction`` of the body, then close
``short``        forward, send only ``truncate_fraction`` of the body with a Content-Length
                 that matches it: a well-framed response that is incomplete (only an
                 end-to-end checksum, such as S3's x-amz-checksum-crc32, can tell)

The rates of the first six kinds are probabilities per request (they sum to at most 1).
The rates of ``truncate`` and ``short`` (summing to at most 1) are probabilities per
response that has a body to cut (2+ bytes, not HEAD) and was not already given another
fault, drawn separately.

The decision for a request depends only on the seed, the method, the request target and
how many times that same request was seen before, so a run's faults do not depend on
thread scheduling; ``aliases`` replaces parts of the target before the draw (a test's
random bucket name), so that the same job draws the same faults in every run. ``only``
restricts faults to some requests (``only_object_reads``), ``limit`` caps how many are
injected (a short outage: the first N eligible requests fail).

Request bodies: ``Content-Length`` bodies are read as is (an ``aws-chunked`` payload is a
body like any other and is forwarded byte for byte with its ``Content-Encoding`` and
``x-amz-decoded-content-length``); ``Transfer-Encoding: chunked`` bodies are de-chunked
and forwarded with a ``Content-Length`` (hop-by-hop framing; botocore never signs
``Transfer-Encoding`` or ``Expect``). What s3fs 2026.9 / aiobotocore 3.10 actually send for
``put_object`` over plain HTTP: one ``Content-Length`` body, its SHA-256 signed in
``X-Amz-Content-SHA256`` and an ``x-amz-checksum-crc32`` header; botocore only switches to
aws-chunked bodies with trailing checksums over HTTPS.

Usage::

    with FaultProxy(moto_url, seed=7, rates={"error500": .1, "reset": .1}) as proxy:
        ... storage_options={"endpoint_url": proxy.url} ...
        assert proxy.faults["error500"] > 0
"""
from __future__ import annotations

import hashlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator
from urllib.parse import urlsplit

KINDS = ("error500", "slowdown503", "reset", "close", "drop_after", "delay", "truncate", "short")
BEFORE_FORWARD = ("error500", "slowdown503", "reset", "close")
ON_BODY = ("truncate", "short")  # drawn separately, for responses with a body to cut
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
ERRORS = {"error500": (500, "Internal Server Error", "InternalError",
                       "We encountered an internal error. Please try again."),
          "slowdown503": (503, "Slow Down", "SlowDown", "Please reduce your request rate.")}
Eligible = Callable[[str, str], bool]  # (method, request target "/bucket/key?query") -> may this request fail?


def s3_error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    return ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{_xml(resource)}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>").encode()


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def only_object_reads(bucket: str, prefix: str = "") -> Eligible:
    """Faults only for GETs of objects under ``bucket/prefix`` (not listings, HEADs or writes)."""
    start = f"/{bucket}/{prefix}".rstrip("/") + "/"

    def eligible(method: str, target: str) -> bool:
        path, _, query = target.partition("?")
        return method == "GET" and path.startswith(start) and "list-type" not in query
    return eligible


def _pick(draw: float, rates: list[tuple[str, float]]) -> str | None:
    for kind, rate in rates:
        if draw < rate:
            return kind
        draw -= rate
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 120  # an idle keep-alive connection is dropped after this

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (no log line per request)
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    # "Expect: 100-continue" is answered by BaseHTTPRequestHandler itself; the request goes upstream whole.
    def _handle(self) -> None:
        proxy = self.server.proxy
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        kind, cut_body = proxy._decide(self.command, self.path)
        if kind in BEFORE_FORWARD:
            proxy._count(kind, self.command, self.path)
            if kind in ERRORS:
                self._send_error(kind)
            else:
                self._abort(reset=kind == "reset")
            return
        if kind == "delay":
            proxy._count(kind, self.command, self.path)
            time.sleep(proxy.delay)
        try:
            status, reason, headers, payload = proxy._forward(self.command, self.path, self._upstream_headers(body),
                                                              body)
        except OSError:  # upstream gone: a bad gateway, as a real proxy would say
            self._send_raw(502, "Bad Gateway", [("Content-Type", "text/plain")], b"upstream unreachable")
            return
        if kind == "drop_after":
            proxy._count(kind, self.command, self.path)
            self._abort(reset=False)
            return
        if kind is None and cut_body and self.command != "HEAD" and len(payload) >= 2:
            proxy._count(cut_body, self.command, self.path)
            cut = min(len(payload) - 1, max(1, int(len(payload) * proxy.truncate_fraction)))
            if cut_body == "short":  # well framed: the connection stays usable
                self._send_raw(status, reason, headers, payload[:cut])
                return
            self._send_raw(status, reason, headers, payload[:cut], full_length=len(payload))
            self.wfile.flush()
            self._abort(reset=False)
            return
        self._send_raw(status, reason, headers, payload, head=self.command == "HEAD")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ValueError("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields of the transfer encoding: not forwarded
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)  # the CRLF after the chunk
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _upstream_headers(self, body: bytes) -> list[tuple[str, str]]:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP
                   and not (chunked and k.lower() == "content-length")]
        if chunked or (body and "Content-Length" not in self.headers):
            headers.append(("Content-Length", str(len(body))))
        return headers

    def _send_error(self, kind: str) -> None:
        status, reason, code, message = ERRORS[kind]
        request_id = f"FAULT{self.server.proxy.requests:010d}"
        body = s3_error_body(code, message, self.path.split("?", 1)[0], request_id)
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
        self._send_raw(status, reason, headers, b"" if self.command == "HEAD" else body,
                       full_length=0 if self.command == "HEAD" else None)

    def _send_raw(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes, *,
                  full_length: int | None = None, head: bool = False) -> None:
        """Status line and headers as given, a Content-Length for ``payload`` (or ``full_length``), then it.

        For HEAD the upstream ``Content-Length`` (the object's size) is passed on unchanged.
        """
        self.send_response_only(status, reason)
        for key, value in headers:
            if key.lower() in HOP_BY_HOP or (key.lower() == "content-length" and not head):
                continue
            self.send_header(key, value)
        if not head and status not in (204, 304):
            self.send_header("Content-Length", str(len(payload) if full_length is None else full_length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if payload and not head:
            self.wfile.write(payload)

    def _abort(self, reset: bool) -> None:
        """Drop the connection with no (further) response: RST if ``reset``, else a clean FIN."""
        self.close_connection = True
        try:
            self.wfile.flush()
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FaultProxy:
    """A threaded reverse proxy on 127.0.0.1 (a free port) in front of ``upstream`` that injects faults.

    Counters: ``requests`` received, ``forwarded`` upstream, ``methods`` (by HTTP method),
    ``faults`` (by kind), ``events`` (kind, method, target of each fault) since the last
    ``reset_counts()``; ``seen`` counts every (method, target) since the start.
    ``configure()`` and ``faults_off()`` change the faults while the proxy runs.
    """

    def __init__(self, upstream: str, *, seed: int = 0, rates: dict[str, float] | None = None,
                 only: Eligible | None = None, delay: float = 0.25, truncate_fraction: float = 0.5,
                 aliases: dict[str, str] | None = None, upstream_timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.seed, self.delay, self.truncate_fraction = seed, delay, truncate_fraction
        self.upstream_timeout = upstream_timeout
        self.aliases = dict(aliases or {})
        self.rates: dict[str, float] = {}
        self.only: Eligible | None = None
        self._budget: int | None = None  # faults still allowed (None: unlimited)
        self.enabled = True
        self.requests = 0  # requests received (complete request lines and bodies)
        self.forwarded = 0  # requests sent upstream
        self.methods: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.events: list[tuple[str, str, str]] = []  # (kind, method, target) of every fault
        self.seen: Counter[tuple[str, str]] = Counter()  # (method, target) -> requests, never reset
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.configure(rates or {}, only=only)

    # -- configuration ---------------------------------------------------------------------------
    def configure(self, rates: dict[str, float], *, only: Eligible | None = None, limit: int | None = None) -> None:
        """Set the fault rates (by kind), which requests may fail (``only``), and at most how many
        faults to inject from now on (``limit``; None: no limit), e.g. a short outage of 3 failures."""
        unknown = set(rates) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        per_request = sum(r for k, r in rates.items() if k not in ON_BODY)
        on_body = sum(r for k, r in rates.items() if k in ON_BODY)
        if any(r < 0 for r in rates.values()) or per_request > 1 + 1e-9 or on_body > 1 + 1e-9:
            raise ValueError(f"fault rates must be >= 0; per request kinds, and {ON_BODY}, sum to at most 1 each: "
                             f"{rates}")
        with self._lock:
            self.rates = {k: float(rates[k]) for k in KINDS if rates.get(k)}
            self.only = only
            self._budget = limit

    @contextmanager
    def faults_off(self) -> Iterator[FaultProxy]:
        """Forward everything untouched inside the block."""
        saved, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = saved

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = self.forwarded = 0
            self.methods.clear()
            self.faults.clear()
            self.events.clear()

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"requests": self.requests, "forwarded": self.forwarded, "methods": dict(self.methods),
                    "faults": dict(self.faults), "total_faults": sum(self.faults.values())}

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (clients see them closed)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            live = list(self._connections)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------------
    def _track(self, conn: socket.socket, live: bool) -> None:
        with self._lock:
            (self._connections.add if live else self._connections.discard)(conn)

    def _decide(self, method: str, target: str) -> tuple[str | None, str | None]:
        """The fault for this request (or None), and how to cut its response body if it has one (or None).

        Counts the request."""
        with self._lock:
            self.requests += 1
            self.methods[method] += 1
            nth = self.seen[(method, target)]
            self.seen[(method, target)] += 1
            if (not self.enabled or not self.rates or self._budget == 0
                    or (self.only is not None and not self.only(method, target))):
                return None, None
            rates = dict(self.rates)
            stable = target
            for name, alias in self.aliases.items():
                stable = stable.replace(name, alias)
            rng = random.Random(hashlib.sha256(f"{self.seed}\0{method}\0{stable}\0{nth}".encode()).digest())
            kind = _pick(rng.random(), [(k, r) for k, r in rates.items() if k not in ON_BODY])
            cut_body = _pick(rng.random(), [(k, r) for k, r in rates.items() if k in ON_BODY]) if not kind else None
            if self._budget is not None and (kind or cut_body):
                self._budget -= 1  # a cut that finds no body to cut still uses one
            return kind, cut_body

    def _count(self, kind: str, method: str, target: str) -> None:
        with self._lock:
            self.faults[kind] += 1
            self.events.append((kind, method, target))

    def _forward(self, method: str, target: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for key, value in headers:  # Host and Authorization as the client signed them
                conn.putheader(key, value)
            conn.endheaders(body if body else None)
            response = conn.getresponse()
            payload = response.read()
            with self._lock:
                self.forwarded += 1
            return response.status, response.reason, response.getheaders(), payload
        finally:
            conn.close()
