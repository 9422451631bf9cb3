"""The device loop (``offload-run``): capture, weak classifier, policy, offloading, frame log.

Torch-free (numpy, OpenCV, LiteRT). One concept per module:

``config``   the keys, each declared once on ``RunConfig`` (TOML, CLI flags, docs table), ``make_config``
``capture``  frame sources (camera, video, image folder, Picamera2, memory) and labels
``weak``     accelerator choice (Edge TPU / CPU) and the inference watchdog
``policy``   per-frame metric and decision (native Decider or thresholds + bucket)
``sender``   bounded queue + background thread posting frames to the edge server
``conn``     the sender's bounded HTTP/1.1 client (plain or TLS; deadline, head and body caps)
``record``   ``FrameRecord`` (one frame's log record) and the ``Outcome`` enum
``slotter``  ``Slotter``: time slot and inter-arrival of each decided frame
``stopwatch`` ``Stopwatch``: per-part loop times
``framelog`` JSON-lines per-frame log with size rotation
``status``   live status line and the end-of-run summary (Table I)
``loop``     ``run(config) -> summary dict``, the ``FrameLoop`` itself
``demo``     ``open_demo``: the in-process server for ``offload-run --demo`` (click-free)
``cli``      the ``offload-run`` command (imports ``demo``, never the other way)

Python use: ``run(make_config(overrides={...}))``; see ``offload.device.loop``.
"""

from offload.device.config import ConfigError, RunConfig, make_config
from offload.device.loop import run
from offload.device.status import format_summary

__all__ = ["ConfigError", "RunConfig", "make_config", "run", "format_summary"]
