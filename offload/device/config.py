"""Configuration of the device loop: one table of keys, read from TOML and/or CLI flags.

Every key below can be set in a TOML file (``offload-run --config FILE``) under
its own name (dashes, e.g. ``slot-ms = 200``; underscores are accepted too) and
as the CLI flag ``--<key>``; a flag overrides the file, the file overrides the
default. Unknown keys and invalid values are refused at start with a
:class:`ConfigError` naming the key. ``KEYS`` is the single source of truth:
the CLI builds its help from it and docs/device.md lists it.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields

__all__ = ["ConfigError", "RunConfig", "KEYS", "load_toml", "make_config", "SOURCE_KEYS",
           "read_key"]


class ConfigError(ValueError):
    """A configuration key with a value the loop cannot use; the message names the key."""


#: (key, default, help). Units are in the help text.
KEYS = [
    ("camera", None, "OpenCV camera index to capture from (cv2.VideoCapture(N))."),
    ("video", None, "Video file to replay; timestamps come from the file, not the wall clock."),
    ("images", None, "Folder of images (sorted by name), one frame each."),
    ("picamera", None, "Raspberry Pi camera number (Picamera2), where picamera2 is installed."),
    ("fps", None, "Frame rate of an --images folder (frames/s); default: one frame per slot."),
    ("labels", None, "CSV with columns 'frame' (0-based) and 'label' (true class), for the summary."),
    ("server", None, "Edge server base URL, e.g. http://10.0.0.2:8080; none: local-only, never offload."),
    ("key", None, "API key sent as 'Authorization: Bearer KEY' (prefer key-file)."),
    ("key-file", None, "File holding the API key (first line, surrounding whitespace ignored)."),
    ("policy", None, "Policy blob (.bin, kind dqn or thresholds); default: the committed policy.bin."),
    ("model", None, "Weak classifier .tflite; default: the committed weak_int8.tflite."),
    ("accelerator", "auto", "auto (Edge TPU when its delegate loads, else CPU with one warning), edgetpu, cpu."),
    ("device", None, "Edge TPU device for the delegate: usb, usb:N, pci, pci:N (default: first found)."),
    ("slot-ms", 200.0, "Length of one time slot (ms); 200 = the paper's 5 images/s."),
    ("queue-size", 8, "Frames waiting to be sent at most; a full queue leaves the weak answer standing."),
    ("connect-timeout", 1.0, "Seconds to open a connection to the server."),
    ("read-timeout", 2.0, "Seconds to wait for the server's answer to one frame."),
    ("inference-timeout", 2.0, "Seconds one weak inference may take before the watchdog reloads the model."),
    ("drain-timeout", 5.0, "Seconds to wait for in-flight frames at the end or on SIGINT/SIGTERM."),
    ("log", None, "JSON-lines frame log (one record per frame); none: no log."),
    ("log-max-bytes", 0, "Rotate the log when it would grow past this many bytes; 0: never."),
    ("log-backups", 3, "Rotated logs kept (LOG.1 .. LOG.N, newest first)."),
    ("image-format", "png", "Encoding of offloaded frames: png (lossless) or jpeg."),
    ("jpeg-quality", 90, "JPEG quality 1..100 when image-format is jpeg."),
    ("top-k", 3, "Classes kept per answer in the log."),
    ("max-frames", None, "Stop after this many frames; none: until the source ends."),
    ("realtime", False, "Pace a file source (video, images) at its frame rate; false: as fast as possible."),
    ("threads", None, "CPU threads for LiteRT (default: LiteRT's choice)."),
    ("summary-json", None, "Also write the end-of-run summary as JSON to this file."),
]
SOURCE_KEYS = ("camera", "video", "images", "picamera")
_DEFAULTS = {k: d for k, d, _ in KEYS}


def _attr(key):
    return key.replace("-", "_")


@dataclass
class RunConfig:
    """The validated configuration of one run; attribute names are the keys with ``_``.

    Build it with :func:`make_config` (which validates); units as in ``KEYS``:
    ``slot_ms`` in ms, timeouts in seconds, ``log_max_bytes`` in bytes.
    """

    camera: int | None = None
    video: str | None = None
    images: str | None = None
    picamera: int | None = None
    fps: float | None = None
    labels: str | None = None
    server: str | None = None
    key: str | None = None
    key_file: str | None = None
    policy: str | None = None
    model: str | None = None
    accelerator: str = "auto"
    device: str | None = None
    slot_ms: float = 200.0
    queue_size: int = 8
    connect_timeout: float = 1.0
    read_timeout: float = 2.0
    inference_timeout: float = 2.0
    drain_timeout: float = 5.0
    log: str | None = None
    log_max_bytes: int = 0
    log_backups: int = 3
    image_format: str = "png"
    jpeg_quality: int = 90
    top_k: int = 3
    max_frames: int | None = None
    realtime: bool = False
    threads: int | None = None
    summary_json: str | None = None

    @property
    def source(self):
        """``(kind, value)`` of the one frame source, or ``(None, None)``."""
        for k in SOURCE_KEYS:
            v = getattr(self, k)
            if v is not None:
                return k, v
        return None, None


assert [f.name for f in fields(RunConfig)] == [_attr(k) for k, _, _ in KEYS]


def load_toml(path):
    """The key/value table of a TOML file; a missing or malformed file is a ``ConfigError``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    return data


def _int(key, v, lo=None, none_ok=False):
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        else:
            raise ConfigError(f"{key}: must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {v}")
    return v


def _float(key, v, positive=True, none_ok=False):
    if v is None and none_ok:
        return None
    if isinstance(v, bool):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number, got {v!r}") from None
    if not math.isfinite(x) or (positive and x <= 0):
        raise ConfigError(f"{key}: must be a finite number > 0, got {v!r}")
    return x


def _str(key, v, none_ok=True, choices=None):
    if v is None and none_ok:
        return None
    if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {v!r}")
    v = os.fspath(v)
    if choices is not None and v.lower() not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {v!r}")
    return v.lower() if choices is not None else v


def _bool(key, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: must be true or false, got {v!r}")


def make_config(file_values=None, overrides=None):
    """Merge defaults, a TOML table and CLI overrides into a validated :class:`RunConfig`.

    Parameters
    ----------
    file_values : dict, optional
        Keys from a TOML file (dashes or underscores).
    overrides : dict, optional
        Keys from the CLI or from Python (dashes or underscores); a value of
        ``None`` means "not given" and leaves the file's value.

    Raises
    ------
    ConfigError
        An unknown key, a value of the wrong type or range, two frame
        sources, or both ``key`` and ``key-file``; the message names the key.
    """
    merged = dict(_DEFAULTS)
    for origin, table in (("config file", file_values or {}), ("option", overrides or {})):
        for raw_key, value in table.items():
            key = str(raw_key).replace("_", "-")
            if key not in _DEFAULTS:
                raise ConfigError(f"{raw_key}: unknown {origin} key (known: {', '.join(_DEFAULTS)})")
            if isinstance(value, dict):
                raise ConfigError(f"{raw_key}: expected a value, got a table")
            if value is not None or origin == "config file":
                merged[key] = value
    v = {}
    for k in ("camera", "picamera"):
        v[k] = _int(k, merged[k], lo=0, none_ok=True)
    for k in ("video", "images", "labels", "server", "key", "key-file", "policy", "model",
              "log", "summary-json", "device"):
        v[k] = _str(k, merged[k])
    v["fps"] = _float("fps", merged["fps"], none_ok=True)
    v["accelerator"] = _str("accelerator", merged["accelerator"], none_ok=False,
                            choices=("auto", "edgetpu", "cpu"))
    v["image-format"] = _str("image-format", merged["image-format"], none_ok=False,
                             choices=("png", "jpeg"))
    for k in ("slot-ms", "connect-timeout", "read-timeout", "inference-timeout", "drain-timeout"):
        v[k] = _float(k, merged[k])
    v["queue-size"] = _int("queue-size", merged["queue-size"], lo=1)
    v["log-max-bytes"] = _int("log-max-bytes", merged["log-max-bytes"], lo=0)
    v["log-backups"] = _int("log-backups", merged["log-backups"], lo=1)
    v["jpeg-quality"] = _int("jpeg-quality", merged["jpeg-quality"], lo=1)
    if v["jpeg-quality"] > 100:
        raise ConfigError(f"jpeg-quality: must be in 1..100, got {v['jpeg-quality']}")
    v["top-k"] = _int("top-k", merged["top-k"], lo=1)
    v["max-frames"] = _int("max-frames", merged["max-frames"], lo=1, none_ok=True)
    v["threads"] = _int("threads", merged["threads"], lo=1, none_ok=True)
    v["realtime"] = _bool("realtime", merged["realtime"])
    given = [k for k in SOURCE_KEYS if v[k] is not None]
    if len(given) > 1:
        raise ConfigError(f"{given[1]}: only one frame source at a time (also given: {given[0]})")
    if v["key"] is not None and v["key-file"] is not None:
        raise ConfigError("key: give key or key-file, not both")
    if v["fps"] is not None and v["images"] is None:
        raise ConfigError("fps: only applies to an images folder")
    if v["server"] is not None:
        from urllib.parse import urlsplit

        u = urlsplit(v["server"])
        if u.scheme != "http" or not u.hostname:
            raise ConfigError(f"server: must be an http://HOST[:PORT] URL, got {v['server']!r}"
                              + (" (https is not supported; use a TLS-terminating proxy)"
                                 if u.scheme == "https" else ""))
        try:
            u.port
        except ValueError:
            raise ConfigError(f"server: bad port in {v['server']!r}") from None
    if v["device"] is not None:
        from offload.classifier import check_device_spec

        try:
            v["device"] = check_device_spec(v["device"])
        except ValueError as e:
            raise ConfigError(f"device: {e}") from None
    return RunConfig(**{_attr(k): x for k, x in v.items()})


def read_key(cfg):
    """The API key from ``cfg.key`` or ``cfg.key_file`` (``None`` when neither is set)."""
    if cfg.key is not None:
        return cfg.key.strip()
    if cfg.key_file is None:
        return None
    try:
        with open(cfg.key_file, encoding="utf-8") as f:
            text = f.readline().strip()
    except OSError as e:
        raise ConfigError(f"key-file: cannot read {cfg.key_file} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"key-file: {cfg.key_file} is not a text file") from None
    if not text:
        raise ConfigError(f"key-file: {cfg.key_file} is empty")
    return text
