"""The per-frame JSON-lines log: one record per frame, append-only, rotated by size.

Each record is one line of JSON (schema in docs/device.md), written with one
``write`` and flushed at once, so a crash loses at most the line being
written and a reader never sees half a record in a closed file. Rotation works
like ``logging.handlers.RotatingFileHandler``: when the next record would push
``PATH`` past ``max_bytes``, ``PATH.(N-1)`` -> ``PATH.N``, ..., ``PATH`` ->
``PATH.1`` (renames; the oldest beyond ``backups`` is dropped) and a new
``PATH`` is started. A record is never split across files; a single record
larger than ``max_bytes`` gets a file of its own.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["FrameLog", "read_log"]


def _clean(obj):
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN), numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return _clean(obj.item())
    return obj


class FrameLog:
    """Append-only JSON-lines writer with size-based rotation.

    Parameters
    ----------
    path : str
        The log file; its folder is created.
    max_bytes : int
        Rotate before a record would make the file larger than this (bytes); 0: never.
    backups : int
        Rotated files kept (``PATH.1`` newest .. ``PATH.backups`` oldest), >= 1.
    """

    def __init__(self, path, max_bytes=0, backups=3):
        self.path = os.fspath(path)
        self.max_bytes, self.backups = int(max_bytes), int(backups)
        if self.max_bytes < 0 or self.backups < 1:
            raise ValueError("log-max-bytes must be >= 0 and log-backups >= 1")
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self._f = open(self.path, "ab")
        self._size = self._f.tell()
        self.records = 0
        self.rotations = 0

    def write(self, record):
        """Append one record (a dict) as one line and flush it."""
        line = (json.dumps(_clean(record), separators=(",", ":"), allow_nan=False)
                + "\n").encode("utf-8")
        if self.max_bytes and self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._f.write(line)
        self._f.flush()
        self._size += len(line)
        self.records += 1

    def _rotate(self):
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._f = open(self.path, "ab")
        self._size = 0
        self.rotations += 1

    def close(self):
        """Flush to disk and close (idempotent)."""
        if self._f is not None and not self._f.closed:
            self._f.flush()
            try:
                os.fsync(self._f.fileno())
            except OSError:  # pragma: no cover - e.g. a pipe
                pass
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_log(path, backups=True):
    """All records of a log, oldest first, including rotated files ``PATH.N .. PATH.1``."""
    path = os.fspath(path)
    files = []
    if backups:
        i = 1
        while os.path.exists(f"{path}.{i}"):
            files.append(f"{path}.{i}")
            i += 1
        files.reverse()
    files.append(path)
    out = []
    for fn in files:
        with open(fn, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out
