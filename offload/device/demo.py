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
"""

from __future__ import annotations

import http.client
import os
import signal
import sys
import tempfile
from urllib.parse import urlsplit

import click

from offload import artifacts

__all__ = ["run_demo", "demo_files", "CONFLICTING"]

#: Flags the demo sets itself.
CONFLICTING = ("camera", "video", "images", "picamera", "labels", "server", "key", "key-file")


def demo_files():
    """``(clip, labels)`` paths of the committed demo clip; ClickException when absent."""
    clip, labels = artifacts.find("demo/clip.avi"), artifacts.find("demo/labels.csv")
    if clip is None or labels is None:
        where = ", ".join(artifacts.search_path())
        raise click.ClickException(f"--demo: the demo clip (demo/clip.avi, demo/labels.csv) is "
                                   f"in none of {where}; reinstall offload or set "
                                   f"${artifacts.ENV}")
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
                    raise click.ClickException(f"--demo: the server answered {resp.status} to a "
                                               f"reference request: {data[:200]!r}")
                wrong += wire.parse_answer(data).top1 != truth[i]
                seen += 1
            i += 1
    finally:
        cap.release()
        conn.close()
    return (wrong / seen if seen else None), seen


def run_demo(flags, stream=None):
    """Run the demo with the other flags given (``None`` = not given); returns the exit status."""
    from offload.device.cli import build_config, device_errors
    from offload.device.loop import run
    from offload.device.status import format_summary

    given = [k for k in CONFLICTING if flags.get(k) is not None]
    if given:
        raise click.ClickException(f"--demo brings its own source, labels and server; "
                                   f"drop --{', --'.join(given)}")
    try:
        from offload.server import serve_in_thread
        from offload.server.serve import ServerStartError
    except ImportError as exc:
        raise click.ClickException(f"--demo runs the edge server too, which needs the server "
                                   f"extra (pip install 'offload[server]'): {exc}") from None
    clip, labels = demo_files()
    out = stream or sys.stdout
    values = {k: v for k, v in flags.items() if v is not None}
    values.setdefault("realtime", True)  # a camera's pace: 5 frames/s, 40 s
    if "log" not in values:
        values["log"] = os.path.join(tempfile.mkdtemp(prefix="offload-demo-"), "frames.jsonl")
    values.update(video=clip, labels=labels)
    try:
        server = serve_in_thread()
    except ServerStartError as exc:
        raise click.ClickException(f"--demo: the edge server did not start: {exc}") from None
    with server:
        click.echo(f"demo: edge server on {server.url} (committed strong.onnx, throw-away key); "
                   f"device on {clip} ({'5 frames/s' if values['realtime'] else 'unpaced'})",
                   err=True)
        values.update(server=server.url, key=server.api_key)
        with device_errors():
            cfg = build_config(None, values)
            summary = run(cfg, status_stream=sys.stderr, echo=lambda m: click.echo(m, err=True))
        loss = summary.get("loss")
        if loss is not None and loss.get("strong_only") is None and not summary.get("signal"):
            err, n = _strong_reference(server.url, server.api_key, clip, labels)
            if err is not None:
                loss["strong_only"] = round(err, 4)
                loss["strong_only_note"] = (f"all {n} frames sent to the server after the run, "
                                            "outside the bucket")
    click.echo(format_summary(summary), file=out)
    click.echo(f"frame log: {summary.get('log')}", file=out)
    if summary.get("signal"):
        return 128 + int(signal.Signals[summary["signal"]])
    return 0
