"""The device's Open Inference Protocol (KServe v2) client: the sender's protocol for any v2 server.

``offload-run --server URL --protocol v2 --server-model NAME`` makes the
sender (``offload.device.sender``) use :class:`V2Protocol`: each offloaded
frame becomes the strong model's input tensor (:func:`default_plan`, the one
place it is made) and is POSTed to ``URL/v2/models/NAME/infer``
(``offload.oip`` bodies) by the same thread, over the same connection, under
the same rules (timeouts, ``Retry-After``, TLS, no redirects, bounded reads,
thread restart) as a ``/v1/classify`` image.

At start (``start``, before the sender's thread runs) and, until it has
succeeded, before each frame (``prepare``):

1. ``GET /v2/health/ready`` must answer 200;
2. ``GET /v2/models/NAME`` gives the metadata; the model card
   (``server-card``, else the defaults) is resolved against its one input,
   the tensor the device will send must fit that input (shape, ``-1``
   matching any size, and datatype), and the output's class count must be
   the weak model's.

At start a server that does not answer (or is not ready) is a warning: frames
are tried when it comes; one that has no model ``NAME``, whose model does not
fit, or whose metadata contradicts the card is a ``ConfigError`` naming both,
and the run does not start.

The answer's output tensor (the metadata's first output, or the one answered)
is one row of class scores; :func:`offload.oip.to_distribution` keeps it if it
is already a distribution and softmaxes it otherwise (logits). Its classes,
best first, become the same ``wire.Answer`` a ``/v1/classify`` answer gives;
``parameters.inference_ms`` and ``batch_size`` are read when the server sends
them (offload-serve does), else 0 and 1.

Binary tensors (``v2-binary``): ``on`` always, ``off`` never (JSON), ``auto``
(default) sends binary and asks for binary outputs until a binary request has
been answered 200; a 400, 415 or 422 to a binary request before then is taken
for a server without the extension: one warning, JSON from then on, and that
frame is sent once more as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from offload import oip, wire
from offload.card import CardError
from offload.device.config import ConfigError
from offload.device.record import Outcome
from offload.device.sender import Failed

__all__ = ["V2Protocol", "TensorPlan", "default_plan", "BINARY_MODES", "FALLBACK_STATUSES"]

#: Values of the ``v2-binary`` key.
BINARY_MODES = ("auto", "on", "off")
#: Answers to a binary request that ``auto`` takes for "no binary extension here".
FALLBACK_STATUSES = (400, 415, 422)


@dataclass(frozen=True)
class TensorPlan:
    """What the device sends for one frame: ``make(image)`` gives an ndarray of ``shape``/``datatype``."""

    shape: tuple
    datatype: str
    make: Callable


def default_plan(spec, *, card=None):
    """The tensor for a model input ``spec`` (an ``oip.TensorSpec``): its model card applied to the frame.

    The one place the v2 client turns a frame into the model's input:
    :func:`offload.preprocess.to_input` (the server's and profiling's
    preprocessing too) with the model card ``card`` (a TOML card file, a
    dict of fields or a ``ModelCard``: the ``server-card`` key; None: the
    card defaults, ``pixels / 255`` as the committed pair was trained)
    resolved against the metadata's shape (NCHW unless the channel axis is
    plainly last; ``-1`` sizes must then be declared by the card).

    Raises
    ------
    OIPError
        The input is not a 4-D FP32 image tensor.
    CardError
        The card cannot be read, or contradicts the metadata (naming both).
    """
    from offload import preprocess
    from offload.card import read_card, resolve, tensor_layout

    if spec.datatype != "FP32" or len(spec.shape) != 4:
        raise oip.OIPError(f"the device sends FP32 image tensors [1, C, H, W] or [1, H, W, C]; "
                           f"the model's input is {spec}")
    where = f"v2 model input {spec}"
    shape = [None if s < 0 else int(s) for s in spec.shape]  # -1: dynamic
    layout = tensor_layout(shape, prefer="NCHW")
    resolved = resolve(read_card(where, override=card), shape=shape, dtype=np.float32,
                       layout=layout, path=where)
    h, w, c = resolved.height, resolved.width, resolved.channels
    item = (c, h, w) if layout == "NCHW" else (h, w, c)

    def make(image):
        return preprocess.to_input(image, resolved, layout=layout)

    return TensorPlan((1, *item), "FP32", make)


class V2Protocol:
    """The sender's protocol (``offload.device.sender.ImageProtocol`` says what that is) for a v2 server.

    Parameters
    ----------
    base : str
        The server URL's path prefix ('' for ``http://host:port``).
    model : str
        The model's name on the server (``server-model``).
    binary : ``"auto"``, ``"on"`` or ``"off"``
        Binary tensors (module docstring).
    n_classes : int, optional
        The weak model's class count: the output must have as many.
    card : str, dict or ModelCard, optional
        The server model's card for :func:`default_plan` (``server-card``).
    plan_for : callable (oip.TensorSpec) -> TensorPlan
        How frames become the input tensor (default: :func:`default_plan`
        with ``card``).
    warn : callable (str) -> None
        Messages for people.
    """

    max_answer_bytes = oip.MAX_ANSWER_BYTES

    def __init__(self, base, *, model, binary="auto", n_classes=None, card=None, plan_for=None,
                 warn=print):
        if binary not in BINARY_MODES:
            raise ConfigError(f"v2-binary: must be one of {', '.join(BINARY_MODES)}, got {binary!r}")
        self.base, self.model = base, oip.check_model_name(model)
        self.mode, self.binary = binary, binary != "off"
        self.n_classes, self.warn = n_classes, warn
        self.plan_for = plan_for or (lambda spec: default_plan(spec, card=card))
        self.metadata = self.plan = self.input = self.output = None
        self._binary_ok = False   # a binary request has been answered 200
        self._told = set()

    @classmethod
    def factory(cls, **kwargs):
        """What ``Sender(protocol=...)`` takes: ``base -> V2Protocol(base, **kwargs)``."""
        return lambda base: cls(base, **kwargs)

    # ------------------------------------------------------------------ before frames

    def start(self, exchange):
        try:
            self._fetch(exchange)
        except Failed as e:
            if e.http_status == 404:
                raise ConfigError(f"server-model: {e.error} (is it a v2 server with a model "
                                  f"{self.model!r}?)") from None
            if e.outcome is Outcome.TLS_ERROR:
                raise  # the sender says it, as for v1
            self.warn(f"warning: v2 server not ready at start ({e.error}); frames are tried "
                      "when it is")
        except CardError as e:
            raise ConfigError(f"server-card: {e}") from None
        except oip.OIPError as e:
            raise ConfigError(f"server-model: {e}") from None

    def prepare(self, exchange):
        if self.plan is not None:
            return
        try:
            self._fetch(exchange)
        except (oip.OIPError, CardError) as e:
            self._tell("metadata", f"error: {e}; frames keep their weak answers")
            raise Failed(Outcome.BAD_ANSWER, str(e)) from None

    def _get(self, exchange, path):
        resp, _ = exchange("GET", path, max_body=oip.MAX_METADATA_BYTES)
        if resp.status != 200:
            text = resp.body[:200].decode("utf-8", "replace")
            outcome = Outcome.REDIRECT if 300 <= resp.status < 400 else Outcome.HTTP
            raise Failed(outcome, f"GET {path} answered {resp.status}: {text}",
                         http_status=resp.status)
        return resp

    def _fetch(self, exchange):
        """Ready check and metadata: sets ``plan``, ``input``, ``output``; raises Failed or OIPError."""
        self._get(exchange, self.base + oip.ready_path())
        resp = self._get(exchange, self.base + oip.model_path(self.model))
        meta = oip.parse_metadata(resp.body, model=self.model)
        if len(meta.inputs) != 1:
            raise oip.OIPError(f"model {self.model!r} takes {len(meta.inputs)} inputs "
                               f"({', '.join(map(str, meta.inputs))}); the device sends one image")
        spec, output = meta.inputs[0], meta.outputs[0]
        plan = self.plan_for(spec)
        oip.check_fits(spec, plan.shape, plan.datatype, model=self.model)
        k = output.shape[-1] if output.shape else -1
        if self.n_classes is not None and k not in (-1, self.n_classes):
            raise oip.OIPError(f"model {self.model!r} output {output} has {k} classes; the "
                               f"device's weak model has {self.n_classes}")
        self.metadata, self.input, self.output, self.plan = meta, spec, output, plan

    def _tell(self, kind, msg):
        if kind not in self._told:
            self._told.add(kind)
            self.warn(msg)

    # ------------------------------------------------------------------ one frame

    def encode(self, fid, image):
        x = self.plan.make(image)
        if tuple(x.shape) != tuple(self.plan.shape) or oip.datatype_of(x.dtype) != self.plan.datatype:
            raise oip.OIPError(f"the frame became {oip.datatype_of(x.dtype)} {list(x.shape)}, not "
                               f"{self.plan.datatype} {list(self.plan.shape)}")
        body, headers = oip.encode_infer([(self.input.name, x)], binary=self.binary,
                                         request_id=str(fid),
                                         binary_output=True if self.binary else None)
        return self.base + oip.infer_path(self.model), body, headers

    def fall_back(self, resp):
        if self.mode != "auto" or not self.binary or self._binary_ok \
                or resp.status not in FALLBACK_STATUSES:
            return False
        self.binary = False
        text = resp.body[:200].decode("utf-8", "replace")
        self.warn(f"warning: the v2 server refused a binary tensor ({resp.status}: {text}); "
                  "sending JSON from now on (v2-binary = off says so at start)")
        return True

    def parse(self, resp):
        ans = oip.decode_infer(resp.body, resp.header(oip.HEADER_LENGTH), kind="answer",
                               max_elements=oip.MAX_OUTPUT_ELEMENTS,
                               max_bytes=oip.MAX_ANSWER_BYTES)
        if self.binary:
            self._binary_ok = True
        by_name = {t.name: t for t in ans.tensors}
        t = by_name.get(self.output.name) or (ans.tensors[0] if len(ans.tensors) == 1 else None)
        if t is None:
            raise oip.OIPError(f"answer has no output {self.output.name!r} (got "
                               f"{', '.join(by_name)})")
        if t.data.ndim not in (1, 2) or (t.data.ndim == 2 and t.data.shape[0] != 1):
            raise oip.OIPError(f"output {t.name!r} has shape {list(t.data.shape)}, not [1, classes]")
        if self.n_classes is not None and t.data.shape[-1] != self.n_classes:
            raise oip.OIPError(f"output {t.name!r} has {t.data.shape[-1]} classes, the weak "
                               f"model {self.n_classes}")
        if t.data.dtype.kind != "f":
            raise oip.OIPError(f"output {t.name!r} is {t.datatype}, not scores (FP16/FP32/FP64)")
        p = oip.to_distribution(t.data)
        order = np.lexsort((np.arange(p.size), -p))[:wire.MAX_TOP_ITEMS]
        ms, batch = ans.parameters.get("inference_ms"), ans.parameters.get("batch_size")
        ms = float(ms) if isinstance(ms, (int, float)) and not isinstance(ms, bool) \
            and np.isfinite(ms) and ms >= 0 else 0.0
        batch = batch if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1 else 1
        return wire.Answer([int(c) for c in order], [float(p[c]) for c in order],
                           inference_ms=ms, batch_size=batch, frame_id=ans.id)
