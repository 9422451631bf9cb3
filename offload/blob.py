"""The policy blob: the one file that carries a trained policy to the device.

A flat little-endian binary file, laid out field by field in ``docs/blob.md``:
header (magic, version, kind, bucket ``(N, P, M)``, history length ``T``,
flags), metric pipeline (inverse temperature, standardisation, entropy->metric
lookup table), free-form JSON metadata, then either per-state thresholds or the
MLP layers (int8 weights with their quantisation and the float32 weights they
came from), and a CRC32 of everything before it.

Numpy only: tests and the simulator build blobs without torch, and the device
only ever reads them.
"""

import json
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from offload.atomic import atomic_write_bytes
from offload.metric import MetricMap
from offload.bucket import Bucket
from offload.mlp import QuantLayer, QuantMLP
from offload_native._mlp import CODE_RANGE, MAX_IN_16
from offload.ring import input_size

__all__ = ["MAGIC", "VERSION", "BlobError", "Policy", "to_bytes", "from_bytes",
           "write_blob", "read_blob"]

MAGIC = b"OFLDPLCY"
VERSION = 3
# Version 1 had no separate float bias (the float layers used the int8 layers' bias).
# Version 3 added 16-bit activation codes (FLAG_ACT16); a blob without them is
# still written as version 2, so older readers keep reading it, while one with
# them is refused by those readers instead of being misread.
READABLE = (1, 2, 3)
KINDS = {"dqn": 0, "thresholds": 1}
FLAG_INTERARRIVAL = 1
FLAG_ACT16 = 2
_KNOWN_FLAGS = {1: FLAG_INTERARRIVAL, 2: FLAG_INTERARRIVAL, 3: FLAG_INTERARRIVAL | FLAG_ACT16}
_HEAD = struct.Struct("<8sHHIIIIIddd")   # magic .. tinv
_LAYER = struct.Struct("<IIII")          # din, dout, nseg, leaky


class BlobError(ValueError):
    """A policy blob that cannot be used; the message names the file and the problem."""


@dataclass
class Policy:
    """Everything the device needs from training besides the weak model.

    Units: ``N, P, M`` scaled tokens (refill per slot, cost per offload,
    capacity); ``T`` history length in images (the input holds ``T-1``
    metrics and, with ``interarrival``, ``T-1`` inter-arrival times in slots);
    ``theta`` thresholds in standardised metric units for ``n = P..M``.
    """

    kind: str
    N: int
    P: int
    M: int
    metric_mean: float
    metric_std: float
    lut_x: np.ndarray
    lut_y: np.ndarray
    tinv: float = 1.0
    T: int = 97
    interarrival: bool = False
    theta: np.ndarray = None
    qmlp: QuantMLP = None
    meta: dict = field(default_factory=dict)

    @property
    def bucket(self):
        """The blob's bucket as an ``offload.bucket.Bucket`` (``ValueError`` if invalid)."""
        return Bucket(self.N, self.P, self.M)

    @property
    def H(self):
        """Number of past values of each kind in the DQN input (``T - 1``)."""
        return self.T - 1

    def metric_map(self):
        """The blob's metric pipeline as an ``offload.metric.MetricMap``
        (logits -> calibrated entropy -> lookup table -> standardised metric)."""
        return MetricMap(self.tinv, self.lut_x, self.lut_y, self.metric_mean, self.metric_std)

    def metric_from_entropy(self, h):
        """Entropy (nats) -> standardised metric, via the lookup table (clamped at its ends)."""
        return self.metric_map().from_entropy(h)

    def validate(self):
        """Raise ``ValueError`` naming the first inconsistency."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown policy kind {self.kind!r}")
        if not (0 < self.N < self.P <= self.M):
            raise ValueError(f"bucket (N={self.N}, P={self.P}, M={self.M}) needs 0 < N < P <= M")
        if self.T < 2:
            raise ValueError(f"history length T={self.T} must be >= 2")
        if not (np.isfinite(self.metric_std) and self.metric_std > 0
                and np.isfinite(self.metric_mean)):
            raise ValueError(f"metric standardisation mean={self.metric_mean}, "
                             f"std={self.metric_std} is not usable")
        if not np.isfinite(self.tinv):
            raise ValueError(f"inverse temperature {self.tinv} is not finite")
        lx, ly = np.asarray(self.lut_x), np.asarray(self.lut_y)
        if lx.ndim != 1 or lx.shape != ly.shape or len(lx) < 2:
            raise ValueError(f"lookup table shapes {lx.shape} and {ly.shape} must match, >= 2 bins")
        if np.any(np.diff(lx) <= 0) or not np.all(np.isfinite(ly)):
            raise ValueError("lookup table entropies must increase and metrics be finite")
        if self.kind == "thresholds":
            if self.theta is None or np.shape(self.theta) != (self.M - self.P + 1,):
                raise ValueError(f"thresholds need M-P+1 = {self.M - self.P + 1} values, "
                                 f"got {None if self.theta is None else np.shape(self.theta)}")
        else:
            if self.qmlp is None or not self.qmlp.layers:
                raise ValueError("a DQN policy needs its network")
            want_in = input_size(self.H, self.interarrival)
            want_out = self.bucket.q_length
            if self.qmlp.input_size != want_in:
                raise ValueError(f"network takes {self.qmlp.input_size} inputs, T={self.T} "
                                 f"{'with' if self.interarrival else 'without'} inter-arrival "
                                 f"times needs {want_in}")
            if self.qmlp.output_size != want_out:
                raise ValueError(f"network gives {self.qmlp.output_size} Q-values, bucket "
                                 f"(N={self.N}, P={self.P}, M={self.M}) needs {want_out}")
            if self.qmlp.act_bits not in CODE_RANGE:
                raise ValueError(f"activation width {self.qmlp.act_bits!r} bits "
                                 f"(must be 8 or 16)")
            zlo, zhi = CODE_RANGE[self.qmlp.act_bits]
            prev = None
            for i, lay in enumerate(self.qmlp.layers):
                dout, din = lay.w_int8.shape
                if prev is not None and din != prev:
                    raise ValueError(f"layer {i} takes {din} inputs, layer {i - 1} gives {prev}")
                st = np.asarray(lay.seg_start)
                nseg = len(st) - 1
                if (nseg < 1 or st[0] != 0 or st[-1] != din or np.any(np.diff(st) <= 0)
                        or len(lay.in_scale) != nseg or len(lay.in_zero) != nseg):
                    raise ValueError(f"layer {i}: bad input segments {st.tolist()}")
                if i > 0 and nseg != 1:
                    raise ValueError(f"layer {i}: hidden layers take one input segment")
                if not (np.all(lay.in_scale > 0) and np.all(np.isfinite(lay.in_scale))):
                    raise ValueError(f"layer {i}: input scales must be positive")
                if np.any(lay.in_zero < zlo) or np.any(lay.in_zero > zhi):
                    raise ValueError(f"layer {i}: zero points outside the {self.qmlp.act_bits}-bit "
                                     f"code range")
                if self.qmlp.act_bits == 16 and din > MAX_IN_16:
                    raise ValueError(f"layer {i}: {din} inputs; 16-bit activations allow at "
                                     f"most {MAX_IN_16}")
                if lay.w_scale.shape != (dout,) or lay.bias.shape != (dout,):
                    raise ValueError(f"layer {i}: scales/bias do not match {dout} outputs")
                if lay.leaky != (i + 1 < len(self.qmlp.layers)):
                    raise ValueError(f"layer {i}: only hidden layers have LeakyReLU")
                if self.qmlp.float_layers:
                    w, b = self.qmlp.float_layers[i]
                    if np.shape(w) != (dout, din) or np.shape(b) != (dout,):
                        raise ValueError(f"layer {i}: float weights do not match int8 ones")
                prev = dout


def to_bytes(policy):
    """Serialise a validated ``Policy`` to the blob format (bytes)."""
    try:
        policy.validate()
    except ValueError as e:
        raise BlobError(f"cannot write policy: {e}") from None
    parts = []
    lx = np.asarray(policy.lut_x, "<f4")
    ly = np.asarray(policy.lut_y, "<f4")
    flags = FLAG_INTERARRIVAL if policy.interarrival else 0
    act16 = policy.kind == "dqn" and policy.qmlp.act_bits == 16
    if act16:
        flags |= FLAG_ACT16
    version = 3 if act16 else 2
    parts.append(_HEAD.pack(MAGIC, version, KINDS[policy.kind], policy.N, policy.P, policy.M,
                            policy.T, flags, policy.metric_mean, policy.metric_std, policy.tinv))
    meta = json.dumps(policy.meta, sort_keys=True).encode()
    parts += [struct.pack("<I", len(meta)), meta]
    parts += [struct.pack("<I", len(lx)), lx.tobytes(), ly.tobytes()]
    if policy.kind == "thresholds":
        parts.append(np.asarray(policy.theta, "<f4").tobytes())
    else:
        layers = policy.qmlp.layers
        floats = policy.qmlp.float_layers or [
            ((lay.w_int8 * lay.w_scale[:, None]).astype(np.float32), lay.bias) for lay in layers]
        parts.append(struct.pack("<I", len(layers)))
        for lay, (w, bf) in zip(layers, floats):
            dout, din = lay.w_int8.shape
            parts.append(_LAYER.pack(din, dout, len(lay.in_scale), int(lay.leaky)))
            parts += [np.asarray(lay.seg_start, "<i4").tobytes(),
                      np.asarray(lay.in_scale, "<f4").tobytes(),
                      np.asarray(lay.in_zero, "<i4").tobytes(),
                      np.asarray(lay.w_scale, "<f4").tobytes(),
                      np.asarray(lay.bias, "<f4").tobytes(),
                      np.ascontiguousarray(lay.w_int8, np.int8).tobytes(),
                      np.ascontiguousarray(w, "<f4").tobytes(),
                      np.ascontiguousarray(bf, "<f4").tobytes()]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class _Reader:
    """Bounds-checked cursor over the blob body."""

    def __init__(self, data, name):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.data):
            raise BlobError(f"{self.name}: truncated while reading {what} "
                            f"(needs {n} bytes at offset {self.pos}, file body has {len(self.data)})")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, st, what):
        return st.unpack(self.take(st.size, what))

    def array(self, dtype, count, what):
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(dt.itemsize * count, what), dtype=dt).copy()


def from_bytes(data, name="<bytes>"):
    """Parse and validate a blob; raises ``BlobError`` naming ``name`` and the problem."""
    data = bytes(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BlobError(f"{name}: not a policy blob (wrong magic {data[:8]!r}, "
                        f"expected {MAGIC!r})")
    if len(data) < _HEAD.size + 4:
        raise BlobError(f"{name}: truncated ({len(data)} bytes, header alone needs "
                        f"{_HEAD.size + 4})")
    version = struct.unpack_from("<H", data, 8)[0]
    if version not in READABLE:
        raise BlobError(f"{name}: unknown format version {version} "
                        f"(this reader knows {', '.join(map(str, READABLE))})")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BlobError(f"{name}: CRC mismatch (file is corrupt or truncated)")
    r = _Reader(body, name)
    _, _, kind, N, P, M, T, flags, mean, std, tinv = r.unpack(_HEAD, "header")
    if flags & ~_KNOWN_FLAGS[version]:
        raise BlobError(f"{name}: unknown flags {flags:#x} for format version {version}")
    kinds = {v: k for k, v in KINDS.items()}
    if kind not in kinds:
        raise BlobError(f"{name}: unknown policy kind {kind}")
    if not (0 < N < P <= M) or M > 1 << 24 or T > 1 << 20:
        raise BlobError(f"{name}: inconsistent header (N={N}, P={P}, M={M}, T={T})")
    (mlen,) = r.unpack(struct.Struct("<I"), "metadata length")
    try:
        meta = json.loads(r.take(mlen, "metadata").decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlobError(f"{name}: metadata is not JSON ({e})") from None
    (nlut,) = r.unpack(struct.Struct("<I"), "lookup table size")
    lx = r.array("<f4", nlut, "lookup table").astype(np.float32)
    ly = r.array("<f4", nlut, "lookup table").astype(np.float32)
    pol = Policy(kinds[kind], N, P, M, mean, std, lx, ly, tinv=tinv, T=T,
                 interarrival=bool(flags & FLAG_INTERARRIVAL), meta=meta)
    if pol.kind == "thresholds":
        pol.theta = r.array("<f4", M - P + 1, "thresholds").astype(np.float32)
    else:
        (nl,) = r.unpack(struct.Struct("<I"), "layer count")
        if not 1 <= nl <= 64:
            raise BlobError(f"{name}: implausible layer count {nl}")
        layers, floats = [], []
        for i in range(nl):
            din, dout, nseg, leaky = r.unpack(_LAYER, f"layer {i} header")
            if not (din and dout and 1 <= nseg <= din) or din * dout > 1 << 26:
                raise BlobError(f"{name}: layer {i} has inconsistent dimensions "
                                f"({din} in, {dout} out, {nseg} segments)")
            what = f"layer {i}"
            st = r.array("<i4", nseg + 1, what).astype(np.int32)
            isc = r.array("<f4", nseg, what).astype(np.float32)
            izp = r.array("<i4", nseg, what).astype(np.int32)
            wsc = r.array("<f4", dout, what).astype(np.float32)
            bias = r.array("<f4", dout, what).astype(np.float32)
            wq = r.array(np.int8, dout * din, what).reshape(dout, din)
            wf = r.array("<f4", dout * din, what).astype(np.float32).reshape(dout, din)
            bf = r.array("<f4", dout, what).astype(np.float32) if version >= 2 else bias
            layers.append(QuantLayer(wq, wsc, bias, st, isc, izp, bool(leaky)))
            floats.append((wf, bf))
        pol.qmlp = QuantMLP(layers, floats, 16 if flags & FLAG_ACT16 else 8)
    if r.pos != len(body):
        raise BlobError(f"{name}: {len(body) - r.pos} unexpected bytes after the last field")
    try:
        pol.validate()
    except ValueError as e:
        raise BlobError(f"{name}: {e}") from None
    return pol


def write_blob(path, policy):
    """Write ``policy`` to ``path`` atomically (temp file in the same folder, then rename)."""
    atomic_write_bytes(path, to_bytes(policy))


def read_blob(path):
    """Read and validate a policy blob; ``BlobError`` (a ``ValueError``) names file and problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BlobError(f"{path}: cannot read ({e.strerror})") from None
    return from_bytes(data, path)
