"""The DQN's MLP: float32 reference, int8 quantisation, and the decision rule.

A network is a list of ``(weight, bias)`` pairs, ``weight`` of shape
``(out, in)``; every layer but the last is followed by LeakyReLU(0.2) (SPEC
section 6). ``quantize`` turns it into a ``QuantMLP``:

* weights: int8, symmetric, one scale per output channel;
* activations: int8 (or 16-bit codes, ``act_bits=16``), asymmetric, one
  (scale, zero point) per layer input, taken from the range seen on
  calibration inputs. The network input may be split into
  *segments* (metrics, inter-arrival times) with a (scale, zero point) each,
  since the two have very different ranges;
* accumulation in int32, requantisation in float32:
  ``y[j] = offset[j] + sum_s mult[s, j] * acc_s[j]`` with
  ``mult[s, j] = w_scale[j] * in_scale[s]`` and ``offset`` folding the bias and
  the zero points.

``forward_int8`` is the numpy twin of the native ``Int8MLP``: the same float32
operations in the same order, so the two agree to the bit.
"""

from dataclasses import dataclass, field

import numpy as np

from offload_native import Int8MLP, decide
from offload_native._mlp import CODE_RANGE, MAX_IN_16

__all__ = [
    "LEAKY_SLOPE", "decide", "decide_reference", "decide_batch",
    "forward_float", "he_uniform", "QuantLayer", "QuantMLP", "equalize", "quantize", "correct_bias", "forward_int8",
    "Int8MLP", "MAX_IN_16", "weight_grid",
]

LEAKY_SLOPE = np.float32(0.2)


def decide_reference(q, n, bucket):
    """Numpy twin of the native ``decide``: offload iff ``n >= P`` and ``Q(n,1) >= Q(n,0)``.

    ``q`` one Q-vector in ``bucket``'s layout (``offload.bucket.Bucket``), ``n`` scaled tokens.
    """
    if not bucket.can_send(n):
        return False
    return bool(q[bucket.q_index(n, 1)] >= q[bucket.q_index(n, 0)])


def decide_batch(q, n, bucket):
    """Decisions for a batch: ``q`` (B, L) Q-vectors, ``n`` (B,) token states -> bool (B,)."""
    q = np.asarray(q)
    n = np.asarray(n, dtype=np.int64)
    rows = np.arange(q.shape[0])
    ok = bucket.can_send(n)
    i1 = bucket.q_index(np.where(ok, n, bucket.P), 1)
    return ok & (q[rows, i1] >= q[rows, bucket.q_index(n, 0)])


def he_uniform(sizes, rng):
    """Random network with He-uniform weights (the paper's initialisation), zero biases.

    ``sizes`` = ``[in, hidden..., out]``. Returns a list of ``(weight, bias)``.
    """
    layers = []
    for din, dout in zip(sizes[:-1], sizes[1:]):
        lim = np.sqrt(6.0 / din)
        layers.append((rng.uniform(-lim, lim, size=(dout, din)).astype(np.float32),
                       np.zeros(dout, dtype=np.float32)))
    return layers


def forward_float(layers, x):
    """Float32 forward pass: ``x`` (B, in) or (in,) -> Q-values of the same rank."""
    h = np.asarray(x, dtype=np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ np.asarray(w, np.float32).T + np.asarray(b, np.float32)
        if i + 1 < len(layers):
            h = np.where(h < 0, h * LEAKY_SLOPE, h)
    return h


@dataclass
class QuantLayer:
    """One int8 layer. ``seg_start`` has ``nseg + 1`` boundaries into the input."""

    w_int8: np.ndarray      # (out, in) int8
    w_scale: np.ndarray     # (out,) float32, per output channel
    bias: np.ndarray        # (out,) float32
    seg_start: np.ndarray   # (nseg + 1,) int32
    in_scale: np.ndarray    # (nseg,) float32
    in_zero: np.ndarray     # (nseg,) int32
    leaky: bool

    def requant(self):
        """``(mult (nseg, out), offset (out,))`` in float32, as both forwards use them."""
        nseg = len(self.in_scale)
        w = self.w_int8.astype(np.int64)
        mult = (self.w_scale[None, :].astype(np.float64)
                * self.in_scale[:, None].astype(np.float64)).astype(np.float32)
        off = self.bias.astype(np.float64).copy()
        for s in range(nseg):
            a, b = self.seg_start[s], self.seg_start[s + 1]
            rowsum = w[:, a:b].sum(axis=1)
            off -= mult[s].astype(np.float64) * self.in_zero[s] * rowsum
        return mult, off.astype(np.float32)


@dataclass
class QuantMLP:
    """An int8 network plus the float weights it came from.

    ``act_bits``: width of the activation codes, 8 or 16 (the weights are
    int8 either way; 16-bit codes cost the native kernel no time, since it
    holds codes as int16 anyway, and make activation rounding negligible).
    """

    layers: list
    float_layers: list = field(default_factory=list)
    act_bits: int = 8

    @property
    def input_size(self):
        return self.layers[0].w_int8.shape[1]

    @property
    def output_size(self):
        return self.layers[-1].w_int8.shape[0]

    def native_args(self):
        """Arguments for the native ``Int8MLP``."""
        args = []
        for lay in self.layers:
            mult, off = lay.requant()
            args.append((lay.w_int8, lay.seg_start, (1.0 / lay.in_scale).astype(np.float32),
                         lay.in_zero.astype(np.float32), mult, off, lay.leaky))
        return args

    def native(self):
        """The compiled forward pass for this network."""
        return Int8MLP(self.native_args(), self.act_bits)


def equalize(layers, calib_x, alpha=0.5):
    """The same network with its hidden channels rescaled for per-layer int8 activations.

    LeakyReLU commutes with a positive scale (``f(c z) = c f(z)``), so
    multiplying hidden unit ``j`` of layer ``l`` (its weight row and bias) by
    ``c_j`` and dividing column ``j`` of layer ``l+1`` by ``c_j`` computes the
    same function. ``quantize`` gives each layer's input one int8 scale; a
    unit whose activations span a small range then gets few of its 256
    levels. With ``c_j = (R / R_j) ** alpha`` (``R_j`` the unit's range on
    ``calib_x``, ``R`` the largest in the layer) the ranges move towards each
    other; ``alpha = 0.5`` splits the difference with the weights of the
    next layer, whose per-row int8 scales the ``1 / c_j`` columns stretch.
    Returns new float32 ``(weight, bias)`` layers.
    """
    out = [(np.asarray(w, np.float64).copy(), np.asarray(b, np.float64).copy()) for w, b in layers]
    h = np.asarray(calib_x, np.float64)
    for i in range(len(out) - 1):
        w, b = out[i]
        z = h @ w.T + b
        a = np.where(z < 0, z * float(LEAKY_SLOPE), z)
        r = a.max(axis=0) - a.min(axis=0)
        r = np.maximum(r, 1e-6 * max(float(r.max()), 1e-30))
        c = (r.max() / r) ** alpha
        out[i] = (w * c[:, None], b * c)
        w2, b2 = out[i + 1]
        out[i + 1] = (w2 / c[None, :], b2)
        h = a * c
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in out]


def weight_grid(w):
    """``w`` (out, in) rounded to the int8 grid ``quantize`` gives it (one scale per row).

    A network whose weights are already on this grid keeps them exactly when
    quantised: its only int8 error is then activation rounding.
    """
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return (np.clip(np.rint(w / scale[:, None]), -127, 127) * scale[:, None]).astype(np.float32)


def _act_quant(lo, hi, bits=8):
    """Asymmetric (scale, zero point) of ``bits``-bit codes covering ``[lo, hi]`` (and 0)."""
    qlo, qhi = CODE_RANGE[bits]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    s = (hi - lo) / (qhi - qlo)
    z = int(np.clip(np.rint(qlo - lo / s), qlo, qhi))
    return np.float32(s), z


def quantize(layers, calib_x, segments=(0,), act_bits=8):
    """Quantise a float network to int8 using calibration inputs.

    Parameters
    ----------
    layers : list of (weight (out, in), bias (out,))
    calib_x : array (B, in)
        Representative inputs; activation ranges are their min/max per layer.
    segments : sequence of int
        Start offsets of the input segments that get their own input scale,
        e.g. ``(0, H)`` for H metrics followed by H inter-arrival times.
    act_bits : 8 or 16
        Width of the activation codes (``QuantMLP.act_bits``). 16 needs every
        layer to have at most ``MAX_IN_16`` inputs.
    """
    if act_bits not in CODE_RANGE:
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits!r}")
    if act_bits == 16:
        widest = max(np.asarray(w).shape[1] for w, _ in layers)
        if widest > MAX_IN_16:
            raise ValueError(f"16-bit activations allow at most {MAX_IN_16} inputs per layer, "
                             f"the network has {widest}")
    calib_x = np.asarray(calib_x, dtype=np.float32)
    if calib_x.ndim != 2 or calib_x.shape[1] != np.asarray(layers[0][0]).shape[1]:
        raise ValueError(f"calibration inputs have shape {calib_x.shape}, "
                         f"the network takes {np.asarray(layers[0][0]).shape[1]} inputs")
    din = calib_x.shape[1]
    bounds = np.array(list(segments) + [din], dtype=np.int32)
    if bounds[0] != 0 or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"segments {segments} must start at 0 and increase within {din}")
    qlayers = []
    h = calib_x
    for i, (w, b) in enumerate(layers):
        w = np.asarray(w, np.float32)
        b = np.asarray(b, np.float32)
        if i == 0:
            qs = [_act_quant(h[:, a:c].min(), h[:, a:c].max(), act_bits)
                  for a, c in zip(bounds[:-1], bounds[1:])]
            seg = bounds
        else:
            qs = [_act_quant(h.min(), h.max(), act_bits)]
            seg = np.array([0, w.shape[1]], dtype=np.int32)
        amax = np.abs(w).max(axis=1)
        w_scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        w_int8 = np.clip(np.rint(w / w_scale[:, None]), -127, 127).astype(np.int8)
        leaky = i + 1 < len(layers)
        qlayers.append(QuantLayer(w_int8, w_scale, b.copy(), seg,
                                  np.array([s for s, _ in qs], np.float32),
                                  np.array([z for _, z in qs], np.int32), leaky))
        h = h @ w.T + b
        if leaky:
            h = np.where(h < 0, h * LEAKY_SLOPE, h)
    return QuantMLP(qlayers, [(np.asarray(w, np.float32), np.asarray(b, np.float32))
                              for w, b in layers], act_bits)


def _quant_input(x, inv, zp, bits):
    lo, hi = CODE_RANGE[bits]
    return np.rint(np.clip(x * inv + zp, np.float32(lo), np.float32(hi))).astype(np.int32)


def _int8_outputs(qmlp, x):
    """Each layer's output (float32, before its LeakyReLU) along the int8 path."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    args = qmlp.native_args()
    w0, st0, inv0, zp0 = args[0][:4]
    a = np.empty(x.shape, dtype=np.int32)
    for s in range(len(inv0)):
        lo, hi = st0[s], st0[s + 1]
        a[:, lo:hi] = _quant_input(x[:, lo:hi], inv0[s], zp0[s], qmlp.act_bits)
    for li, (w, st, inv, zp, mult, off, leaky) in enumerate(args):
        w32 = w.astype(np.int32)
        y = np.broadcast_to(off, (x.shape[0], len(off))).astype(np.float32)
        for s in range(len(st) - 1):
            acc = a[:, st[s]:st[s + 1]] @ w32[:, st[s]:st[s + 1]].T
            y = y + mult[s][None, :] * acc.astype(np.float32)
        yield y
        if leaky:
            y = np.where(y < 0, y * LEAKY_SLOPE, y)
        if li + 1 < len(args):
            a = _quant_input(y, args[li + 1][2][0], args[li + 1][3][0], qmlp.act_bits)


def forward_int8(qmlp, x):
    """Numpy twin of the native int8 forward: ``x`` (B, in) float -> (B, out) float32."""
    for y in _int8_outputs(qmlp, x):
        pass
    return y.astype(np.float32)


def correct_bias(qmlp, calib_x):
    """Remove each int8 layer's mean error on ``calib_x``, first layer to last (in place).

    Rounding weights and activations shifts a layer's outputs on average,
    and the shift passes on through the later layers; subtracting the mean
    difference between the int8 and the float layer outputs from the float
    bias undoes it (one layer at a time, each seeing the corrected ones
    before it). Returns ``qmlp``.
    """
    x = np.asarray(calib_x, dtype=np.float32)
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(qmlp.float_layers):
        ref = h @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        for j, y in enumerate(_int8_outputs(qmlp, x)):
            if j == i:
                break
        lay = qmlp.layers[i]
        lay.bias = (lay.bias.astype(np.float64) - (y.astype(np.float64) - ref).mean(axis=0)
                    ).astype(np.float32)
        h = np.where(ref < 0, ref * float(LEAKY_SLOPE), ref)
    return qmlp
