"""Atomic file output: nothing a user has is ever left half-written.

Write to a temporary file beside the target, flush it to disk, then rename it
over the target with ``os.replace``: a reader (or a crash, or Ctrl+C) sees the
old file or the new one, never a partial one.
"""

import contextlib
import json
import os
import tempfile

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def _default_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path, suffix=None, mode=None):
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    The temporary name keeps ``path``'s extension (or ``suffix``) so writers that
    look at it (numpy's ``.npz``, matplotlib's ``.png``) behave. The file gets
    ``mode``, by default the usual permissions (``0666 & ~umask``) rather than
    ``mkstemp``'s 0600, before anything is written to it. On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = suffix if suffix is not None else os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + ext,
                               dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, _default_mode() if mode is None else mode)
        yield tmp
        with open(tmp, "rb+") as f:  # the data reach the disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
