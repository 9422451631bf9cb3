"""Running the edge server: in the foreground (``offload-serve``) or in a background thread.

From Python (e.g. ``offload-run --demo``, tests)::

    from offload.server import serve_in_thread

    with serve_in_thread() as server:          # committed strong.onnx, a throw-away key
        print(server.url, server.api_key)      # http://127.0.0.1:PORT  <43-character key>
        ...                                    # POST images to server.url + "/v1/classify"
    # stopped here: the port is closed, the thread has ended

:func:`serve_in_thread` binds the socket itself (port 0 = a free port chosen
by the OS, so parallel callers never collide), starts uvicorn in a daemon
thread, and returns only once the server accepts connections. The returned
:class:`BackgroundServer` also works without ``with``: call ``stop()``.

Both ways serve through :class:`offload.server.guard.GuardedH11Protocol`:
head and body deadlines, connection caps (:class:`offload.server.guard.Limits`)
and, with a certificate, TLS.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

from offload import artifacts
from offload.server.app import create_app
from offload.server.guard import Guard, Limits
from offload.server.keys import KeyStore, new_key
from offload.server.model import ModelError, StrongModel
from offload.server.tls import TLSConfigError, server_context

__all__ = ["serve_in_thread", "BackgroundServer", "bind_socket", "default_model_path",
           "ServerStartError", "is_loopback", "tls_context", "Limits", "LISTENING", "start_process"]

log = logging.getLogger("offload.server")


class ServerStartError(RuntimeError):
    """The server could not start (port in use, model unusable, ...)."""


#: What ``offload-serve`` writes on stderr once its socket is bound; with ``--port 0``
#: it is how a script learns the port the server got (no port picked, closed and reused).
LISTENING = re.compile(r"listening on (https?://\S+)")


def start_process(args, *, cwd, preexec_fn=None, timeout_s=60.0):
    """Run ``offload-serve ARGS`` (this Python) and wait until it listens: ``(process, url)``.

    ``args`` should include ``--port 0``. ``cwd`` should be outside a source
    checkout, whose tree (without the compiled core) would shadow the installed
    package on ``sys.path``. The process's stderr stays a pipe the caller may
    read. Raises :class:`ServerStartError` with what the server printed when it
    exits or says nothing within ``timeout_s`` seconds.
    """
    proc = subprocess.Popen([sys.executable, "-m", "offload.server.cli", *args],
                            stderr=subprocess.PIPE, text=True, cwd=cwd, preexec_fn=preexec_fn)
    end = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = LISTENING.search(line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    raise ServerStartError("offload-serve did not start:\n" + "".join(lines))


def default_model_path():
    """The committed strong model (``artifacts/strong.onnx``, via ``offload.artifacts.find``)."""
    return artifacts.find("strong.onnx")


def bind_socket(host, port):
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one).

    Raises :class:`ServerStartError` with one clear line when the address is
    in use or cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerStartError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (getaddrinfo's answer), not 0: asyncio sets
    # TCP_NODELAY only on sockets that say so, and without it every answer
    # (headers and body written separately) waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host):
    """Whether ``host`` (a name or address to listen on) is a loopback one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uvicorn_server(app, log_level, guard):
    import uvicorn

    # ws="none": a WebSocket upgrade would hand the socket to another
    # protocol, out of the guard's deadlines (the API has no WebSocket).
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            server_header=False, timeout_graceful_shutdown=5,
                            http=guard.protocol_factory(), ws="none",
                            timeout_keep_alive=guard.limits.keep_alive)
    return uvicorn.Server(config)


def _guard(app, limits, ssl_context):
    return Guard(limits, ssl_context=ssl_context, metrics=app.state.service.metrics)


def _url(sock, tls):
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


class BackgroundServer:
    """An edge server running in a daemon thread; see :func:`serve_in_thread`.

    Attributes
    ----------
    url : str
        ``http://HOST:PORT`` or ``https://HOST:PORT`` (no trailing slash).
    api_key : str or None
        The throw-away key when :func:`serve_in_thread` made one, else None.
    app : starlette.applications.Starlette
        The app (``app.state.service`` has the model, keys, batcher, metrics).
    """

    def __init__(self, app, sock, api_key=None, log_level="warning", *, limits=None,
                 ssl_context=None):
        self.app, self.api_key = app, api_key
        self._sock = sock
        self.url = _url(sock, ssl_context is not None)
        self._server = _uvicorn_server(app, log_level, _guard(app, limits, ssl_context))
        self._thread = None
        self._error = None

    def _run(self):
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc

    def start(self, timeout=30.0):
        """Start the thread; return once the server accepts connections (``timeout`` s)."""
        self._thread = threading.Thread(target=self._run, name="offload-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                self._sock.close()
                raise ServerStartError(f"the server thread ended during start-up: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout=10.0):
        """Ask uvicorn to exit, wait for the thread (``timeout`` s), close the socket."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - a stuck request
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        self._sock.close()

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve_in_thread(model=None, *, keys=None, api_key=None, host="127.0.0.1", port=0,
                    slot_ms=200.0, log_level="warning", limits=None, tls_cert=None,
                    tls_key=None, tls_client_ca=None, **options):
    """Start the edge server in a background thread; returns a started :class:`BackgroundServer`.

    Parameters
    ----------
    model : str, StrongModel or None
        ``.onnx`` path or a loaded model; None: the committed ``strong.onnx``.
    keys : str, KeyStore or None
        A key file path, a :class:`KeyStore`, or None: one key, ``api_key``
        or a new throw-away key (``server.api_key``), without a bucket.
    api_key : str, optional
        The key to accept when ``keys`` is None.
    host : str
        Address to listen on (loopback by default).
    port : int
        0 (default): a free port chosen by the OS; ``server.url`` tells which.
    slot_ms : float
        Bucket slot length for keys with a rate limit, milliseconds.
    log_level : str
        uvicorn's log level ("warning": quiet).
    limits : offload.server.guard.Limits, optional
        Deadlines (s) and connection caps; the defaults of ``Limits()``.
    tls_cert, tls_key : str, optional
        PEM certificate chain and key: serve HTTPS (``server.url`` says so).
    tls_client_ca : str, optional
        Require client certificates that chain to this CA (with ``tls_cert``).
    **options
        ``create_app`` options: ``max_batch``, ``batch_window_ms``,
        ``max_queue``, ``max_body``, ``top_k``, ``max_pixels``, ``decode_threads``,
        and ``state`` (``offload.server.state``: where the buckets live).

    Raises
    ------
    ServerStartError
        No model found, model unusable, bad key file, bad TLS files, address in use.
    """
    from offload.server.keys import KeyFileError

    made_key = None
    try:
        if keys is None:
            made_key = api_key or new_key()
            store = KeyStore.single(made_key, name="local", slot_s=slot_ms / 1000.0)
        elif isinstance(keys, KeyStore):
            store = keys
        else:
            store = KeyStore.from_file(keys, slot_s=slot_ms / 1000.0)
        if model is None:
            model = default_model_path()
            if model is None:
                raise ServerStartError("no model given and the committed strong.onnx was not found")
        ctx = tls_context(tls_cert, tls_key, tls_client_ca)
        app = create_app(model, store, **options)
    except (KeyFileError, ModelError, ValueError) as exc:  # TLSConfigError is a ValueError
        raise ServerStartError(str(exc)) from None
    sock = bind_socket(host, port)
    return BackgroundServer(app, sock, api_key=made_key, log_level=log_level, limits=limits,
                            ssl_context=ctx).start()


def tls_context(cert, key, client_ca=None):
    """The server's SSLContext, or None without ``cert``; TLSConfigError on bad files or flags."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key (a TLS server)")
        return None
    if cert is None or key is None:
        raise TLSConfigError("give both --tls-cert and --tls-key")
    return server_context(cert, key, client_ca=client_ca)


def serve_forever(app, host, port, log_level="info", on_ready=None, *, limits=None,
                  ssl_context=None):
    """Serve ``app`` in this thread until Ctrl+C / SIGTERM (``offload-serve``).

    ``on_ready(url)`` is called once the socket is bound (before serving).
    ``limits``: deadlines and caps (:class:`Limits`); ``ssl_context``: serve HTTPS.
    Raises :class:`ServerStartError` when the address cannot be bound.
    """
    sock = bind_socket(host, port)
    url = _url(sock, ssl_context is not None)
    server = _uvicorn_server(app, log_level, _guard(app, limits, ssl_context))
    if on_ready is not None:
        on_ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return url


def load_model(path):
    """A :class:`StrongModel` from ``path`` (None: the committed one); ModelError when unusable."""
    path = path or default_model_path()
    if path is None:
        raise ModelError("no --model given and the committed strong.onnx was not found")
    return StrongModel(os.fspath(path))
