"""The strong classifier on the edge server: an ONNX model run by ONNX Runtime (no torch).

The model is ``artifacts/strong.onnx`` by default (``offload-train onnx``
writes it from the trained network, see docs/classifiers.md): input
``image`` float32 ``(batch, 1, H, W)`` in [0, 1], output ``logits``
``(batch, n_classes)``; its ``metadata_props`` entry ``offload.json`` holds
the class names and input shape.

What the model expects is its model card (:mod:`offload.card`): the
``offload.card`` entry of its ``metadata_props`` (read through ONNX Runtime's
``custom_metadata_map``; the class names of ``offload.json`` become the
labels), a ``<model>.card.toml`` beside it, an override (``offload-serve
--card FILE``), else the defaults, checked against the input tensor at
start. Images become the input through :func:`offload.preprocess.to_input`,
the device's and profiling's preprocessing too; with the default card that is
``pixels / 255`` for a grey uint8 image of the input size and, for any other,
the device's float resize (OpenCV area/linear, BGR -> grey by OpenCV's
weights), the convention training used.

ONNX Runtime runs on CUDA when ``CUDAExecutionProvider`` is available (the
``onnxruntime-gpu`` package and a GPU), else on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np

from offload import preprocess
from offload.card import ONNX_META_KEY, CardError, read_card, resolve, tensor_layout
from offload.preprocess import ImageError

__all__ = ["ModelError", "StrongModel", "softmax", "top_k", "default_providers", "META_NAME"]

#: ``metadata_props`` key of the model's JSON metadata (as in the TorchScript file).
META_NAME = ONNX_META_KEY


class ModelError(ValueError):
    """A model file the server cannot use, or an image it cannot prepare."""


def default_providers(available=None):
    """ONNX Runtime providers to ask for: CUDA first when present, always the CPU last."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + [
        "CPUExecutionProvider"]


def softmax(logits):
    """Row-wise softmax of ``(n, k)`` logits, float64 inside, float32 out."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probs, k):
    """``(classes, scores)`` of the ``k`` most likely classes of one row, best first.

    Ties go to the lower class index (as ``argmax``), so top-1 is ``argmax``.
    """
    p = np.asarray(probs)
    k = max(1, min(int(k), p.shape[0]))
    order = np.lexsort((np.arange(p.shape[0]), -p))[:k]
    return [int(c) for c in order], [float(p[c]) for c in order]


def _ort_message(exc):
    """ONNX Runtime's message without its ``[ONNXRuntimeError] : 7 : CODE :`` wrapping."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    m = re.match(r"\[ONNXRuntimeError\] : \d+ : (\w+) : (.*)", text)
    if m:
        code, text = m.groups()
        text = re.sub(r"^Load model from .* failed:", "", text).strip()
        return f"{code}: {text}"
    return text


class StrongModel:
    """An ONNX classifier session with the server's preprocessing.

    Parameters
    ----------
    path : str or os.PathLike
        ``.onnx`` file: one float32 NCHW image input with a free batch axis,
        one ``(batch, n_classes)`` output.
    providers : list of str, optional
        ONNX Runtime execution providers (default :func:`default_providers`).
    threads : int, optional
        Intra-op CPU threads (default: ONNX Runtime's choice, all cores).
    spin : bool
        Let ONNX Runtime's idle CPU threads spin-wait for the next call
        (False by default: on a small edge box they would take the cores the
        event loop and the image decoding need).
    card : ModelCard, str, os.PathLike or dict, optional
        A card used as it is, or a TOML file / dict of fields overriding what
        the model carries (:func:`offload.card.read_card`). ``card`` is then
        the card resolved against the input tensor.

    Raises
    ------
    ModelError
        Missing file, not an ONNX model, not a one-image-in,
        one-vector-out classifier, or a card that is wrong or contradicts the
        input tensor (the message names both).
    """

    def __init__(self, path, *, providers=None, threads=None, spin=False, card=None):
        import onnxruntime as ort

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelError(f"model file {self.path} not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: the server logs its own choices
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts,
                                                providers=providers or default_providers())
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelError(f"{self.path} is not a usable ONNX model ({_ort_message(exc)})") from None
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelError(f"{self.path}: expected 1 input and 1 output, "
                             f"got {len(ins)} and {len(outs)}")
        self.input_name, self.output_name = ins[0].name, outs[0].name
        shape = list(ins[0].shape)
        if ins[0].type != "tensor(float)" or len(shape) != 4:
            raise ModelError(f"{self.path}: input must be float32 (batch, C, H, W) or "
                             f"(batch, H, W, C), got {ins[0].type} {shape}")
        meta_map = self.session.get_modelmeta().custom_metadata_map or {}
        try:
            self.meta = json.loads(meta_map.get(META_NAME, "{}"))
        except json.JSONDecodeError:
            self.meta = {}
        try:
            # ONNX models are NCHW unless the channel axis is plainly last.
            self.layout = tensor_layout(shape, prefer="NCHW")
            read = read_card(self.path, override=card, metadata=meta_map)
            provisional = resolve(read, shape=shape, dtype=np.float32, layout=self.layout,
                                  path=self.path)
        except CardError as exc:
            raise ModelError(str(exc)) from None
        self.height, self.width, self.channels = (provisional.height, provisional.width,
                                                  provisional.channels)
        # Learn the class count (and check a batch really passes) with one zero image.
        try:
            out = self._run(np.zeros((1, *self.item_shape), np.float32))
        except Exception as exc:  # noqa: BLE001 - any ORT failure means an unusable model
            raise ModelError(f"{self.path}: a test image does not run ({_ort_message(exc)})") from None
        if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 2:
            raise ModelError(f"{self.path}: output must be (batch, n_classes), got {out.shape}")
        self.n_classes = int(out.shape[1])
        try:
            self.card = resolve(read, shape=shape, dtype=np.float32, layout=self.layout,
                                n_classes=self.n_classes, path=self.path)
        except CardError as exc:
            raise ModelError(str(exc)) from None
        self.class_names = None if self.card.labels is None else list(self.card.labels)
        self.providers = self.session.get_providers()

    @property
    def item_shape(self):
        """One image's input tensor shape without the batch axis: ``(C, H, W)`` or ``(H, W, C)``."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @property
    def name(self):
        """The model file's name (for ``/healthz`` and logs)."""
        return os.path.basename(self.path)

    def prepare(self, image):
        """One decoded image (``HxW`` grey or ``HxWx3`` BGR, uint8) -> float32 :attr:`item_shape`.

        :func:`offload.preprocess.to_input` with the model's card (the
        device's and profiling's preprocessing).
        """
        try:
            return preprocess.to_input(image, self.card, layout=self.layout)[0]
        except (ImageError, CardError) as exc:
            raise ModelError(str(exc)) from None

    def _run(self, batch):
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def run(self, batch):
        """Logits for a float32 batch ``(n, C, H, W)``: ``(logits (n, n_classes), seconds)``."""
        t = time.perf_counter()
        out = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        return out, time.perf_counter() - t

    def classify(self, images):
        """Softmax probabilities ``(n, n_classes)`` for decoded images (one model call)."""
        batch = np.stack([self.prepare(im) for im in images])
        return softmax(self.run(batch)[0])
