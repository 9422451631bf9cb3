"""Request bodies to images, with the picture size checked before anything is decoded.

A few kilobytes of PNG can inflate to gigabytes of pixels, so the server
reads the size from the image's own header (a PNG's ``IHDR`` chunk, a JPEG's
start-of-frame marker) and refuses pictures over ``max_pixels`` before
OpenCV allocates anything; then :func:`offload.wire.decode_image` decodes
(and rejects truncated or garbled bodies with :class:`offload.wire.WireError`).
"""

from __future__ import annotations

import struct

from offload.wire import WireError, decode_image

__all__ = ["image_size", "decode_body", "DEFAULT_MAX_PIXELS"]

#: Largest picture accepted by default, pixels (2048 x 2048; camera frames are far smaller).
DEFAULT_MAX_PIXELS = 2048 * 2048

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(data):
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise WireError("PNG without an IHDR header chunk")
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _jpeg_size(data):
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise WireError("JPEG header is garbled (expected a marker)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            raise WireError("JPEG header is garbled (bad segment length)")
        if marker in _SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return int(w), int(h)
        i += 2 + length
    raise WireError("JPEG without a frame header (no start-of-frame marker before the data)")


def image_size(data, media_type):
    """``(width, height)`` in pixels read from a PNG or JPEG header, without decoding.

    Raises :class:`WireError` when the header is missing or garbled.
    """
    data = bytes(data[:65536]) if media_type == "image/jpeg" else bytes(data[:32])
    if media_type == "image/png":
        if not data.startswith(_PNG_SIGNATURE):
            raise WireError("body is not a PNG image (bad signature)")
        return _png_size(data)
    if media_type == "image/jpeg":
        if not data.startswith(b"\xff\xd8"):
            raise WireError("body is not a JPEG image (no start-of-image marker)")
        return _jpeg_size(data)
    raise WireError(f"content type {media_type!r} is not an image type")


def decode_body(body, content_type, *, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode a request body to a uint8 image after checking its size.

    Raises
    ------
    WireError
        Garbled header, a picture of 0 or more than ``max_pixels`` pixels,
        or anything :func:`offload.wire.decode_image` refuses.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not body:
        raise WireError("empty body: expected one JPEG or PNG image")
    w, h = image_size(body, media)
    if w < 1 or h < 1:
        raise WireError(f"image header says {w}x{h} pixels")
    if w * h > max_pixels:
        raise WireError(f"image of {w}x{h} pixels is over the server's limit of {max_pixels} pixels")
    return decode_image(body, content_type)
