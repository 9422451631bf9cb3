"""What a model file says about its own input: TFLite metadata and ONNX ``metadata_props``, read by hand.

Torch-free and dependency-free (no ``tflite-support``, no ``onnx``, no
LiteRT): both formats are read with a few lines of struct unpacking, only the
parts a model card needs (:mod:`offload.card` turns them into card fields).

TFLite: the model (a flatbuffer, tflite ``schema.fbs``) may carry a
``metadata`` entry named ``TFLITE_METADATA`` whose buffer is a second
flatbuffer of the TFLite metadata schema (``metadata_schema.fbs``, file
identifier ``M001``): ``ModelMetadata.subgraph_metadata[0]`` ->
``input_tensor_metadata[0]`` -> ``process_units`` -> ``NormalizationOptions
{mean, std}`` and ``content`` -> ``ImageProperties.color_space``, and
``output_tensor_metadata[0].associated_files``, the label file being the one
of type ``TENSOR_AXIS_LABELS``. Associated files are stored in a zip archive
appended to the ``.tflite`` file.

ONNX: a ``ModelProto`` (protobuf) whose field 14, ``metadata_props``, holds
``StringStringEntryProto {key = 1, value = 2}`` entries. The top-level fields
are scanned and the others (the graph) skipped by their length, so the
weights are never parsed.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile

__all__ = ["MetadataError", "tflite_card_metadata", "onnx_metadata_props", "onnx_inputs",
           "ONNX_ELEMENT_TYPES", "TFLITE_METADATA_NAME"]

#: Name of the tflite ``Metadata`` entry whose buffer holds the metadata flatbuffer.
TFLITE_METADATA_NAME = "TFLITE_METADATA"

# Field numbers (vtable slots) from the published schemas. A union takes two
# slots: its type, then its value.
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6                  # tflite Model
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2    # tflite Buffer
_METADATA_NAME, _METADATA_BUFFER = 0, 1                 # tflite Metadata
_MM_SUBGRAPHS, _MM_FILES = 3, 6                         # ModelMetadata
_SG_INPUTS, _SG_OUTPUTS, _SG_FILES = 2, 3, 4            # SubGraphMetadata
_TM_CONTENT, _TM_UNITS, _TM_FILES = 3, 4, 6             # TensorMetadata
_CONTENT_TYPE, _CONTENT_PROPS = 0, 1                    # Content (union ContentProperties)
_IMAGE_PROPERTIES = 2                                   # ContentProperties.ImageProperties
_IMAGE_COLOR_SPACE = 0                                  # ImageProperties
_COLOR_SPACES = {1: "rgb", 2: "grayscale"}              # ColorSpaceType
_UNIT_TYPE, _UNIT_OPTIONS = 0, 1                        # ProcessUnit (union ProcessUnitOptions)
_NORMALIZATION_OPTIONS = 1                              # ProcessUnitOptions.NormalizationOptions
_NORM_MEAN, _NORM_STD = 0, 1                            # NormalizationOptions
_FILE_NAME, _FILE_TYPE, _FILE_LOCALE = 0, 2, 3          # AssociatedFile
_TENSOR_AXIS_LABELS = 2                                 # AssociatedFileType


class MetadataError(ValueError):
    """A model file whose metadata cannot be read; names the file."""


class _Table:
    """A flatbuffer table at ``pos`` in ``buf``: fields by slot number (little-endian throughout)."""

    def __init__(self, buf, pos):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]

    def _offset(self, slot):
        at = 4 + 2 * slot
        return struct.unpack_from("<H", self.buf, self.vtable + at)[0] if at < self.vsize else 0

    def scalar(self, slot, fmt, default=0):
        off = self._offset(slot)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _indirect(self, slot):
        off = self._offset(slot)
        if not off:
            return None
        at = self.pos + off
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, slot):
        at = self._indirect(slot)
        return None if at is None else _Table(self.buf, at)

    def _vector(self, slot):
        at = self._indirect(slot)
        if at is None:
            return 0, 0
        return at + 4, struct.unpack_from("<I", self.buf, at)[0]

    def tables(self, slot):
        start, n = self._vector(slot)
        return [_Table(self.buf, e + struct.unpack_from("<I", self.buf, e)[0])
                for e in range(start, start + 4 * n, 4)]

    def floats(self, slot):
        start, n = self._vector(slot)
        return list(struct.unpack_from(f"<{n}f", self.buf, start)) if n else None

    def bytes(self, slot):
        start, n = self._vector(slot)
        if start + n > len(self.buf):
            raise struct.error("vector past the end of the buffer")
        return bytes(self.buf[start:start + n])

    def string(self, slot):
        at = self._indirect(slot)
        if at is None:
            return None
        n = struct.unpack_from("<I", self.buf, at)[0]
        return bytes(self.buf[at + 4:at + 4 + n]).decode("utf-8", "replace")


def _root(buf):
    return _Table(buf, struct.unpack_from("<I", buf, 0)[0])


def _metadata_buffer(path, data):
    """The bytes of the ``TFLITE_METADATA`` buffer of a tflite model, or None."""
    model = _root(data)
    buffers = None
    for entry in model.tables(_MODEL_METADATA):
        if entry.string(_METADATA_NAME) != TFLITE_METADATA_NAME:
            continue
        buffers = buffers or model.tables(_MODEL_BUFFERS)
        index = entry.scalar(_METADATA_BUFFER, "I")
        if index >= len(buffers):
            raise MetadataError(f"{path}: {TFLITE_METADATA_NAME} names buffer {index} of "
                                f"{len(buffers)}")
        buf = buffers[index]
        offset, size = buf.scalar(_BUFFER_OFFSET, "Q"), buf.scalar(_BUFFER_SIZE, "Q")
        if offset > 1:  # models over 2 GB keep buffers after the flatbuffer, by offset
            return bytes(data[offset:offset + size])
        return buf.bytes(_BUFFER_DATA)
    return None


def _label_file(tensor, subgraph, model):
    """The name of the first TENSOR_AXIS_LABELS file (no locale first), tensor's own before others'."""
    for owner in (tensor, subgraph, model):
        if owner is None:
            continue
        labels = [f for f in owner.tables(_TM_FILES if owner is tensor else
                                          _SG_FILES if owner is subgraph else _MM_FILES)
                  if f.scalar(_FILE_TYPE, "b") == _TENSOR_AXIS_LABELS]
        labels.sort(key=lambda f: bool(f.string(_FILE_LOCALE)))
        if labels:
            return labels[0].string(_FILE_NAME)
    return None


def _packed_file(path, data, name):
    """Text of the file ``name`` in the zip appended to a tflite model."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            raw = z.read(name)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise MetadataError(f"{path}: its metadata names the label file {name!r}, but the model "
                            f"does not pack it ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: packed label file {name} is not UTF-8 ({exc})") from None


def tflite_card_metadata(path):
    """What the TFLite metadata of ``path`` says about the input and the labels.

    Returns
    -------
    dict with ``mean``, ``std`` (lists of float or None: the input's
    NormalizationOptions), ``color_space`` (``"rgb"``, ``"grayscale"`` or
    None) and ``labels_text`` (``(file name, text)`` of the packed label file,
    or None). All None when the model carries no metadata.
    """
    path = os.fspath(path)
    out = {"mean": None, "std": None, "color_space": None, "labels_text": None}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    try:
        meta = _metadata_buffer(path, data)
        if not meta:
            return out
        if meta[4:8] != b"M001":
            raise MetadataError(f"{path}: {TFLITE_METADATA_NAME} is not a TFLite metadata "
                                f"flatbuffer (identifier {meta[4:8]!r}, not b'M001')")
        root = _root(meta)
        subgraphs = root.tables(_MM_SUBGRAPHS)
        sub = subgraphs[0] if subgraphs else None
        inputs = sub.tables(_SG_INPUTS) if sub else []
        outputs = sub.tables(_SG_OUTPUTS) if sub else []
        if inputs:
            _read_input(inputs[0], out, path)
        name = _label_file(outputs[0] if outputs else None, sub, root)
    except struct.error as exc:
        raise MetadataError(f"{path}: damaged TFLite metadata ({exc})") from None
    if name:
        out["labels_text"] = (name, _packed_file(path, data, name))
    return out


def _read_input(tensor, out, path):
    content = tensor.table(_TM_CONTENT)
    if content is not None and content.scalar(_CONTENT_TYPE, "B") == _IMAGE_PROPERTIES:
        props = content.table(_CONTENT_PROPS)
        if props is not None:
            out["color_space"] = _COLOR_SPACES.get(props.scalar(_IMAGE_COLOR_SPACE, "b"))
    for unit in tensor.tables(_TM_UNITS):
        if unit.scalar(_UNIT_TYPE, "B") != _NORMALIZATION_OPTIONS:
            continue
        options = unit.table(_UNIT_OPTIONS)
        if options is None:
            continue
        mean, std = options.floats(_NORM_MEAN), options.floats(_NORM_STD)
        if not mean or not std:
            raise MetadataError(f"{path}: its NormalizationOptions lack mean or std")
        out["mean"], out["std"] = mean, std
        return


# --------------------------------------------------------------------------- ONNX

_MODEL_GRAPH, _MODEL_METADATA_PROPS = 7, 14      # onnx ModelProto
_ENTRY_KEY, _ENTRY_VALUE = 1, 2                  # StringStringEntryProto
_GRAPH_INITIALIZER, _GRAPH_INPUT = 5, 11         # GraphProto
_TENSOR_NAME = 8                                 # TensorProto (an initializer)
_VALUE_NAME, _VALUE_TYPE = 1, 2                  # ValueInfoProto
_TYPE_TENSOR = 1                                 # TypeProto.tensor_type
_TENSOR_ELEM_TYPE, _TENSOR_SHAPE = 1, 2          # TypeProto.Tensor
_SHAPE_DIM = 1                                   # TensorShapeProto
_DIM_VALUE, _DIM_PARAM = 1, 2                    # TensorShapeProto.Dimension
#: ONNX TensorProto.DataType numbers of the input types a card knows.
ONNX_ELEMENT_TYPES = {1: "float32", 2: "uint8", 3: "int8", 10: "float16"}


def _varint(f):
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError("the file ends inside a number")
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a number longer than 64 bits")


def _fields(f, end):
    """``(field number, value)`` of a protobuf message up to ``end``; LEN values as ``(offset, size)``."""
    while f.tell() < end:
        tag = _varint(f)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            yield number, _varint(f)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        elif wire == 2:
            size = _varint(f)
            at = f.tell()
            if at + size > end:
                raise ValueError("a field runs past the end of the file")
            yield number, (at, size)
            f.seek(at + size)
        else:
            raise ValueError(f"unknown protobuf wire type {wire}")


def onnx_metadata_props(path):
    """The ``metadata_props`` of an ONNX model file as a dict (the graph is skipped, not parsed)."""
    path = os.fspath(path)
    props = {}
    try:
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            f.seek(0)
            entries = [v for n, v in _fields(f, end) if n == _MODEL_METADATA_PROPS
                       and isinstance(v, tuple)]
            for at, size in entries:
                f.seek(at)
                key = value = ""
                for n, (vat, vsize) in ((n, v) for n, v in _fields(f, at + size)
                                        if isinstance(v, tuple)):
                    here = f.tell()
                    f.seek(vat)
                    text = f.read(vsize).decode("utf-8")
                    f.seek(here)
                    if n == _ENTRY_KEY:
                        key = text
                    elif n == _ENTRY_VALUE:
                        value = text
                props[key] = value
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    except (EOFError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise MetadataError(f"{path}: not a readable ONNX model ({exc})") from None
    return props


def _message(f, at, size):
    """The fields of the message at ``(at, size)`` as a list (LEN values as ``(offset, size)``)."""
    f.seek(at)
    return list(_fields(f, at + size))


def _text(f, span):
    f.seek(span[0])
    return f.read(span[1]).decode("utf-8")


def _value_info(f, span):
    """``(name, elem_type, dims)`` of a ValueInfoProto; a dim is an int, a name (str) or None."""
    name, elem, dims = "", 0, []
    for n, v in _message(f, *span):
        if n == _VALUE_NAME and isinstance(v, tuple):
            name = _text(f, v)
        elif n == _VALUE_TYPE and isinstance(v, tuple):
            for tn, tv in _message(f, *v):
                if tn != _TYPE_TENSOR or not isinstance(tv, tuple):
                    continue
                for kn, kv in _message(f, *tv):
                    if kn == _TENSOR_ELEM_TYPE and isinstance(kv, int):
                        elem = kv
                    elif kn == _TENSOR_SHAPE and isinstance(kv, tuple):
                        dims = [_dimension(f, dv) for dn, dv in _message(f, *kv)
                                if dn == _SHAPE_DIM and isinstance(dv, tuple)]
    return name, elem, dims


def _dimension(f, span):
    for n, v in _message(f, *span):
        if n == _DIM_VALUE and isinstance(v, int):
            return v
        if n == _DIM_PARAM and isinstance(v, tuple):
            return _text(f, v)
    return None


def onnx_inputs(path):
    """The graph inputs of an ONNX model that are not initializers, without ONNX or ONNX Runtime.

    Returns a list of ``(name, element type, dims)``: the element type as
    :data:`ONNX_ELEMENT_TYPES` names it (else ``"type N"``), each dim an int,
    a symbolic name (str, a dynamic axis) or None. The weights are skipped by
    their length, never read.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            f.seek(0)
            graphs = [v for n, v in _fields(f, end) if n == _MODEL_GRAPH and isinstance(v, tuple)]
            if not graphs:
                raise ValueError("no graph")
            inputs, weights = [], set()
            for n, v in _message(f, *graphs[0]):
                if n == _GRAPH_INPUT and isinstance(v, tuple):
                    inputs.append(v)
                elif n == _GRAPH_INITIALIZER and isinstance(v, tuple):
                    weights.update(_text(f, tv) for tn, tv in _message(f, *v)
                                   if tn == _TENSOR_NAME and isinstance(tv, tuple))
            out = []
            for span in inputs:
                name, elem, dims = _value_info(f, span)
                if name not in weights:
                    out.append((name, ONNX_ELEMENT_TYPES.get(elem, f"type {elem}"), dims))
            return out
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    except (EOFError, ValueError) as exc:
        raise MetadataError(f"{path}: not a readable ONNX model ({exc})") from None
