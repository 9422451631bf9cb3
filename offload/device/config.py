"""Configuration of the device loop: each key declared once, read from TOML and/or CLI flags.

Every key is one field of :class:`RunConfig`, declared with :func:`setting`: its
type (the annotation), default, bound (``ge``/``le``/``gt``/``choices``) and
help, once. From that one declaration come the TOML reader
(:func:`make_config`), the ``offload-run`` flags (``offload.device.cli``) and
the table in docs/device.md (:func:`docs_table`; a test holds the doc to it).

Every key can be set in a TOML file (``offload-run --config FILE``) under its
own name (dashes, e.g. ``slot-ms = 200``; underscores are accepted too) and as
the CLI flag ``--<key>``; a flag overrides the file, the file overrides the
default. Unknown keys and invalid values are refused at start with a
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Optional

__all__ = ["ConfigError", "RunConfig", "Key", "KEYS", "setting", "key_name", "load_toml",
           "make_config", "SOURCE_KEYS", "read_key", "docs_table", "update_docs_table"]


class ConfigError(ValueError):
    """A configuration key with a value the loop cannot use; the message names the key."""


def setting(default, help, *, ge=None, le=None, gt=None, choices=None, check=None):
    """Declare one configuration key (a :class:`RunConfig` field); units go in ``help``.

    ``ge``/``le`` bound an integer (inclusive), ``gt`` a number (exclusive,
    finite), ``choices`` a string (case-insensitive, stored lower-case);
    ``check(value)`` may refuse a parsed value with a ``ValueError`` (its
    message follows the key's name).
    """
    return field(default=default, metadata={"help": help, "ge": ge, "le": le, "gt": gt,
                                            "choices": choices, "check": check})


def _check_server(url):
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"must be an https://HOST[:PORT] or http://HOST[:PORT] URL, got {url!r}")
    try:
        u.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return url


def _check_model_name(name):
    from offload.oip import check_model_name

    return check_model_name(name)


def _check_size(text):
    from offload.device.payload import CARD_SIZE, parse_size

    if str(text).strip().lower() == CARD_SIZE:
        return CARD_SIZE
    parse_size(text)
    return str(text).strip().lower()


def _check_device(spec):
    from offload.classifier import check_device_spec

    return check_device_spec(spec)


@dataclass
class RunConfig:
    """The validated configuration of one run; attribute names are the keys with ``_``.

    Build it with :func:`make_config` (which validates). Each field is one key,
    declared once with :func:`setting`.
    """

    camera: Optional[int] = setting(None, "OpenCV camera index to capture from (cv2.VideoCapture(N)).",
                                ge=0)
    video: Optional[str] = setting(None, "Video file to replay; timestamps come from the file, not "
                                     "the wall clock.")
    images: Optional[str] = setting(None, "Folder of images (sorted by name), one frame each.")
    picamera: Optional[int] = setting(None, "Raspberry Pi camera number (Picamera2), where picamera2 "
                                        "is installed.", ge=0)
    fps: Optional[float] = setting(None, "Frame rate of an --images folder (frames/s); default: one "
                                     "frame per slot.", gt=0)
    labels: Optional[str] = setting(None, "CSV with columns 'frame' (0-based) and 'label' (true "
                                      "class), for the summary.")
    server: Optional[str] = setting(None, "Edge server base URL, e.g. https://10.0.0.2:8443 (plain "
                                      "http:// only on loopback or a trusted network); none: "
                                      "local-only, never offload.", check=_check_server)
    protocol: str = setting("v1", "Protocol to the server: v1 (the frame as an image to "
                            "/v1/classify, offload-serve) or v2 (Open Inference Protocol, KServe "
                            "v2: the strong model's input tensor to /v2/models/NAME/infer; "
                            "Triton, KServe, MLServer, offload-serve).", choices=("v1", "v2"))
    server_model: Optional[str] = setting(None, "v2: the model's name on the server "
                                          "(/v2/models/NAME); offload-serve's is its model file's "
                                          "stem, e.g. strong.", check=_check_model_name)
    server_card: Optional[str] = setting(None, "Model card (TOML) of the server's model. v2: how "
                                         "a frame becomes its input tensor (size, colour order, "
                                         "mean/std, resize; docs/classifiers.md); none: the card "
                                         "defaults, resolved against its metadata. v1: the size "
                                         "for send-size card.")
    v2_binary: str = setting("auto", "v2: binary tensor extension: auto (binary until the server "
                             "refuses it, then JSON), on, off (JSON).",
                             choices=("auto", "on", "off"))
    ca_file: Optional[str] = setting(None, "PEM file of the CA certificate(s) an https:// server's "
                                     "certificate must chain to; none: the system store.")
    client_cert: Optional[str] = setting(None, "PEM file of this device's TLS client certificate "
                                         "(and its key, unless client-key), for a server that "
                                         "requires one.")
    client_key: Optional[str] = setting(None, "PEM file of the private key of client-cert.")
    key: Optional[str] = setting(None, "API key sent as 'Authorization: Bearer KEY' (prefer "
                                   "key-file).")
    key_file: Optional[str] = setting(None, "File holding the API key (first line, surrounding "
                                        "whitespace ignored).")
    policy: Optional[str] = setting(None, "Policy blob (.bin, kind dqn or thresholds); default: the "
                                      "committed policy.bin.")
    model: Optional[str] = setting(None, "Weak classifier .tflite; default: the committed "
                                     "weak_int8.tflite.")
    accelerator: str = setting("auto", "auto (Edge TPU when its delegate loads, else CPU with one "
                                   "warning), edgetpu, cpu.", choices=("auto", "edgetpu", "cpu"))
    device: Optional[str] = setting(None, "Edge TPU device for the delegate: usb, usb:N, pci, pci:N "
                                      "(default: first found).", check=_check_device)
    slot_ms: float = setting(200.0, "Length of one time slot (ms); 200 = the paper's 5 images/s.",
                         gt=0)
    queue_size: int = setting(8, "Frames waiting to be sent at most; a full queue leaves the weak "
                             "answer standing.", ge=1)
    connect_timeout: float = setting(1.0, "Seconds to open a connection to the server.", gt=0)
    read_timeout: float = setting(2.0, "Seconds to wait for the server's answer to one frame.", gt=0)
    inference_timeout: float = setting(2.0, "Seconds one weak inference may take before the watchdog "
                                        "reloads the model.", gt=0)
    drain_timeout: float = setting(5.0, "Seconds to wait for in-flight frames at the end or on "
                                    "SIGINT/SIGTERM.", gt=0)
    log: Optional[str] = setting(None, "JSON-lines frame log (one record per frame); none: no log.")
    log_max_bytes: int = setting(0, "Rotate the log when it would grow past this many bytes; 0: "
                                "never.", ge=0)
    log_backups: int = setting(3, "Rotated logs kept (LOG.1 .. LOG.N, newest first).", ge=1)
    image_format: str = setting("auto", "Encoding of offloaded frames: png (lossless), jpeg, or "
                                "auto (jpeg for a camera or picamera, png for a video or images "
                                "folder).", choices=("auto", "png", "jpeg"))
    jpeg_quality: int = setting(90, "JPEG quality 1..100 when frames are sent as jpeg.", ge=1, le=100)
    send_size: Optional[str] = setting(None, "Shrink offloaded frames to fit inside WIDTHxHEIGHT "
                                       "pixels (aspect ratio kept, never enlarged), e.g. 236x236, "
                                       "or card: the input size server-card declares (covered, "
                                       "not fitted, when its resize is crop); none: send them "
                                       "whole.", check=_check_size)
    top_k: int = setting(3, "Classes kept per answer in the log.", ge=1)
    max_frames: Optional[int] = setting(None, "Stop after this many frames; none: until the source "
                                          "ends.", ge=1)
    realtime: bool = setting(False, "Pace a file source (video, images) at its frame rate; false: as "
                                "fast as possible.")
    threads: Optional[int] = setting(None, "CPU threads for LiteRT (default: LiteRT's choice).", ge=1)
    summary_json: Optional[str] = setting(None, "Also write the end-of-run summary as JSON to this "
                                            "file.")

    @property
    def source(self):
        """``(kind, value)`` of the one frame source, or ``(None, None)``."""
        for k in SOURCE_KEYS:
            v = getattr(self, k)
            if v is not None:
                return k, v
        return None, None


SOURCE_KEYS = ("camera", "video", "images", "picamera")

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "true/false"}


@dataclass(frozen=True)
class Key:
    """One configuration key as declared on :class:`RunConfig` (``name`` with dashes)."""

    name: str
    attr: str
    type: type
    optional: bool
    default: object
    help: str
    ge: object = None
    le: object = None
    gt: object = None
    choices: tuple = None
    check: object = None

    def parse(self, value):
        """``value`` (from TOML, a flag or Python) checked and converted; ``ConfigError`` if bad."""
        if value is None and self.optional:
            return None
        v = _PARSERS[self.type](self, value)
        if self.check is not None:
            try:
                v = self.check(v)
            except ValueError as e:
                raise ConfigError(f"{self.name}: {e}") from None
        return v

    @property
    def bound(self):
        """The allowed values as text (docs): ``>= 1``, ``1..100``, ``> 0``, ``png, jpeg``."""
        if self.choices:
            return ", ".join(self.choices)
        if self.ge is not None and self.le is not None:
            return f"{self.ge}..{self.le}"
        if self.ge is not None:
            return f">= {self.ge}"
        if self.gt is not None:
            return f"> {self.gt:g}"
        return ""

    @property
    def default_text(self):
        """The default as the CLI help and the docs show it (``None``: no default)."""
        if self.default is None:
            return None
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


def _parse_int(k, v):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        else:
            raise ConfigError(f"{k.name}: must be an integer, got {v!r}")
    if k.ge is not None and v < k.ge:
        raise ConfigError(f"{k.name}: must be >= {k.ge}, got {v}")
    if k.le is not None and v > k.le:
        raise ConfigError(f"{k.name}: must be in {k.ge}..{k.le}, got {v}")
    return v


def _parse_float(k, v):
    if isinstance(v, bool):
        raise ConfigError(f"{k.name}: must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{k.name}: must be a number, got {v!r}") from None
    if not math.isfinite(x) or (k.gt is not None and x <= k.gt):
        raise ConfigError(f"{k.name}: must be a finite number > {k.gt:g}, got {v!r}")
    return x


def _parse_str(k, v):
    if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
        raise ConfigError(f"{k.name}: must be a non-empty string, got {v!r}")
    v = os.fspath(v)
    if k.choices is not None:
        if v.lower() not in k.choices:
            raise ConfigError(f"{k.name}: must be one of {', '.join(k.choices)}, got {v!r}")
        return v.lower()
    return v


def _parse_bool(k, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.lower() in ("true", "yes", "1")
    raise ConfigError(f"{k.name}: must be true or false, got {v!r}")


_PARSERS = {int: _parse_int, float: _parse_float, str: _parse_str, bool: _parse_bool}


def _declared_keys():
    hints = typing.get_type_hints(RunConfig)
    out = []
    for f in fields(RunConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        kind = args[0] if args else hints[f.name]
        out.append(Key(name=f.name.replace("_", "-"), attr=f.name, type=kind,
                       optional=bool(args), default=f.default, **f.metadata))
    return tuple(out)


#: Every key, in declaration order (``Key`` objects, built from ``RunConfig``'s fields).
KEYS = _declared_keys()
_BY_NAME = {k.name: k for k in KEYS}


def key_name(raw):
    """The declared name of a key written with dashes or underscores; None when unknown."""
    name = str(raw).replace("_", "-")
    return name if name in _BY_NAME else None


def docs_table():
    """The Markdown table of every key (docs/device.md, Configuration), from the declaration."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for k in KEYS:
        d = k.default_text
        d = "—" if d is None else (f"`{d}`" if k.type is str else d)
        kind = "choice" if k.choices else _TYPE_NAMES[k.type]
        allowed = f"`{k.bound}`" if k.bound else ""
        lines.append(f"| `{k.name}` | {kind} | {d} | {allowed} | {k.help} |")
    return "\n".join(lines) + "\n"


#: The lines around the generated table in docs/device.md.
DOCS_BEGIN = "<!-- begin config table: generated by offload.device.config.docs_table() -->\n"
DOCS_END = "<!-- end config table -->\n"


def update_docs_table(path):
    """Rewrite the generated table between ``DOCS_BEGIN`` and ``DOCS_END`` in ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + DOCS_BEGIN + docs_table() + DOCS_END + tail)


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
        sources, both ``key`` and ``key-file``, ``protocol = "v2"`` with a
        server but no ``server-model`` (or one without v2); the message names the key.
    """
    merged = {k.name: k.default for k in KEYS}
    for origin, table in (("config file", file_values or {}), ("option", overrides or {})):
        for raw_key, value in table.items():
            name = key_name(raw_key)
            if name is None:
                raise ConfigError(f"{raw_key}: unknown {origin} key (known: {', '.join(merged)})")
            if isinstance(value, dict):
                raise ConfigError(f"{raw_key}: expected a value, got a table")
            if value is not None or origin == "config file":
                merged[name] = value
    v = {k.name: k.parse(merged[k.name]) for k in KEYS}
    given = [k for k in SOURCE_KEYS if v[k] is not None]
    if len(given) > 1:
        raise ConfigError(f"{given[1]}: only one frame source at a time (also given: {given[0]})")
    if v["key"] is not None and v["key-file"] is not None:
        raise ConfigError("key: give key or key-file, not both")
    tls_given = [k for k in ("ca-file", "client-cert", "client-key") if v[k] is not None]
    if tls_given and not (v["server"] or "").lower().startswith("https://"):
        raise ConfigError(f"{tls_given[0]}: only applies to an https:// server")
    if v["client-key"] is not None and v["client-cert"] is None:
        raise ConfigError("client-key: needs client-cert")
    if v["protocol"] == "v2" and v["server"] and v["server-model"] is None:
        raise ConfigError("server-model: --protocol v2 needs the model's name on the server "
                          "(--server-model NAME)")
    if v["protocol"] != "v2" and v["server-model"] is not None:
        raise ConfigError("server-model: only applies to --protocol v2")
    if v["protocol"] != "v2" and v["server-card"] is not None and v["send-size"] != "card":
        raise ConfigError("server-card: only applies to --protocol v2, or to --send-size card")
    if v["send-size"] == "card" and v["server-card"] is None:
        raise ConfigError("send-size: card needs --server-card FILE (the server model's card)")
    if v["protocol"] == "v2" and v["send-size"] is not None:
        raise ConfigError("send-size: only applies to --protocol v1 (v2 sends the model's input "
                          "tensor, whose size the model's metadata gives)")
    if v["fps"] is not None and v["images"] is None:
        raise ConfigError("fps: only applies to an images folder")
    return RunConfig(**{_BY_NAME[name].attr: x for name, x in v.items()})


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
