"""Offloading frames to the edge server without ever stalling capture.

``Sender.submit`` puts a frame on a bounded queue and returns at once; one
background thread encodes each frame (``offload.wire.encode_image``) and POSTs
it to ``SERVER/v1/classify`` over one keep-alive HTTP/1.1 connection, with
``Authorization: Bearer KEY``. Every frame handed to ``submit`` comes back
exactly once as a :class:`Result` on ``results`` (a ``queue.Queue`` the loop
drains): an answer, or the reason there is none. A failure never raises into
the loop; the frame keeps its weak answer.

Outcomes (``Result.outcome``, an :class:`offload.device.record.Outcome`):

``SENT``         the server answered 200 with a valid answer
``TIMEOUT``      no connection within ``connect_timeout`` or no answer within ``read_timeout``
``REFUSED``      the connection was refused (no server listening)
``DISCONNECTED`` the server closed the connection without an answer
``NET_ERROR``    any other network error (message in ``Result.error``)
``HTTP``         the server answered with status ``Result.http_status`` (401, 429, 500, ...)
``HELD_OFF``     not sent: the server asked to wait (``Retry-After`` on a 429 or 503)
``BAD_ANSWER``   a 200 answer that does not follow the wire format
``BAD_FRAME``    the frame could not be encoded
``CANCELLED``    still queued or in flight when the run ended (``close``)

(``QUEUE_FULL`` is decided by the caller when ``submit`` returns False.)

A 429 or 503 answer with ``Retry-After`` (seconds or an HTTP date, RFC 9110)
holds the sender off: frames taken from the queue before that time come back
``held-off`` at once instead of being sent, so a device whose bucket has
drifted from the server's does not spend network on requests the server has
said it will refuse. The hold is capped at ``MAX_HOLD_S`` and measured on the
sender's ``clock`` (``time.monotonic`` unless a test injects another).
"""

from __future__ import annotations

import http.client
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from offload import wire
from offload.device.record import Outcome

__all__ = ["Sender", "Result", "retry_after_seconds", "MAX_HOLD_S"]

MAX_HOLD_S = 60.0  # a longer Retry-After would silence offloading for a whole run


def retry_after_seconds(value, now=None):
    """Seconds to wait from a ``Retry-After`` header value, or None if it is not valid.

    ``value`` is delta-seconds (``"5"``) or an HTTP date; ``now`` (Unix time,
    s) is the reference for a date (default: the current time). The result
    lies in ``0 .. MAX_HOLD_S``.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes "²" too
        secs = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; others are ambiguous
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    return min(max(secs, 0.0), MAX_HOLD_S)


@dataclass
class Result:
    """What became of one offloaded frame.

    Times in ms: ``queue_ms`` waiting in the queue, ``transmission_ms`` the
    request's round trip minus the server's ``inference_ms`` (encoding
    excluded), ``encode_ms`` encoding the image.
    """

    frame_id: int
    outcome: Outcome
    answer: wire.Answer | None = None
    error: str | None = None
    queue_ms: float | None = None
    encode_ms: float | None = None
    transmission_ms: float | None = None
    request_bytes: int | None = None
    http_status: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self):
        """The outcome as logged (``"sent"``, ``"http-429"``, ...)."""
        return self.outcome.label(self.http_status)


class Sender:
    """Bounded queue + one sender thread over one keep-alive connection.

    Parameters
    ----------
    server : str
        Base URL ``http://HOST[:PORT]``.
    key : str
        API key for ``Authorization: Bearer``.
    queue_size : int
        Frames waiting at most (the one being sent not counted).
    connect_timeout, read_timeout : float
        Seconds.
    image_format : ``"png"`` or ``"jpeg"``; ``jpeg_quality`` 1..100.
    n_classes : int, optional
        When given, answers with a class outside ``0..n_classes-1`` are ``bad-answer``.
    clock : callable () -> float
        Monotonic seconds for the ``Retry-After`` hold (tests pass a fake one).
    """

    def __init__(self, server, key, *, queue_size=8, connect_timeout=1.0, read_timeout=2.0,
                 image_format="png", jpeg_quality=90, n_classes=None, clock=time.monotonic):
        u = urlsplit(server)
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/") + wire.CLASSIFY_PATH
        self.key = key
        self.connect_timeout, self.read_timeout = float(connect_timeout), float(read_timeout)
        self.image_format, self.jpeg_quality = image_format, int(jpeg_quality)
        self.n_classes = n_classes
        self.clock = clock
        self.results = queue.Queue()
        self._jobs = queue.Queue(maxsize=int(queue_size))
        self._conn = None
        self._conn_lock = threading.Lock()
        self._stopping = threading.Event()
        self._pending = 0          # submitted and not yet on ``results``
        self._hold_until = -math.inf  # clock() before which nothing is sent (Retry-After)
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="offload-sender", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    def submit(self, frame_id, image):
        """Queue one frame; False (nothing queued) when the queue is full or closed. Never blocks."""
        if self._stopping.is_set():
            return False
        try:
            self._jobs.put_nowait((frame_id, image, time.perf_counter()))
        except queue.Full:
            return False
        with self._count_lock:
            self._pending += 1
        return True

    @property
    def pending(self):
        """Frames submitted whose result is not yet on ``results``."""
        with self._count_lock:
            return self._pending

    def close(self, timeout):
        """Stop: let queued frames go out for up to ``timeout`` s, then cancel the rest.

        Frames still queued, and the one in flight when the time is up (its
        socket is shut down to wake the thread), come back as ``cancelled``.
        Returns when every submitted frame has a result or, if the thread does
        not wake, after about ``timeout + 1`` s.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping.set()
        # Cancel what is still queued.
        while True:
            try:
                fid, _, t_in = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._finish(Result(fid, Outcome.CANCELLED, error="run ended before it was sent",
                                queue_ms=(time.perf_counter() - t_in) * 1e3))
        self._jobs.put(None)  # wake the thread if it waits for work
        with self._conn_lock:
            conn = self._conn
        if conn is not None and conn.sock is not None:
            try:  # abort a request in flight: the thread sees an error and cancels it
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=1.0)

    # ------------------------------------------------------------------ thread side

    def _finish(self, result):
        self.results.put(result)
        with self._count_lock:
            self._pending -= 1

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fid, image, t_in = job
            if self._stopping.is_set():
                self._finish(Result(fid, Outcome.CANCELLED, error="run ended before it was sent",
                                    queue_ms=(time.perf_counter() - t_in) * 1e3))
                continue
            t0 = time.perf_counter()
            hold = self._hold_until - self.clock()
            if hold > 0:
                self._finish(Result(fid, Outcome.HELD_OFF, queue_ms=(t0 - t_in) * 1e3,
                                    error=f"not sent: the server asked to wait {hold:.1f} s more "
                                          "(Retry-After)"))
                continue
            res = self._send(fid, image)
            res.queue_ms = (t0 - t_in) * 1e3
            if self._stopping.is_set() and res.outcome is not Outcome.SENT:
                res.error = f"run ended while in flight ({res.label}: {res.error})"
                res.outcome, res.http_status = Outcome.CANCELLED, None
            self._finish(res)
        self._close_conn()

    def _close_conn(self):
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self):
        with self._conn_lock:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.connect_timeout)
            conn = self._conn
        if conn.sock is None:
            conn.connect()  # bounded by connect_timeout
            conn.sock.settimeout(self.read_timeout)
            # http.client sends headers and body in two writes; with Nagle's
            # algorithm the body then waits for the server's delayed ACK
            # (~40 ms per request on Linux).
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn, False
        return conn, True

    def _send(self, fid, image):
        t0 = time.perf_counter()
        try:
            body, ctype = wire.encode_image(image, self.image_format, quality=self.jpeg_quality)
        except wire.WireError as e:
            return Result(fid, Outcome.BAD_FRAME, error=str(e))
        encode_ms = (time.perf_counter() - t0) * 1e3
        headers = {"Content-Type": ctype, "Authorization": f"Bearer {self.key}",
                   wire.FRAME_ID_HEADER: str(fid)}
        # A reused keep-alive connection may have been closed by the server
        # while idle; that shows as a disconnect before any answer, and the
        # request is retried once on a fresh connection.
        for attempt in (0, 1):
            t1 = time.perf_counter()
            reused = False
            try:
                conn, reused = self._connection()
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                retry_after = resp.getheader("Retry-After")
                if resp.will_close:
                    self._close_conn()
            except (socket.timeout, TimeoutError) as e:
                self._close_conn()
                return Result(fid, Outcome.TIMEOUT, error=f"{e or 'timed out'}", encode_ms=encode_ms,
                              request_bytes=len(body))
            except ConnectionRefusedError as e:
                self._close_conn()
                return Result(fid, Outcome.REFUSED, error=str(e), encode_ms=encode_ms,
                              request_bytes=len(body))
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.IncompleteRead) as e:
                self._close_conn()
                if reused and attempt == 0 and not self._stopping.is_set():
                    continue
                return Result(fid, Outcome.DISCONNECTED, error=f"{type(e).__name__}: {e}",
                              encode_ms=encode_ms, request_bytes=len(body))
            except (OSError, http.client.HTTPException) as e:
                self._close_conn()
                return Result(fid, Outcome.NET_ERROR, error=f"{type(e).__name__}: {e}",
                              encode_ms=encode_ms, request_bytes=len(body))
            rtt_ms = (time.perf_counter() - t1) * 1e3
            if status != 200:
                wait = retry_after_seconds(retry_after) if status in (429, 503) else None
                if wait:
                    self._hold_until = max(self._hold_until, self.clock() + wait)
                return Result(fid, Outcome.HTTP, http_status=status,
                              error=data[:200].decode("utf-8", "replace"),
                              encode_ms=encode_ms, transmission_ms=rtt_ms,
                              request_bytes=len(body))
            try:
                ans = wire.parse_answer(data, self.n_classes)
            except wire.WireError as e:
                return Result(fid, Outcome.BAD_ANSWER, error=str(e), encode_ms=encode_ms,
                              transmission_ms=rtt_ms, request_bytes=len(body))
            return Result(fid, Outcome.SENT, answer=ans, encode_ms=encode_ms,
                          transmission_ms=max(0.0, rtt_ms - ans.inference_ms),
                          request_bytes=len(body))
        raise AssertionError("unreachable")  # pragma: no cover
