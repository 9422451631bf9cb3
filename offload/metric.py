"""Offloading metric (SPEC section 3): losses, calibration, entropy, metric map.

Pipeline, all plain numpy:

1. ``topk_loss(rank, k)``: top-k loss of each classifier from the rank of the
   true class; the reward of offloading an image is
   ``weak_loss - strong_loss`` (in {-1, 0, 1}).
2. ``calibrate(logits, labels)``: one inverse temperature ``t`` for the weak
   classifier's logits (dimensionless, in [0, 2]).
3. ``entropy(logits, t)``: entropy of ``softmax(t * logits)`` in nats.
4. ``fit_metric_map(h, reward)``: a 1000-bin table ``f(h)`` of expected
   reward given entropy (Nadaraya-Watson regression, RBF kernel).
5. ``apply_metric_map(h, xbins, ybins)``: raw metric ``m = f(h)`` (expected
   reward, in reward units, i.e. loss units).
6. ``standardize(m, mean, std)``: the metric the DQN and the thresholds see.

``MetricMap`` bundles steps 2-6 for a trained map.
"""

from dataclasses import dataclass

import numpy as np

__all__ = [
    "topk_loss",
    "calibrate",
    "entropy",
    "dequantize",
    "fit_metric_map",
    "apply_metric_map",
    "standardize",
    "metric_stats",
    "bandwidth_candidates",
    "MetricMap",
    "N_BINS",
]

#: Number of evenly spaced entropy bins in a metric map table.
N_BINS = 1000
#: Exponents ``e`` of the bandwidth candidates ``2**e * (max - min)``.
BANDWIDTH_EXPONENTS = np.arange(-8.0, -3.75, 0.5)
#: Grid points per calibration round, and number of rounds (1 + 5 refinements).
CALIB_POINTS = 10
CALIB_ROUNDS = 6
CALIB_RANGE = (0.0, 2.0)
# Metric-map regression blocks: bins per block, samples per block, and the
# kernel cut-off (samples with relative weight below exp(-cut) are skipped).
_BIN_BLOCK = 25
_SAMPLE_BLOCK = 2048
_KERNEL_CUT = 50.0


# --------------------------------------------------------------------------- loss


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def topk_loss(rank, k=1):
    """Top-k loss from the rank of the true class.

    Parameters
    ----------
    rank : array_like of int
        Rank of the true class in a classifier's output, 1 = most likely.
    k : int
        The loss is 0 when the true class is among the ``k`` most likely.

    Returns
    -------
    ndarray of float32, same shape as ``rank``
        ``1.0`` where ``rank > k``, else ``0.0``.
    """
    k = _positive_int(k, "k")
    rank = np.asarray(rank)
    if rank.size and not np.issubdtype(rank.dtype, np.integer):
        if not np.all(np.isfinite(rank)) or np.any(rank != np.round(rank)):
            raise ValueError("rank must hold whole numbers")
    if rank.size and rank.min() < 1:
        raise ValueError(f"rank must be >= 1 (1 = best), got min {rank.min()}")
    return (rank > k).astype(np.float32)


# --------------------------------------------------------------------------- calibration


def _logits_2d(logits, name="logits"):
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (n_images, n_classes), got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name} contain NaN or inf")
    return z


def _mean_xent(shifted, true_shifted, tinvs):
    """Mean cross-entropy (nats) of ``softmax(t * z)`` for each ``t`` in ``tinvs``.

    ``shifted`` is ``z - max(z)`` per row (so ``<= 0``) and ``true_shifted`` the
    true class's entry of it; with ``t >= 0`` every exponent is ``<= 0`` and the
    largest is 0, so the log-sum-exp cannot overflow or hit ``log(0)``.
    """
    out = np.empty(len(tinvs))
    base = -true_shifted.mean()
    for i, t in enumerate(tinvs):
        lse = np.log(np.exp(t * shifted).sum(axis=1))
        out[i] = lse.mean() + t * base
    return out


def calibrate(logits, labels):
    """Inverse temperature minimising the mean cross-entropy of ``softmax(t * logits)``.

    Grid search: 10 evenly spaced ``t`` on [0, 2], then 5 more rounds of a
    10-point grid from one grid step below to one grid step above the best
    ``t`` so far (clipped to [0, 2]). Ties go to the smaller ``t``.

    Parameters
    ----------
    logits : array_like, shape (n_images, n_classes)
        Weak classifier's logits (any real scale; dequantise int8 outputs first).
    labels : array_like of int, shape (n_images,)
        True class of each image, in ``0..n_classes-1``.

    Returns
    -------
    float
        Inverse temperature ``t`` (dimensionless), ``0 <= t <= 2``.
    """
    z = _logits_2d(logits)
    y = _labels(labels, z.shape)
    if z.shape[0] == 0:
        raise ValueError("calibrate needs at least one image")
    shifted = z - z.max(axis=1, keepdims=True)
    true_shifted = shifted[np.arange(len(y)), y]
    lo, hi = CALIB_RANGE
    best = lo
    for _ in range(CALIB_ROUNDS):
        grid = np.linspace(lo, hi, CALIB_POINTS)
        best = float(grid[np.argmin(_mean_xent(shifted, true_shifted, grid))])
        step = grid[1] - grid[0]
        lo, hi = max(CALIB_RANGE[0], best - step), min(CALIB_RANGE[1], best + step)
    return best


def _labels(labels, shape):
    y = np.asarray(labels)
    if y.shape != (shape[0],):
        raise ValueError(f"labels must have shape ({shape[0]},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= shape[1]):
        raise ValueError(f"labels must be in 0..{shape[1] - 1}")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- entropy


def entropy(logits, tinv=1.0):
    """Entropy (nats) of ``softmax(tinv * logits)`` over the last axis.

    Computed as ``log S - sum(e * a) / S`` with ``a = tinv * (z - max z)``,
    ``e = exp(a)``, ``S = sum(e)``: no overflow, no ``log(0)``.

    Parameters
    ----------
    logits : array_like, shape (..., n_classes)
        Classifier logits; a 1-D array is one output.
    tinv : float
        Inverse temperature (from ``calibrate``), ``>= 0``.

    Returns
    -------
    ndarray of float64, shape (...)
        Entropy in nats, in ``[0, log(n_classes)]``.
    """
    tinv = float(tinv)
    if not np.isfinite(tinv) or tinv < 0:
        raise ValueError(f"tinv must be a finite number >= 0, got {tinv}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"logits must have a class axis, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf")
    a = tinv * (z - z.max(axis=-1, keepdims=True))
    e = np.exp(a)
    s = e.sum(axis=-1)
    h = np.log(s) - (e * a).sum(axis=-1) / s
    return np.maximum(h, 0.0)


def dequantize(q, scale, zero_point):
    """Real values of an affine-quantised (int8/uint8) tensor: ``(q - zero_point) * scale``.

    This is LiteRT's output quantisation (per tensor, or per axis when
    ``scale``/``zero_point`` are arrays that broadcast against ``q``). Use as
    ``entropy(dequantize(q, s, z), tinv)``.

    Parameters
    ----------
    q : array_like of int8 or uint8
        Quantised classifier output.
    scale : float or array_like
        Real value of one quantisation step, ``> 0``.
    zero_point : int or array_like
        Quantised value of real 0, within the range of ``q``'s dtype.

    Returns
    -------
    ndarray of float32
    """
    q = np.asarray(q)
    if q.dtype not in (np.int8, np.uint8):
        raise ValueError(f"q must be int8 or uint8, got dtype {q.dtype}")
    scale = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    zp = np.asarray(zero_point)
    info = np.iinfo(q.dtype)
    if not np.issubdtype(zp.dtype, np.integer):
        if not np.all(zp == np.round(zp)):
            raise ValueError(f"zero_point must be a whole number, got {zero_point}")
    if np.any(zp < info.min) or np.any(zp > info.max):
        raise ValueError(f"zero_point {zero_point} out of range for {q.dtype}")
    return ((q.astype(np.float64) - zp.astype(np.float64)) * scale).astype(np.float32)


# --------------------------------------------------------------------------- metric map


def bandwidth_candidates(lo, hi):
    """Kernel bandwidths tried by ``fit_metric_map``: ``2**e * (hi - lo)``, e = -8..-4 by 0.5 (nats)."""
    return np.exp2(BANDWIDTH_EXPONENTS) * (hi - lo)


def _check_fit_inputs(entropy, reward):
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    if h.ndim != 1 or r.ndim != 1:
        raise ValueError(f"entropy and reward must be 1-D, got shapes {h.shape}, {r.shape}")
    if h.shape != r.shape:
        raise ValueError(f"entropy ({h.size}) and reward ({r.size}) differ in length")
    if h.size == 0:
        raise ValueError("fit_metric_map: empty training set")
    if h.size < 2:
        raise ValueError("fit_metric_map needs at least 2 samples (even/odd split)")
    if not np.all(np.isfinite(h)):
        raise ValueError("fit_metric_map: entropy contains NaN or inf")
    if not np.all(np.isfinite(r)):
        raise ValueError("fit_metric_map: reward contains NaN or inf")
    if h.min() == h.max():
        raise ValueError(
            f"fit_metric_map: all training entropies are equal ({h[0]}), no range to map"
        )
    return h, r


def _kernel_regression(xbins, h, r, bw):
    """Nadaraya-Watson estimate at ``xbins`` of ``r`` given ``h``, weights ``exp(-(x-h)^2/bw^2)``.

    For numerical safety every bin's weights are divided by the weight of its
    nearest sample (the ratio is unchanged), so the largest weight is 1 and a
    bin far from all samples still gets the value of its nearest ones instead
    of 0/0. Samples whose relative weight is below ``exp(-_KERNEL_CUT)`` are
    skipped (with ``_KERNEL_CUT = 50`` that is < 2e-22 each, far below float64
    rounding even summed over millions of samples), so each block of bins
    only touches the sorted samples within reach. Memory is O(block), never
    O(bins x samples).
    """
    order = np.argsort(h, kind="stable")
    hs = h[order]
    r1 = np.stack([r[order], np.ones(len(hs))], axis=1)  # [reward, 1]: num and den in one matmul
    pos = np.clip(np.searchsorted(hs, xbins), 1, len(hs) - 1)
    d0 = np.minimum(np.abs(xbins - hs[pos - 1]), np.abs(xbins - hs[pos]))
    offset = (d0 / bw) ** 2
    reach = np.sqrt(d0 * d0 + _KERNEL_CUT * bw * bw)
    starts = np.searchsorted(hs, xbins - reach, side="left")
    stops = np.searchsorted(hs, xbins + reach, side="right")
    out = np.empty_like(xbins)
    inv_bw = 1.0 / bw
    for b in range(0, len(xbins), _BIN_BLOCK):
        xs, off = xbins[b:b + _BIN_BLOCK], offset[b:b + _BIN_BLOCK, None]
        acc = np.zeros((len(xs), 2))
        i1 = stops[b:b + _BIN_BLOCK].max()
        for s in range(starts[b:b + _BIN_BLOCK].min(), i1, _SAMPLE_BLOCK):
            e = min(s + _SAMPLE_BLOCK, i1)
            w = np.subtract.outer(xs, hs[s:e])
            w *= inv_bw
            np.square(w, out=w)
            np.subtract(off, w, out=w)
            np.exp(w, out=w)
            acc += w @ r1[s:e]
        out[b:b + _BIN_BLOCK] = acc[:, 0] / acc[:, 1]
    return out


def fit_metric_map(entropy, reward):
    """Fit the table ``f(h)`` of expected offloading reward given entropy.

    ``xbins`` are 1000 evenly spaced entropies from the training min to max;
    ``ybins`` the Nadaraya-Watson (RBF kernel) regression of reward on entropy
    there, weights ``exp(-(x - h_k)^2 / bw^2)``.

    Bandwidth selection: for each candidate ``bw = 2**e * (max - min)``,
    ``e = -8, -7.5, ..., -4``, fit the table on the even-indexed samples
    (``0, 2, 4, ...``, in the order given), predict the odd-indexed samples by
    *linear interpolation in that table* (exactly how ``apply_metric_map`` will
    use it), and score the mean squared error. The best (smallest; first on
    ties) candidate is refit on all samples. The bins always span the range of
    all samples.

    Parameters
    ----------
    entropy : array_like, shape (n,)
        Training entropies (nats), finite, not all equal, ``n >= 2``.
    reward : array_like, shape (n,)
        Training rewards ``weak_loss - strong_loss``.

    Returns
    -------
    xbins, ybins : ndarray of float64, shape (1000,)
        Entropy bins (nats, increasing) and expected reward at each.

    Raises
    ------
    ValueError
        Empty or mismatched inputs, fewer than 2 samples, NaN/inf, or all
        entropies equal.
    """
    h, r = _check_fit_inputs(entropy, reward)
    xbins = np.linspace(h.min(), h.max(), N_BINS)
    h_fit, r_fit, h_val, r_val = h[0::2], r[0::2], h[1::2], r[1::2]
    best_bw, best_err = None, np.inf
    for bw in bandwidth_candidates(h.min(), h.max()):
        table = _kernel_regression(xbins, h_fit, r_fit, bw)
        err = np.mean((np.interp(h_val, xbins, table) - r_val) ** 2)
        if err < best_err:
            best_bw, best_err = bw, err
    return xbins, _kernel_regression(xbins, h, r, best_bw)


def apply_metric_map(entropy, xbins, ybins):
    """Raw metric ``f(h)`` by linear interpolation in the table, clamped at the ends.

    Parameters
    ----------
    entropy : array_like
        Entropies (nats), any shape.
    xbins, ybins : array_like, shape (n_bins,)
        Table from ``fit_metric_map`` (``xbins`` increasing).

    Returns
    -------
    ndarray of float64, shape of ``entropy``
        Expected reward (loss units); NaN where the entropy is NaN.
    """
    x = np.asarray(xbins, dtype=np.float64)
    y = np.asarray(ybins, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 1:
        raise ValueError(f"xbins and ybins must be 1-D of equal length, got {x.shape}, {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("xbins must be non-decreasing")
    return np.interp(np.asarray(entropy, dtype=np.float64), x, y)


# --------------------------------------------------------------------------- standardisation


def metric_stats(metric):
    """Mean and standard deviation (population, ddof=0) of training metrics.

    A zero or non-finite standard deviation (constant metric) is replaced by
    1.0 so that ``standardize`` never divides by zero.

    Returns
    -------
    (mean, std) : tuple of float
    """
    m = np.asarray(metric, dtype=np.float64)
    if m.size == 0:
        raise ValueError("metric_stats: no metrics")
    if not np.all(np.isfinite(m)):
        raise ValueError("metric_stats: metric contains NaN or inf")
    mean, std = float(m.mean()), float(m.std())
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
        std = 1.0
    return mean, std


def standardize(metric, mean, std):
    """``(metric - mean) / std``: the metric in the space thresholds and the DQN use."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    return (np.asarray(metric, dtype=np.float64) - mean) / std


# --------------------------------------------------------------------------- bundle


@dataclass
class MetricMap:
    """A fitted metric: calibration, entropy -> reward table and standardisation.

    Attributes
    ----------
    tinv : float
        Inverse temperature applied to logits before the softmax.
    xbins, ybins : ndarray, shape (n_bins,)
        Entropy bins (nats) and expected reward at each.
    mean, std : float
        Training mean and standard deviation of the raw metric.
    """

    tinv: float
    xbins: np.ndarray
    ybins: np.ndarray
    mean: float
    std: float

    @classmethod
    def from_training(cls, reward, *, logits=None, labels=None, entropy=None, tinv=None):
        """Fit on a training split, from logits (calibrated when ``labels`` are given) or entropies.

        Exactly one of ``logits`` and ``entropy`` must be given. With logits,
        ``tinv`` is ``calibrate(logits, labels)`` unless given, or 1.0 when
        neither ``tinv`` nor labels are given. With entropies ``tinv`` is only
        recorded (default 1.0).
        """
        if (logits is None) == (entropy is None):
            raise ValueError("give exactly one of logits= and entropy=")
        if logits is not None:
            if tinv is None:
                tinv = calibrate(logits, labels) if labels is not None else 1.0
            h = _entropy(logits, tinv)
        else:
            h = np.asarray(entropy, dtype=np.float64)
            tinv = 1.0 if tinv is None else tinv
        xbins, ybins = fit_metric_map(h, reward)
        mean, std = metric_stats(apply_metric_map(h, xbins, ybins))
        return cls(float(tinv), xbins, ybins, mean, std)

    def raw_from_entropy(self, h):
        """Raw metric ``f(h)`` (expected reward) for entropies ``h`` (nats)."""
        return apply_metric_map(h, self.xbins, self.ybins)

    def from_entropy(self, h):
        """Standardised metric for entropies ``h`` (nats)."""
        return standardize(self.raw_from_entropy(h), self.mean, self.std)

    def __call__(self, logits):
        """Standardised metric for logits, shape (..., n_classes) -> (...)."""
        return self.from_entropy(_entropy(logits, self.tinv))


_entropy = entropy
