"""The wire format between a device and the edge server: one image in, top-k classes out.

The only module the device (``offload/device/``) and the server
(``offload/server/``) share besides the core. Plain HTTP/1.1:

``POST /v1/classify``
    Body: one encoded image, ``Content-Type: image/jpeg`` or ``image/png``.
    Headers: ``Authorization: Bearer <key>``; optional ``X-Frame-Id`` (echoed).
    200 answer (JSON)::

        {"top": [{"class": 3, "name": "Dress", "score": 0.91}, ...],   # best first
         "inference_ms": 1.8,      # the strong model's time for this request's batch
         "batch_size": 4,          # how many requests shared that model call
         "frame_id": "17"}         # when the request carried X-Frame-Id

    An error answers ``{"error": "<what is wrong>"}`` with 400 (undecodable
    or truncated image), 401 (no or wrong key), 413 (body over the limit),
    415 (other content type), 429 (the key's bucket is empty; ``Retry-After``
    in seconds), 503 (server overloaded or shutting down).
``GET /healthz``
    ``{"status": "ok", "model": ...}``.
``GET /metrics``
    Prometheus text format.

Scores are softmax probabilities of the strong model. The device needs
no more than the top-1 class; top-k is for logs and people.

Answer limits (one declaration each, below): at most :data:`MAX_TOP_ITEMS`
classes in ``top``, names of at most :data:`MAX_NAME_CHARS` characters, a
``frame_id`` of at most :data:`MAX_FRAME_ID_CHARS`. From them follows
:data:`LARGEST_ANSWER_BYTES` (every field at its limit, every character
escaped) and the device's read cap :data:`MAX_ANSWER_BYTES`, twice that.
``answer_body`` keeps within them; ``parse_answer`` refuses a body over the
cap, nested deeper than :data:`MAX_ANSWER_DEPTH` or with more than
:data:`MAX_ANSWER_VALUES` values *before* handing it to ``json.loads``, so no
answer can exhaust the device's stack or memory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CLASSIFY_PATH",
    "HEALTH_PATH",
    "METRICS_PATH",
    "CONTENT_TYPES",
    "MAX_BODY_BYTES",
    "MAX_TOP_ITEMS",
    "MAX_NAME_CHARS",
    "MAX_FRAME_ID_CHARS",
    "LARGEST_ANSWER_BYTES",
    "MAX_ANSWER_BYTES",
    "MAX_ANSWER_DEPTH",
    "MAX_ANSWER_VALUES",
    "FRAME_ID_HEADER",
    "WireError",
    "Answer",
    "encode_image",
    "decode_image",
    "content_type_ok",
    "answer_body",
    "error_body",
    "refused_by",
    "check_answer_shape",
    "check_json_shape",
    "load_json",
    "parse_answer",
]

CLASSIFY_PATH = "/v1/classify"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
FRAME_ID_HEADER = "X-Frame-Id"
#: Accepted request content types, by the format name ``encode_image`` takes.
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
#: Default largest request body (bytes). A camera frame as JPEG is far below this.
MAX_BODY_BYTES = 4 * 1024 * 1024

#: Classes in an answer's ``top`` at most (the device needs one; the rest is for logs).
MAX_TOP_ITEMS = 100
#: Characters of one class name at most (longer names are cut by ``answer_body``).
MAX_NAME_CHARS = 64
#: Characters of an echoed ``X-Frame-Id`` at most (the server refuses a longer header).
MAX_FRAME_ID_CHARS = 128
# Bytes of JSON numbers at their longest: a class index (int64), a score or a time
# as Python's repr of a float ("-1.2345678901234567e-308").
_NUMBER_BYTES = 24
# One character as JSON at its longest: a character outside the BMP is a
# surrogate pair, two 6-byte "\uXXXX" escapes.
_CHAR_BYTES = 12
#: The largest 200 answer ``answer_body`` can produce (bytes): every field at its limit.
LARGEST_ANSWER_BYTES = (
    len('{"top":[],"inference_ms":,"batch_size":,"frame_id":""}') + 2 * _NUMBER_BYTES
    + _CHAR_BYTES * MAX_FRAME_ID_CHARS
    + MAX_TOP_ITEMS * (len('{"class":,"score":,"name":""},') + 2 * _NUMBER_BYTES
                       + _CHAR_BYTES * MAX_NAME_CHARS))
#: The device reads at most this many bytes of an answer (any status): twice the largest.
MAX_ANSWER_BYTES = 2 * LARGEST_ANSWER_BYTES
#: Nesting of an answer's JSON at most: answer object, ``top`` list, item object (3), with room.
MAX_ANSWER_DEPTH = 8
#: JSON values (separated by ``,``) an answer may hold at most: 4 per item, with room.
MAX_ANSWER_VALUES = 2 * (4 * MAX_TOP_ITEMS + 8)
#: Digits of one JSON number at most (a longer one is no class, score or time).
_MAX_NUMBER_CHARS = 40

# The scan before parsing: structural bytes outside strings, and the rest of a
# string after its opening quote. Both are linear (no nested repetition, and a
# failed string match is the end of the scan).
_JSON_TOKEN = re.compile(rb'[\[\]{}",]')
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


class WireError(ValueError):
    """A request or an answer that does not follow the wire format; the message says how."""


def encode_image(image, fmt="png", *, quality=90):
    """Encode a ``uint8`` image (``HxW`` grey or ``HxWx3`` BGR) for the request body.

    Parameters
    ----------
    fmt : ``"png"`` (lossless, the default: what the device saw is what the
        server sees) or ``"jpeg"`` (smaller for camera frames).
    quality : JPEG quality, 1..100.

    Returns
    -------
    (bytes, content_type)
    """
    import cv2

    if fmt not in CONTENT_TYPES:
        raise WireError(f"image format must be one of {sorted(CONTENT_TYPES)}, got {fmt!r}")
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
        raise WireError(f"encode_image needs a uint8 HxW or HxWx3 image, got {a.dtype} {a.shape}")
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)] if fmt == "jpeg" else []
    ok, buf = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), a, params)
    if not ok:  # pragma: no cover - OpenCV always has both codecs
        raise WireError(f"OpenCV could not encode a {a.shape} image as {fmt}")
    return buf.tobytes(), CONTENT_TYPES[fmt]


def _media_type(content_type):
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_image(body, content_type):
    """Decode a request body to a ``uint8`` image (``HxW`` grey or ``HxWx3`` BGR).

    Raises
    ------
    WireError
        ``content_type`` is not one of :data:`CONTENT_TYPES` (the server
        answers 415: check with ``content_type_ok`` first), the bytes are not
        that format, are cut short (a JPEG without its end marker, a PNG
        without its ``IEND`` chunk) or do not decode.
    """
    import cv2

    media = _media_type(content_type)
    data = bytes(body)
    if not data:
        raise WireError("empty body: expected one JPEG or PNG image")
    if media == "image/jpeg":
        if not data.startswith(_JPEG_SOI):
            raise WireError("body is not a JPEG image (no start-of-image marker)")
        # OpenCV decodes a truncated JPEG into a grey-filled image without
        # complaint, so a missing end marker is checked here.
        if not data.rstrip(b"\x00").endswith(_JPEG_EOI):
            raise WireError("truncated JPEG: no end-of-image marker")
    elif media == "image/png":
        if not data.startswith(_PNG_SIGNATURE):
            raise WireError("body is not a PNG image (bad signature)")
        if not data.endswith(_PNG_IEND):
            raise WireError("truncated PNG: no IEND chunk")
    else:
        raise WireError(f"content type must be one of {sorted(CONTENT_TYPES.values())}, got {media or 'none'!r}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise WireError(f"the {media} body does not decode")
    if image.dtype != np.uint8:
        raise WireError(f"only 8-bit images are accepted, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def content_type_ok(content_type):
    """True when ``content_type`` is an accepted image type (parameters ignored)."""
    return _media_type(content_type) in CONTENT_TYPES.values()



@dataclass
class Answer:
    """The server's answer for one image.

    Attributes
    ----------
    classes : list of int, best first
    scores : list of float, the strong model's probabilities, same order
    names : list of str or None
    inference_ms : float, strong-model time of the batch this image was in
    batch_size : int
    frame_id : str or None
    """

    classes: list
    scores: list
    names: list = field(default_factory=list)
    inference_ms: float = 0.0
    batch_size: int = 1
    frame_id: str | None = None

    @property
    def top1(self):
        """The best class."""
        return self.classes[0]


def answer_body(classes, scores, *, names=None, inference_ms, batch_size, frame_id=None):
    """The JSON body (``bytes``) of a 200 answer; ``classes``/``scores`` best first.

    Kept within the answer limits: the first :data:`MAX_TOP_ITEMS` classes,
    names cut to :data:`MAX_NAME_CHARS` characters, ``frame_id`` to
    :data:`MAX_FRAME_ID_CHARS`.
    """
    top = []
    for i, (c, s) in enumerate(zip(classes[:MAX_TOP_ITEMS], scores)):
        item = {"class": int(c), "score": round(float(s), 6)}
        if names is not None:
            item["name"] = str(names[i])[:MAX_NAME_CHARS]
        top.append(item)
    obj = {"top": top, "inference_ms": round(float(inference_ms), 3), "batch_size": int(batch_size)}
    if frame_id is not None:
        obj["frame_id"] = str(frame_id)[:MAX_FRAME_ID_CHARS]
    return json.dumps(obj, separators=(",", ":")).encode()


def error_body(message, *, refused_by=None, bucket=None):
    """The JSON body (``bytes``) of an error answer.

    A 429 also says which bucket refused the request: ``refused_by`` is
    ``"key"`` (the key's own bucket) or ``"switch"`` (the shared bucket named
    ``bucket`` that several keys send through).
    """
    obj = {"error": str(message)}
    if refused_by is not None:
        obj["refused_by"] = str(refused_by)
        if bucket is not None:
            obj["bucket"] = str(bucket)
    return json.dumps(obj, separators=(",", ":")).encode()


def refused_by(body):
    """``"key"``, ``"switch"``, ... from an error answer's body (``bytes``), or ``None``.

    Never raises: a body that is not the server's JSON says nothing.
    """
    if not isinstance(body, (bytes, bytearray)) or len(body) > MAX_ANSWER_BYTES:
        return None
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    who = obj.get("refused_by") if isinstance(obj, dict) else None
    return who if isinstance(who, str) else None


def check_answer_shape(body):
    """Refuse, before any parsing, an answer too large, nested too deep or with too many values.

    :func:`check_json_shape` with the answer bounds: at most
    :data:`MAX_ANSWER_BYTES` bytes, :data:`MAX_ANSWER_DEPTH` levels of
    ``[``/``{`` and :data:`MAX_ANSWER_VALUES` values. ``json.loads`` then
    cannot recurse deeper than that nor build more than that many objects.

    Raises
    ------
    WireError
        Saying which bound the body breaks (or that a string never ends).
    """
    check_json_shape(body, max_bytes=MAX_ANSWER_BYTES, max_depth=MAX_ANSWER_DEPTH,
                     max_values=MAX_ANSWER_VALUES)


def check_json_shape(body, *, max_bytes, max_depth, max_values, what="answer"):
    """A linear scan of JSON bytes (strings skipped) against three bounds, before any parsing.

    At most ``max_bytes`` bytes, ``max_depth`` levels of ``[``/``{`` and
    ``max_values`` values (separated by ``,``); ``what`` names the body in the
    message (``"answer"``, ``"request"``). Also used for the Open Inference
    Protocol bodies (``offload.oip``).

    Raises
    ------
    WireError
        Saying which bound the body breaks (or that a string never ends).
    """
    data = bytes(body)
    if len(data) > max_bytes:
        raise WireError(f"{what} of {len(data)} bytes is over the limit of {max_bytes}")
    max_tokens = 8 * max_values  # a value is a key, a string, a bracket pair and a comma
    depth = values = tokens = 0
    pos = 0
    while True:
        m = _JSON_TOKEN.search(data, pos)
        if m is None:
            return
        tokens += 1
        if tokens > max_tokens:
            raise WireError(f"{what} has more than {max_tokens} JSON tokens")
        c, pos = data[m.start()], m.end()
        if c == 0x22:  # '"': skip to the end of the string
            end = _STRING_REST.match(data, pos)
            if end is None:
                raise WireError(f"{what} is not JSON: a string never ends")
            pos = end.end()
        elif c in b"[{":
            depth += 1
            if depth > max_depth:
                raise WireError(f"{what} is nested deeper than {max_depth} levels")
        elif c in b"]}":
            depth -= 1
        else:
            values += 1
            if values >= max_values:
                raise WireError(f"{what} has more than {max_values} JSON values")


def load_json(body, *, max_bytes, max_depth, max_values, what="answer"):
    """``json.loads`` of a body after :func:`check_json_shape`: no NaN/Infinity, no huge numbers.

    Raises
    ------
    WireError
        Over a bound, not UTF-8, not JSON, or a number longer than 40 characters.
    """
    check_json_shape(body, max_bytes=max_bytes, max_depth=max_depth, max_values=max_values,
                     what=what)
    try:
        return json.loads(bytes(body).decode("utf-8"), **_JSON_HOOKS)
    except (UnicodeDecodeError, ValueError) as exc:  # WireError is a ValueError: it passes as is
        if isinstance(exc, WireError):
            raise
        raise WireError(f"{what} is not JSON: {exc}") from None


def _number(kind, convert):
    def parse(text):
        if len(text) > _MAX_NUMBER_CHARS:
            raise WireError(f"a JSON {kind} of {len(text)} characters")
        return convert(text)
    return parse


def _no_constant(name):
    raise WireError(f"JSON with {name}, which JSON does not allow")


_JSON_HOOKS = {"parse_int": _number("number", int), "parse_float": _number("number", float),
               "parse_constant": _no_constant}


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_answer(body, n_classes=None):
    """Check and read a 200 answer's body.

    The bounds of :func:`check_answer_shape` are checked first, on the bytes.

    Parameters
    ----------
    n_classes : int, optional
        When given, every class must be in ``0..n_classes-1``.

    Raises
    ------
    WireError
        Over a bound, not JSON, not the documented shape, empty ``top`` or
        more than :data:`MAX_TOP_ITEMS`, a class out of range, a score that is
        not a probability, a name or ``frame_id`` that is not a string within
        its limit, a time that is not finite.
    """
    obj = load_json(body, max_bytes=MAX_ANSWER_BYTES, max_depth=MAX_ANSWER_DEPTH,
                    max_values=MAX_ANSWER_VALUES)
    if not isinstance(obj, dict) or not isinstance(obj.get("top"), list) or not obj["top"]:
        raise WireError("answer has no non-empty 'top' list")
    if len(obj["top"]) > MAX_TOP_ITEMS:
        raise WireError(f"answer has {len(obj['top'])} classes, more than {MAX_TOP_ITEMS}")
    classes, scores, names = [], [], []
    for item in obj["top"]:
        if not isinstance(item, dict):
            raise WireError("answer 'top' items must be objects")
        c, s, name = item.get("class"), item.get("score"), item.get("name", "")
        if not isinstance(c, int) or isinstance(c, bool) or c < 0 or (n_classes is not None and c >= n_classes):
            raise WireError(f"answer class {c!r} is not a class index"
                            + (f" in 0..{n_classes - 1}" if n_classes else ""))
        if not _finite(s) or not (0.0 <= s <= 1.0):
            raise WireError(f"answer score {s!r} is not a probability")
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise WireError(f"answer name must be a string of at most {MAX_NAME_CHARS} characters")
        classes.append(c)
        scores.append(float(s))
        names.append(name)
    ms, batch = obj.get("inference_ms", 0.0), obj.get("batch_size", 1)
    if not _finite(ms) or ms < 0.0:
        raise WireError(f"answer inference_ms {ms!r} is not a time")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise WireError(f"answer batch_size {batch!r} is not a positive integer")
    fid = obj.get("frame_id")
    if fid is not None and (not isinstance(fid, str) or len(fid) > MAX_FRAME_ID_CHARS):
        raise WireError(f"answer frame_id must be a string of at most {MAX_FRAME_ID_CHARS} characters")
    return Answer(classes, scores, names, float(ms), batch, fid)
