"""The edge server's HTTP application (Starlette): classify, health, metrics.

Why Starlette rather than FastAPI: FastAPI is Starlette plus pydantic
validation and OpenAPI schema generation. The API here is one binary
upload and two GETs, whose wire format is fixed in ``offload.wire``; the
schema machinery would add pydantic (a compiled dependency, awkward on a
Pi-class edge box) and request-parsing layers we would have to bypass to
bound the body size ourselves. Starlette gives the raw request stream.

Endpoints (``offload.wire`` documents the bodies):

``POST /v1/classify``
    Checks, in this order (each failure answers the ``offload.wire.error_body``
    JSON and counts in ``/metrics``): ``Authorization: Bearer KEY`` (401),
    ``Content-Type`` image/jpeg or image/png (415), declared
    ``Content-Length`` over ``max_body`` (413, nothing read), the key's
    token bucket then its switch's (429 + ``Retry-After``, the body's
    ``refused_by`` saying ``key`` or ``switch``; a request that gets this far
    spends a token, as a device spends one when it sends; with ``--state
    redis://`` the buckets are shared by every replica, ``offload.server.state``;
    503 when that state cannot be reached and fails closed), the body streamed in and
    counted (413 as soon as it passes ``max_body``), image header and decode
    (400), batch queue room (503). Then the image joins a micro-batch
    (``offload.server.batcher``) and the answer is the top-k classes.
``GET /healthz``
    200 ``{"status": "ok", ...}``; 503 while shutting down.
``GET /metrics``
    Prometheus text: ``offload_requests_total{status}``,
    ``offload_request_seconds`` (latency histogram of classify requests),
    ``offload_batch_size`` and ``offload_inference_seconds`` (per model
    call), ``offload_queue_depth``; and, from the connection guard
    (``offload.server.guard``), ``offload_deadline_hits_total{phase}``,
    ``offload_connections_refused_total{reason}``,
    ``offload_tls_failures_total{error}`` and ``offload_open_connections``;
    and, from the bucket state (``offload.server.state``),
    ``offload_key_requests_total{key,result}``,
    ``offload_switch_requests_total{switch,result}``, ``offload_state_seconds``
    (Redis round trip), ``offload_state_failures_total{reason}``,
    ``offload_state_fallbacks_total{mode}`` and ``offload_state_up``.
    Each app has its own
    ``CollectorRegistry``, so several apps in one process do not collide.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

import anyio
import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from offload import wire
from offload.server.batcher import Batcher, Overloaded
from offload.server.images import DEFAULT_MAX_PIXELS, decode_body, image_size
from offload.server.keys import KeyStore
from offload.server.model import ModelError, StrongModel, softmax, top_k
from offload.server.state import MemoryState

__all__ = ["create_app", "DEFAULTS", "DEADLINE_SCOPE_KEY", "CLIENT_CERT_SCOPE_KEY"]

log = logging.getLogger("offload.server")

#: Defaults shared by ``create_app``, ``serve_in_thread`` and ``offload-serve``.
DEFAULTS = dict(
    max_batch=32,            # inputs per model call
    batch_window_ms=2.0,     # longest wait for a batch to fill, ms
    max_queue=1024,          # inputs waiting for the model before 503
    max_body=wire.MAX_BODY_BYTES,  # bytes
    top_k=3,                 # classes in an answer
    max_pixels=DEFAULT_MAX_PIXELS,
    decode_threads=4,        # images decoded at once (bounds decode memory)
)
#: Bodies up to this size (bytes) whose picture is at most INLINE_DECODE_PIXELS are
#: decoded on the event loop; larger ones in a worker thread.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 256 * 256
#: Longest accepted X-Frame-Id, characters.
MAX_FRAME_ID = 128
#: Request-scope keys set by the connection guard (``offload.server.guard``):
#: the deadline ("head"/"body") that cut the request, and the verified client
#: certificate's common name (None without client certificates).
DEADLINE_SCOPE_KEY = "offload.deadline"
CLIENT_CERT_SCOPE_KEY = "offload.client_cert"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Metrics:
    def __init__(self, registry):
        self.registry = registry
        self.requests = Counter("offload_requests", "Classify requests by HTTP status.",
                                ["status"], registry=registry)
        self.latency = Histogram("offload_request_seconds",
                                 "Classify request time in the server, seconds.",
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch = Histogram("offload_batch_size", "Images per strong-model call.",
                               buckets=_BATCH_BUCKETS, registry=registry)
        self.inference = Histogram("offload_inference_seconds",
                                   "Strong-model time per call, seconds.",
                                   buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue = Gauge("offload_queue_depth", "Images waiting for the strong model.",
                           registry=registry)
        # Updated by the connection guard (offload.server.guard).
        self.deadline_hits = Counter("offload_deadline_hits",
                                     "Connections cut by a deadline, by phase (head, body).",
                                     ["phase"], registry=registry)
        self.refused = Counter("offload_connections_refused",
                               "Connections refused at accept, by cap "
                               "(max_connections, max_per_client).", ["reason"], registry=registry)
        self.tls_failures = Counter("offload_tls_failures", "Failed TLS handshakes, by error (certificate, protocol, timeout, connection).",
                                    ["error"], registry=registry)
        self.connections = Gauge("offload_open_connections", "Open client connections.",
                                 registry=registry)


def _error(status, message, headers=None):
    return Response(wire.error_body(message), status_code=status, media_type="application/json",
                    headers=headers)


def _refused(decision):
    """The answer to a request its bucket, its switch or the shared state refused."""
    wait = decision.wait_s
    # Retry-After is whole seconds (RFC 9110); the message has the exact time.
    headers = {"Retry-After": str(max(1, int(np.ceil(wait))))}
    if decision.refused_by == "state":
        return _error(503, "the shared rate-limit state does not answer; try again", headers)
    if decision.refused_by == "switch":
        what = f"switch {decision.bucket!r} (a link several keys share)"
    else:
        what = f"key {decision.bucket!r}"
    return Response(wire.error_body(f"rate limit of {what}: its bucket is empty; the next token "
                                    f"is there in {wait:.3f} s",
                                    refused_by=decision.refused_by, bucket=decision.bucket),
                    status_code=429, media_type="application/json", headers=headers)


def _pixels(body, content_type):
    """Pixels of the picture by its header; 0 when unreadable (decoding will say why)."""
    try:
        w, h = image_size(body, content_type.split(";", 1)[0].strip().lower())
    except wire.WireError:
        return 0
    return w * h


def _bearer(request):
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class _Service:
    """The state behind one app: model, keys, batcher, metrics, options."""

    def __init__(self, model, keys, opts, registry, state):
        self.model, self.keys, self.opts = model, keys, opts
        self.metrics = _Metrics(registry)
        self.state = state
        state.bind(registry)
        self.batcher = Batcher(self._run_batch, max_batch=opts["max_batch"],
                               window_s=opts["batch_window_ms"] / 1000.0,
                               max_queue=opts["max_queue"], on_batch=self._on_batch)
        self.metrics.queue.set_function(lambda: self.batcher.pending)
        self.decode_limiter = anyio.CapacityLimiter(opts["decode_threads"])
        self.stopping = False

    def _run_batch(self, batch):
        logits, seconds = self.model.run(batch)
        return softmax(logits), seconds

    def _on_batch(self, info):
        self.metrics.batch.observe(info.size)
        self.metrics.inference.observe(info.seconds)

    def _prepare(self, body, content_type):
        image = decode_body(body, content_type, max_pixels=self.opts["max_pixels"])
        return self.model.prepare(image)

    async def classify(self, request):
        t0 = time.perf_counter()
        try:
            response = await self._classify(request)
        except Exception:  # noqa: BLE001 - a bug must not become a traceback for the client
            log.exception("classify failed")
            response = _error(500, "internal error (logged by the server)")
        status = response.status_code
        self.metrics.requests.labels(str(status)).inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        return response

    async def _classify(self, request: Request):
        opts = self.opts
        self.keys.maybe_reload()
        grant = self.keys.authorize(_bearer(request) or "")
        if grant is None:  # unknown, revoked or past its rotation overlap: all look the same
            return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                          {"WWW-Authenticate": "Bearer"})
        name = grant.name
        cert_name = request.scope.get(CLIENT_CERT_SCOPE_KEY)
        if cert_name is not None and not hmac.compare_digest(cert_name.encode(), name.encode()):
            # With client certificates a key is only good with its own
            # device's certificate: a copied key alone does not pass.
            return _error(401, f"the client certificate is not the one of key {name!r}",
                          {"WWW-Authenticate": "Bearer"})
        ctype = request.headers.get("content-type", "")
        if not wire.content_type_ok(ctype):
            return _error(415, f"content type must be one of {sorted(wire.CONTENT_TYPES.values())}, "
                               f"got {ctype.split(';')[0].strip() or 'none'!r}")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return _error(400, f"bad Content-Length {declared[:40]!r}")
            if int(declared) > opts["max_body"]:
                return _error(413, f"body of {int(declared)} bytes is over the limit of "
                                   f"{opts['max_body']} bytes")
        frame_id = request.headers.get(wire.FRAME_ID_HEADER)
        if frame_id is not None and len(frame_id) > MAX_FRAME_ID:
            return _error(400, f"{wire.FRAME_ID_HEADER} longer than {MAX_FRAME_ID} characters")
        # The buckets of the key set that accepted the key: its own, then its switch's.
        decision = await self.state.admit(grant)
        if not decision.allowed:
            return _refused(decision)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > opts["max_body"]:
                    return _error(413, f"body is over the limit of {opts['max_body']} bytes")
        except ClientDisconnect:
            # Never sent: the client went away (499), or the body deadline cut it (408).
            if request.scope.get(DEADLINE_SCOPE_KEY):
                return _error(408, "request body not received in time")
            return _error(499, "client closed the connection")
        try:
            if len(body) <= INLINE_DECODE_BYTES and _pixels(body, ctype) <= INLINE_DECODE_PIXELS:
                # A camera-sized frame decodes in tens of microseconds: cheaper
                # here than the hop to a worker thread and back.
                x = self._prepare(body, ctype)
            else:
                x = await anyio.to_thread.run_sync(self._prepare, body, ctype,
                                                   limiter=self.decode_limiter)
        except (wire.WireError, ModelError) as exc:
            return _error(400, str(exc))
        try:
            probs, info = await self.batcher.submit(x)
        except Overloaded as exc:
            return _error(503, str(exc), {"Retry-After": "1"})
        classes, scores = top_k(probs, opts["top_k"])
        names = None
        if self.model.class_names is not None:
            names = [self.model.class_names[c] for c in classes]
        return Response(wire.answer_body(classes, scores, names=names,
                                         inference_ms=info.seconds * 1000.0,
                                         batch_size=info.size, frame_id=frame_id),
                        media_type="application/json")

    async def health(self, request):
        body = {"status": "stopping" if self.stopping else "ok", "model": self.model.name,
                "providers": self.model.providers, "classes": self.model.n_classes,
                "keys": len(self.keys), "max_batch": self.opts["max_batch"],
                "pending": self.batcher.pending}
        return JSONResponse(body, status_code=503 if self.stopping else 200)

    async def metrics_page(self, request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(model, keys, *, registry=None, state=None, **options):
    """The Starlette app of the edge server.

    Parameters
    ----------
    model : StrongModel or str
        The strong model, or the path of its ``.onnx`` file.
    keys : KeyStore
        Accepted keys (``KeyStore.from_file(path)`` or ``KeyStore.single(key)``).
    registry : prometheus_client.CollectorRegistry, optional
        Where the metrics live (a new one by default).
    state : offload.server.state.MemoryState or RedisState, optional
        Where the buckets live (``offload.server.state.open_state``); in this
        process by default. Closed when the app stops.
    **options
        ``max_batch`` (inputs per model call, 32), ``batch_window_ms`` (2.0),
        ``max_queue`` (1024 waiting inputs before 503), ``max_body`` (bytes,
        ``offload.wire.MAX_BODY_BYTES``), ``top_k`` (3), ``max_pixels``
        (2048*2048), ``decode_threads`` (4); see :data:`DEFAULTS`.

    The app's ``state.service`` holds the model, keys, batcher and metrics.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown server options {unknown}; known: {sorted(DEFAULTS)}")
    opts = dict(DEFAULTS, **options)
    for k in ("max_batch", "max_queue", "max_body", "top_k", "max_pixels", "decode_threads"):
        if int(opts[k]) < 1:
            raise ValueError(f"{k}={opts[k]} must be >= 1")
        opts[k] = int(opts[k])
    if opts["top_k"] > wire.MAX_TOP_ITEMS:  # a device refuses longer answers (offload.wire)
        raise ValueError(f"top_k={opts['top_k']} must be <= {wire.MAX_TOP_ITEMS}")
    if not float(opts["batch_window_ms"]) >= 0:
        raise ValueError(f"batch_window_ms={opts['batch_window_ms']} must be >= 0")
    if not isinstance(keys, KeyStore):
        raise TypeError("keys must be an offload.server.keys.KeyStore")
    if not isinstance(model, StrongModel):
        model = StrongModel(model)
    state = MemoryState() if state is None else state
    service = _Service(model, keys, opts, registry or CollectorRegistry(), state)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        keys.start_watching()  # key-file changes apply even while no request comes
        try:
            yield
        finally:
            keys.stop_watching()
        service.stopping = True
        await service.batcher.stop()
        await state.close()

    async def json_http_error(request, exc):
        return _error(exc.status_code, exc.detail or "error", getattr(exc, "headers", None))

    async def json_server_error(request, exc):
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal error (logged by the server)")

    app = Starlette(
        routes=[
            Route(wire.CLASSIFY_PATH, service.classify, methods=["POST"]),
            Route(wire.HEALTH_PATH, service.health, methods=["GET"]),
            Route(wire.METRICS_PATH, service.metrics_page, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: json_http_error, Exception: json_server_error},
    )
    app.state.service = service
    return app
