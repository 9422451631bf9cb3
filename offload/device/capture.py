"""Frame sources: camera, video file, image folder, Raspberry Pi camera, or frames in memory.

Every source yields :class:`Frame` ``(frame_id, t, image, label)``:

* ``frame_id``: 0, 1, 2, ... in capture order;
* ``t``: capture time in seconds since the source's first frame. A video file
  gives the frame's own time stamp (``CAP_PROP_POS_MSEC``, or ``index / fps``
  when the backend has no usable stamp), an image folder one slot apart (or
  ``index / fps``), so a file replays the same way every time; a live camera
  gives the monotonic clock (Picamera2: the sensor's time stamp);
* ``image``: ``uint8`` ``HxWx3`` BGR or ``HxW`` grey;
* ``label``: the true class from a labels CSV, or ``None``.

A source that cannot be opened or read raises :class:`SourceError` with one
line that names it.
"""

from __future__ import annotations

import csv
import math
import os
import time
from typing import NamedTuple

import numpy as np

__all__ = ["Frame", "SourceError", "open_source", "read_labels", "MemorySource", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


class SourceError(ValueError):
    """A frame source that cannot be opened or read; the message names it."""


class Frame(NamedTuple):
    """One captured frame; ``t`` in seconds since the first frame of the source."""

    frame_id: int
    t: float
    image: np.ndarray
    label: int | None = None


def read_labels(path):
    """``{frame index: true class}`` from a CSV with columns ``frame`` and ``label``.

    artifacts/demo/labels.csv is such a file (its other columns are ignored).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SourceError(f"labels {path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"labels {path}: not a CSV file ({e})") from None
    if not rows or "frame" not in rows[0] or "label" not in rows[0]:
        raise SourceError(f"labels {path}: need a header with columns 'frame' and 'label'")
    out = {}
    for i, row in enumerate(rows, start=2):
        try:
            fid, lab = int(row["frame"]), int(row["label"])
        except (TypeError, ValueError):
            raise SourceError(f"labels {path} line {i}: frame and label must be integers, "
                              f"got {row['frame']!r}, {row['label']!r}") from None
        if fid < 0 or lab < 0:
            raise SourceError(f"labels {path} line {i}: frame and label must be >= 0")
        out[fid] = lab
    return out


class _Source:
    """Common part: ids, labels, ``max_frames``; subclasses yield ``(t, image)``."""

    #: Nominal frame rate (frames/s) when the source knows one, for --realtime pacing.
    fps = None
    #: True for file sources whose time stamps can be paced against the wall clock.
    replayable = False
    description = "?"

    def __init__(self, labels=None):
        self.labels = labels or {}

    def _frames(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self):
        for i, (t, image) in enumerate(self._frames()):
            yield Frame(i, float(t), image, self.labels.get(i))

    def close(self):
        """Release the device or file."""


class VideoSource(_Source):
    """A video file read with OpenCV; time stamps from the file (deterministic replay)."""

    replayable = True

    def __init__(self, path, labels=None):
        import cv2

        super().__init__(labels)
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise SourceError(f"video {self.path}: no such file")
        self._cap = cv2.VideoCapture(self.path)
        if not self._cap.isOpened():
            raise SourceError(f"video {self.path}: OpenCV cannot open it (not a video, "
                              "or no codec for it)")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else None
        self.description = f"video {self.path}" + (f" ({self.fps:g} frames/s)" if self.fps else "")

    def _frames(self):
        import cv2

        prev, k = None, 0
        while True:
            ok, image = self._cap.read()
            if not ok or image is None:
                if k == 0:
                    raise SourceError(f"video {self.path}: no frame could be decoded")
                return
            # The stamp of the frame just read. Some backends report 0 or the
            # next frame's time; only a stamp that moves forward is trusted,
            # otherwise index / fps (one nominal frame period after the last).
            ms = self._cap.get(cv2.CAP_PROP_POS_MSEC)
            if k == 0:
                t = 0.0
                t0 = ms / 1000.0 if ms and math.isfinite(ms) and ms >= 0 else 0.0
            elif ms and math.isfinite(ms) and ms / 1000.0 - t0 > prev:
                t = ms / 1000.0 - t0
            else:
                t = prev + (1.0 / self.fps if self.fps else 0.0)
            prev, k = t, k + 1
            yield t, image

    def close(self):
        self._cap.release()


class CameraSource(_Source):
    """A live camera through ``cv2.VideoCapture(index)``; time stamps from the monotonic clock."""

    def __init__(self, index, labels=None):
        import cv2

        super().__init__(labels)
        self.index = int(index)
        self._cap = cv2.VideoCapture(self.index)
        if not self._cap.isOpened():
            raise SourceError(f"camera {self.index}: cannot open it (no such device, or busy)")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else None
        self.description = f"camera {self.index}"

    def _frames(self):
        t0, k = None, 0
        while True:
            ok, image = self._cap.read()
            now = time.monotonic()
            if not ok or image is None:
                if k == 0:
                    raise SourceError(f"camera {self.index}: opened but gives no frames")
                return
            t0 = now if t0 is None else t0
            k += 1
            yield now - t0, image

    def close(self):
        self._cap.release()


class PicameraSource(_Source):
    """The Raspberry Pi camera through Picamera2 (only where the ``picamera2`` module exists).

    Frames are captured as ``RGB888``, which libcamera stores in B, G, R byte
    order: what OpenCV calls BGR. Time stamps are the sensor's
    (``SensorTimestamp``, ns) relative to the first frame.
    """

    def __init__(self, number=0, labels=None, size=(640, 480)):
        super().__init__(labels)
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise SourceError("picamera: the picamera2 module is not installed (Raspberry Pi OS: "
                              "apt install python3-picamera2, and create the venv with "
                              "--system-site-packages)") from None
        try:
            self._cam = Picamera2(int(number))
            self._cam.configure(self._cam.create_video_configuration(
                main={"size": tuple(size), "format": "RGB888"}))
            self._cam.start()
        except Exception as e:  # picamera2 raises many kinds; one line for the user
            raise SourceError(f"picamera {number}: cannot start the camera ({e})") from None
        self.description = f"picamera {number}"

    def _frames(self):
        t0 = None
        while True:
            req = self._cam.capture_request()
            try:
                image = req.make_array("main")
                stamp = req.get_metadata().get("SensorTimestamp")
            finally:
                req.release()
            t = stamp / 1e9 if stamp is not None else time.monotonic()
            t0 = t if t0 is None else t0
            yield t - t0, np.ascontiguousarray(image[:, :, :3])

    def close(self):
        self._cam.stop()
        self._cam.close()


class ImagesSource(_Source):
    """Image files of a folder, sorted by name; one slot apart, or ``1/fps`` s apart."""

    replayable = True

    def __init__(self, folder, slot_s, fps=None, labels=None):
        super().__init__(labels)
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise SourceError(f"images {self.folder}: not a folder")
        self.files = sorted(f for f in os.listdir(self.folder)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise SourceError(f"images {self.folder}: no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        self.period = 1.0 / fps if fps else float(slot_s)
        self.fps = 1.0 / self.period
        self.description = f"images {self.folder} ({len(self.files)} files, {self.fps:g} frames/s)"

    def _frames(self):
        import cv2

        for k, name in enumerate(self.files):
            path = os.path.join(self.folder, name)
            image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if image is None or image.dtype != np.uint8:
                raise SourceError(f"images: cannot read {path} as an 8-bit image")
            if image.ndim == 3 and image.shape[2] == 4:
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
            yield k * self.period, image


class MemorySource(_Source):
    """Frames already in memory: ``images`` (a sequence of uint8 arrays), ``times`` in seconds.

    For tests, benchmarks and callers that capture themselves. ``times``
    defaults to ``k * period``.
    """

    replayable = True

    def __init__(self, images, times=None, period=0.2, labels=None):
        super().__init__(labels)
        self.images = images
        self.times = times if times is not None else [k * period for k in range(len(images))]
        if len(self.times) != len(self.images):
            raise SourceError("memory source: as many times as images are needed")
        self.fps = 1.0 / period
        self.description = f"{len(images)} frames in memory"

    def _frames(self):
        return zip(self.times, self.images)


def open_source(cfg, slot_s):
    """The frame source a :class:`offload.device.config.RunConfig` names, labels attached."""
    kind, value = cfg.source
    labels = read_labels(cfg.labels) if cfg.labels else None
    if kind == "video":
        return VideoSource(value, labels)
    if kind == "images":
        return ImagesSource(value, slot_s, cfg.fps, labels)
    if kind == "camera":
        return CameraSource(value, labels)
    if kind == "picamera":
        return PicameraSource(value, labels)
    raise SourceError("no frame source: give one of --video, --images, --camera, --picamera")
