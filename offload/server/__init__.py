"""The edge server: the strong classifier behind ``POST /v1/classify`` (torch-free).

Modules, one concept each:

- ``model``: the ONNX strong model (ONNX Runtime, CUDA when present) and its preprocessing;
- ``batcher``: micro-batching of concurrent requests into one model call;
- ``keys``: the TOML key file (hashes only), per-key token buckets and switches;
- ``state``: where the buckets live: in memory, or in Redis shared by replicas;
- ``images``: request bodies to images, picture size checked before decoding;
- ``app``: the Starlette app (classify, ``/healthz``, ``/metrics``);
- ``guard``: per-connection deadlines, connection caps and TLS under uvicorn;
- ``tls``: the server's TLS context, and a private CA for a fleet (``tls init``);
- ``serve``: running it, in the foreground or in a background thread;
- ``cli``: ``offload-serve``.

Start one from Python (see docs/server.md)::

    from offload.server import serve_in_thread

    with serve_in_thread() as server:    # committed strong.onnx, loopback, free port, throw-away key
        server.url, server.api_key
"""

from offload.server.app import create_app
from offload.server.guard import Limits
from offload.server.keys import KeyStore
from offload.server.model import StrongModel
from offload.server.serve import BackgroundServer, ServerStartError, serve_in_thread

__all__ = ["serve_in_thread", "BackgroundServer", "ServerStartError", "create_app", "KeyStore",
           "StrongModel", "Limits"]
