"""The strong side of a profile as a running ``offload-serve`` (for models too big for the workstation).

``offload-train profile --images DIR --weak W.tflite --strong http://HOST:PORT
--key-file K`` sends every image, PNG-encoded as the device sends a frame, to
``POST /v1/classify`` and reads the ranked classes back. The server applies
its own model card, so the pixels are the deployed ones. An answer names the
server's ``--top-k`` best classes only: a true class among them has its exact
rank, any other a rank beyond them, which is all a top-``k`` loss with ``k``
at most the server's top-k needs (checked on the first answer).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np

__all__ = ["RemoteStrong", "RemoteError", "is_url"]


class RemoteError(ValueError):
    """The server cannot be used for the profile (one message naming it)."""


def is_url(text):
    """True when ``text`` names a server (``http://`` or ``https://``) rather than a file."""
    return str(text).lower().startswith(("http://", "https://"))


class RemoteStrong:
    """A running ``offload-serve`` seen as the profile's strong model.

    Parameters
    ----------
    url : str
        Base URL, e.g. ``http://127.0.0.1:8080``.
    key : str
        An API key of the server (no rate limit, or the profile is refused 429s).
    k : int
        The profile's top-k: the server must answer at least ``k`` classes.
    timeout : float
        Seconds per request.
    """

    def __init__(self, url, *, key, k, timeout=30.0):
        self.url, self.k, self.timeout = url.rstrip("/"), int(k), float(timeout)
        self._headers = {"Authorization": f"Bearer {key}"}
        health = self._call("/healthz", None)
        try:
            self.n_classes = int(health["classes"])
            self.name = str(health.get("model", "?"))
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"{self.url}/healthz: not an offload-serve answer: {health}") from None
        self.providers = [f"offload-serve, model {self.name}"]
        self.card = None  # the server applies its own

    def _call(self, path, body):
        req = urllib.request.Request(self.url + path, data=body, headers=dict(
            self._headers, **({"Content-Type": "image/png"} if body is not None else {})))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            raise RemoteError(f"{self.url}{path}: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise RemoteError(f"{self.url}{path}: {getattr(exc, 'reason', exc)}") from None

    def prepare(self, image):
        """The frame as the device sends it: PNG bytes (lossless)."""
        import cv2

        ok, png = cv2.imencode(".png", np.asarray(image))
        if not ok:  # pragma: no cover - any uint8 image encodes
            raise RemoteError("cannot encode the image as PNG")
        return png.tobytes()

    def scores(self, frames):
        """``(n, n_classes)`` float32: each answer's scores at its classes, ``-inf`` elsewhere."""
        out = np.full((len(frames), self.n_classes), -np.inf, dtype=np.float32)
        for i, body in enumerate(frames):
            top = self._call("/v1/classify", body).get("top") or []
            if len(top) < min(self.k, self.n_classes):
                raise RemoteError(f"{self.url} answers {len(top)} classes per image, fewer than "
                                  f"--top-k {self.k}; start it with --top-k {self.k} or more")
            for entry in top:
                out[i, int(entry["class"])] = float(entry["score"])
        return out
