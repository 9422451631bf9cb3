"""Offloading frames to the edge server without ever stalling capture.

``Sender.submit`` puts a frame on a bounded queue and returns at once; one
background thread encodes each frame and POSTs it over one keep-alive
HTTP/1.1 connection (``offload.device.conn``: plain for ``http://``, TLS for
``https://``), with ``Authorization: Bearer KEY``. What a request is comes
from the sender's *protocol*: :class:`ImageProtocol` (the default) encodes the
frame (``offload.device.payload``) for ``SERVER/v1/classify``;
``offload.device.oipclient.V2Protocol`` sends the model's input tensor to an
Open Inference Protocol (KServe v2) server's ``/v2/models/NAME/infer``.
Every rule below holds for both. Every frame handed to ``submit`` comes back
exactly once as a :class:`Result` on ``results`` (a ``queue.Queue`` the loop
drains): an answer, or the reason there is none. A failure never raises into
the loop; the frame keeps its weak answer.

Outcomes (``Result.outcome``, an :class:`offload.device.record.Outcome`):

``SENT``         the server answered 200 with a valid answer
``TIMEOUT``      no connection within ``connect_timeout`` or no complete answer within ``read_timeout``
``REFUSED``      the connection was refused (no server listening)
``DISCONNECTED`` the server closed (or reset) the connection without an answer
``NET_ERROR``    any other network error (message in ``Result.error``)
``TLS_ERROR``    ``https://`` only: the certificate chain, host name or dates do not verify,
                 the server speaks no TLS, or refused this device's certificate; nothing was sent
``HTTP``         the server answered with status ``Result.http_status`` (401, 429, 500, ...)
``SWITCH_REFUSED`` a 429 whose body says the shared switch refused it (``wire.refused_by``)
``REDIRECT``     the server answered 3xx; redirects are never followed
``HELD_OFF``     not sent: the server asked to wait (``Retry-After`` on a 429 or 503)
``BAD_ANSWER``   an answer that breaks HTTP/1.1, the wire format or a bound (too large,
                 too deep, too many headers, ...)
``BAD_FRAME``    the frame could not be encoded (or made into the model's tensor)
``ERROR``        anything else that went wrong in the sender (message in ``Result.error``);
                 the sender goes on with the next frame
``CANCELLED``    still queued or in flight when the run ended (``close``)

(``QUEUE_FULL`` is decided by the caller when ``submit`` returns False.)

No answer can stop offloading: each frame is handled under its own ``try``,
and should the thread die all the same, ``submit`` (and ``close``) notice,
record the frame it held as ``error`` and start a new thread
(``Sender.restarts`` counts them).

A 429 or 503 answer with ``Retry-After`` (seconds or an HTTP date, RFC 9110)
holds the sender off: frames taken from the queue before that time come back
``held-off`` at once instead of being sent, so a device whose bucket has
drifted from the server's does not spend network on requests the server has
said it will refuse. The hold is capped at ``MAX_HOLD_S`` and measured on the
sender's ``clock`` (``time.monotonic`` unless a test injects another).

Messages for people (``warn``): once when plain HTTP goes to a host that is
not loopback (the key and the images cross the network in clear text), and
once at the first TLS failure; an ``https://`` sender also tries the
handshake as soon as it starts, so a wrong CA or host name is reported before
the first frame is offloaded.
"""

from __future__ import annotations

import ipaddress
import math
import queue
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from offload import wire
from offload.device.conn import Connection, Disconnected, ProtocolError, TLSError
from offload.device.config import ConfigError
from offload.device.payload import Payload
from offload.device.record import Outcome

__all__ = ["Sender", "Result", "ImageProtocol", "Failed", "retry_after_seconds", "tls_context",
           "is_loopback", "MAX_HOLD_S"]

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


def is_loopback(host):
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): traffic that stays on the machine."""
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(ca_file=None, client_cert=None, client_key=None):
    """The ``ssl.SSLContext`` of an ``https://`` sender: verify chain and host name, TLS 1.2 or later.

    ``ca_file`` (PEM) holds the CA certificates to trust; None: the system
    store. ``client_cert`` (PEM, may hold the key too) and ``client_key`` are
    this device's certificate and key, for a server that asks for one.

    Raises
    ------
    ConfigError
        A file that cannot be read or is not what it should be, naming the key.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"ca-file: cannot load CA certificates from {ca_file} "
                          f"({getattr(e, 'strerror', None) or e})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname, ctx.verify_mode = True, ssl.CERT_REQUIRED  # the defaults, said once more
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as e:
            key = "client-key" if client_key and "key" in str(e).lower() else "client-cert"
            raise ConfigError(f"{key}: cannot load the client certificate {client_cert}"
                              + (f" with key {client_key}" if client_key else "")
                              + f" ({getattr(e, 'strerror', None) or e})") from None
    elif client_key is not None:
        raise ConfigError("client-key: needs client-cert")
    return ctx


class Failed(Exception):
    """An exchange with the server that ended without a usable answer: its ``outcome`` and ``error``.

    Raised by :meth:`Sender.exchange` (network, TLS, a broken answer) and by a
    protocol's ``prepare`` (``http_status`` set for a non-200 answer).
    """

    def __init__(self, outcome, error, *, http_status=None, request_bytes=None):
        super().__init__(error)
        self.outcome, self.error, self.http_status = outcome, error, http_status
        self.request_bytes = request_bytes


class ImageProtocol:
    """``POST /v1/classify`` with the frame as an image (``offload.device.payload``), the default protocol.

    A protocol tells the sender what one frame's request is and how to read
    its answer: ``start(exchange)`` (at construction, in the caller's thread)
    and ``prepare(exchange)`` (before each frame, in the sender's) may talk
    to the server first; ``encode(fid, image) -> (path, body, headers)``
    (a ``ValueError`` makes the frame ``bad-frame``); ``parse(response) ->
    wire.Answer`` (a ``ValueError``: ``bad-answer``); ``fall_back(response)``
    True to encode and send the frame once more after a non-200 answer;
    ``max_answer_bytes`` caps the answer.
    """

    max_answer_bytes = wire.MAX_ANSWER_BYTES

    def __init__(self, payload, *, n_classes=None, base=""):
        self.payload = payload  # offload.device.payload.Payload: size and encoding of the image
        self.n_classes = n_classes
        self.path = base + wire.CLASSIFY_PATH

    def start(self, exchange):
        pass

    def prepare(self, exchange):
        pass

    def encode(self, fid, image):
        body, ctype = self.payload.encode(image)
        return self.path, body, {"Content-Type": ctype, wire.FRAME_ID_HEADER: str(fid)}

    def parse(self, resp):
        return wire.parse_answer(resp.body, self.n_classes)

    def fall_back(self, resp):
        return False


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


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
        Base URL ``http://HOST[:PORT]`` or ``https://HOST[:PORT]``.
    key : str
        API key for ``Authorization: Bearer``.
    queue_size : int
        Frames waiting at most (the one being sent not counted).
    connect_timeout : float
        Seconds to connect, TLS handshake included.
    read_timeout : float
        Seconds for the whole answer to one frame (from sending it to its last byte).
    image_format : ``"png"`` or ``"jpeg"``; ``jpeg_quality`` 1..100.
    send_size : (width, height), optional
        Shrink frames to fit inside this many pixels before encoding
        (:class:`offload.device.payload.Payload`); None: send them whole.
    send_cover : bool
        Shrink only until the frame covers ``send_size`` (a server that crops).
    n_classes : int, optional
        When given, answers with a class outside ``0..n_classes-1`` are ``bad-answer``.
    protocol : callable (base path) -> protocol, optional
        Makes the request protocol (see :class:`ImageProtocol`) for the URL's
        path prefix; default: :class:`ImageProtocol` with ``image_format``,
        ``jpeg_quality``, ``n_classes``. Its ``start`` runs here, before the
        thread: a ``ConfigError`` from it (a v2 model that does not fit) is
        raised from the constructor.
    clock : callable () -> float
        Monotonic seconds for the ``Retry-After`` hold (tests pass a fake one).
    ca_file, client_cert, client_key : str, optional
        ``https://`` only: see :func:`tls_context`.
    warn : callable (str) -> None, optional
        Receives the messages for people (default: stderr).

    Raises
    ------
    ConfigError
        A URL that is not ``http://`` or ``https://``, TLS files given for
        ``http://``, or TLS files that do not load.
    """

    def __init__(self, server, key, *, queue_size=8, connect_timeout=1.0, read_timeout=2.0,
                 image_format="png", jpeg_quality=90, send_size=None, send_cover=False,
                 n_classes=None, clock=time.monotonic,
                 ca_file=None, client_cert=None, client_key=None, warn=None, protocol=None):
        u = urlsplit(server)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"server: must be an http:// or https:// URL, got {server!r}")
        self.url = f"{u.scheme}://{u.netloc}"
        self.host, self.port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
        base = u.path.rstrip("/")
        if protocol is None:
            try:
                payload = Payload(fmt=image_format, quality=jpeg_quality, size=send_size,
                                  cover=send_cover)
            except ValueError as e:
                raise ConfigError(f"image-format: {e}") from None
            self.protocol = ImageProtocol(payload, n_classes=n_classes, base=base)
        else:
            self.protocol = protocol(base)
        self.key = key
        self.connect_timeout, self.read_timeout = float(connect_timeout), float(read_timeout)
        self.clock = clock
        self.warn = warn or _stderr
        self._warned = set()
        tls = None
        if u.scheme == "https":
            tls = tls_context(ca_file, client_cert, client_key)
        elif (ca_file, client_cert, client_key) != (None, None, None):
            raise ConfigError("ca-file: TLS files only apply to an https:// server")
        elif not is_loopback(self.host):
            self._warn_once("cleartext", f"warning: plain HTTP to {self.url}: the key and every "
                            "offloaded image cross the network unencrypted; use https:// "
                            "(docs/security.md)")
        self.tls = tls is not None
        self._conn = Connection(self.host, self.port, tls=tls, connect_timeout=self.connect_timeout)
        self.results = queue.Queue()
        self._jobs = queue.Queue(maxsize=int(queue_size))
        self._stopping = threading.Event()
        self._pending = 0          # submitted and not yet on ``results``
        self._hold_until = -math.inf  # clock() before which nothing is sent (Retry-After)
        self._count_lock = threading.Lock()
        self._thread_lock = threading.Lock()
        self._in_hand = None       # (frame id, t_in) of the job the thread holds
        self._died = None          # what killed the last thread
        self.restarts = 0          # threads started again after one died
        self._thread = None
        probe = self.tls
        if protocol is not None:
            probe = False  # the protocol's start opened the connection (or said why not)
            try:
                self.protocol.start(self.exchange)
            except Failed as e:
                if e.outcome is Outcome.TLS_ERROR:
                    self._tls_warning(e.error)
            except BaseException:
                self._conn.close()
                raise
        self._start_thread(probe=probe)

    # ------------------------------------------------------------------ caller side

    def submit(self, frame_id, image):
        """Queue one frame; False (nothing queued) when the queue is full or closed. Never blocks."""
        if self._stopping.is_set():
            return False
        self._revive()
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

    @property
    def alive(self):
        """True while the sender thread runs."""
        return self._thread.is_alive()

    def close(self, timeout):
        """Stop: let queued frames go out for up to ``timeout`` s, then cancel the rest.

        Frames still queued, and the one in flight when the time is up (its
        socket is shut down to wake the thread), come back as ``cancelled``.
        Returns when every submitted frame has a result or, if the thread does
        not wake, after about ``timeout + 1`` s.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        while self.pending and time.monotonic() < deadline:
            self._revive()
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
        self._conn.abort()    # a request in flight fails at once: the thread cancels it
        self._thread.join(timeout=1.0)
        self._revive()        # a thread that died holding a frame: that frame's result

    # ------------------------------------------------------------------ thread keeping

    def _start_thread(self, probe=False):
        self._thread = threading.Thread(target=self._thread_main, args=(probe,),
                                        name="offload-sender", daemon=True)
        self._thread.start()

    def _revive(self):
        """If the thread died: record the frame it held as ``error`` and start another one."""
        with self._thread_lock:
            if self._thread.is_alive():
                return
            died, self._died = self._died or "it stopped", None
            held, self._in_hand = self._in_hand, None
            if held is not None:
                fid, t_in = held
                self._finish(Result(fid, Outcome.ERROR, error=f"sender thread died ({died})",
                                    queue_ms=(time.perf_counter() - t_in) * 1e3))
            if self._stopping.is_set():
                return
            self.restarts += 1
            self.warn(f"warning: the sender thread died ({died}); started a new one")
            self._conn.close()
            self._start_thread()

    def _thread_main(self, probe):
        try:
            if probe:
                self._probe()
            self._work()
        except BaseException as e:  # noqa: BLE001 - recorded, and the thread is started again
            self._died = f"{type(e).__name__}: {e}"

    def _probe(self):
        """Open the connection at once (``https://``): a TLS failure is told before any frame."""
        try:
            self._conn.connect()
        except TLSError as e:
            self._tls_warning(e)
        except OSError:
            pass  # no server yet: each frame says so

    def _tls_warning(self, e):
        self._warn_once("tls", f"error: {e}; nothing will be offloaded until it verifies "
                               "(check ca-file and the server's certificate, docs/security.md)")

    def _warn_once(self, kind, msg):
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(msg)

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
            self._in_hand = (fid, t_in)
            try:
                res = self._handle(fid, image, t_in)
            except Exception as e:  # noqa: BLE001 - one frame's failure, never the sender's
                self._conn.close()
                res = Result(fid, Outcome.ERROR, error=f"sender: {type(e).__name__}: {e}",
                             queue_ms=(time.perf_counter() - t_in) * 1e3)
            self._in_hand = None
            self._finish(res)
        self._conn.close()

    def _handle(self, fid, image, t_in):
        """The result of one frame taken from the queue: cancelled, held off, or sent."""
        t0 = time.perf_counter()
        if self._stopping.is_set():
            return Result(fid, Outcome.CANCELLED, error="run ended before it was sent",
                          queue_ms=(t0 - t_in) * 1e3)
        hold = self._hold_until - self.clock()
        if hold > 0:
            return Result(fid, Outcome.HELD_OFF, queue_ms=(t0 - t_in) * 1e3,
                          error=f"not sent: the server asked to wait {hold:.1f} s more "
                                "(Retry-After)")
        res = self._send(fid, image)
        res.queue_ms = (t0 - t_in) * 1e3
        if res.outcome is Outcome.TLS_ERROR:
            self._warn_once("tls", f"error: {res.error}; frames keep their weak answers "
                                   "(check ca-file and the server's certificate, docs/security.md)")
        if self._stopping.is_set() and res.outcome is not Outcome.SENT:
            res.error = f"run ended while in flight ({res.label}: {res.error})"
            res.outcome, res.http_status = Outcome.CANCELLED, None
        return res

    def exchange(self, method, path, body=b"", headers=None, *, max_body):
        """One request on the kept-alive connection: ``(Response, round trip ms)``.

        Adds ``Authorization``. A reused connection the server closed while
        idle shows as a disconnect before any answer: the request goes once
        more on a fresh connection. Raises :class:`Failed` with the outcome
        of a network, TLS or HTTP/1.1 failure.
        """
        headers = dict(headers or {}, Authorization=f"Bearer {self.key}")
        for attempt in (0, 1):
            t1 = time.perf_counter()
            reused = self._conn.sock is not None
            try:
                resp = self._conn.request(method, path, body, headers,
                                          timeout=self.read_timeout, max_body=max_body)
            except TLSError as e:
                raise Failed(Outcome.TLS_ERROR, str(e)) from None
            except (TimeoutError, OSError) as e:
                outcome = _network_outcome(e)
                if outcome is Outcome.DISCONNECTED and reused and attempt == 0 \
                        and not self._stopping.is_set():
                    continue
                raise Failed(outcome, f"{e or 'timed out'}" if outcome is Outcome.TIMEOUT
                             else f"{type(e).__name__}: {e}") from None
            except ProtocolError as e:
                raise Failed(Outcome.BAD_ANSWER, str(e)) from None
            return resp, (time.perf_counter() - t1) * 1e3
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, fid, image):
        try:
            self.protocol.prepare(self.exchange)
        except Failed as e:
            return Result(fid, e.outcome, error=e.error, http_status=e.http_status,
                          request_bytes=e.request_bytes)
        for attempt in (0, 1):
            t0 = time.perf_counter()
            try:
                path, body, headers = self.protocol.encode(fid, image)
            except ValueError as e:  # WireError, OIPError: this frame cannot be sent
                return Result(fid, Outcome.BAD_FRAME, error=str(e))
            encode_ms = (time.perf_counter() - t0) * 1e3
            try:
                resp, rtt_ms = self.exchange("POST", path, body, headers,
                                             max_body=self.protocol.max_answer_bytes)
            except Failed as e:
                return Result(fid, e.outcome, error=e.error, encode_ms=encode_ms,
                              request_bytes=len(body))
            if attempt == 0 and resp.status != 200 and self.protocol.fall_back(resp):
                continue  # the protocol changed how it encodes (v2: JSON, not binary)
            return self._answered(fid, resp, rtt_ms, encode_ms, len(body))
        raise AssertionError("unreachable")  # pragma: no cover

    def _answered(self, fid, resp, rtt_ms, encode_ms, request_bytes):
        """The result of a complete answer: sent, redirect, http-<status> or bad-answer."""
        times = {"encode_ms": encode_ms, "request_bytes": request_bytes}
        status = resp.status
        if 300 <= status < 400:
            where = (resp.header("Location") or "nowhere")[:200]
            return Result(fid, Outcome.REDIRECT, http_status=status, transmission_ms=rtt_ms,
                          error=f"the server answered {status}, a redirect to {where!r}; "
                                "redirects are not followed", **times)
        if status != 200:
            wait = retry_after_seconds(resp.header("Retry-After")) if status in (429, 503) else None
            if wait:
                self._hold_until = max(self._hold_until, self.clock() + wait)
            switch = status == 429 and wire.refused_by(resp.body) == "switch"
            return Result(fid, Outcome.SWITCH_REFUSED if switch else Outcome.HTTP,
                          http_status=status, transmission_ms=rtt_ms,
                          error=resp.body[:200].decode("utf-8", "replace"), **times)
        try:
            ans = self.protocol.parse(resp)
        except ValueError as e:  # WireError, OIPError
            return Result(fid, Outcome.BAD_ANSWER, error=str(e), transmission_ms=rtt_ms, **times)
        return Result(fid, Outcome.SENT, answer=ans,
                      transmission_ms=max(0.0, rtt_ms - ans.inference_ms), **times)


def _network_outcome(exc):
    """The outcome of a network error raised by a request."""
    if isinstance(exc, (TimeoutError, socket.timeout)):   # one class from Python 3.10
        return Outcome.TIMEOUT
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.REFUSED
    if isinstance(exc, (Disconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return Outcome.DISCONNECTED
    return Outcome.NET_ERROR
