"""What the device puts on the link for one offloaded frame: a smaller picture, encoded.

A 1080p camera frame as PNG is megabytes; the paper sent 236x236 images
(1.34e6 bits raw RGB), so that ``r = 0.1`` at 5 images/s is 0.67 Mbit/s.
:class:`Payload` shrinks the frame to fit inside ``--send-size WxH`` (aspect
ratio kept, never enlarged: the server's own preprocessing then crops,
letterboxes or stretches it as its model card says) and encodes it:

- ``png``: lossless, what the device saw is what the server sees (the
  default for file sources, so replayed datasets reach the strong model
  unchanged);
- ``jpeg``: the default for camera sources (``--image-format auto``), with
  ``--jpeg-quality``.
"""

from __future__ import annotations

import re

import numpy as np

from offload import wire

__all__ = ["Payload", "parse_size", "shrink_to_fit", "shrink_to_cover", "resolve_format", "card_box",
           "CAMERA_SOURCES", "FORMATS", "CARD_SIZE"]

#: ``--image-format`` values: ``auto`` resolves by the source (:func:`resolve_format`).
FORMATS = ("auto", "png", "jpeg")
#: Sources whose frames are camera pictures (JPEG by default); the others replay files.
CAMERA_SOURCES = ("camera", "picamera")
#: Largest side accepted by ``--send-size``, pixels (the server's default cap is 2048x2048).
MAX_SIDE = 8192

#: ``--send-size`` value meaning "the input size the server model's card declares".
CARD_SIZE = "card"

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text):
    """``"WxH"`` -> ``(width, height)`` in pixels, each 1..MAX_SIDE.

    Raises ``ValueError`` naming the text otherwise.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"must be WIDTHxHEIGHT in pixels, e.g. 236x236, got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise ValueError(f"each side must be 1..{MAX_SIDE} pixels, got {w}x{h}")
    return w, h


def resolve_format(fmt, source_kind):
    """The encoding for ``--image-format fmt`` on a source of kind ``source_kind``.

    ``auto`` is ``jpeg`` for a camera (:data:`CAMERA_SOURCES`) and ``png``
    (lossless) for a replayed file or folder.
    """
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "jpeg" if source_kind in CAMERA_SOURCES else "png"


def shrink_to_fit(image, width, height):
    """``image`` scaled down to fit inside ``width x height`` pixels, aspect ratio kept.

    An image that already fits is returned unchanged (never enlarged: that
    would spend link bytes on no information). Sides are rounded to the
    nearest pixel, at least 1; OpenCV's area interpolation, which averages
    the pixels it drops instead of aliasing.
    """
    import cv2

    a = np.asarray(image)
    h0, w0 = a.shape[:2]
    if w0 <= width and h0 <= height:
        return a
    s = min(width / w0, height / h0)
    size = (max(1, min(width, round(w0 * s))), max(1, min(height, round(h0 * s))))
    return cv2.resize(np.ascontiguousarray(a), size, interpolation=cv2.INTER_AREA)


def card_box(card_path):
    """``((width, height), cover)`` for ``--send-size card`` from a TOML model card.

    ``cover`` is True when the card's resize is ``crop``: the frame is then
    shrunk only until it covers the box, so the server's centre crop keeps
    full resolution; for ``stretch`` and ``letterbox`` it is shrunk to fit.

    Raises ``ValueError`` naming the file when the card cannot be read or
    declares no height and width.
    """
    from offload.card import CardError, read_card

    try:
        card = read_card(card_path, override=card_path)
    except (CardError, OSError) as e:
        raise ValueError(f"cannot read the card {card_path}: {e}") from None
    if card.height is None or card.width is None:
        raise ValueError(f"{card_path} declares no height and width, which send-size card needs")
    return (int(card.width), int(card.height)), card.resize == "crop"


def shrink_to_cover(image, width, height):
    """``image`` scaled down until it just covers ``width x height`` pixels, aspect kept.

    Never enlarged; OpenCV's area interpolation, as :func:`shrink_to_fit`.
    """
    import cv2

    a = np.asarray(image)
    h0, w0 = a.shape[:2]
    s = max(width / w0, height / h0)
    if s >= 1.0:
        return a
    size = (max(width, round(w0 * s)), max(height, round(h0 * s)))
    return cv2.resize(np.ascontiguousarray(a), size, interpolation=cv2.INTER_AREA)


class Payload:
    """How one frame is turned into a request body.

    Parameters
    ----------
    fmt : ``"png"`` or ``"jpeg"`` (resolve ``auto`` first with :func:`resolve_format`).
    quality : int
        JPEG quality 1..100.
    size : (width, height) or None
        Shrink frames to fit inside this many pixels; None: send them whole.
    cover : bool
        Shrink only until the frame covers ``size`` (for a server that
        centre-crops, :func:`card_box`), instead of fitting inside it.
    """

    def __init__(self, *, fmt="png", quality=90, size=None, cover=False):
        if fmt not in wire.CONTENT_TYPES:
            raise ValueError(f"image format must be png or jpeg, got {fmt!r}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be 1..100, got {quality}")
        self.fmt, self.quality = fmt, int(quality)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.cover = bool(cover)

    def encode(self, image):
        """``(body bytes, content type)`` for one uint8 frame; :class:`wire.WireError` if unusable."""
        a = np.asarray(image)
        if self.size is not None and a.ndim in (2, 3) and a.size:
            a = (shrink_to_cover if self.cover else shrink_to_fit)(a, *self.size)
        return wire.encode_image(a, self.fmt, quality=self.quality)

    def __repr__(self):
        size = "whole" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        return f"Payload({self.fmt}, quality={self.quality}, size={size})"
