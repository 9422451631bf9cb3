"""Connection guard: deadlines, connection caps and TLS for the edge server's sockets.

uvicorn's h11 protocol closes idle keep-alive connections (``timeout_keep_alive``)
but has no deadline for a request head or body: a client that sends one header
line, or one body byte, every few seconds holds its socket forever, and a few
hundred such clients exhaust a 1,024 open-file limit. :class:`GuardedH11Protocol`
is uvicorn's ``H11Protocol`` with, per connection:

* **caps**, checked at accept (before any TLS handshake, so a refusal costs one
  ``accept`` and one ``close``): at most ``max_connections`` open connections in
  all and ``max_per_client`` per client address; past them the connection gets
  a short 503 (plain HTTP) or is closed at once (TLS), and is counted;
* **one timer**, re-armed as the request moves on: ``head`` runs from accept
  (TLS handshake included) or from the first byte of a next request on a
  keep-alive connection until the head is complete; ``body`` from then until
  the body is complete. When it fires the client gets ``408`` (if no answer has
  started) and the connection is closed; a request the app is still reading
  sees a disconnect, marked in its scope (:data:`offload.server.app.DEADLINE_SCOPE_KEY`)
  so the app counts it as 408 rather than 499;
* **TLS** done here with ``loop.start_tls`` after the caps pass, rather than by
  the listening socket, so that the caps and the head deadline bound the
  handshake too (asyncio's own handshake timeout is 60 s);
* the verified client certificate's common name, when the server asks for
  one, put in the request scope (:data:`offload.server.app.CLIENT_CERT_SCOPE_KEY`).

Between requests uvicorn's own keep-alive timer applies (``--keep-alive``).
The timer's state follows h11's view of the client (``their_state``): IDLE
waiting for a head, SEND_BODY reading a body, DONE nothing to wait for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from offload import wire
from offload.server.app import CLIENT_CERT_SCOPE_KEY, DEADLINE_SCOPE_KEY

__all__ = ["Limits", "Guard", "GuardedH11Protocol"]

log = logging.getLogger("offload.server")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-connection deadlines (seconds) and connection caps of one server."""

    head_timeout: float = 10.0   # s, accept (or a next request's first byte) to complete head
    body_timeout: float = 30.0   # s, complete head to complete body
    keep_alive: float = 5.0      # s, idle between requests on one connection
    max_connections: int = 512   # open connections in all
    max_per_client: int = 64     # open connections from one client address

    def __post_init__(self):
        for name in ("head_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")
        for name in ("max_connections", "max_per_client"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _canned(status, reason, message):
    body = wire.error_body(message)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii") + body


class Guard:
    """What the connections of one server share: limits, counts per address, TLS, metrics.

    ``metrics`` is the app's metrics object (``app.state.service.metrics``):
    its ``deadline_hits``, ``refused``, ``tls_failures`` counters and
    ``connections`` gauge are updated here; None counts nothing.
    """

    def __init__(self, limits=None, *, ssl_context=None, metrics=None):
        self.limits = limits or Limits()
        self.ssl_context = ssl_context
        self.metrics = metrics
        self.open = 0
        self.per_client = {}
        self.busy_reply = _canned(503, "Service Unavailable",
                             "too many connections; try again shortly")

    def admit(self, host):
        """None when a connection from ``host`` may open (and it is counted), else the reason."""
        if self.open >= self.limits.max_connections:
            reason = "max_connections"
        elif self.per_client.get(host, 0) >= self.limits.max_per_client:
            reason = "max_per_client"
        else:
            self.open += 1
            self.per_client[host] = self.per_client.get(host, 0) + 1
            if self.metrics is not None:
                self.metrics.connections.inc()
            return None
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        return reason

    def release(self, host):
        self.open -= 1
        left = self.per_client[host] - 1
        if left:
            self.per_client[host] = left
        else:
            del self.per_client[host]
        if self.metrics is not None:
            self.metrics.connections.dec()

    def count(self, counter, label):
        if self.metrics is not None:
            getattr(self.metrics, counter).labels(label).inc()

    def protocol_factory(self):
        """What ``uvicorn.Config(http=...)`` takes: makes a :class:`GuardedH11Protocol` per connection."""
        def make(*args, **kwargs):
            return GuardedH11Protocol(*args, guard=self, **kwargs)
        return make


def _tls_error_kind(exc):
    """The ``offload_tls_failures_total`` label of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(exc):
        return "certificate"   # the client's certificate is missing or does not verify
    if isinstance(exc, ssl.SSLError):
        return "protocol"      # not TLS (plain HTTP on the TLS port), no shared version/cipher
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    return "connection"        # reset or closed during the handshake


def _common_name(cert):
    """The subject CN of ``ssl.SSLObject.getpeercert()``'s dict, or None."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the :class:`Guard`'s caps, deadlines and TLS (module doc)."""

    def __init__(self, *args, guard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._host = None        # client address once admitted (None: refused / not yet)
        self._raw = None         # the TCP transport (under TLS, the one below it)
        self._timer = None       # asyncio.TimerHandle of the current deadline
        self._phase = None       # "head" | "body" | None
        self._peer_name = None   # client certificate CN
        self._released = False
        self._early = []         # TLS data that arrived before start_tls returned

    # -- connection ---------------------------------------------------------
    def connection_made(self, transport):
        peer = transport.get_extra_info("peername")
        host = peer[0] if peer else ""
        if self.guard.admit(host) is not None:
            # Refused before h11 or TLS see anything: no state to undo.
            if self.guard.ssl_context is None:
                transport.write(self.guard.busy_reply)
            transport.close()
            return
        self._host, self._raw = host, transport
        self._arm("head", self.guard.limits.head_timeout)
        if self.guard.ssl_context is None:
            super().connection_made(transport)
        else:
            transport.pause_reading()  # the ClientHello waits for start_tls, not h11
            self.loop.create_task(self._start_tls(transport))

    async def _start_tls(self, raw):
        try:
            tls = await self.loop.start_tls(
                raw, self, self.guard.ssl_context, server_side=True,
                ssl_handshake_timeout=self.guard.limits.head_timeout)
        except Exception as exc:  # noqa: BLE001 - any failed handshake just ends this connection
            if not self._released:  # (not the head deadline, which counted itself)
                self.guard.count("tls_failures", _tls_error_kind(exc))
                log.debug("TLS handshake with %s failed: %s", self._host, exc)
            raw.close()
            self._release()
            return
        if self._released:  # pragma: no cover - the deadline fired as the handshake ended
            tls.close()
            return
        self._peer_name = _common_name(tls.get_extra_info("peercert"))
        super().connection_made(tls)
        # start_tls hands decrypted data to this protocol as soon as the
        # handshake ends, which can be before this coroutine resumes.
        early, self._early = b"".join(self._early), None
        if early:
            self.data_received(early)

    def connection_lost(self, exc):
        if self._host is None:
            return  # refused at accept: uvicorn never knew this connection
        self._cancel()
        self._release()
        if self.transport is not None:
            super().connection_lost(exc)

    def _release(self):
        if not self._released:
            self._released = True
            self.guard.release(self._host)

    # -- deadlines ----------------------------------------------------------
    def _arm(self, phase, seconds):
        self._cancel()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired)

    def _cancel(self):
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def data_received(self, data):
        if self._early is not None and self.transport is None:
            self._early.append(data)
            return
        if self._phase is None and self.conn.their_state is h11.IDLE:
            # The first byte of a next request on a kept-alive connection:
            # uvicorn cancels its idle timer, the head deadline starts.
            self._arm("head", self.guard.limits.head_timeout)
        super().data_received(data)

    def handle_events(self):
        # Also reached from on_response_complete for pipelined requests.
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None:
            # A new request: its ASGI task is created but has not run yet.
            self.scope[CLIENT_CERT_SCOPE_KEY] = self._peer_name
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.guard.limits.body_timeout)
        elif state is not h11.IDLE:
            self._cancel()  # the whole request is in (or the connection is ending)

    def _expired(self):
        phase = self._phase
        self._timer, self._phase = None, None
        self.guard.count("deadline_hits", phase)
        if self.transport is None:  # still in the TLS handshake
            self._raw.close()
            self._release()
            return
        if self.transport.is_closing():
            return
        limit = getattr(self.guard.limits, f"{phase}_timeout")
        # A head deadline runs only between requests (h11 IDLE); a body one
        # always has its request's cycle, whose answer may have been sent
        # already (a 401 before the body was read): then no second answer.
        cycle = self.cycle
        if phase == "head" or not cycle.response_started:
            self.transport.write(_canned(408, "Request Timeout",
                                         f"request {phase} not received within {limit:g} s"))
        if phase == "body" and not cycle.response_complete:
            # The app may be waiting in receive(): wake it with a disconnect,
            # and drop whatever it would still send.
            self.scope[DEADLINE_SCOPE_KEY] = phase
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
