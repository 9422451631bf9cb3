"""The device-side weak classifier: an int8 ``.tflite`` model run by LiteRT.

Torch-free. The model is loaded with ``ai_edge_litert.interpreter.Interpreter``;
the Coral Edge TPU is reached through LiteRT's
``load_delegate("libedgetpu.so.1")`` (never the unrelated PyPI "pycoral").

What the model expects is its model card (:mod:`offload.card`): read from the
file's TFLite metadata, a ``<model>.card.toml`` beside it, or the defaults,
and checked against the input tensor at start. Images become the input
tensor only through :func:`offload.preprocess.to_input`, the one
preprocessing module that the server and profiling use too. With the default
card (no metadata, no card file): the image in ``[0, 1]``, in the model's
channel count (greyscale by OpenCV's BGR->grey weights, or grey replicated),
resized to the input size (``cv2.INTER_AREA`` when shrinking,
``cv2.INTER_LINEAR`` when enlarging), quantised with the input tensor's scale
and zero point. :func:`prepare_image` remains for training code, which needs
the same pixels without a model file.

The output is the model's int8 logits and their dequantised values
``(q - zero_point) * scale``, which is what the profile stores and what the
entropy/metric is computed from.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import numpy as np

from offload import preprocess
from offload.card import CardError, ModelCard, read_card, resolve, tensor_layout

__all__ = [
    "ClassifierError",
    "EdgeTPUUnavailable",
    "WeakClassifier",
    "WeakOutput",
    "prepare_image",
    "to_unit_float",
    "EDGETPU_LIBRARY",
    "EDGETPU_CUSTOM_OP",
    "is_edgetpu_model",
    "cpu_model_for",
    "check_device_spec",
]

log = logging.getLogger(__name__)

#: Shared library of the Coral Edge TPU runtime, loaded as a LiteRT delegate.
EDGETPU_LIBRARY = "libedgetpu.so.1"
#: Name of the custom op ``edgetpu_compiler`` puts in a compiled model; only the
#: Edge TPU delegate can run it.
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
#: Forms of the Edge TPU delegate's ``device`` option (libedgetpu): the first
#: device of a kind, or the N-th one.
_DEVICE_KINDS = ("usb", "pci")


def is_edgetpu_model(model_path):
    """True when the ``.tflite`` file was compiled by ``edgetpu_compiler`` (holds its custom op).

    The op's name is stored as plain bytes in the flatbuffer, so a byte search
    is exact enough and needs no interpreter (which would fail on the op).
    """
    with open(os.fspath(model_path), "rb") as f:
        return EDGETPU_CUSTOM_OP.encode() in f.read()


def cpu_model_for(model_path):
    """The CPU twin of an Edge-TPU-compiled model's path: ``x_edgetpu.tflite`` -> ``x.tflite``.

    ``edgetpu_compiler`` names its output ``<input>_edgetpu.tflite``; returns
    ``None`` when the name does not follow that pattern.
    """
    path = os.fspath(model_path)
    head, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    if not stem.endswith("_edgetpu"):
        return None
    return os.path.join(head, stem[: -len("_edgetpu")] + ext)


def check_device_spec(device):
    """Validate an Edge TPU device spec: ``None``, ``usb``, ``usb:N``, ``pci`` or ``pci:N``."""
    if device is None:
        return None
    spec = str(device).strip().lower()
    kind, _, index = spec.partition(":")
    if kind not in _DEVICE_KINDS or (index and not index.isdigit()) or spec.endswith(":"):
        raise ValueError(f"Edge TPU device {device!r} must be 'usb', 'usb:N', 'pci' or 'pci:N'")
    return spec


class ClassifierError(ValueError):
    """A model file or an input image the weak classifier cannot use."""


class EdgeTPUUnavailable(RuntimeError):
    """``edgetpu=True`` was asked for but the Edge TPU delegate could not be loaded."""


# --------------------------------------------------------------------------- images


def to_unit_float(image):
    """Pixels as float32 in ``[0, 1]``: ``uint8 / 255``, floats checked and kept.

    A thin wrapper of :func:`offload.preprocess.to_unit_float` (the one
    preprocessing module) that raises :class:`ClassifierError`.
    """
    try:
        return preprocess.to_unit_float(image)
    except preprocess.ImageError as exc:
        raise ClassifierError(str(exc)) from None


def prepare_image(image, height, width, channels=1, *, bgr=True):
    """An image as the default card's float input: ``height x width x channels`` in ``[0, 1]``.

    A thin wrapper of :func:`offload.preprocess.fit_pixels` with a card of
    that size and the default conventions (BGR order kept inside), for
    training code that needs the device's pixels without a model file.

    Parameters
    ----------
    image : ndarray
        ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4``; uint8 or float in [0, 1].
    height, width : int
        Model input size in pixels.
    channels : int
        1 (greyscale) or 3.
    bgr : bool
        Colour images are in OpenCV's BGR(A) order (True) or RGB(A) (False).

    Returns
    -------
    ndarray of float32, shape ``(height, width, channels)``
    """
    if channels not in (1, 3):
        raise ClassifierError(f"models with {channels} input channels are not supported")
    try:
        card = ModelCard(height=height, width=width, channels=channels)
        return preprocess.fit_pixels(preprocess.to_unit_float(image), card,
                                     input_order="bgr" if bgr else "rgb")
    except (preprocess.ImageError, CardError) as exc:
        raise ClassifierError(str(exc)) from None


# --------------------------------------------------------------------------- classifier


@dataclass
class WeakOutput:
    """One weak-classifier answer.

    Attributes
    ----------
    q : ndarray of int8 (or the model's output dtype), shape (n_classes,)
        Raw quantised logits.
    logits : ndarray of float32, shape (n_classes,)
        Dequantised logits ``(q - zero_point) * scale``.
    """

    q: np.ndarray
    logits: np.ndarray

    @property
    def top1(self):
        """Index of the most likely class (first on ties)."""
        return int(np.argmax(self.logits))


def _tensor_qparams(detail):
    scale, zp = detail.get("quantization", (0.0, 0))
    return float(scale), int(zp)


class WeakClassifier:
    """The weak classifier of the device: a LiteRT model, on the Edge TPU when present.

    Parameters
    ----------
    model_path : str or os.PathLike
        A ``.tflite`` file with one image input (``1xHxWxC`` NHWC, or
        ``1xCxHxW`` NCHW) and one ``1 x n_classes`` output; int8 tensors
        expected (uint8 and float32 also work).
    edgetpu : None, True or False
        ``None`` (auto): try the Edge TPU delegate, fall back to the CPU with
        a logged note. ``True``: the Edge TPU is required
        (:class:`EdgeTPUUnavailable` otherwise). ``False``: CPU only.
        Only a model compiled by ``edgetpu_compiler`` actually runs its ops on
        the Edge TPU; any other model runs on the CPU even with the delegate.
    num_threads : int, optional
        CPU threads for LiteRT.
    device : str, optional
        Which Edge TPU to use, passed as the delegate's ``device`` option:
        ``usb``, ``usb:N``, ``pci`` or ``pci:N`` (default: the first found).
    class_names : sequence of str, optional
        Names of the output classes, for display (default: the card's labels).
    bgr : bool
        Colour input images are BGR (OpenCV's order); False for RGB.
    card : ModelCard, str, os.PathLike or dict, optional
        The model card: a :class:`~offload.card.ModelCard` used as it is, or
        a TOML card file / dict of fields overriding what the model carries
        (:func:`offload.card.read_card`). Resolved against the input tensor
        at start; ``card`` is then the resolved card.

    Raises
    ------
    ClassifierError
        The file is missing, not a LiteRT model, or not a one-image-in,
        one-vector-out classifier, or its card is wrong or contradicts its
        input tensor (the message names both).
    EdgeTPUUnavailable
        ``edgetpu=True`` and ``libedgetpu.so.1`` could not be loaded, or the
        model is Edge-TPU-compiled and the delegate is not there (the message
        names the CPU model to use instead).
    """

    def __init__(self, model_path, edgetpu=None, *, num_threads=None, class_names=None, bgr=True,
                 device=None, card=None):
        self.model_path = os.fspath(model_path)
        self.bgr = bool(bgr)
        if edgetpu not in (None, True, False):
            raise ValueError(f"edgetpu must be None (auto), True or False, got {edgetpu!r}")
        if not os.path.isfile(self.model_path):
            raise ClassifierError(f"weak model not found: {self.model_path}")
        self.device = check_device_spec(device)
        try:
            from ai_edge_litert.interpreter import Interpreter, load_delegate
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ClassifierError(
                "the weak classifier needs ai-edge-litert (pip install 'offload[device]')"
            ) from exc

        delegates = []
        self.on_edgetpu = False
        if edgetpu is not False:
            try:
                # Probe with ctypes first: a failed load_delegate() leaves a
                # half-built Delegate whose __del__ prints a spurious traceback.
                ctypes.CDLL(EDGETPU_LIBRARY)
                options = {"device": self.device} if self.device else None
                delegates = [load_delegate(EDGETPU_LIBRARY, options)]
                self.on_edgetpu = True
            except (ValueError, OSError, RuntimeError) as exc:
                if edgetpu is True:
                    raise EdgeTPUUnavailable(
                        f"Edge TPU requested but its delegate {EDGETPU_LIBRARY} could not be "
                        f"loaded ({exc}); install libedgetpu1-std and plug in the Coral device, "
                        "or use edgetpu=None/False for the CPU"
                    ) from exc
                log.info("Edge TPU delegate unavailable (%s); running %s on the CPU",
                         exc, self.model_path)
        if not self.on_edgetpu and is_edgetpu_model(self.model_path):
            # Refuse here with a useful message rather than let the interpreter
            # fail on an unknown custom op.
            twin = cpu_model_for(self.model_path)
            use = (f"use its CPU model {twin}" if twin else
                   "use the uncompiled .tflite (the edgetpu_compiler input)")
            raise EdgeTPUUnavailable(
                f"{self.model_path} is compiled for the Edge TPU ({EDGETPU_CUSTOM_OP}) and needs "
                f"{EDGETPU_LIBRARY} and the device; {use} on the CPU")
        try:
            self._interp = Interpreter(
                model_path=self.model_path,
                experimental_delegates=delegates or None,
                num_threads=num_threads,
            )
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if "edgetpu-custom-op" in str(exc):
                twin = cpu_model_for(self.model_path)
                raise EdgeTPUUnavailable(
                    f"{self.model_path} is compiled for the Edge TPU ({EDGETPU_CUSTOM_OP}) and needs "
                    f"{EDGETPU_LIBRARY} and the device; use "
                    f"{twin or 'the uncompiled .tflite'} on the CPU"
                ) from exc
            raise ClassifierError(f"{self.model_path} is not a usable LiteRT model: {exc}") from exc

        self._read_tensors(class_names, card)

    def _read_tensors(self, class_names, card):
        """Check the model's input and output tensors and resolve its card against them."""
        ins, outs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ClassifierError(
                f"{self.model_path}: expected 1 input and 1 output, got {len(ins)} and {len(outs)}"
            )
        self._in, self._out = ins[0], outs[0]
        shape = [int(s) for s in self._in["shape"]]
        if len(shape) != 4 or shape[0] != 1:
            raise ClassifierError(f"{self.model_path}: input must be a 1-image 4-D tensor, got {shape}")
        oshape = [int(s) for s in self._out["shape"]]
        if len(oshape) != 2 or oshape[0] != 1 or oshape[1] < 2:
            raise ClassifierError(f"{self.model_path}: output must be 1 x n_classes, got {oshape}")
        self.n_classes = oshape[1]
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        self.input_scale, self.input_zero_point = _tensor_qparams(self._in)
        self.output_scale, self.output_zero_point = _tensor_qparams(self._out)
        if self.input_dtype != np.float32 and self.input_scale <= 0:
            raise ClassifierError(f"{self.model_path}: integer input without quantisation parameters")
        if self.output_dtype != np.float32 and self.output_scale <= 0:
            raise ClassifierError(f"{self.model_path}: integer output without quantisation parameters")
        if class_names is not None and len(class_names) != self.n_classes:
            raise ClassifierError(
                f"{len(class_names)} class names for a model with {self.n_classes} outputs"
            )
        try:
            self.layout = tensor_layout(shape)
            read = read_card(self.model_path, override=card)
            self.card = resolve(read, shape=shape, dtype=self.input_dtype, scale=self.input_scale,
                                zero_point=self.input_zero_point, layout=self.layout,
                                n_classes=self.n_classes, path=self.model_path)
        except CardError as exc:
            raise ClassifierError(str(exc)) from None
        self.height, self.width, self.channels = self.card.height, self.card.width, self.card.channels
        names = class_names if class_names is not None else self.card.labels
        self.class_names = None if names is None else [str(c) for c in names]

    # ------------------------------------------------------------------ details

    @property
    def input_shape(self):
        """Input tensor shape, e.g. ``(1, 14, 14, 1)``."""
        return tuple(int(s) for s in self._in["shape"])

    def ops(self):
        """Builtin op names of the model, in execution order, without runtime delegates.

        Read from a second interpreter with no default delegate, so that the
        list is the model's own (e.g. ``CONV_2D``), not ``DELEGATE`` nodes.
        """
        return model_ops(self.model_path)

    # ------------------------------------------------------------------ inference

    def quantize_input(self, image):
        """The input tensor for ``image``: :func:`offload.preprocess.to_input` with the model's card."""
        try:
            return preprocess.to_input(image, self.card, dtype=self.input_dtype,
                                       scale=self.input_scale, zero_point=self.input_zero_point,
                                       layout=self.layout, input_order="bgr" if self.bgr else "rgb")
        except (preprocess.ImageError, CardError) as exc:
            raise ClassifierError(str(exc)) from None

    def classify(self, image):
        """Run the model on one image; returns :class:`WeakOutput` (int8 and float logits)."""
        return self.run_quantized(self.quantize_input(image))

    __call__ = classify

    def run_quantized(self, tensor):
        """Run the model on an already-prepared input tensor (``quantize_input``'s output)."""
        self._interp.set_tensor(self._in["index"], tensor)
        self._interp.invoke()
        q = self._interp.get_tensor(self._out["index"])[0].copy()
        if self.output_dtype == np.float32:
            return WeakOutput(q, q.astype(np.float32))
        logits = (q.astype(np.float32) - np.float32(self.output_zero_point)) * np.float32(self.output_scale)
        return WeakOutput(q, logits)

    def classify_many(self, images, progress=False):
        """Classify a sequence of images one by one, as the device does.

        Returns ``(q, logits)``: int8 outputs and dequantised float32 logits,
        each ``(n, n_classes)``. ``progress=True`` shows a tqdm bar.
        """
        n = len(images)
        q = np.empty((n, self.n_classes), dtype=self.output_dtype)
        z = np.empty((n, self.n_classes), dtype=np.float32)
        it = range(n)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="weak int8 (LiteRT)", unit="img", mininterval=0.5)
        for i in it:
            out = self.classify(images[i])
            q[i], z[i] = out.q, out.logits
        return q, z


def model_ops(model_path):
    """Builtin op names of a ``.tflite`` file, in execution order (no runtime delegate)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        it = Interpreter(
            model_path=os.fspath(model_path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        it.allocate_tensors()
        return [d["op_name"] for d in it._get_ops_details() if d["op_name"] != "DELEGATE"]
    except (ValueError, RuntimeError) as exc:
        raise ClassifierError(f"{model_path} is not a usable LiteRT model: {exc}") from exc
