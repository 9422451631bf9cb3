"""Test helpers for the device loop: a fake wire-format server, demo frames, log checks.

The fake server speaks ``offload.wire`` on loopback (port 0) from a thread, so
the device tests do not depend on the real ``offload-serve``. Behaviours
(``FakeServer.mode``): ``ok`` (answer at once), ``gate`` (hold every answer
until ``release`` is set: deterministic "slow network"), ``slow`` (sleep
``delay`` s, past the client's read timeout), ``garbage`` (200 with a body
that is not JSON), ``500``, ``close`` (read the request, close the socket
without answering). ``kill()`` shuts it down mid-run (later requests are
refused). With ``tls`` (a server ``ssl.SSLContext``, tests/tls_helpers.py) it
serves HTTPS: each connection's handshake runs in that connection's thread,
and one that fails is counted in ``tls_failures`` (no request is read).
"""

from __future__ import annotations

import glob
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from offload import wire
from offload.bucket import step_reference
from offload.device.framelog import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "artifacts", "demo")
CLIP = os.path.join(DEMO, "clip.avi")
LABELS = os.path.join(DEMO, "labels.csv")
MODEL = os.path.join(ROOT, "artifacts", "weak_int8.tflite")
DQN = os.path.join(ROOT, "docs", "dqn", "fig7.bin")           # periodic, no inter-arrival input
DQN_IA = os.path.join(ROOT, "docs", "dqn", "fig10.bin")       # with inter-arrival times
KEY = "test-key-123"


def demo_frames():
    """The 200 demo frames (BGR uint8) and their true labels."""
    files = sorted(glob.glob(os.path.join(DEMO, "frames", "*.png")))
    import csv

    with open(LABELS, newline="") as f:
        labels = [int(r["label"]) for r in csv.DictReader(f)]
    return [cv2.imread(p) for p in files], labels


def write_video(path, frames, fps):
    """Write ``frames`` to an MJPG .avi at ``fps`` frames/s (what OpenCV can always encode)."""
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(f)
    vw.release()
    return str(path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def setup(self):
        super().setup()
        # answer headers and body go out as separate writes: no Nagle delay
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner.connections.append(self.connection)

    def do_POST(self):
        srv = self.server.owner
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        fid = self.headers.get(wire.FRAME_ID_HEADER)
        srv.requests.append({"frame_id": fid, "auth": self.headers.get("Authorization"),
                             "type": self.headers.get("Content-Type"), "bytes": len(body)})
        mode = srv.mode
        if mode == "gate":
            srv.release.wait(10)
        elif mode == "slow":
            time.sleep(srv.delay)
        if mode == "close":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if mode in ("500", "429", "503"):  # each with srv.retry_after as its Retry-After header
            return self._send(int(mode), wire.error_body(f"status {mode}"),
                              {"Retry-After": srv.retry_after})
        if mode == "garbage":
            return self._send(200, b"<html>not json</html>")
        if self.headers.get("Authorization") != f"Bearer {srv.key}":
            return self._send(401, wire.error_body("bad key"))
        try:
            srv.requests[-1]["shape"] = wire.decode_image(body, self.headers.get("Content-Type")).shape
        except wire.WireError as e:
            return self._send(400, wire.error_body(e))
        cls = srv.answer_class(int(fid)) if fid is not None else 0
        others = [c for c in range(10) if c != cls][:2]
        self._send(200, wire.answer_body([cls] + others, [0.9, 0.06, 0.04], inference_ms=1.5,
                                         batch_size=1, frame_id=fid))

    def _send(self, status, data, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def finish_request(self, request, client_address):
        # in the connection's own thread: a client that never finishes its
        # handshake holds up nobody else
        owner = self.owner
        if owner.tls is not None:
            request.settimeout(5.0)
            try:
                request = owner.tls.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as e:
                owner.tls_failures.append(f"{type(e).__name__}: {e}")
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


class FakeServer:
    """A loopback wire-format server in a thread; ``url`` to pass as ``server``.

    ``tls``: a server-side ``ssl.SSLContext`` (HTTPS, ``url`` is ``https://``);
    ``host``: the host name the ``url`` carries (the socket is on 127.0.0.1).
    """

    def __init__(self, mode="ok", key=KEY, answer_class=lambda fid: 0, delay=1.0, *, tls=None,
                 host="127.0.0.1"):
        self.mode, self.key, self.answer_class, self.delay = mode, key, answer_class, delay
        self.retry_after = "1"  # the Retry-After header of modes "429", "503" and "500"
        self.tls = tls
        self.tls_failures = []
        self.requests = []
        self.connections = []
        self.release = threading.Event()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self._dead = False

    def kill(self):
        """Stop answering and close the listening socket (new connections are refused)."""
        if not self._dead:
            self._dead = True
            self.release.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            for c in self.connections:  # keep-alive connections too, as a dying process would
                try:
                    c.shutdown(2)
                except OSError:
                    pass


def check_log(records, n_frames, N, P, M):
    """One record per frame (ids 0..n-1) and the bucket never violated, replayed with step_reference.

    Returns the records sorted by id.
    """
    ids = sorted(r["id"] for r in records)
    assert ids == list(range(n_frames)), "every frame exactly once"
    recs = sorted(records, key=lambda r: r["id"])
    decided = [r for r in recs if "n_before" in r]
    n = M
    for k, r in enumerate(decided):
        if k:
            n = step_reference(n, decided[k - 1]["offload"], r["slots"], N, P, M)
        assert r["n_before"] == n
        assert 0 <= n <= M
        if r["offload"]:
            assert n >= P
        assert r["n_after"] == n - P * r["offload"] >= 0
        # the final answer is the strong one exactly when it came back
        if r["outcome"] == "sent":
            assert r["final"] == r["strong_top"][0][0]
        else:
            assert r["final"] == r["weak_top"][0][0] and "strong_top" not in r
    return recs


def load(path):
    return read_log(path)


def tiny_images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8) for _ in range(count)]
