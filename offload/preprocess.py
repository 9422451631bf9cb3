"""The one preprocessing: an image and a model card in, the model's input tensor out.

The device (weak classifier), the server (strong model) and profiling all
call :func:`to_input`, so they cannot drift apart. Torch-free; OpenCV is
imported on first use.

Images: a NumPy array ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` (colour in
``input_order``, BGR(A) as OpenCV reads it by default); ``uint8`` pixels
(0..255) or floats in ``[0, 1]`` (``pixel / 255``).

The steps, for a card :func:`offload.card.resolve` has completed:

1. channels: colour to grey by OpenCV's weights (before resizing), grey
   replicated to 3 channels (after), colour reordered to ``card.order``;
2. geometry, per ``card.resize``: ``stretch`` to ``height x width``;
   ``crop``, the centred largest window of the model's aspect ratio (its
   side ``floor(H * width / height + 0.5)`` or ``floor(W * height / width +
   0.5)``, at least 1, offset ``(excess) // 2``), then resize; ``letterbox``, resize to fit
   inside (scale ``min(height / H, width / W)``, sides rounded half up), centred
   (offsets ``(gap) // 2``) on a ``card.pad`` background. ``cv2.INTER_AREA``
   when neither side grows, ``cv2.INTER_LINEAR`` otherwise;
3. normalisation: ``(pixel - mean) / std`` in pixel units; or, for
   ``"tensor"``, the raw pixels (uint8 ``q = pixel``, int8 ``q = pixel - 128``);
4. quantisation for an integer tensor: ``q = floor(round(x / scale, 3) + 0.5)
   + zero_point``, clipped to the type. Half-way cases round up after
   snapping to 1/1000 of a step, so float noise between equivalent inputs
   (uint8 vs float, grey vs grey-in-BGR) cannot flip them.

When the image needs resizing or a channel change, it first becomes float32
``pixel / 255`` and every step runs in float: no rounding to uint8 between
steps. A uint8 image already of the model's size and channels (alpha dropped
and colour reordered if need be, both exact) is normalised from its exact
pixel values. With the default card these are exactly the
tensors of ``offload.classifier`` and ``offload.server.model`` before the
card existed (the committed profile's).
"""

from __future__ import annotations

import numpy as np

from offload.card import CardError, ModelCard

__all__ = ["ImageError", "to_unit_float", "fit_pixels", "normalize", "quantize", "to_input",
           "ORDERS"]

ORDERS = ("bgr", "rgb")
_ONE_255TH = np.float32(1.0 / 255.0)


class ImageError(ValueError):
    """An image that cannot be turned into a model input (type, shape or values)."""


def to_unit_float(image):
    """Pixels as float32 in ``[0, 1]``: ``uint8 * float32(1/255)``, floats checked and kept.

    Raises ImageError for other dtypes, non-finite floats or floats outside ``[0, 1]``.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float32) * _ONE_255TH
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
        if a.size and (not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0):
            raise ImageError("float images must hold finite values in [0, 1]")
        return a
    raise ImageError(f"images must be uint8 (0..255) or float in [0, 1], got dtype {a.dtype}")


def _check_image(image):
    """``image`` as ``HxW`` (grey) or ``HxWx3`` (colour, alpha dropped), uint8 or float32 [0, 1]."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = to_unit_float(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"an image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {np.shape(image)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"empty image, shape {np.shape(image)}")
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    return a


def _need_resolved(card):
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be a ModelCard, got {type(card).__name__}")
    if not card.resolved:
        raise CardError(f"the card ({card.source}) leaves the input size open; resolve it against "
                        "the model's input tensor first (offload.card.resolve)")


def _check_order(input_order):
    if input_order not in ORDERS:
        raise ValueError(f"input_order must be 'bgr' or 'rgb', got {input_order!r}")


def _half_up(v):
    return int(np.floor(v + 0.5))


def _resize(x, height, width):
    import cv2

    if x.shape[:2] == (height, width):
        return x
    shrink = height <= x.shape[0] and width <= x.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(x), (int(width), int(height)), interpolation=interp)


def _geometry(x, card):
    h, w = card.height, card.width
    H, W = x.shape[:2]
    if card.resize == "crop":
        if W * h > H * w:    # too wide: keep the full height
            cw = min(W, max(1, _half_up(H * w / h)))
            x0 = (W - cw) // 2
            x = x[:, x0:x0 + cw]
        elif W * h < H * w:  # too tall: keep the full width
            ch = min(H, max(1, _half_up(W * h / w)))
            y0 = (H - ch) // 2
            x = x[y0:y0 + ch]
        return _resize(x, h, w)
    if card.resize == "letterbox":
        s = min(h / H, w / W)
        nh, nw = min(h, max(1, _half_up(H * s))), min(w, max(1, _half_up(W * s)))
        inner = _resize(x, nh, nw)
        pad = card.pad if x.dtype == np.uint8 else np.float32(card.pad) * _ONE_255TH
        out = np.full((h, w) + x.shape[2:], pad, dtype=x.dtype)
        top, left = (h - nh) // 2, (w - nw) // 2
        out[top:top + nh, left:left + nw] = inner
        return out
    return _resize(x, h, w)


def fit_pixels(image, card, *, input_order="bgr"):
    """Geometry and channels only: ``image`` as ``card.height x card.width x card.channels``.

    Parameters
    ----------
    image : ndarray
        ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4``; uint8 or float in [0, 1].
    card : ModelCard
        A resolved card (height, width and channels known).
    input_order : "bgr" or "rgb"
        The colour order of ``image`` (OpenCV's is BGR).

    Returns
    -------
    ndarray ``(card.height, card.width, card.channels)``: uint8 when the
    image is uint8 (each OpenCV step rounds to uint8: the frame to send, say),
    else float32 in [0, 1]. Colour is in ``card.order``.
    """
    import cv2

    _need_resolved(card)
    _check_order(input_order)
    x = _check_image(image)
    if x.ndim == 3:
        if card.channels == 1:
            code = cv2.COLOR_BGR2GRAY if input_order == "bgr" else cv2.COLOR_RGB2GRAY
            x = cv2.cvtColor(np.ascontiguousarray(x), code)
        elif input_order != card.order:
            x = x[:, :, ::-1]
    x = _geometry(x, card)
    if x.ndim == 2:
        x = x[:, :, None]
        if card.channels == 3:
            x = np.repeat(x, 3, axis=2)
    if x.dtype != np.uint8:
        x = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(x)


def _per_channel(values, channels):
    v = np.asarray(values, dtype=np.float32)
    return v if v.size == 1 else v.reshape(1, 1, channels)


def normalize(pixels, card):
    """``(pixel - mean) / std`` per channel, float32 ``HxWxC``.

    ``pixels`` as :func:`fit_pixels` returns them: uint8 (0..255) or float
    in ``[0, 1]`` (pixel / 255; then computed as ``(p - mean / 255) / (std /
    255)``, which with the default card is ``p`` itself, bit for bit).
    """
    p = np.asarray(pixels)
    if card.mean is None or card.std is None:
        raise CardError(f"the card ({card.source}) has no mean/std (resolve a 'tensor' card first)")
    c = p.shape[2] if p.ndim == 3 else 1
    mean, std = _per_channel(card.mean, c), _per_channel(card.std, c)
    if p.dtype == np.uint8:
        return ((p.astype(np.float32) - mean) / std).astype(np.float32, copy=False)
    p = p.astype(np.float32, copy=False)
    return ((p - mean * _ONE_255TH) / (std * _ONE_255TH)).astype(np.float32, copy=False)


def quantize(x, *, dtype, scale, zero_point):
    """Real values to an integer tensor: ``clip(floor(round(x / scale, 3) + 0.5) + zero_point)``."""
    info = np.iinfo(dtype)
    v = np.asarray(x, dtype=np.float64) / float(scale)
    q = np.floor(np.round(v, 3) + 0.5) + int(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def _raw_pixels(pixels, dtype):
    """``"tensor"`` normalisation: uint8 q = pixel, int8 q = pixel - 128 (pixels rounded half up)."""
    p = np.asarray(pixels)
    v = p.astype(np.float64) if p.dtype == np.uint8 else np.asarray(p, np.float64) * 255.0
    q = np.clip(np.floor(np.round(v, 3) + 0.5), 0, 255)
    return (q - (128 if np.dtype(dtype) == np.int8 else 0)).astype(dtype)


def _exact_pixels(image, card, input_order):
    """A uint8 image of the model's size as ``HxWxC`` pixels when only exact steps are needed
    (dropping alpha, reordering colour), else None."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or a.shape[:2] != (card.height, card.width):
        return None
    c = 1 if a.ndim == 2 else a.shape[2]
    if c == 1 and card.channels == 1:
        return a.reshape(card.height, card.width, 1)
    if c in (3, 4) and card.channels == 3:
        a = a[:, :, :3]
        return a if input_order == card.order else a[:, :, ::-1]
    return None


def to_input(image, card, *, dtype=np.float32, scale=0.0, zero_point=0, layout="NHWC",
             input_order="bgr"):
    """The model's input tensor for one image, with a leading batch axis of 1.

    Parameters
    ----------
    image : ndarray
        See :func:`fit_pixels`.
    card : ModelCard
        Resolved against the model (:func:`offload.card.resolve`).
    dtype : numpy dtype
        The input tensor's: float32 (normalised values), or uint8/int8
        (quantised with ``scale`` and ``zero_point``).
    layout : "NHWC" or "NCHW"
    input_order : "bgr" or "rgb", the colour order of ``image``.

    Returns
    -------
    ndarray ``(1, H, W, C)`` or ``(1, C, H, W)`` of ``dtype``.
    """
    _need_resolved(card)
    _check_order(input_order)
    dtype = np.dtype(dtype)
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be NHWC or NCHW, got {layout!r}")
    pixels = _exact_pixels(image, card, input_order)
    if pixels is None:
        pixels = fit_pixels(to_unit_float(_check_image(image)), card, input_order=input_order)
    integer = np.issubdtype(dtype, np.integer)
    if card.normalization == "tensor":
        if not integer:
            raise CardError(f"the card ({card.source}) says normalization 'tensor', which needs an "
                            f"integer input tensor, not {dtype}")
        x = _raw_pixels(pixels, dtype)
    else:
        x = normalize(pixels, card)
        if integer:
            if not scale > 0:
                raise CardError(f"an integer ({dtype}) input tensor needs its quantisation scale")
            x = quantize(x, dtype=dtype, scale=scale, zero_point=zero_point)
        else:
            x = x.astype(dtype, copy=False)
    if layout == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x[None])
