"""The model card: one declaration per model of what its input expects and what its outputs are.

A card says how an image becomes the model's input tensor and what the
output classes are called:

- ``height`` x ``width`` pixels and ``channels`` (1 or 3), by default the
  input tensor's own;
- ``order``: the colour order the model was trained on (``"rgb"`` or
  ``"bgr"``);
- the normalisation: ``"meanstd"``, model input ``(pixel - mean) / std`` with
  per-channel ``mean`` and ``std`` in pixel units (0..255; the default,
  mean 0 and std 255, gives ``[0, 1]``), or ``"tensor"``: an integer input
  tensor takes the raw pixels (uint8 ``q = pixel``, int8 ``q = pixel - 128``),
  as the Coral examples feed the zoo models, so the normalisation is the
  tensor's own quantisation;
- ``resize``: ``"stretch"`` (to the input size, aspect ratio not kept),
  ``"crop"`` (centre crop to the input's aspect ratio, then resize) or
  ``"letterbox"`` (fit inside, keep the aspect ratio, pad with ``pad``);
- ``labels``: the class names, one per output.

Where a card comes from (:func:`read_card`), highest precedence first: an
override (the ``--card FILE`` flag, or a dict), the model file's own metadata
(TFLite metadata: normalisation options, image colour space and the label
file packed in the model; ONNX ``metadata_props``: key ``offload.card``, a
JSON object of card fields, and the class names of ``offload.json``), a TOML
file beside the model named ``<model file>.card.toml``, and the defaults.
Each field is taken from the highest layer that declares it.

:func:`resolve` fills what a card leaves open from the input tensor and
refuses a card that contradicts it. Torch-free; no OpenCV, no ONNX, no LiteRT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass

import numpy as np

from offload import model_metadata

__all__ = [
    "CardError", "ModelCard", "Field", "FIELDS", "SIDECAR_SUFFIX", "ONNX_CARD_KEY",
    "ONNX_META_KEY", "read_card", "read_labels", "parse_labels", "card_from_fields",
    "resolve", "tensor_layout", "fields_table", "read_onnx_card",
]

#: A card beside the model is named after the model file plus this suffix.
SIDECAR_SUFFIX = ".card.toml"
#: ONNX ``metadata_props`` key holding a JSON object of card fields.
ONNX_CARD_KEY = "offload.card"
#: ONNX ``metadata_props`` key of the training export's metadata (its ``class_names``).
ONNX_META_KEY = "offload.json"
#: The largest input side a card may declare, in pixels.
MAX_SIDE = 16384
ORDERS = ("rgb", "bgr")
NORMALIZATIONS = ("meanstd", "tensor")
RESIZES = ("stretch", "crop", "letterbox")


class CardError(ValueError):
    """A card (file, metadata or fields) that is wrong or contradicts its model; names the file."""


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Field:
    """One card field, declared once: its TOML name, kind, default, bound and meaning."""

    name: str
    kind: str          # "side", "channels", "choice", "floats", "pad", "labels"
    default: object
    bound: str         # the allowed values, in words (for docs and messages)
    help: str
    choices: tuple = ()


FIELDS = (
    Field("height", "side", None, f"1..{MAX_SIDE}, or absent",
          "input height in pixels; absent: the input tensor's"),
    Field("width", "side", None, f"1..{MAX_SIDE}, or absent",
          "input width in pixels; absent: the input tensor's"),
    Field("channels", "channels", None, "1 or 3, or absent",
          "1 (greyscale) or 3 (colour); absent: the input tensor's"),
    Field("order", "choice", "bgr", " or ".join(ORDERS),
          "colour order the model expects (OpenCV's is bgr; most trained models' is rgb)", ORDERS),
    Field("mean", "floats", (0.0,), "one number or one per channel, finite",
          "subtracted from each pixel (0..255 units) before dividing by std"),
    Field("std", "floats", (255.0,), "one number or one per channel, > 0",
          "model input = (pixel - mean) / std; the defaults give [0, 1]"),
    Field("normalization", "choice", "meanstd", " or ".join(NORMALIZATIONS),
          "meanstd: use mean and std; tensor: an integer input tensor takes raw pixels "
          "(uint8 q = pixel, int8 q = pixel - 128), mean and std follow from its quantisation",
          NORMALIZATIONS),
    Field("resize", "choice", "stretch", ", ".join(RESIZES),
          "stretch to the input size; crop: centre crop to its aspect ratio, then resize; "
          "letterbox: fit inside keeping the aspect ratio, pad the rest", RESIZES),
    Field("pad", "pad", 0, "0..255", "pixel value of letterbox padding"),
    Field("labels", "labels", None, "as many distinct names as the model has classes",
          "class names in output order (a TOML list); or labels_file"),
)
_BY_NAME = {f.name: f for f in FIELDS}
#: Keys a TOML card or ``offload.card`` JSON may hold besides the fields.
LABELS_FILE = "labels_file"


def fields_table():
    """The card fields as Markdown table rows (name, default, allowed values, meaning), for docs."""
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for f in FIELDS:
        default = "from the tensor" if f.default is None and f.kind != "labels" else f.default
        if isinstance(default, tuple):
            default = list(default)
        rows.append(f"| `{f.name}` | {'none' if default is None else default} | {f.bound} | {f.help} |")
    rows.append(f"| `{LABELS_FILE}` | none | a path, relative to the card file | "
                "a label file (see below) instead of `labels` |")
    return "\n".join(rows)


def _is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check(field, value, origin):
    """``value`` of ``field`` in its canonical form; CardError naming ``origin`` when it is wrong."""
    f = _BY_NAME[field]
    where = f"{origin}: card field {field}"
    if value is None:
        if f.default is None or f.kind == "floats":
            return None
        raise CardError(f"{where} must be {f.bound}, got nothing")
    if f.kind in ("side", "pad", "channels"):
        if not _is_number(value) or float(value) != int(value):
            raise CardError(f"{where} must be a whole number ({f.bound}), got {value!r}")
        v = int(value)
        ok = {"side": 1 <= v <= MAX_SIDE, "pad": 0 <= v <= 255, "channels": v in (1, 3)}[f.kind]
        if not ok:
            raise CardError(f"{where} must be {f.bound}, got {v}")
        return v
    if f.kind == "choice":
        v = str(value).strip().lower() if isinstance(value, str) else value
        if v not in f.choices:
            raise CardError(f"{where} must be {f.bound}, got {value!r}")
        return v
    if f.kind == "floats":
        items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        if len(items) not in (1, 3) or not all(_is_number(x) for x in items):
            raise CardError(f"{where} must be {f.bound}, got {value!r}")
        v = tuple(float(x) for x in items)
        if not all(math.isfinite(x) for x in v) or (field == "std" and min(v) <= 0):
            raise CardError(f"{where} must be {f.bound}, got {list(v)}")
        return v
    # labels
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise CardError(f"{where} must be a list of names, got {value!r}")
    names = tuple(str(x).strip() if isinstance(x, str) else x for x in value)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise CardError(f"{where}: label {i} must be a non-empty string, got {value[i]!r}")
    if len(names) < 2:
        raise CardError(f"{where} must name at least 2 classes, got {len(names)}")
    _no_duplicates(names, where)
    return names


def _no_duplicates(names, where, lines=None):
    seen = {}
    for i, name in enumerate(names):
        if name in seen:
            at = (f"line {lines[i]} repeats {name!r} of line {lines[seen[name]]}" if lines else
                  f"label {i} repeats {name!r} of label {seen[name]}")
            raise CardError(f"{where}: {at}; class names must be distinct")
        seen[name] = i


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class ModelCard:
    """What a model expects as input and what its classes are called (see the module docstring).

    Validated once, when made: a wrong field raises :class:`CardError`
    naming the field and ``source``. ``origins`` records where each declared
    field came from (``(field, origin)`` pairs), for messages.
    """

    height: int | None = None
    width: int | None = None
    channels: int | None = None
    order: str = "bgr"
    mean: tuple[float, ...] | None = (0.0,)
    std: tuple[float, ...] | None = (255.0,)
    normalization: str = "meanstd"
    resize: str = "stretch"
    pad: int = 0
    labels: tuple[str, ...] | None = None
    source: str = "defaults"
    origins: tuple = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        origins = dict(self.origins)
        for f in FIELDS:
            value = _check(f.name, getattr(self, f.name), origins.get(f.name, self.source))
            object.__setattr__(self, f.name, value)
        if self.channels is not None:
            for name in ("mean", "std"):
                v = getattr(self, name)
                if v is not None and len(v) not in (1, self.channels):
                    raise CardError(f"{self.origin(name)}: card field {name} has {len(v)} values "
                                    f"for {self.channels} channel(s); give one or {self.channels}")

    def origin(self, field):
        """Where ``field``'s value came from: a file, ``"override"``, or ``"defaults"``.

        A card made directly (no ``origins``) names its ``source`` for every field.
        """
        return dict(self.origins).get(field, "defaults" if self.origins else self.source)

    @property
    def resolved(self):
        """True when height, width and channels are known (as :func:`resolve` leaves them)."""
        return None not in (self.height, self.width, self.channels)

    def fields(self):
        """The card's fields as a plain dict (TOML/JSON names; tuples as lists)."""
        out = {}
        for f in FIELDS:
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def card_from_fields(values, origin, *, base_dir=None):
    """Card fields from a TOML/JSON mapping: ``{field: canonical value}``; CardError naming ``origin``.

    ``labels_file`` is read with :func:`read_labels`, relative to
    ``base_dir`` (the card file's folder); unknown keys are refused.
    """
    if not isinstance(values, dict):
        raise CardError(f"{origin}: a card must be a table of fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_BY_NAME) - {LABELS_FILE})
    if unknown:
        raise CardError(f"{origin}: unknown card field(s) {', '.join(unknown)}; known: "
                        f"{', '.join([*_BY_NAME, LABELS_FILE])}")
    out = {k: _check(k, v, origin) for k, v in values.items() if k != LABELS_FILE}
    if LABELS_FILE in values:
        if "labels" in values:
            raise CardError(f"{origin}: give labels or {LABELS_FILE}, not both")
        name = values[LABELS_FILE]
        if not isinstance(name, str) or not name:
            raise CardError(f"{origin}: {LABELS_FILE} must be a path, got {name!r}")
        path = name if os.path.isabs(name) or base_dir is None else os.path.join(base_dir, name)
        out["labels"] = read_labels(path)
    return out


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CardError(f"{path}: cannot read the card ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CardError(f"{path}: not a valid TOML card ({exc})") from None
    return card_from_fields(data, os.fspath(path), base_dir=os.path.dirname(os.fspath(path)))


def read_card(model_path, *, override=None, metadata=None):
    """The card of ``model_path`` from every place that declares one (see the module docstring).

    Parameters
    ----------
    model_path : str or os.PathLike
        The ``.tflite`` or ``.onnx`` model (it need not exist when only an
        override and defaults apply).
    override : str, os.PathLike, dict or ModelCard, optional
        A TOML card file (the ``--card`` flag) or a dict of fields; wins over
        everything. A :class:`ModelCard` is returned as it is.
    metadata : dict, optional
        An ONNX model's ``metadata_props`` already read (ONNX Runtime's
        ``custom_metadata_map``), so the file is not read again.

    Returns
    -------
    ModelCard, with ``source`` listing the layers used, highest first.
    """
    if isinstance(override, ModelCard):
        return override
    path = os.fspath(model_path)
    layers = []  # lowest precedence first
    sidecar = path + SIDECAR_SUFFIX
    if os.path.isfile(sidecar):
        layers.append((sidecar, _read_toml(sidecar)))
    meta = _metadata_fields(path, metadata)
    if meta:
        layers.append(meta)
    if override is not None:
        if isinstance(override, dict):
            layers.append(("override", card_from_fields(override, "override")))
        else:
            layers.append((os.fspath(override), _read_toml(os.fspath(override))))
    values, origins = {}, {}
    for origin, fields in layers:
        for k, v in fields.items():
            values[k], origins[k] = v, origin
    used = [origin for origin, fields in reversed(layers) if fields]
    source = " > ".join(used + ["defaults"])
    return ModelCard(**values, source=source, origins=tuple(origins.items()))


def _metadata_fields(path, metadata):
    """``(origin, fields)`` from the model file's own metadata, or None when it carries none."""
    ext = os.path.splitext(path)[1].lower()
    origin = f"{path} metadata"
    if ext == ".onnx" or metadata is not None:
        props = metadata
        if props is None and os.path.isfile(path):
            try:
                props = model_metadata.onnx_metadata_props(path)
            except model_metadata.MetadataError as exc:
                raise CardError(str(exc)) from None
        fields = _onnx_fields(props or {}, origin, os.path.dirname(path))
    elif ext == ".tflite" and os.path.isfile(path):
        try:
            meta = model_metadata.tflite_card_metadata(path)
        except model_metadata.MetadataError as exc:
            raise CardError(str(exc)) from None
        fields = _tflite_fields(meta, origin)
    else:
        return None
    return (origin, fields) if fields else None


def _onnx_fields(props, origin, base_dir):
    fields = {}
    if ONNX_META_KEY in props:
        try:
            names = json.loads(props[ONNX_META_KEY]).get("class_names")
        except (json.JSONDecodeError, AttributeError):
            names = None  # an export's free-form metadata; only its class names matter here
        if isinstance(names, list) and names:
            fields["labels"] = _check("labels", names, f"{origin} ({ONNX_META_KEY})")
    if ONNX_CARD_KEY in props:
        where = f"{origin} ({ONNX_CARD_KEY})"
        try:
            data = json.loads(props[ONNX_CARD_KEY])
        except json.JSONDecodeError as exc:
            raise CardError(f"{where}: not valid JSON ({exc})") from None
        fields.update(card_from_fields(data, where, base_dir=base_dir))
    return fields


def _tflite_fields(meta, origin):
    """Card fields from what :func:`model_metadata.tflite_card_metadata` found."""
    fields = {}
    if meta.get("mean") is not None:
        fields["mean"] = _check("mean", meta["mean"], origin)
        fields["std"] = _check("std", meta["std"], origin)
        fields["normalization"] = "meanstd"
    # Google's image-classifier metadata writer records RGB whatever the
    # tensor's channel count, so RGB says only the order; GRAYSCALE says 1 channel.
    if meta.get("color_space") == "rgb":
        fields["order"] = "rgb"
    elif meta.get("color_space") == "grayscale":
        fields["channels"] = 1
    if meta.get("labels_text") is not None:
        name, text = meta["labels_text"]
        fields["labels"] = parse_labels(text, f"{origin} (packed label file {name})")
    return fields


# --------------------------------------------------------------------------- labels

_ID_LINE = re.compile(r"^(\d+)(?:\s*:\s*|\s+)(\S.*?)\s*$")


def read_labels(path):
    """Class names from a label file: ``id:label``, ``id label`` or one label per line.

    Refuses gaps (ids not 0..n-1), repeated ids or names, empty labels and a
    mix of forms, naming the file and line (:class:`CardError`).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CardError(f"{path}: cannot read the label file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"{path}: the label file is not UTF-8 text ({exc})") from None
    return parse_labels(text, path)


def parse_labels(text, origin):
    """Class names from the text of a label file (see :func:`read_labels`); ``origin`` names it."""
    lines = [(n, line.strip()) for n, line in enumerate(text.lstrip("\ufeff").splitlines(), 1)]
    while lines and not lines[-1][1]:
        lines.pop()
    body = [(n, s) for n, s in lines if s]
    if not body:
        raise CardError(f"{origin}: the label file holds no labels")
    with_ids = [_ID_LINE.match(s) for _, s in body]
    if all(with_ids):
        return _labels_with_ids(body, with_ids, origin)
    if any(with_ids):
        n = next(n for (n, _), m in zip(body, with_ids) if not m)
        first = next(n for (n, _), m in zip(body, with_ids) if m)
        raise CardError(f"{origin}: line {n} is not 'id label' or 'id:label' as line {first} is; "
                        "use one form for the whole file")
    blank = next((n for n, s in lines if not s), None)
    if blank is not None:
        raise CardError(f"{origin}: line {blank} is empty; with one label per line each line is "
                        "a class, so an empty line would be a class without a name")
    names = tuple(s for _, s in body)
    _no_duplicates(names, origin, lines=[n for n, _ in body])
    return names


def _labels_with_ids(body, matches, origin):
    by_id = {}
    for (n, _), m in zip(body, matches):
        i, name = int(m.group(1)), m.group(2)
        if i in by_id:
            raise CardError(f"{origin}: line {n} repeats id {i} of line {by_id[i][0]}")
        by_id[i] = (n, name)
    missing = [i for i in range(len(by_id)) if i not in by_id]
    if missing:
        extra = sorted(i for i in by_id if i >= len(by_id))
        raise CardError(f"{origin}: ids must be 0..{len(by_id) - 1} without gaps; id {missing[0]} "
                        f"is missing (and id {extra[0]} on line {by_id[extra[0]][0]} is beyond)")
    names = tuple(by_id[i][1] for i in range(len(by_id)))
    _no_duplicates(names, origin, lines=[by_id[i][0] for i in range(len(by_id))])
    return names


# --------------------------------------------------------------------------- resolve


def tensor_layout(shape, *, prefer="NHWC"):
    """``"NHWC"`` or ``"NCHW"`` for a 4-D image tensor shape (batch first), from where 1 or 3 sits.

    A dimension that is not an int (a dynamic one) is not a channel axis.
    ``prefer`` breaks a tie (both axes 1 or 3). Raises CardError when neither fits.
    """
    shape = list(shape)
    if len(shape) != 4:
        raise CardError(f"the input must be a 4-D image tensor (batch first), got shape {shape}")
    last, second = (isinstance(shape[i], int) and shape[i] in (1, 3) for i in (3, 1))
    if last and second:
        return prefer
    if last or second:
        return "NHWC" if last else "NCHW"
    raise CardError(f"cannot tell the channel axis of input shape {shape} (1 or 3 channels, "
                    "NHWC or NCHW)")


def _dim(v):
    return int(v) if isinstance(v, (int, np.integer)) and int(v) > 0 else None


def resolve(card, *, shape, dtype, scale=0.0, zero_point=0, layout=None, n_classes=None, path=""):
    """The card with what it leaves open taken from the input tensor, checked against it.

    Parameters
    ----------
    card : ModelCard
    shape : sequence
        The input tensor's shape, batch first (a dimension that is not a
        positive int is dynamic: the card must then declare it).
    dtype : numpy dtype
        The input tensor's type: float, or uint8/int8 (quantised).
    scale, zero_point : float, int
        The integer input tensor's quantisation (real = (q - zero_point) * scale).
    layout : "NHWC", "NCHW" or None (:func:`tensor_layout` decides)
    n_classes : int, optional
        The output's class count, checked against the labels.
    path : str
        The model file, named in messages.

    Returns
    -------
    ModelCard with height, width and channels set; with ``"tensor"``
    normalisation, mean and std are those the quantisation implies
    (uint8: mean = zero_point; int8: mean = zero_point + 128; std = 1 / scale).

    Raises
    ------
    CardError
        A declared size, channel count or label count that is not the
        model's, "tensor" normalisation on a float tensor, an integer tensor
        without quantisation, or a size neither declares; the message names
        the card's value and where it came from, the tensor's, and the file.
    """
    shape = list(shape)
    layout = layout or tensor_layout(shape)
    if layout not in ("NHWC", "NCHW"):
        raise CardError(f"{path}: layout must be NHWC or NCHW, got {layout!r}")
    h, w, c = (shape[1], shape[2], shape[3]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
    tensor = {"height": _dim(h), "width": _dim(w), "channels": _dim(c)}
    filled = {}
    for name, value in tensor.items():
        declared = getattr(card, name)
        if declared is not None and value is not None and declared != value:
            raise CardError(f"{path}: the card's {name} {declared} (from {card.origin(name)}) "
                            f"contradicts the model's input tensor, whose {name} is {value} "
                            f"(shape {shape}, {layout})")
        filled[name] = declared if declared is not None else value
        if filled[name] is None:
            raise CardError(f"{path}: the input tensor's {name} is dynamic (shape {shape}) and "
                            f"the card ({card.source}) declares none; set {name} in a card")
    dtype = np.dtype(dtype)
    integer = np.issubdtype(dtype, np.integer)
    if integer and dtype not in (np.uint8, np.int8):
        raise CardError(f"{path}: input tensors of type {dtype} are not supported (float, uint8 "
                        "or int8)")
    if integer and not scale > 0:
        raise CardError(f"{path}: integer input tensor ({dtype}) without quantisation parameters")
    if card.normalization == "tensor":
        if not integer:
            raise CardError(f"{path}: the card's normalization 'tensor' (from "
                            f"{card.origin('normalization')}) needs an integer input tensor, but "
                            f"the model's input tensor is {dtype}; declare mean and std instead")
        offset = 0 if dtype == np.uint8 else 128
        filled["mean"], filled["std"] = (float(zero_point + offset),), (1.0 / float(scale),)
    elif card.mean is None or card.std is None:
        raise CardError(f"{path}: the card ({card.source}) declares no mean/std for 'meanstd'")
    if n_classes is not None and card.labels is not None and len(card.labels) != int(n_classes):
        raise CardError(f"{path}: the card's labels (from {card.origin('labels')}) name "
                        f"{len(card.labels)} classes, but the model's output has {int(n_classes)}")
    origins = dict(card.origins)
    for name in filled:
        if name in ("mean", "std"):  # derived from the quantisation, whatever the card said
            origins[name] = f"{path} input tensor quantisation"
        else:
            origins.setdefault(name, f"{path} input tensor")
    return dataclasses.replace(card, **filled, origins=tuple(origins.items()))


def read_onnx_card(path, *, override=None):
    """The card of an ONNX model resolved against its input tensor, without ONNX Runtime.

    For code that needs the strong model's input size and conventions but
    does not run it (the device choosing what size to send). The input's
    shape and type come from :func:`offload.model_metadata.onnx_inputs`; the
    class count is not checked (the output is not run).
    """
    path = os.fspath(path)
    try:
        inputs = model_metadata.onnx_inputs(path)
    except model_metadata.MetadataError as exc:
        raise CardError(str(exc)) from None
    if len(inputs) != 1:
        raise CardError(f"{path}: expected 1 input, got {len(inputs)}")
    _, elem, dims = inputs[0]
    if elem != "float32":  # as StrongModel: ONNX integer inputs carry no quantisation
        raise CardError(f"{path}: the input is {elem}; strong ONNX models take float32")
    shape = [d if isinstance(d, int) and d > 0 else None for d in dims]
    layout = tensor_layout(shape, prefer="NCHW")
    return resolve(read_card(path, override=override), shape=shape, dtype=np.float32,
                   layout=layout, path=path)
