"""Profile: the per-image table every policy is trained and tested on.

A profile holds, for each image of a dataset, what profiling the weak
(on-device) and strong (edge server) classifiers found: their top-k losses
(and, when known, the rank of the true class), the split the image belongs
to, and optionally the weak classifier's logits, the true labels and the
fitted offloading metric. It is stored as one ``.npz`` file; the schema is
documented field by field in ``docs/profile.md`` and in ``Profile``.

``reward = weak_loss - strong_loss`` is what offloading an image gains.
"""

import os
import zipfile
import zlib
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from . import metric as _metric
from .atomic import atomic_path

__all__ = [
    "Profile",
    "TRAIN",
    "VALIDATION",
    "TEST",
    "SCHEMA_VERSION",
    "from_mdp_file",
    "from_dqn_file",
    "LAYOUTS",
    "detect_layout",
    "read_profile",
]

#: Values of ``Profile.split``.
TRAIN, VALIDATION, TEST = 0, 1, 2
#: Written as key ``version``; a file with a larger version is refused.
SCHEMA_VERSION = 1

_RANK_MAX = np.iinfo(np.int16).max
_REQUIRED = ("weak_loss", "strong_loss", "split", "k")
_SCALARS = ("k", "tinv", "metric_mean", "metric_std", "source", "version")


# --------------------------------------------------------------------------- coercion helpers


def _float_array(name, value, ndim, dtype=np.float32):
    try:
        a = np.asarray(value)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"dtype {a.dtype}")
        a = a.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not numeric ({exc})") from None
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _int_array(name, value, dtype, lo, hi):
    a = np.asarray(value)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name}: must hold whole numbers")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{name}: must be integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected 1-D, got shape {a.shape}")
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{name}: values must be in {lo}..{hi}, got {a.min()}..{a.max()}")
    return a.astype(dtype)


def _float_scalar(name, value, positive=False):
    """A finite float (``>= 0``; ``> 0`` with ``positive``) from a 0-d number."""
    a = np.asarray(value)
    if a.ndim != 0 or a.dtype.kind not in "iuf":
        raise ValueError(f"{name}: must be a number, got {value!r}")
    v = float(a)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name}: must be finite and {'> 0' if positive else '>= 0'}, got {v}")
    return v


def _finite_scalar(name, value):
    a = np.asarray(value)
    if a.ndim != 0 or a.dtype.kind not in "iuf" or not np.isfinite(a):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(a)


def _int_scalar(name, value, lo):
    a = np.asarray(value)
    if a.ndim != 0 or a.dtype.kind not in "iu":
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if int(a) < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {int(a)}")
    return int(a)


# --------------------------------------------------------------------------- Profile


@dataclass(eq=False)
class Profile:
    """Per-image profiling results (one row per image, ``n`` images).

    Attributes (``.npz`` key = attribute name)
    ------------------------------------------
    weak_loss, strong_loss : float32 (n,)
        Loss of the weak / strong classifier on each image (top-k loss:
        0 or 1). Always present.
    split : int8 (n,)
        ``TRAIN`` (0), ``VALIDATION`` (1) or ``TEST`` (2).
    k : int
        The ``k`` of the top-k loss.
    weak_rank, strong_rank : int16 (n,) or None
        Rank of the true class (1 = best); when present, the losses must
        equal ``rank > k``. Both or neither.
    weak_logits : float32 (n, C) or None
        Weak classifier's logits (dequantised when the model is int8).
    labels : int64 (n,) or None
        True class, ``0..C-1``.
    entropy : float32 (n,) or None
        Entropy (nats) of ``softmax(tinv * weak_logits)``.
    metric : float32 (n,) or None
        Raw metric ``f(entropy)`` (expected reward), not standardised.
    tinv : float or None
        Calibrated inverse temperature.
    lut_x, lut_y : float32 (n_bins,) or None
        Metric map table (entropy bins in nats, expected reward); both or
        neither.
    metric_mean, metric_std : float or None
        Mean and standard deviation (ddof=0) of ``metric`` on the training
        split; both or neither; ``metric_std > 0``.
    source : str
        Where the profile came from (free text).
    """

    weak_loss: np.ndarray
    strong_loss: np.ndarray
    split: np.ndarray
    k: int = 1
    weak_rank: Optional[np.ndarray] = None
    strong_rank: Optional[np.ndarray] = None
    weak_logits: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    entropy: Optional[np.ndarray] = None
    metric: Optional[np.ndarray] = None
    tinv: Optional[float] = None
    lut_x: Optional[np.ndarray] = None
    lut_y: Optional[np.ndarray] = None
    metric_mean: Optional[float] = None
    metric_std: Optional[float] = None
    source: str = ""

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- checks

    def validate(self):
        """Coerce every field to its schema dtype and check shapes and values.

        Raises ``ValueError`` naming the offending field.
        """
        self.k = _int_scalar("k", self.k, 1)
        self.weak_loss = _float_array("weak_loss", self.weak_loss, 1)
        n = self.weak_loss.shape[0]
        self.strong_loss = self._per_image("strong_loss", _float_array("strong_loss", self.strong_loss, 1), n)
        self.split = self._per_image("split", _int_array("split", self.split, np.int8, 0, 2), n)
        self._check_ranks(n)
        self._check_logits(n)
        for name in ("entropy", "metric"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, self._per_image(name, _float_array(name, value, 1), n))
        if self.tinv is not None:
            self.tinv = _float_scalar("tinv", self.tinv)
        self._check_lut()
        self._check_stats()
        if not isinstance(self.source, str):
            raise ValueError(f"source: must be a string, got {type(self.source).__name__}")
        return self

    @staticmethod
    def _per_image(name, a, n):
        if a.shape[0] != n:
            raise ValueError(f"{name}: {a.shape[0]} rows, expected {n} (one per image)")
        return a

    def _check_ranks(self, n):
        if (self.weak_rank is None) != (self.strong_rank is None):
            raise ValueError("weak_rank and strong_rank: give both or neither")
        if self.weak_rank is None:
            return
        for name, loss in (("weak_rank", self.weak_loss), ("strong_rank", self.strong_loss)):
            rank = self._per_image(name, _int_array(name, getattr(self, name), np.int16, 1, _RANK_MAX), n)
            if not np.array_equal(loss, _metric.topk_loss(rank, self.k)):
                raise ValueError(f"{name}: losses disagree with rank > k (k={self.k})")
            setattr(self, name, rank)

    def _check_logits(self, n):
        n_classes = None
        if self.weak_logits is not None:
            z = _float_array("weak_logits", self.weak_logits, 2)
            self.weak_logits = self._per_image("weak_logits", z, n)
            n_classes = z.shape[1]
        if self.labels is not None:
            hi = (n_classes - 1) if n_classes else np.iinfo(np.int64).max
            self.labels = self._per_image("labels", _int_array("labels", self.labels, np.int64, 0, hi), n)

    def _check_lut(self):
        if (self.lut_x is None) != (self.lut_y is None):
            raise ValueError("lut_x and lut_y: give both or neither")
        if self.lut_x is None:
            return
        self.lut_x = _float_array("lut_x", self.lut_x, 1)
        self.lut_y = _float_array("lut_y", self.lut_y, 1)
        if self.lut_x.shape != self.lut_y.shape or self.lut_x.size < 2:
            raise ValueError(f"lut_x/lut_y: need equal lengths >= 2, got {self.lut_x.size}, {self.lut_y.size}")
        if np.any(np.diff(self.lut_x) < 0):
            raise ValueError("lut_x: must be non-decreasing")

    def _check_stats(self):
        if (self.metric_mean is None) != (self.metric_std is None):
            raise ValueError("metric_mean and metric_std: give both or neither")
        if self.metric_mean is not None:
            self.metric_mean = _finite_scalar("metric_mean", self.metric_mean)
            self.metric_std = _float_scalar("metric_std", self.metric_std, positive=True)

    # ---------------------------------------------------------------- views

    @classmethod
    def from_ranks(cls, weak_rank, strong_rank, split, k=1, **optional):
        """Build from ranks of the true class (1 = best); losses are ``rank > k``."""
        return cls(
            weak_loss=_metric.topk_loss(weak_rank, k),
            strong_loss=_metric.topk_loss(strong_rank, k),
            split=split,
            k=k,
            weak_rank=weak_rank,
            strong_rank=strong_rank,
            **optional,
        )

    @property
    def n(self):
        """Number of images."""
        return int(self.weak_loss.shape[0])

    @property
    def reward(self):
        """Offloading reward per image, ``weak_loss - strong_loss`` (float32, (n,))."""
        return self.weak_loss - self.strong_loss

    def indices(self, split):
        """Indices (int64) of the images in ``split`` (``TRAIN``, ``VALIDATION`` or ``TEST``)."""
        return np.flatnonzero(self.split == split)

    def standardized_metric(self):
        """``(metric - metric_mean) / metric_std`` (float64, (n,)); needs a fitted metric."""
        if self.metric is None or self.metric_mean is None:
            raise ValueError("profile has no fitted metric; call fit_metric() first")
        return _metric.standardize(self.metric, self.metric_mean, self.metric_std)

    def metric_map(self):
        """The fitted ``metric.MetricMap`` (calibration, table, standardisation)."""
        if self.lut_x is None or self.metric_mean is None:
            raise ValueError("profile has no metric table; call fit_metric() first")
        tinv = 1.0 if self.tinv is None else self.tinv
        return _metric.MetricMap(tinv, self.lut_x, self.lut_y, self.metric_mean, self.metric_std)

    def take(self, idx):
        """A new profile of the images ``idx`` (in that order); fit fields are kept."""
        idx = np.asarray(idx)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and f.name not in ("lut_x", "lut_y"):
                v = v[idx]
            values[f.name] = v
        return Profile(**values)

    # ---------------------------------------------------------------- metric fit

    def fit_metric(self):
        """Fit the offloading metric on the training split and fill the metric fields.

        1. With ``weak_logits``: ``tinv = calibrate`` on the training split when
           ``labels`` are present (otherwise the existing ``tinv``, or 1.0),
           and ``entropy`` for every image.
        2. With an entropy: the map ``lut_x, lut_y`` is fit on the training
           split's entropies and rewards; ``metric`` is the table applied to
           every image.
        3. ``metric_mean, metric_std`` from the training split's metrics.

        A profile with only ``metric`` (e.g. imported from the DQN paper) just
        gets step 3. Modifies the profile in place and returns it.
        """
        train = self.split == TRAIN
        if train.sum() < 2:
            raise ValueError(f"fit_metric: need >= 2 training images, have {int(train.sum())}")
        if self.weak_logits is not None:
            if self.labels is not None:
                self.tinv = _metric.calibrate(self.weak_logits[train], self.labels[train])
            elif self.tinv is None:
                self.tinv = 1.0
            self.entropy = _metric.entropy(self.weak_logits, self.tinv).astype(np.float32)
        if self.entropy is not None:
            xbins, ybins = _metric.fit_metric_map(self.entropy[train], self.reward[train])
            self.lut_x, self.lut_y = xbins.astype(np.float32), ybins.astype(np.float32)
            self.metric = _metric.apply_metric_map(self.entropy, self.lut_x, self.lut_y).astype(np.float32)
        elif self.metric is None:
            raise ValueError("fit_metric: profile has no weak_logits, entropy or metric")
        self.metric_mean, self.metric_std = _metric.metric_stats(self.metric[train])
        return self.validate()

    # ---------------------------------------------------------------- files

    def to_arrays(self):
        """The ``.npz`` contents: ``{key: ndarray}``; absent optional fields are left out."""
        out = {"version": np.asarray(SCHEMA_VERSION, dtype=np.int64)}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "k":
                v = np.asarray(v, dtype=np.int64)
            elif f.name == "source":
                v = np.asarray(v, dtype=np.str_)
            elif f.name in ("tinv", "metric_mean", "metric_std"):
                v = np.asarray(v, dtype=np.float64)
            out[f.name] = v
        return out

    def save(self, path, compress=False):
        """Write the profile to ``path`` (exactly that name) atomically.

        The data go to a temporary file in the same directory, which is
        flushed, synced and then renamed over ``path`` with ``os.replace``:
        a reader sees the old file or the new one, never a partial one.
        """
        self.validate()
        with atomic_path(path, suffix="") as tmp:
            with open(tmp, "wb") as fh:
                (np.savez_compressed if compress else np.savez)(fh, **self.to_arrays())

    @classmethod
    def load(cls, path):
        """Read a profile written by ``save``.

        Raises ``FileNotFoundError`` when there is no file, and ``ValueError``
        naming the file (and the key) when it is not a readable ``.npz``, a
        required key is missing, or a value has the wrong type, shape or range.
        Unknown keys are ignored.
        """
        data = _read_npz(path)
        version = data.get("version")
        if version is not None:
            try:
                v = _int_scalar("version", version, 1)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            if v > SCHEMA_VERSION:
                raise ValueError(f"{path}: profile version {v} is newer than supported ({SCHEMA_VERSION})")
        for key in _REQUIRED:
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}; not a profile file?")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in _SCALARS and v.ndim != 0:
                raise ValueError(f"{path}: key {f.name!r} must be a scalar, got shape {v.shape}")
            if f.name == "source":
                if v.dtype.kind != "U":
                    raise ValueError(f"{path}: key 'source' must be a string")
                v = str(v)
            values[f.name] = v
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{path}: bad key {exc}") from None


# --------------------------------------------------------------------------- reading files


def _read_npz(path):
    """``{key: ndarray}`` of an ``.npz`` file, or ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    # numpy would try any non-zip, non-.npy file as a pickle and, with pickles
    # refused, say "This file contains pickled (object) data": name the real
    # problem instead.
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    if head.startswith(b"\x93NUMPY"):
        raise ValueError(f"{path}: not a .npz profile (not a readable .npz file: it holds a "
                         "single .npy array, not an .npz archive)")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise ValueError(f"{path}: not a .npz profile (not a readable .npz file: it is not a "
                         f"zip archive, as every .npz is; it starts with {head[:12]!r})")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a .npy array, not an .npz archive")
        with z:
            return {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None


def _require(path, data, keys):
    for key in keys:
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")


def from_mdp_file(path, k=1, test_fold=None):
    """Import a profile in the MDP paper's ``.npz`` layout.

    Keys: ``wlogit`` (n, C) weak logits, ``gt`` (n,) labels, ``wrank`` and
    ``srank`` (n,) ranks of the true class in the weak and strong outputs,
    ``split`` (n,) fold number 0, 1 or 2.

    Ranks: when the smallest of all ``wrank`` and ``srank`` values is 0 the
    ranks are taken as 0-based (0 = best) and 1 is added; otherwise they are
    1-based as stored. Losses are ``rank > k`` (top-k).

    Splits: by default fold 0 is the training split, fold 1 validation and
    fold 2 test. The published MDP experiments instead cross-validate: for
    test fold ``f`` they train on the two other folds. ``test_fold=f`` gives
    that layout (fold ``f`` -> ``TEST``, the others -> ``TRAIN``).

    The metric is not fit; call ``fit_metric()``.
    """
    data = _read_npz(path)
    _require(path, data, ("wlogit", "gt", "wrank", "srank", "split"))
    try:
        wrank = _int_array("wrank", data["wrank"], np.int64, 0, _RANK_MAX)
        srank = _int_array("srank", data["srank"], np.int64, 0, _RANK_MAX)
        folds = _int_array("split", data["split"], np.int64, 0, 2)
    except ValueError as exc:
        raise ValueError(f"{path}: bad key {exc}") from None
    zero_based = min(wrank.min(initial=1), srank.min(initial=1)) == 0
    if zero_based:
        wrank, srank = wrank + 1, srank + 1
    if test_fold is None:
        split = folds.astype(np.int8)
        layout = "fold 0 train, 1 validation, 2 test"
    else:
        if test_fold not in (0, 1, 2) or isinstance(test_fold, bool):
            raise ValueError(f"test_fold must be 0, 1 or 2, got {test_fold!r}")
        split = np.where(folds == test_fold, TEST, TRAIN).astype(np.int8)
        layout = f"fold {test_fold} test, others train"
    source = f"mdp:{os.path.basename(os.fspath(path))} ({layout}; ranks {'0' if zero_based else '1'}-based in file)"
    try:
        return Profile.from_ranks(
            wrank, srank, split, k=k,
            weak_logits=data["wlogit"], labels=data["gt"], source=source,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def from_dqn_file(path, k=5):
    """Import a profile in the DQN paper's ``.npz`` layout (metrics already computed).

    Keys: ``metric_tr``, ``metric_ts`` (raw metric f(h)), ``wcost_tr``,
    ``wcost_ts``, ``scost_tr``, ``scost_ts`` (weak / strong losses). The
    ``_tr`` images become the training split, the ``_ts`` images the test
    split, in that order. Optional keys ``tinv`` and ``mtog`` (a (2, n_bins)
    entropy -> metric table) are kept as ``tinv`` and ``lut_x, lut_y``.
    ``metric_mean, metric_std`` are filled from the training metrics (the
    standardisation the DQN code applies). The file does not say which loss
    its costs are; ``k`` (default 5: the paper reports top-5 loss) is only
    recorded.
    """
    data = _read_npz(path)
    keys = ("metric_tr", "metric_ts", "wcost_tr", "wcost_ts", "scost_tr", "scost_ts")
    _require(path, data, keys)
    for key in keys:
        if data[key].ndim != 1:
            raise ValueError(f"{path}: bad key {key}: expected 1-D, got shape {data[key].shape}")
    n_tr, n_ts = data["metric_tr"].size, data["metric_ts"].size
    for part, n_part in (("tr", n_tr), ("ts", n_ts)):
        for key in (f"wcost_{part}", f"scost_{part}"):
            if data[key].size != n_part:
                raise ValueError(f"{path}: bad key {key}: {data[key].size} rows, expected {n_part}")
    optional = {}
    if "tinv" in data:
        optional["tinv"] = data["tinv"]
    if "mtog" in data:
        mtog = data["mtog"]
        if mtog.ndim != 2 or mtog.shape[0] != 2:
            raise ValueError(f"{path}: bad key mtog: expected shape (2, n_bins), got {mtog.shape}")
        optional["lut_x"], optional["lut_y"] = mtog[0], mtog[1]
    try:
        prof = Profile(
            weak_loss=np.concatenate([data["wcost_tr"], data["wcost_ts"]]),
            strong_loss=np.concatenate([data["scost_tr"], data["scost_ts"]]),
            split=np.repeat(np.array([TRAIN, TEST], dtype=np.int8), [n_tr, n_ts]),
            k=k,
            metric=np.concatenate([data["metric_tr"], data["metric_ts"]]),
            source=f"dqn:{os.path.basename(os.fspath(path))}",
            **optional,
        )
        if n_tr:
            prof.metric_mean, prof.metric_std = _metric.metric_stats(prof.metric[:n_tr])
        return prof.validate()
    except ValueError as exc:
        raise ValueError(f"{path}: bad key {exc}") from None


# --------------------------------------------------------------------------- any layout

#: The profile layouts ``read_profile`` recognises, by the keys each needs.
LAYOUTS = {
    "offload": _REQUIRED,
    "mdp": ("wlogit", "gt", "wrank", "srank", "split"),
    "dqn": ("metric_tr", "metric_ts", "wcost_tr", "wcost_ts", "scost_tr", "scost_ts"),
}
_LAYOUT_NAMES = {
    "offload": "this project's profile (Profile.save)",
    "mdp": "the MDP paper's layout (from_mdp_file)",
    "dqn": "the DQN paper's layout (from_dqn_file)",
}


def detect_layout(path):
    """Which of :data:`LAYOUTS` the ``.npz`` file ``path`` is in, told by its keys.

    The first layout (in the order of ``LAYOUTS``) whose keys are all present
    wins. Raises ``ValueError`` listing the keys found and the keys each
    layout needs when none matches, and as ``_read_npz`` does for a file that
    is not a readable ``.npz``.
    """
    keys = set(_read_npz(path))
    for name, need in LAYOUTS.items():
        if all(k in keys for k in need):
            return name
    found = ", ".join(sorted(keys)) or "none"
    need = "; ".join(f"{_LAYOUT_NAMES[n]}: {', '.join(ks)}" for n, ks in LAYOUTS.items())
    # A file holding part of one layout is most likely that layout, damaged: say what it lacks.
    best = max(LAYOUTS, key=lambda n: sum(k in keys for k in LAYOUTS[n]))
    if any(k in keys for k in LAYOUTS[best]):
        missing = ", ".join(repr(k) for k in LAYOUTS[best] if k not in keys)
        raise ValueError(f"{os.fspath(path)}: missing key {missing} of {_LAYOUT_NAMES[best]} "
                         f"(keys found: {found}). A profile needs the keys of one layout: {need}")
    raise ValueError(f"{os.fspath(path)}: unknown profile layout (keys found: {found}). "
                     f"A profile needs the keys of one layout: {need}")


def read_profile(path, *, k=None, test_fold=None):
    """Read a profile in any layout of :data:`LAYOUTS`, with its metric ready to use.

    ``k`` applies to the published layouts only (their defaults: 1 for the
    MDP layout, 5 for the DQN layout; this project's profiles carry their
    own), ``test_fold`` to the MDP layout only (see :func:`from_mdp_file`).
    A profile without a fitted metric gets one from its training split
    (:meth:`Profile.fit_metric`). Raises ``FileNotFoundError`` or
    ``ValueError`` naming the file and the problem.
    """
    layout = detect_layout(path)
    if layout == "offload":
        prof = Profile.load(path)
    elif layout == "mdp":
        prof = from_mdp_file(path, k=1 if k is None else k, test_fold=test_fold)
    else:
        prof = from_dqn_file(path, k=5 if k is None else k)
    if prof.metric is None or prof.metric_mean is None:
        try:
            prof.fit_metric()
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None
    return prof
