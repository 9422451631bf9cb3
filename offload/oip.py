"""The Open Inference Protocol (KServe v2) over HTTP: bodies shared by the device's client and the server.

What ``offload.wire`` is for ``/v1/classify``, this module is for the v2
protocol of NVIDIA Triton, KServe and Seldon MLServer
(https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/).
numpy only, no HTTP: the device (``offload.device.oipclient``) and the edge
server (``offload.server.app``) build and read bodies with it.

Endpoints (paths from :func:`model_path` and friends)::

    GET  /v2/health/live            200 = live
    GET  /v2/health/ready           200 = ready
    GET  /v2                        {"name", "version", "extensions"}
    GET  /v2/models/NAME            {"name", "platform", "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}
    GET  /v2/models/NAME/ready      200 = ready
    POST /v2/models/NAME/infer      {"inputs": [{"name", "shape", "datatype", "data"}], "outputs"?, "parameters"?}
                                    -> {"model_name", "outputs": [{"name", "shape", "datatype", "data"}]}

The **binary tensor extension** (Triton's ``binary_tensor_data``, also in
KServe): the body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by each binary tensor's raw little-endian, row-major bytes,
in the order of the tensors that carry ``"parameters": {"binary_data_size":
N}`` instead of ``"data"``. A request asks for binary outputs with
``"parameters": {"binary_data_output": true}`` (or per output ``"binary_data":
true``); the answer is then laid out the same way.

Datatypes: :data:`DATATYPES` (BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32,
FP64); BYTES (strings) is refused. Errors answer ``{"error": "..."}``
(``offload.wire.error_body``).

Reading is strict and bounded: JSON is scanned by
``offload.wire.check_json_shape`` before ``json.loads``, a tensor has at most
:data:`MAX_RANK` dimensions and the caller's ``max_elements`` elements, a
JSON ``data`` list must hold exactly ``prod(shape)`` numbers of the declared
kind within the datatype's range, binary sizes must add up to the body's
exact length. Every refusal is one :class:`OIPError` saying what is wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from offload import wire

__all__ = [
    "V2_PREFIX", "HEADER_LENGTH", "DATATYPES", "MAX_RANK", "MAX_TENSORS", "MAX_NAME_CHARS",
    "MAX_METADATA_BYTES", "MAX_OUTPUT_ELEMENTS", "MAX_ANSWER_BYTES", "BINARY_EXTENSION",
    "OIPError", "Tensor", "TensorSpec", "ModelMetadata", "InferRequest",
    "live_path", "ready_path", "server_path", "model_path", "model_ready_path", "infer_path",
    "check_model_name", "datatype_of", "encode_infer", "decode_infer", "encode_metadata",
    "parse_metadata", "server_metadata_body", "check_fits", "to_distribution",
]

V2_PREFIX = "/v2"
#: The binary extension's header: bytes of the JSON part at the start of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The name servers list in ``GET /v2`` ``extensions`` when they take binary tensors (Triton does).
BINARY_EXTENSION = "binary_tensor_data"
#: Wire datatype -> numpy dtype (little-endian, as the binary extension lays tensors out).
DATATYPES = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_BY_DTYPE = {v: k for k, v in DATATYPES.items()}
#: Dimensions of one tensor at most.
MAX_RANK = 8
#: Tensors in one request or answer (inputs or outputs), and entries in metadata, at most.
MAX_TENSORS = 16
#: Characters of a model or tensor name at most.
MAX_NAME_CHARS = 128
#: Bytes of a metadata, health or error answer the device reads at most.
MAX_METADATA_BYTES = 64 * 1024
#: Elements of all the output tensors of one answer, at most (a 1000-class model uses 1000).
MAX_OUTPUT_ELEMENTS = 1 << 16
# A number in JSON at its longest (offload.wire caps one at 40 characters) and its comma.
_JSON_NUMBER_BYTES = 41
#: Bytes of an infer answer the device reads at most: every output element as JSON, with room.
MAX_ANSWER_BYTES = _JSON_NUMBER_BYTES * MAX_OUTPUT_ELEMENTS + MAX_METADATA_BYTES
# JSON around the numbers: objects, keys, parameters (values other than tensor data).
_STRUCTURE_VALUES = 64 * MAX_TENSORS
_MAX_DEPTH = MAX_RANK + 6  # body, list of tensors, tensor, parameters / nested data
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,%d}" % (MAX_NAME_CHARS - 1))


class OIPError(ValueError):
    """A v2 body (request, answer, metadata) that does not follow the protocol or a bound."""


@dataclass
class Tensor:
    """A named tensor: ``data`` is an ndarray of its ``datatype`` and ``shape``."""

    name: str
    data: np.ndarray

    @property
    def datatype(self):
        return datatype_of(self.data.dtype)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor in model metadata: ``shape`` may hold ``-1`` (any size)."""

    name: str
    datatype: str
    shape: tuple

    def as_dict(self):
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def __str__(self):
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class ModelMetadata:
    """``GET /v2/models/NAME``: the model's name, platform, input and output tensors."""

    name: str
    inputs: tuple
    outputs: tuple
    platform: str = ""
    versions: tuple = ()


@dataclass
class InferRequest:
    """A decoded infer request (or answer): tensors, the outputs asked for, binary wishes."""

    tensors: list
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)   # [(name, binary: bool | None)]
    binary_output: bool = False


# -------------------------------------------------------------------- paths

def check_model_name(name):
    """``name`` if it is a usable model name (letters, digits, ``_ . : -``), else :class:`OIPError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise OIPError(f"model name {str(name)[:40]!r} must be 1..{MAX_NAME_CHARS} letters, "
                       "digits or '_.:-' (starting with a letter, digit or '_')")
    return name


def live_path():
    return f"{V2_PREFIX}/health/live"


def ready_path():
    return f"{V2_PREFIX}/health/ready"


def server_path():
    return V2_PREFIX


def model_path(name):
    return f"{V2_PREFIX}/models/{check_model_name(name)}"


def model_ready_path(name):
    return model_path(name) + "/ready"


def infer_path(name):
    return model_path(name) + "/infer"


def datatype_of(dtype):
    """The v2 datatype name of a numpy dtype (``float32`` -> ``"FP32"``); :class:`OIPError` if none."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    name = _BY_DTYPE.get(dt)
    if name is None:
        raise OIPError(f"no v2 datatype for numpy {np.dtype(dtype)}")
    return name


# -------------------------------------------------------------------- infer bodies

def encode_infer(tensors, *, binary, model_name=None, request_id=None, parameters=None,
                 outputs=None, binary_output=None):
    """The body of an infer request or answer: ``(bytes, headers)``.

    Parameters
    ----------
    tensors : list of (name, ndarray)
        The inputs (a request) or outputs (an answer), in order.
    binary : bool
        Tensors as raw bytes after the JSON header (the binary extension);
        ``headers`` then holds :data:`HEADER_LENGTH`. False: JSON ``data`` lists.
    model_name : str, optional
        Set on an answer (``"model_name"``).
    outputs : list of str, optional
        Request only: the outputs asked for (default: all).
    binary_output : bool, optional
        Request only: ask for binary outputs (``binary_data_output``).
    """
    items, raws = [], []
    for name, data in tensors:
        a = np.ascontiguousarray(data)
        dt = datatype_of(a.dtype)
        a = a.astype(DATATYPES[dt], copy=False)
        item = {"name": str(name), "datatype": dt, "shape": [int(s) for s in a.shape]}
        if binary:
            raw = a.tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            item["data"] = a.ravel().tolist()
        items.append(item)
    obj = {}
    if model_name is not None:
        obj["model_name"] = model_name
    if request_id is not None:
        obj["id"] = str(request_id)
    params = dict(parameters or {})
    if binary_output is not None:
        params["binary_data_output"] = bool(binary_output)
    if params:
        obj["parameters"] = params
    obj["outputs" if model_name is not None else "inputs"] = items
    if outputs is not None:
        obj["outputs"] = [{"name": n} for n in outputs]
    header = json.dumps(obj, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(raws), {"Content-Type": "application/octet-stream",
                                     HEADER_LENGTH: str(len(header))}


def _header_length(value, size):
    if value is None:
        return None
    value = str(value).strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise OIPError(f"{HEADER_LENGTH} {value[:40]!r} is not a byte count")
    n = int(value)
    if n > size:
        raise OIPError(f"{HEADER_LENGTH} {n} is longer than the body ({size} bytes)")
    return n


def decode_infer(body, header_length=None, *, max_elements, max_bytes, kind="request"):
    """Read an infer request (``kind="request"``: its ``inputs``) or answer (``"answer"``: ``outputs``).

    Parameters
    ----------
    body : bytes
    header_length : str or None
        The :data:`HEADER_LENGTH` header's value: the JSON part's length (binary extension).
    max_elements : int
        Elements of all the tensors together, at most.
    max_bytes : int
        The body's size at most (the JSON part is scanned against it first).

    Returns
    -------
    InferRequest
        ``tensors`` as :class:`Tensor` (read-only ndarrays of the declared shape).

    Raises
    ------
    OIPError
        Anything that is not the protocol or over a bound, naming the tensor.
    """
    data = bytes(body)
    n = _header_length(header_length, len(data))
    head, rest = (data, b"") if n is None else (data[:n], data[n:])
    try:
        obj = wire.load_json(head, max_bytes=max_bytes, max_depth=_MAX_DEPTH,
                             max_values=max_elements + _STRUCTURE_VALUES, what=kind)
    except wire.WireError as exc:
        raise OIPError(str(exc)) from None
    key = "inputs" if kind == "request" else "outputs"
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list) or not obj[key]:
        raise OIPError(f"{kind} has no non-empty {key!r} list")
    if len(obj[key]) > MAX_TENSORS:
        raise OIPError(f"{kind} has {len(obj[key])} {key}, more than {MAX_TENSORS}")
    params = _parameters(obj.get("parameters"), kind)
    tensors, offset, total = [], 0, 0
    for item in obj[key]:
        t, used = _tensor(item, rest, offset, max_elements - total, kind)
        offset += used
        total += t.data.size
        tensors.append(t)
    if offset != len(rest):
        raise OIPError(f"{kind} has {len(rest) - offset} bytes of binary data no tensor claims")
    rid = obj.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_NAME_CHARS):
        raise OIPError(f"{kind} id must be a string of at most {MAX_NAME_CHARS} characters")
    out = InferRequest(tensors, rid, params)
    if kind == "request":
        out.binary_output = _flag(params, "binary_data_output", kind)
        out.outputs = _requested(obj.get("outputs"))
    return out


def _parameters(value, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OIPError(f"{where} parameters must be an object")
    return value


def _flag(params, name, where):
    v = params.get(name, False)
    if not isinstance(v, bool):
        raise OIPError(f"{where} parameter {name} must be true or false, got {v!r}")
    return v


def _requested(value):
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise OIPError(f"request outputs must be a list of at most {MAX_TENSORS} objects")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise OIPError("request outputs must be objects with a name")
        params = _parameters(item.get("parameters"), f"output {item['name'][:40]!r}")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise OIPError(f"output {item['name'][:40]!r} binary_data must be true or false")
        out.append((item["name"], binary))
    return out


def _shape(value, name):
    if not isinstance(value, list) or len(value) > MAX_RANK or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise OIPError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} "
                       f"non-negative integers, got {str(value)[:60]}")
    return tuple(value)


def _tensor(item, rest, offset, room, kind):
    """One tensor of a body: ``(Tensor, binary bytes it used)``."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        raise OIPError(f"{kind} tensors must be objects with a non-empty name")
    name = item["name"][:MAX_NAME_CHARS]
    dt = item.get("datatype")
    if dt == "BYTES":
        raise OIPError(f"tensor {name!r}: BYTES tensors are not supported (numbers only)")
    if dt not in DATATYPES:
        raise OIPError(f"tensor {name!r}: datatype must be one of {', '.join(DATATYPES)}, "
                       f"got {str(dt)[:20]!r}")
    shape = _shape(item.get("shape"), name)
    count = math.prod(shape)
    if count > room:
        raise OIPError(f"tensor {name!r} of shape {list(shape)} has more elements than the "
                       f"limit left for it ({room})")
    dtype = DATATYPES[dt]
    params = _parameters(item.get("parameters"), f"tensor {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in item:
            raise OIPError(f"tensor {name!r} has both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise OIPError(f"tensor {name!r}: binary_data_size {size!r} is not "
                           f"{count} x {dtype.itemsize} bytes for {dt} {list(shape)}")
        if offset + size > len(rest):
            raise OIPError(f"tensor {name!r}: {size} bytes of binary data declared, "
                           f"{len(rest) - offset} left in the body")
        a = np.frombuffer(rest, dtype, count, offset).reshape(shape)
        if dtype.kind == "f" and not np.isfinite(a).all():
            raise OIPError(f"tensor {name!r} holds NaN or infinity")
        return Tensor(name, a), size
    if "data" not in item:
        raise OIPError(f"tensor {name!r} has neither data nor binary_data_size")
    return Tensor(name, _json_data(item["data"], dtype, shape, name)), 0


def _json_data(values, dtype, shape, name):
    """A JSON ``data`` list (flat or nested, row-major) as an ndarray of ``dtype`` and ``shape``."""
    if not isinstance(values, list):
        raise OIPError(f"tensor {name!r}: data must be a list")
    try:
        a = np.array(values)
    except ValueError:  # ragged nesting
        raise OIPError(f"tensor {name!r}: data is not a regular (row-major) array") from None
    count = math.prod(shape)
    if a.size != count:
        raise OIPError(f"tensor {name!r}: data has {a.size} values, shape {list(shape)} "
                       f"needs {count}")
    if a.size == 0:
        return np.zeros(shape, dtype)
    if dtype.kind == "b":
        ok = a.dtype.kind == "b"
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = a.dtype.kind in "iu" and a.min() >= info.min and a.max() <= info.max
    else:
        ok = a.dtype.kind in "iuf" and np.isfinite(a.astype(np.float64)).all()
    if not ok:
        raise OIPError(f"tensor {name!r}: data must be {_BY_DTYPE[dtype]} values"
                       + ("" if dtype.kind == "b" else " (finite, in range)")
                       + f", got {a.dtype.kind!r}-kind values")
    if dtype.kind == "f" and np.abs(a.astype(np.float64)).max() > np.finfo(dtype).max:
        # 1e39 is a finite number, but not as FP32
        raise OIPError(f"tensor {name!r}: data has values beyond {_BY_DTYPE[dtype]}'s range")
    return a.astype(dtype).reshape(shape)


# -------------------------------------------------------------------- metadata

def server_metadata_body(name, version, *, extensions=(BINARY_EXTENSION,)):
    """The body (``bytes``) of ``GET /v2``."""
    return json.dumps({"name": name, "version": version, "extensions": list(extensions)},
                      separators=(",", ":")).encode()


def encode_metadata(meta):
    """The body (``bytes``) of ``GET /v2/models/NAME`` for a :class:`ModelMetadata`."""
    obj = {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
           "inputs": [t.as_dict() for t in meta.inputs],
           "outputs": [t.as_dict() for t in meta.outputs]}
    return json.dumps(obj, separators=(",", ":")).encode()


def _specs(value, key, model):
    if not isinstance(value, list) or not value or len(value) > MAX_TENSORS:
        raise OIPError(f"model {model!r} metadata: {key} must be a list of 1..{MAX_TENSORS} tensors")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("datatype"), str):
            raise OIPError(f"model {model!r} metadata: each of {key} needs a name and a datatype")
        shape = item.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= -1 for s in shape):
            raise OIPError(f"model {model!r} metadata: {key} {item['name'][:40]!r} shape must be "
                           f"a list of integers >= -1, got {str(shape)[:60]}")
        out.append(TensorSpec(item["name"][:MAX_NAME_CHARS], item["datatype"][:20], tuple(shape)))
    return tuple(out)


def parse_metadata(body, *, model):
    """Read a ``GET /v2/models/NAME`` answer; ``model`` is the name asked for (named in errors).

    Raises
    ------
    OIPError
        Not JSON, over :data:`MAX_METADATA_BYTES`, or no usable ``inputs``/``outputs``.
    """
    try:
        obj = wire.load_json(body, max_bytes=MAX_METADATA_BYTES, max_depth=_MAX_DEPTH,
                             max_values=MAX_METADATA_BYTES // 4, what="model metadata")
    except wire.WireError as exc:
        raise OIPError(f"model {model!r}: {exc}") from None
    if not isinstance(obj, dict):
        raise OIPError(f"model {model!r} metadata is not a JSON object")
    name = obj.get("name", model)
    versions = obj.get("versions") or ()
    return ModelMetadata(str(name)[:MAX_NAME_CHARS], _specs(obj.get("inputs"), "inputs", model),
                         _specs(obj.get("outputs"), "outputs", model),
                         str(obj.get("platform", ""))[:MAX_NAME_CHARS],
                         tuple(str(v)[:MAX_NAME_CHARS] for v in versions
                               if isinstance(versions, list)))


def check_fits(spec, shape, datatype, *, model):
    """Refuse a tensor ``shape``/``datatype`` that the metadata's input ``spec`` does not take.

    ``-1`` in the spec matches any size. The message names both.
    """
    shape = tuple(int(s) for s in shape)
    fits = spec.datatype == datatype and len(spec.shape) == len(shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape))
    if not fits:
        raise OIPError(f"model {model!r} takes input {spec}, but the device would send "
                       f"{datatype} {list(shape)}")


def to_distribution(values):
    """One output row as class probabilities (float64).

    The rule: a row that is already a distribution (every value in
    ``[0, 1]`` and the sum within 1e-3 of 1) is kept as it is; anything else
    is taken for logits and softmaxed.

    Raises
    ------
    OIPError
        An empty row or a value that is not finite.
    """
    p = np.asarray(values, dtype=np.float64).ravel()
    if p.size == 0 or not np.isfinite(p).all():
        raise OIPError("output row is empty or holds NaN or infinity")
    if p.min() >= 0.0 and p.max() <= 1.0 and abs(p.sum() - 1.0) <= 1e-3:
        return p
    e = np.exp(p - p.max())
    return e / e.sum()
