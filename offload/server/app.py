"""The edge server's HTTP application (Starlette): classify, Open Inference Protocol (v2), health, metrics.

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
Open Inference Protocol (KServe v2, bodies in ``offload.oip``) for the one model, named
``model_name`` (default: the model file's stem)
    ``GET /v2/health/live``, ``GET /v2/health/ready`` (503 while shutting
    down), ``GET /v2`` (server metadata, ``extensions`` lists
    ``binary_tensor_data``), ``GET /v2/models/NAME`` (metadata: input
    ``[-1, C, H, W]`` or ``[-1, H, W, C]`` FP32, the model's layout, with the size
    its card resolved; output ``[-1, n_classes]`` FP32 logits),
    ``GET /v2/models/NAME/ready``: no key needed, as ``/healthz``.
    ``POST /v2/models/NAME/infer``: the same gate as classify, in the same
    order (401, 413 on the declared length, 429 + ``Retry-After`` spending
    one token per request, 413 while streaming), then 404 for another model
    name, 400 for a body that is not the protocol or a tensor that is not
    the model's input (one FP32 ``[n, C, H, W]`` (or NHWC) tensor, ``1 <= n <=
    max_batch``); each of the ``n`` rows joins the micro-batcher as a
    classify image does (503 when its queue is full). The answer is the
    model's output, logits, as JSON or, when asked
    (``binary_data_output``), binary; ``parameters`` carry
    ``inference_ms`` and ``batch_size`` (the largest over the rows).
``GET /metrics``
    Prometheus text: ``offload_requests_total{status}``,
    ``offload_request_seconds`` (latency histogram of classify requests),
    ``offload_v2_requests_total{endpoint,status}`` (every v2 request; endpoint
    ``infer``, ``metadata``, ``health``),
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

import asyncio
import contextlib
import hmac
import logging
import math
import os
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

from offload import __version__, oip, wire
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
    model_name=None,         # v2 model name; None: the model file's stem
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
        self.v2_requests = Counter("offload_v2_requests", "Open Inference Protocol (v2) requests "
                                   "by endpoint (infer, metadata, health) and HTTP status.",
                                   ["endpoint", "status"], registry=registry)
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


class _V2Model:
    """The server's one model as the Open Inference Protocol sees it: name, metadata, bodies."""

    def __init__(self, model, name=None):
        stem = os.path.splitext(os.path.basename(model.path))[0]
        self.name = oip.check_model_name(name if name is not None else stem)
        self.model = model
        self.input = oip.TensorSpec(model.input_name, "FP32", (-1, *model.item_shape))
        self.output = oip.TensorSpec(model.output_name, "FP32", (-1, model.n_classes))
        self.metadata = oip.ModelMetadata(self.name, (self.input,), (self.output,),
                                          platform="onnxruntime_onnx")

    def read(self, body, header_length, opts):
        """``(request, batch (n, *item_shape) float32)`` of an infer body; :class:`oip.OIPError` if bad."""
        per_row = math.prod(self.input.shape[1:])
        req = oip.decode_infer(body, header_length, max_elements=opts["max_batch"] * per_row,
                               max_bytes=opts["max_body"])
        if len(req.tensors) != 1:
            raise oip.OIPError(f"model {self.name!r} takes one input tensor, got "
                               f"{len(req.tensors)}")
        t = req.tensors[0]
        if t.name != self.input.name:
            raise oip.OIPError(f"model {self.name!r} has no input {t.name!r} (its input is "
                               f"{self.input.name!r})")
        oip.check_fits(self.input, t.data.shape, t.datatype, model=self.name)
        if not 1 <= t.data.shape[0] <= opts["max_batch"]:
            raise oip.OIPError(f"a batch of {t.data.shape[0]} is not 1..{opts['max_batch']} "
                               f"(the server's max-batch)")
        for out, _ in req.outputs:
            if out != self.output.name:
                raise oip.OIPError(f"model {self.name!r} has no output {out[:40]!r} (its output "
                                   f"is {self.output.name!r})")
        return req, t.data

    def answer(self, req, rows):
        """The 200 answer for the ``(logits, BatchInfo)`` of each row of ``req``."""
        logits = np.stack([r for r, _ in rows]).astype(np.float32)
        binary = req.binary_output
        for _, b in req.outputs:
            if b is not None:
                binary = b
        params = {"inference_ms": round(max(i.seconds for _, i in rows) * 1000.0, 3),
                  "batch_size": max(i.size for _, i in rows)}
        body, headers = oip.encode_infer([(self.output.name, logits)], binary=binary,
                                         model_name=self.name, request_id=req.id,
                                         parameters=params)
        return Response(body, media_type=headers.pop("Content-Type"), headers=headers)


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
        self.v2 = _V2Model(model, opts["model_name"])

    def _run_batch(self, batch):
        # Logits: classify softmaxes its row, a v2 infer answers the model's own output.
        return self.model.run(batch)

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

    def _authorize(self, request):
        """``(grant, None)`` for a good key (and certificate), else ``(None, 401 answer)``."""
        self.keys.maybe_reload()
        grant = self.keys.authorize(_bearer(request) or "")
        if grant is None:  # unknown, revoked or past its rotation overlap: all look the same
            return None, _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                {"WWW-Authenticate": "Bearer"})
        cert_name = request.scope.get(CLIENT_CERT_SCOPE_KEY)
        if cert_name is not None and not hmac.compare_digest(cert_name.encode(), grant.name.encode()):
            # With client certificates a key is only good with its own
            # device's certificate: a copied key alone does not pass.
            return None, _error(401, f"the client certificate is not the one of key {grant.name!r}",
                                {"WWW-Authenticate": "Bearer"})
        return grant, None

    def _declared_too_large(self, request):
        """The 400/413 answer for a bad or too large declared ``Content-Length``, else None."""
        declared = request.headers.get("content-length")
        if declared is None:
            return None
        if not declared.strip().isdigit():
            return _error(400, f"bad Content-Length {declared[:40]!r}")
        if int(declared) > self.opts["max_body"]:
            return _error(413, f"body of {int(declared)} bytes is over the limit of "
                               f"{self.opts['max_body']} bytes")
        return None

    async def _spend(self, grant):
        """Take the key's token (and its switch's): None, or the refusal (429 + ``Retry-After``, 503)."""
        # The buckets of the key set that accepted the key: its own, then its switch's.
        decision = await self.state.admit(grant)
        return None if decision.allowed else _refused(decision)

    async def _read_body(self, request):
        """``(body, None)``, or ``(None, answer)`` for 413 past ``max_body``, 408 or 499."""
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.opts["max_body"]:
                    return None, _error(413, f"body is over the limit of {self.opts['max_body']} bytes")
        except ClientDisconnect:
            # Never sent: the client went away (499), or the body deadline cut it (408).
            if request.scope.get(DEADLINE_SCOPE_KEY):
                return None, _error(408, "request body not received in time")
            return None, _error(499, "client closed the connection")
        return body, None

    async def _classify(self, request: Request):
        grant, refused = self._authorize(request)
        if refused is not None:
            return refused
        ctype = request.headers.get("content-type", "")
        if not wire.content_type_ok(ctype):
            return _error(415, f"content type must be one of {sorted(wire.CONTENT_TYPES.values())}, "
                               f"got {ctype.split(';')[0].strip() or 'none'!r}")
        refused = self._declared_too_large(request)
        if refused is not None:
            return refused
        frame_id = request.headers.get(wire.FRAME_ID_HEADER)
        if frame_id is not None and len(frame_id) > MAX_FRAME_ID:
            return _error(400, f"{wire.FRAME_ID_HEADER} longer than {MAX_FRAME_ID} characters")
        refused = await self._spend(grant)
        if refused is not None:
            return refused
        body, refused = await self._read_body(request)
        if refused is not None:
            return refused
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
            logits, info = await self.batcher.submit(x)
        except Overloaded as exc:
            return _error(503, str(exc), {"Retry-After": "1"})
        classes, scores = top_k(softmax(logits[None])[0], self.opts["top_k"])
        names = None
        if self.model.class_names is not None:
            names = [self.model.class_names[c] for c in classes]
        return Response(wire.answer_body(classes, scores, names=names,
                                         inference_ms=info.seconds * 1000.0,
                                         batch_size=info.size, frame_id=frame_id),
                        media_type="application/json")

    # ------------------------------------------------------------------ Open Inference Protocol

    def _count_v2(self, endpoint, response):
        self.metrics.v2_requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def v2_infer(self, request):
        try:
            response = await self._v2_infer(request)
        except Exception:  # noqa: BLE001 - a bug must not become a traceback for the client
            log.exception("v2 infer failed")
            response = _error(500, "internal error (logged by the server)")
        return self._count_v2("infer", response)

    async def _v2_infer(self, request):
        grant, refused = self._authorize(request)
        if refused is not None:
            return refused
        name = request.path_params["model"]
        if name != self.v2.name:
            return _error(404, f"no model {name[:oip.MAX_NAME_CHARS]!r} here (this server has "
                               f"{self.v2.name!r})")
        refused = self._declared_too_large(request) or await self._spend(grant)
        if refused is not None:
            return refused
        body, refused = await self._read_body(request)
        if refused is not None:
            return refused
        hlen = request.headers.get(oip.HEADER_LENGTH)
        try:
            if len(body) <= INLINE_DECODE_BYTES:
                req, x = self.v2.read(body, hlen, self.opts)
            else:  # a large JSON body takes milliseconds to parse: off the event loop
                req, x = await anyio.to_thread.run_sync(self.v2.read, body, hlen, self.opts,
                                                        limiter=self.decode_limiter)
        except oip.OIPError as exc:
            return _error(400, str(exc))
        try:
            rows = await asyncio.gather(*(self.batcher.submit(row) for row in x))
        except Overloaded as exc:
            return _error(503, str(exc), {"Retry-After": "1"})
        return self.v2.answer(req, rows)

    async def v2_health(self, request):
        if request.url.path == oip.ready_path() and self.stopping:
            return self._count_v2("health", _error(503, "the server is shutting down"))
        key = "live" if request.url.path == oip.live_path() else "ready"
        return self._count_v2("health", JSONResponse({key: True}))

    async def v2_server(self, request):
        return self._count_v2("metadata", Response(
            oip.server_metadata_body("offload", __version__), media_type="application/json"))

    async def v2_metadata(self, request):
        name = request.path_params["model"]
        if name != self.v2.name:
            return self._count_v2("metadata", _error(404, f"no model {name[:oip.MAX_NAME_CHARS]!r} "
                                                          f"here (this server has {self.v2.name!r})"))
        if request.url.path.endswith("/ready"):
            ready = not self.stopping
            return self._count_v2("health", JSONResponse({"name": name, "ready": ready},
                                                         status_code=200 if ready else 503))
        return self._count_v2("metadata", Response(oip.encode_metadata(self.v2.metadata),
                                                   media_type="application/json"))

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
        (2048*2048), ``decode_threads`` (4), ``model_name`` (the v2 name; default
        the model file's stem); see :data:`DEFAULTS`.

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
            Route(oip.live_path(), service.v2_health, methods=["GET"]),
            Route(oip.ready_path(), service.v2_health, methods=["GET"]),
            Route(oip.server_path(), service.v2_server, methods=["GET"]),
            Route(oip.V2_PREFIX + "/models/{model}", service.v2_metadata, methods=["GET"]),
            Route(oip.V2_PREFIX + "/models/{model}/ready", service.v2_metadata, methods=["GET"]),
            Route(oip.V2_PREFIX + "/models/{model}/infer", service.v2_infer, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: json_http_error, Exception: json_server_error},
    )
    app.state.service = service
    return app
