"""The strong classifier on the edge server: an ONNX model run by ONNX Runtime (no torch).

The model is ``artifacts/strong.onnx`` by default (``offload-train onnx``
writes it from the trained network, see docs/classifiers.md): input
``image`` float32 ``(batch, 1, H, W)`` in [0, 1], output ``logits``
``(batch, n_classes)``; its ``metadata_props`` entry ``offload.json`` holds
the class names and input shape.

Preprocessing is the one training used (``training.train.images_to_tensor``):
a greyscale ``uint8`` image already ``H x W`` becomes ``pixels / 255``; any
other image (another size, colour, float) goes through
:func:`offload.classifier.prepare_image` (OpenCV area/linear resize, BGR ->
grey by OpenCV's weights), the device's own convention.

ONNX Runtime runs on CUDA when ``CUDAExecutionProvider`` is available (the
``onnxruntime-gpu`` package and a GPU), else on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np

from offload.classifier import ClassifierError, prepare_image

__all__ = ["ModelError", "StrongModel", "softmax", "top_k", "default_providers", "META_NAME"]

#: ``metadata_props`` key of the model's JSON metadata (as in the TorchScript file).
META_NAME = "offload.json"


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

    Raises
    ------
    ModelError
        Missing file, not an ONNX model, or not a one-image-in,
        one-vector-out classifier.
    """

    def __init__(self, path, *, providers=None, threads=None, spin=False):
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
        if ins[0].type != "tensor(float)" or len(shape) != 4 or shape[1] not in (1, 3) \
                or not all(isinstance(s, int) for s in shape[1:]):
            raise ModelError(f"{self.path}: input must be float32 (batch, C, H, W), got "
                             f"{ins[0].type} {shape}")
        self.channels, self.height, self.width = (int(s) for s in shape[1:])
        meta_map = self.session.get_modelmeta().custom_metadata_map or {}
        try:
            self.meta = json.loads(meta_map.get(META_NAME, "{}"))
        except json.JSONDecodeError:
            self.meta = {}
        # Learn the class count (and check a batch really passes) with one zero image.
        try:
            out = self._run(np.zeros((1, self.channels, self.height, self.width), np.float32))
        except Exception as exc:  # noqa: BLE001 - any ORT failure means an unusable model
            raise ModelError(f"{self.path}: a test image does not run ({_ort_message(exc)})") from None
        if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 2:
            raise ModelError(f"{self.path}: output must be (batch, n_classes), got {out.shape}")
        self.n_classes = int(out.shape[1])
        names = self.meta.get("class_names")
        self.class_names = ([str(c) for c in names]
                            if isinstance(names, list) and len(names) == self.n_classes else None)
        self.providers = self.session.get_providers()

    @property
    def name(self):
        """The model file's name (for ``/healthz`` and logs)."""
        return os.path.basename(self.path)

    def prepare(self, image):
        """One decoded image (``HxW`` grey or ``HxWx3`` BGR, uint8) -> float32 ``(C, H, W)``.

        Training's rule: an ``H x W`` grey uint8 image is divided by 255 (no
        resize); everything else goes through ``prepare_image``.
        """
        a = np.asarray(image)
        if (self.channels == 1 and a.dtype == np.uint8 and a.ndim == 2
                and a.shape == (self.height, self.width)):
            return (a.astype(np.float32) / 255.0)[None]
        try:
            x = prepare_image(a, self.height, self.width, self.channels)
        except ClassifierError as exc:
            raise ModelError(str(exc)) from None
        return np.ascontiguousarray(np.transpose(x, (2, 0, 1)))

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
