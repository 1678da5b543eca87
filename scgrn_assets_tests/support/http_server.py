"""A real HTTP server on 127.0.0.1 with scriptable faults, for download tests.

Tests get it through the :func:`http_server` fixture (import the fixture into the test module)::

    from scgrn_assets_tests.support.http_server import Reply, http_server  # noqa: F401

    def test_something(http_server):
        url = http_server.serve("/GSE1_RAW.tar", content, replies=[Reply(status=500), Reply()])
        ...
        assert len(http_server.requests_for("/GSE1_RAW.tar")) == 2

Each served path answers its scripted replies in order, one per request, then plain
successful replies once the script is used up. Unknown paths answer 404. Every request is
recorded (path and headers) so tests can assert what the client really sent.

Downloads refuse hosts on this machine unless the user allows them, so a test that fetches from
the server directly (not through a mirror rule, ``SCGRN_URL_MIRROR``, whose host is allowed)
allows it explicitly: ``SCGRN_ALLOW_HOSTS=127.0.0.1`` (or ``server.allow_entry``, this port only),
or ``DownloadPolicy(allow_hosts=...)``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass(frozen=True)
class Reply:
    """One scripted answer to one request.

    Attributes
    ----------
    status
        HTTP status. 200 serves the content (206 instead when the request has a ``Range``
        header and ``honour_range`` is true); 3xx sends ``headers`` (put a ``Location`` there)
        and no body; any other status sends a short text body.
    delay_seconds
        Sleep this long before sending anything (a slow server).
    honour_range
        Answer ``Range: bytes=N-`` with 206 and ``Content-Range``; when false, ignore the
        header and send the whole content with 200.
    range_start
        Serve a 206 starting at this offset whatever the request asked for (a server that
        answers the wrong range).
    content_length
        Declare this ``Content-Length`` instead of the true one (a lying server); ``-1``
        sends no ``Content-Length`` and ends the body by closing the connection.
    body
        Send these bytes instead of the served content.
    drop_after_bytes
        Close the connection after this many body bytes (a connection dropped mid-body).
    reset_connection
        With ``drop_after_bytes``, end with a TCP reset (RST) instead of an orderly close.
    headers
        Extra response headers.
    """

    status: int = 200
    delay_seconds: float = 0.0
    honour_range: bool = True
    range_start: int | None = None
    content_length: int | None = None
    body: bytes | None = None
    drop_after_bytes: int | None = None
    reset_connection: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    """What the client sent: the request path and its headers (names lower-cased)."""

    path: str
    headers: dict[str, str]


@dataclass
class _ServedPath:
    content: bytes
    replies: list[Reply]


class _QuietThreadingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping for a slow reply must not block shutdown

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that give up (timeouts) and dropped connections are the point of these tests, not errors."""


class FaultyHTTPServer:
    """A ThreadingHTTPServer on 127.0.0.1 (port chosen by the OS) whose answers are scripted."""

    def __init__(self) -> None:
        self._served: dict[str, _ServedPath] = {}
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self._server = _QuietThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def allow_entry(self) -> str:
        """``127.0.0.1:<port>``: the ``SCGRN_ALLOW_HOSTS`` entry allowing this server (and no other port)."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The full URL of ``path`` (which starts with ``/``) on this server."""
        return self.base_url + path

    def serve(self, path: str, content: bytes, replies: list[Reply] | tuple[Reply, ...] = ()) -> str:
        """Serve ``content`` at ``path``, answering the first requests with ``replies``; returns the URL."""
        with self._lock:
            self._served[path] = _ServedPath(content=content, replies=list(replies))
        return self.url(path)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The recorded requests for ``path``, oldest first."""
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_reply(self, path: str, headers: dict[str, str]) -> tuple[Reply, bytes] | None:
        with self._lock:
            self.requests.append(RecordedRequest(path=path, headers=headers))
            served = self._served.get(path)
            if served is None:
                return None
            reply = served.replies.pop(0) if served.replies else Reply()
            return reply, served.content


def _requested_range_start(range_header: str | None) -> int | None:
    """The N of ``bytes=N-`` (the only form the client sends), or None."""
    if not range_header or not range_header.startswith("bytes=") or not range_header.endswith("-"):
        return None
    try:
        return int(range_header[len("bytes="):-1])
    except ValueError:
        return None


def _make_handler(server: FaultyHTTPServer) -> type[BaseHTTPRequestHandler]:
    class ScriptedHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            headers = {name.lower(): value for name, value in self.headers.items()}
            scripted = server._next_reply(self.path, headers)
            self.close_connection = True
            if scripted is None:
                self._send_simple(404, b"not found")
                return
            reply, content = scripted
            if reply.delay_seconds:
                time.sleep(reply.delay_seconds)
            if reply.status != 200:
                self._send_simple(reply.status, b"scripted status", reply.headers)
                return
            self._send_content(reply, content, headers.get("range"))

        def _send_simple(self, status: int, body: bytes, extra_headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (extra_headers or {}).items():
                self.send_header(name, value)
            if 300 <= status < 400:
                body = b""
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _send_content(self, reply: Reply, content: bytes, range_header: str | None) -> None:
            total = len(content)
            start = _requested_range_start(range_header) if reply.honour_range else None
            if reply.range_start is not None:
                start = reply.range_start
            if start is not None and start >= total:
                self._send_simple(416, b"", {"Content-Range": f"bytes */{total}"})
                return
            body = reply.body if reply.body is not None else content[start or 0:]
            if start is None:
                self.send_response(200)
            else:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            declared = len(body) if reply.content_length is None else reply.content_length
            if declared >= 0:
                self.send_header("Content-Length", str(declared))
            self.send_header("Connection", "close")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.drop_after_bytes is None:
                self.wfile.write(body)
                return
            self.wfile.write(body[:reply.drop_after_bytes])
            self.wfile.flush()
            if reply.reset_connection:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
            """Keep test output clean: requests are recorded on the server object instead."""

    return ScriptedHandler


@pytest.fixture
def http_server() -> Iterator[FaultyHTTPServer]:
    """A running :class:`FaultyHTTPServer`, shut down after the test."""
    server = FaultyHTTPServer()
    try:
        yield server
    finally:
        server.close()
