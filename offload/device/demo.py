"""``offload-run --demo``: the whole system on one machine, from the committed artifacts.

Starts the edge server on loopback in a background thread (the committed
``strong.onnx``, a throw-away key), runs the device loop over the committed
demo clip (200 held-out Fashion-MNIST test images at 5 frames/s, replayed at
its own pace) with the committed weak model and policy, prints the
end-of-run summary, stops the server. Works from any directory: the
artifacts are found next to the package or inside it (``offload.artifacts``).

The device itself never learns the strong model's answer on frames it did
not offload, so "strong only" is measured here, after the run, by sending
every frame of the clip to the same server (outside the device's bucket).

Library code, click-free: ``offload.device.cli`` uses it one way::

    with open_demo(flags) as demo:          # the server runs inside the block
        summary = run(make_config(overrides=demo.values))
        demo.complete(summary)              # adds the strong-only reference
"""

from __future__ import annotations

import contextlib
import http.client
import os
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit

from offload import artifacts

__all__ = ["open_demo", "Demo", "DemoError", "demo_files", "CONFLICTING"]

#: Keys the demo sets itself.
CONFLICTING = ("camera", "video", "images", "picamera", "labels", "server", "key", "key-file")


class DemoError(RuntimeError):
    """The demo cannot run: a conflicting key, no server extra, no demo clip, no server."""


def demo_files():
    """``(clip, labels)`` paths of the committed demo clip; :class:`DemoError` when absent."""
    clip, labels = artifacts.find("demo/clip.avi"), artifacts.find("demo/labels.csv")
    if clip is None or labels is None:
        where = ", ".join(artifacts.search_path())
        raise DemoError(f"--demo: the demo clip (demo/clip.avi, demo/labels.csv) is in none of "
                        f"{where}; reinstall offload or set ${artifacts.ENV}")
    return clip, labels


def _strong_reference(url, api_key, clip, labels):
    """Top-1 error of the strong model on every frame of ``clip``: ``(error, frames)``."""
    import cv2

    from offload import wire
    from offload.device.capture import read_labels

    truth = read_labels(labels)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    cap = cv2.VideoCapture(clip)
    wrong = seen = 0
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i in truth:
                body, ctype = wire.encode_image(frame)
                conn.request("POST", wire.CLASSIFY_PATH, body=body,
                             headers={"Authorization": f"Bearer {api_key}",
                                      "Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise DemoError(f"--demo: the server answered {resp.status} to a "
                                    f"reference request: {data[:200]!r}")
                wrong += wire.parse_answer(data).top1 != truth[i]
                seen += 1
            i += 1
    finally:
        cap.release()
        conn.close()
    return (wrong / seen if seen else None), seen


@dataclass
class Demo:
    """What a demo run needs while its server runs: ``values`` are the run's config keys."""

    values: dict
    url: str
    api_key: str
    clip: str
    labels: str

    @property
    def banner(self):
        """One line saying what runs where."""
        pace = "5 frames/s" if self.values["realtime"] else "unpaced"
        return (f"demo: edge server on {self.url} (committed strong.onnx, throw-away key); "
                f"device on {self.clip} ({pace})")

    def complete(self, summary):
        """Add "strong only" to ``summary['loss']``: every frame sent after the run, outside the bucket."""
        loss = summary.get("loss")
        if loss is None or loss.get("strong_only") is not None or summary.get("signal"):
            return
        err, n = _strong_reference(self.url, self.api_key, self.clip, self.labels)
        if err is not None:
            loss["strong_only"] = round(err, 4)
            loss["strong_only_note"] = (f"all {n} frames sent to the server after the run, "
                                        "outside the bucket")


@contextlib.contextmanager
def open_demo(flags):
    """Start the loopback edge server (throw-away key); yield the :class:`Demo`; stop the server.

    ``flags`` are the caller's other keys (``None`` = not given); the demo
    adds its clip, labels, server and key, paces the clip (``realtime``)
    unless told otherwise and logs to a fresh temporary folder unless ``log``
    is given.

    Raises
    ------
    DemoError
        A key the demo sets itself was given, the server extra or the demo
        clip is missing, or the server did not start.
    """
    given = [k for k in CONFLICTING if flags.get(k) is not None]
    if given:
        raise DemoError(f"--demo brings its own source, labels and server; "
                        f"drop --{', --'.join(given)}")
    try:
        from offload.server import serve_in_thread
        from offload.server.serve import ServerStartError
    except ImportError as exc:
        raise DemoError(f"--demo runs the edge server too, which needs the server extra "
                        f"(pip install 'offload[server]'): {exc}") from None
    clip, labels = demo_files()
    values = {k: v for k, v in flags.items() if v is not None}
    values.setdefault("realtime", True)  # a camera's pace: 5 frames/s, 40 s
    if "log" not in values:
        values["log"] = os.path.join(tempfile.mkdtemp(prefix="offload-demo-"), "frames.jsonl")
    values.update(video=clip, labels=labels)
    try:
        server = serve_in_thread()
    except ServerStartError as exc:
        raise DemoError(f"--demo: the edge server did not start: {exc}") from None
    with server:
        values.update(server=server.url, key=server.api_key)
        yield Demo(values, server.url, server.api_key, clip, labels)
