"""One keep-alive HTTP/1.1 connection to the edge server, plain or TLS, that no answer can break.

The sender's client, in place of ``http.client``, because a device on a
shared network must bound everything an answer can make it do, and
``http.client`` bounds headers only with private module constants, has no
limit on a body, and times each ``recv`` rather than the whole answer:

* the whole answer (head and body) must arrive within one deadline (the
  sender's ``read-timeout``), however slowly the bytes dribble in;
* the head (status line and headers) is at most :data:`MAX_HEAD_BYTES`
  bytes and :data:`MAX_HEADERS` header lines;
* the body is at most ``max_body`` bytes (the sender passes
  ``offload.wire.MAX_ANSWER_BYTES``): a larger ``Content-Length`` is refused
  before reading any of it, a chunked or read-until-close body is cut there;
* nothing is followed: a redirect is an answer like any other.

With an ``ssl.SSLContext`` the connection is TLS: the certificate chain and
the host name are verified by the context (``check_hostname``); a failed
handshake raises :class:`TLSError` and nothing is sent, and there is no
fallback to plain HTTP.

Errors: :class:`TLSError` (handshake or TLS record failure),
:class:`ProtocolError` (the answer breaks HTTP/1.1 or a bound),
:class:`Disconnected` (closed before a complete answer), ``TimeoutError``
(``socket.timeout``), ``ConnectionRefusedError`` and other ``OSError``.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass

__all__ = ["Connection", "Response", "ProtocolError", "AnswerTooLarge", "TLSError", "Disconnected",
           "MAX_HEAD_BYTES", "MAX_HEADERS"]

#: Bytes of an answer's status line and headers together, at most.
MAX_HEAD_BYTES = 16 * 1024
#: Header lines in an answer, at most (the edge server sends about 5).
MAX_HEADERS = 32
_RECV_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 1024           # "SIZE;extensions\r\n" of one chunk
_MAX_INTERIM = 4                 # 1xx answers skipped before the real one
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (.*))?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class ProtocolError(Exception):
    """The answer breaks HTTP/1.1 or one of this module's bounds; the message says which."""


class AnswerTooLarge(ProtocolError):
    """The answer's body is over ``max_body`` bytes (not read past the limit)."""


class TLSError(Exception):
    """The TLS handshake failed (certificate, host name, protocol) or a TLS record was bad."""


class Disconnected(ConnectionError):
    """The server closed the connection before a complete answer."""


@dataclass
class Response:
    """One answer: ``status``, ``reason``, ``headers`` (lower-case name -> value), ``body``."""

    status: int
    reason: str
    headers: dict
    body: bytes
    will_close: bool

    def header(self, name):
        """The value of header ``name`` (any case), or None."""
        return self.headers.get(name.lower())


def _ssl_text(exc):
    """OpenSSL's message without its ``[SSL: CODE]`` prefix and ``(_ssl.c:N)`` suffix."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", re.sub(r"^\[[^\]]*\]\s*", "", str(exc))) or repr(exc)


def _tls_message(exc, host, port):
    return f"TLS handshake with {host}:{port} failed: {_ssl_text(exc)}"


class Connection:
    """A connection to ``host:port`` (opened on demand by :meth:`request`).

    ``tls`` is an ``ssl.SSLContext`` for ``https`` (verifies chain and host
    name), None for plain HTTP. ``connect_timeout`` (s) bounds the TCP
    connect and the TLS handshake together.
    """

    def __init__(self, host, port, *, tls=None, connect_timeout=1.0):
        self.host, self.port, self.tls = host, int(port), tls
        self.connect_timeout = float(connect_timeout)
        self.sock = None
        self._sock_lock = threading.Lock()   # close() against abort() from another thread
        self._buf = bytearray()
        self._deadline = None
        self._host_header = host if ":" not in host else f"[{host}]"
        if self.port != (443 if tls is not None else 80):
            self._host_header += f":{self.port}"

    # ------------------------------------------------------------------ open / close

    def connect(self):
        """Open the connection (TCP, then the TLS handshake when ``tls`` is set)."""
        t0 = time.monotonic()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout:
            raise socket.timeout(f"no connection to {self.host}:{self.port} within "
                                 f"{self.connect_timeout:g} s") from None
        try:
            # the request goes out in one write, but small answers should not wait either
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock.settimeout(max(1e-3, self.connect_timeout - (time.monotonic() - t0)))
                sock = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        self.sock, self._buf = sock, bytearray()

    def _handshake(self, sock):
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLError as e:
            raise TLSError(_tls_message(e, self.host, self.port)) from None
        except (socket.timeout, TimeoutError):
            raise TLSError(f"TLS handshake with {self.host}:{self.port} failed: no answer within "
                           f"{self.connect_timeout:g} s (is it serving plain HTTP?)") from None
        except OSError as e:  # reset or closed mid-handshake: a plain server often does this
            raise TLSError(f"TLS handshake with {self.host}:{self.port} failed: the connection "
                           f"was closed ({type(e).__name__}; is it serving plain HTTP?)") from None

    def close(self):
        """Close the connection (the next request opens a new one)."""
        with self._sock_lock:
            sock, self.sock = self.sock, None
            if sock is not None:
                sock.close()

    def abort(self):
        """Shut the connection down from another thread: a request in flight fails at once."""
        with self._sock_lock:  # the descriptor cannot be closed (and reused) meanwhile
            if self.sock is None:
                return
            try:  # on a duplicate of the descriptor: SSLSocket.shutdown would drop its TLS state
                with socket.socket(fileno=socket.dup(self.sock.fileno())) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ one request

    def request(self, method, path, body, headers, *, timeout, max_body):
        """Send one request and read its answer; ``timeout`` (s) bounds sending and the whole answer.

        Returns a :class:`Response`; after one with ``will_close`` the
        connection is closed. Raises as the module docstring says; after an
        error the connection is closed.
        """
        if self.sock is None:
            self.connect()
        self._deadline = time.monotonic() + float(timeout)
        try:
            self._send(method, path, body, headers)
            resp = self._read_answer(max_body)
        except socket.timeout:
            self.close()
            raise socket.timeout(f"no complete answer in time ({timeout:g} s)") from None
        except ssl.SSLError as e:
            self.close()
            if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise Disconnected(f"the server closed the TLS connection ({_ssl_text(e)})") from None
            raise TLSError(f"TLS with {self.host}:{self.port} failed: {_ssl_text(e)}") from None
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp

    def _send(self, method, path, body, headers):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._settimeout()
        self.sock.sendall(head + bytes(body))

    def _settimeout(self):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no complete answer in time")
        self.sock.settimeout(left)

    def _fill(self, what):
        """Read more bytes into the buffer; :class:`Disconnected` at the end of the stream."""
        self._settimeout()
        data = self.sock.recv(_RECV_BYTES)
        if not data:
            raise Disconnected(f"the server closed the connection {what}")
        self._buf += data

    def _read_answer(self, max_body):
        head_bytes = 0
        for _ in range(_MAX_INTERIM + 1):
            status, reason, version, headers, n = self._read_head(MAX_HEAD_BYTES - head_bytes)
            head_bytes += n
            if status >= 200:
                break
        else:
            raise ProtocolError(f"more than {_MAX_INTERIM} interim (1xx) answers")
        try:
            body, until_close = self._read_body(status, headers, max_body)
        except AnswerTooLarge as e:
            if status == 200:
                raise
            # an error page too large to keep: the status is the answer, the stream is spent
            return Response(status, reason, headers, f"({e})".encode(), True)
        conn = headers.get("connection", "").lower()
        will_close = until_close or "close" in conn or (version == 0 and "keep-alive" not in conn)
        if self._buf:  # bytes after the answer: the stream cannot be trusted for the next one
            will_close = True
        return Response(status, reason, headers, body, will_close)

    def _read_head(self, limit):
        """``(status, reason, minor version, headers, bytes)`` of one answer head."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buf) > limit:
                raise ProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes")
            self._fill("before answering" if not self._buf else "in the middle of the answer head")
        if end + 4 > limit:
            raise ProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes")
        raw = bytes(self._buf[:end])
        del self._buf[:end + 4]
        lines = raw.decode("latin-1").split("\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        if m is None:
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        if len(lines) - 1 > MAX_HEADERS:
            raise ProtocolError(f"answer has {len(lines) - 1} header lines, more than {MAX_HEADERS}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.fullmatch(name):
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name, value = name.lower(), value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return int(m.group(2)), m.group(3) or "", int(m.group(1)), headers, end + 4

    def _read_body(self, status, headers, max_body):
        """``(body, read until close)`` of an answer, at most ``max_body`` bytes."""
        if status in (204, 304):
            return b"", False
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {te[:40]!r}")
            return self._read_chunked(max_body), False
        length = headers.get("content-length")
        if length is None:
            return self._read_until_close(max_body), True
        if not (length.isascii() and length.isdigit()):
            raise ProtocolError(f"bad Content-Length {length[:40]!r}")
        n = int(length)
        if n > max_body:
            raise AnswerTooLarge(f"answer of {n} bytes (Content-Length) is over the limit of "
                                f"{max_body}")
        return self._take(n, "in the middle of the answer body"), False

    def _take(self, n, what):
        while len(self._buf) < n:
            self._fill(what)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _line(self, limit, what):
        while True:
            end = self._buf.find(b"\r\n")
            if 0 <= end <= limit:
                line = bytes(self._buf[:end])
                del self._buf[:end + 2]
                return line
            if end > limit or len(self._buf) > limit:
                raise ProtocolError(f"{what} over {limit} bytes")
            self._fill(f"in the middle of a {what}")

    def _read_chunked(self, max_body):
        out = bytearray()
        while True:
            size = self._line(_MAX_CHUNK_LINE, "chunk size line").split(b";", 1)[0].strip()
            if not size or len(size) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                raise ProtocolError(f"bad chunk size {size[:20]!r}")
            n = int(size, 16)
            if n == 0:
                break
            if len(out) + n > max_body:
                raise AnswerTooLarge(f"chunked answer over the limit of {max_body} bytes")
            out += self._take(n, "in the middle of a chunk")
            if self._take(2, "after a chunk") != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
        trailers = 0
        while self._line(_MAX_CHUNK_LINE, "trailer line"):
            trailers += 1
            if trailers > MAX_HEADERS:
                raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")
        return bytes(out)

    def _read_until_close(self, max_body):
        while True:
            if len(self._buf) > max_body:
                raise AnswerTooLarge(f"answer over the limit of {max_body} bytes (no Content-Length)")
            try:
                self._fill("")
            except Disconnected:
                out = bytes(self._buf)
                self._buf = bytearray()
                return out
