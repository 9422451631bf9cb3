"""Policies compared in the paper (SPEC section 5): lower bound, Baseline, MDP, Oracle.

Units: token counts ``n`` and the bucket (``offload.bucket.Bucket``: ``N, P, M``) are in *scaled tokens*
(SPEC section 1: ``N`` refilled per time slot, ``P`` per offload, ``M`` at
most); ``rate`` is real tokens per slot; inter-arrival times are *slots*
(integers ``>= 1``; ``interarrival[k]`` is the number of slots from image ``k``
to image ``k+1``). Metrics are whatever the caller uses for decisions
(standardised metrics in the pipeline); rewards are ``L_weak - L_strong``.

A threshold policy offloads image ``k`` iff ``n >= P`` and
``metric[k] >= theta[n-P]`` (ties offload), ``theta`` having ``M-P+1`` entries
for ``n = P..M``.
"""

import warnings

import numpy as np

from offload.bucket import Bucket
from offload_native import oracle_dp, simulate_thresholds as _simulate_native, upper_hull

__all__ = [
    "lower_bound", "baseline_threshold", "mdp_thresholds", "oracle", "oracle_metric",
    "threshold_vector", "simulate_thresholds", "interarrival_distribution",
    "DISCOUNT", "MAX_SWEEPS", "MAX_DP_STATES", "MAX_MDP_TABLE", "MAX_THRESHOLD_STATES",
]

DISCOUNT = 0.9999
MAX_SWEEPS = 10_000
# The MDP and the oracles work over every token count n = N..M: they refuse
# buckets with more states than this (a depth of 655 tokens at P = 100).
MAX_DP_STATES = 1 << 16
# The MDP tabulates next(n, a) for every state and distinct inter-arrival
# time: it refuses tables larger than this (entries), which bounds a sweep.
MAX_MDP_TABLE = 1 << 20
# A threshold policy keeps one float32 threshold per n = P..M (64 MiB here):
# a larger bucket is refused with a message rather than a failed allocation.
MAX_THRESHOLD_STATES = 1 << 24


# ----------------------------------------------------------------------------- checks

def _check_bucket(bucket):
    if not isinstance(bucket, Bucket):
        raise ValueError(f"bucket={bucket!r} must be an offload.bucket.Bucket")
    return bucket.N, bucket.P, bucket.M


def _check_dp_bucket(bucket, what):
    N, P, M = _check_bucket(bucket)
    if M - N + 1 > MAX_DP_STATES:
        raise ValueError(
            f"{what}: bucket (N={N}, P={P}, M={M}) has {M - N + 1:,} token states, above the "
            f"supported {MAX_DP_STATES:,}; use a smaller depth")
    return N, P, M


def _vector(x, name, dtype=np.float64):
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _same_length(**arrays):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError("mismatched lengths: " + ", ".join(f"{k}={n}" for k, n in lengths.items()))


def _slots(x, name="interarrival"):
    a = np.asarray(x)
    if a.size and (a.dtype.kind not in "iu" and not np.all(a == np.round(a))):
        raise ValueError(f"{name} must hold whole numbers of slots")
    a = a.astype(np.int64, copy=False)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.min() < 1:
        raise ValueError(f"{name} must be >= 1 slot everywhere, got {a.min()}")
    return a


# --------------------------------------------------------------- lower bound / baseline

def baseline_threshold(metrics, rate, mean_interarrival=1.0):
    """The single threshold of the lower bound and Baseline (SPEC section 5).

    The training metrics' ``(1 - rate*tau)`` quantile (numpy's default linear
    interpolation), ``tau = mean_interarrival`` in slots, so that a fraction
    ``rate*tau`` of the images (one per ``1/rate`` slots) is offloaded. The
    quantile level is clipped to ``[0, 1]``: ``rate*tau >= 1`` offloads all.

    Parameters
    ----------
    metrics : array (K,)
        Training metrics.
    rate : float
        Token rate ``r`` (real tokens per slot), ``> 0``.
    mean_interarrival : float
        Mean slots between images ``tau`` (1 for periodic arrivals).
    """
    metrics = _vector(metrics, "metrics")
    rate, tau = float(rate), float(mean_interarrival)
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"rate={rate} tokens/slot must be > 0")
    if not (np.isfinite(tau) and tau >= 1):
        raise ValueError(f"mean_interarrival={tau} slots must be >= 1")
    q = min(1.0, max(0.0, 1.0 - rate * tau))
    return float(np.quantile(metrics, q))


def lower_bound(train_metrics, test_metrics, test_rewards, rate, mean_interarrival=1.0):
    """Mean reward per test image of the bucket-free lower bound (SPEC section 5).

    Offloads every test image with ``metric >= baseline_threshold(train_metrics,
    rate, mean_interarrival)`` (the same ``>=`` as every threshold policy, so it
    is Baseline with an infinite bucket) and returns the mean of
    ``reward * offloaded`` over all test images. Not feasible under the bucket.
    """
    test_metrics = _vector(test_metrics, "test_metrics")
    test_rewards = _vector(test_rewards, "test_rewards")
    _same_length(test_metrics=test_metrics, test_rewards=test_rewards)
    theta = baseline_threshold(train_metrics, rate, mean_interarrival)
    return float(np.mean(np.where(test_metrics >= theta, test_rewards, 0.0)))


# ----------------------------------------------------------------------------- MDP

def interarrival_distribution(interarrival=None):
    """``(values, probabilities)`` of inter-arrival slots; ``None`` means periodic (``I = 1``)."""
    if interarrival is None:
        return np.ones(1, dtype=np.int64), np.ones(1)
    ia = _slots(interarrival)
    if ia.size == 0:
        raise ValueError("interarrival sample is empty")
    vals, counts = np.unique(ia, return_counts=True)
    return vals, counts / counts.sum()


def _threshold_candidates(metrics, rewards):
    """Sorted (descending) metrics and the tie-group ends usable as thresholds.

    Returns ``(sorted_metric, j, C)``: ``j`` the candidate positions (the last of
    each run of equal metrics, since ``metric >= theta`` offloads a whole run),
    ``C[j]`` the cumulative reward of the top ``j+1`` images.
    """
    order = np.argsort(-metrics, kind="stable")
    m = metrics[order]
    c = np.cumsum(rewards[order])
    ends = np.flatnonzero(np.append(m[1:] != m[:-1], True))
    return m, ends, c[ends]


def mdp_thresholds(metrics, rewards, bucket, *, interarrival=None, discount=DISCOUNT,
                   max_sweeps=MAX_SWEEPS, rtol=1e-6):
    """Token-dependent thresholds of the MDP policy by value iteration (SPEC section 5).

    Assumes i.i.d. metrics with the training distribution. With the ``K``
    training metrics sorted descending, threshold ``j`` offloads the top
    ``j+1`` images: fraction ``F(j) = (j+1)/K``, reward ``G(j) = C(j)/K`` with
    ``C`` the cumulative reward. Values ``V[n]``, ``n = N..M`` (scaled tokens)
    start at 0; each sweep, from the previous sweep's ``V`` (synchronous)::

        V[n] = g E[V[next(n,0)]]                                  n < P
        V[n] = max_j G(j) + g (F(j) E[V[next(n,1)]] + (1-F(j)) E[V[next(n,0)]])
        theta[n] = sorted_metric[argmax]                          n >= P

    with ``next(n, a) = min(M, n - P*a + N*I)`` and ``E`` over the inter-arrival
    slots ``I``. Stops when no threshold moves by more than
    ``1e-6 * max|metric|`` between sweeps, or after 10,000 sweeps (then it
    returns the last sweep's thresholds, as SPEC section 5 says, and emits a
    ``RuntimeWarning`` naming the threshold move still left).

    Since ``score(j) = g E0 + (C(j) + (j+1) d) / K`` with ``d = g (E1 - E0)``,
    the best ``j`` is the vertex of the upper convex hull of the points
    ``(j+1, C(j))`` that is extreme in direction ``(d, 1)``: a binary search per
    state, so a sweep costs ``O((M-N) * (#I values) + (M-P) log K)``.

    Limits: at most ``MAX_DP_STATES`` token states (``M - N + 1``) and a
    next-state table of at most ``MAX_MDP_TABLE`` entries (``M - N + 1``
    times the number of distinct inter-arrival times); larger problems are
    refused with a ``ValueError`` before any sweep. A sweep at the table cap
    takes a few milliseconds, so even 10,000 sweeps stay around a minute;
    typical problems (``M`` in the tens) converge in a few milliseconds.

    Ties: ``metric >= theta`` offloads every image equal to ``theta``, so only
    the last position of each run of equal metrics is a candidate (then ``F``
    and ``G`` describe what the threshold really does; without ties this is
    every ``j``). Among equally good candidates the smallest ``j`` (highest
    threshold) wins, as ``argmax`` would pick.

    Parameters
    ----------
    metrics, rewards : arrays (K,)
        Training metrics and rewards.
    bucket : offload.bucket.Bucket
        ``N, P, M`` (scaled tokens).
    interarrival : array of int, optional
        Sample of inter-arrival slots whose empirical distribution is used;
        ``None`` for periodic arrivals (``I = 1``).
    discount : float
        ``g``, in ``(0, 1)``.
    max_sweeps, rtol : int, float
        The stopping rule: at most ``max_sweeps`` sweeps, and stop once no
        threshold moves by more than ``rtol * max|metric|`` (a negative ``rtol``
        always runs ``max_sweeps``). The defaults are SPEC section 5's.

    Returns
    -------
    theta : float64 array (M-P+1,)
        ``theta[n-P]`` for ``n = P..M``, each a training metric value.
    """
    N, P, M = _check_dp_bucket(bucket, "MDP")
    metrics = _vector(metrics, "metrics")
    rewards = _vector(rewards, "rewards")
    _same_length(metrics=metrics, rewards=rewards)
    if not 0 < discount < 1:
        raise ValueError(f"discount={discount} must be in (0, 1)")
    if int(max_sweeps) < 1:
        raise ValueError(f"max_sweeps={max_sweeps} must be >= 1")
    vals, prob = interarrival_distribution(interarrival)
    if (M - N + 1) * len(vals) > MAX_MDP_TABLE:
        raise ValueError(
            f"MDP: bucket (N={N}, P={P}, M={M}) with {len(vals):,} distinct inter-arrival times "
            f"needs a {M - N + 1:,} x {len(vals):,} next-state table, above the supported "
            f"{MAX_MDP_TABLE:,} entries; use a smaller depth")
    m, ends, C = _threshold_candidates(metrics, rewards)
    K = len(metrics)
    hull = upper_hull(ends + 1.0, C)
    hx, hy, hj = ends[hull] + 1.0, C[hull], ends[hull]
    neg_slope = -np.diff(hy) / np.diff(hx)  # strictly increasing
    states = np.arange(N, M + 1)
    refill = N * np.minimum(vals, M)[None, :]
    nxt0 = np.minimum(M, states[:, None] + refill) - N          # (M-N+1, U)
    nxt1 = np.minimum(M, states[P - N:, None] - P + refill) - N  # (M-P+1, U)
    tol = rtol * np.max(np.abs(metrics))
    V = np.zeros(M - N + 1)
    theta = np.full(M - P + 1, np.nan)
    moved = np.inf
    for _ in range(int(max_sweeps)):
        E0 = V[nxt0] @ prob
        E1 = V[nxt1] @ prob
        d = discount * (E1 - E0[P - N:])
        best = np.searchsorted(neg_slope, d, side="left")  # first vertex with slope <= -d
        newV = discount * E0
        newV[P - N:] += (hy[best] + hx[best] * d) / K
        new_theta = m[hj[best]]
        V = newV
        moved = np.max(np.abs(new_theta - theta))  # NaN on the first sweep
        theta = new_theta
        if moved <= tol:
            break
    else:
        if tol >= 0:
            last = (f"a threshold still moved by {moved:.3g} in the last sweep"
                    if np.isfinite(moved) else "one sweep cannot show convergence")
            warnings.warn(
                f"MDP value iteration stopped after {int(max_sweeps):,} sweep(s) without "
                f"converging: {last} (tolerance {tol:.3g}); the last sweep's thresholds are used",
                RuntimeWarning, stacklevel=2)
    return theta


# ----------------------------------------------------------------------------- oracle

def _oracle_inputs(values, interarrival, bucket, name):
    N, P, M = _check_dp_bucket(bucket, "oracle")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values")
    ia = _slots(interarrival)
    _same_length(**{name: values, "interarrival": ia})
    return values, ia, N, P, M


def oracle(rewards, interarrival, bucket):
    """Best offload set for one finite sequence knowing every future reward and arrival.

    Exact dynamic programming over (image, scaled tokens) with the bucket
    starting full (SPEC section 1); an upper bound for every policy under the
    same bucket. Work: about 2 ns per image and token state (``M - N + 1``,
    at most ``MAX_DP_STATES``, else ``ValueError``); memory about
    ``16 * sqrt(L) * (M - N + 1)`` bytes.

    Parameters
    ----------
    rewards : array (L,)
        True reward of offloading each image.
    interarrival : int array (L,)
        Slots (``>= 1``) from image ``k`` to ``k+1`` (the last is not used).
    bucket : offload.bucket.Bucket
        ``N, P, M`` (scaled tokens).

    Returns
    -------
    (total_reward, offload_mask) : (float, bool array (L,))
        The maximum total reward and one feasible mask achieving it. Where
        offloading and not are equally good the image is not offloaded.
    """
    rewards, ia, N, P, M = _oracle_inputs(rewards, interarrival, bucket, "rewards")
    total, mask = oracle_dp(rewards, ia, N, P, M)
    return total, mask.astype(bool)


def oracle_metric(metrics, rewards, interarrival, bucket):
    """Metric-only oracle: maximise the sum of the metrics sent, score on true rewards.

    Knows the whole future of metrics and arrivals, but not the rewards: the
    yardstick for policies that see only metrics. Images with a metric ``<= 0``
    are never worth sending to it (standardised metrics can be negative).

    Returns
    -------
    (total_reward, offload_mask) : (float, bool array (L,))
        The true total reward of the chosen offload set, and that set.
    """
    metrics, ia, N, P, M = _oracle_inputs(metrics, interarrival, bucket, "metrics")
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != metrics.shape:
        raise ValueError(f"mismatched shapes: metrics {metrics.shape}, rewards {rewards.shape}")
    _, mask = oracle_dp(metrics, ia, N, P, M)
    mask = mask.astype(bool)
    return float(rewards[mask].sum()), mask


# ----------------------------------------------------------------------------- simulation

def threshold_vector(theta, bucket):
    """Thresholds for ``n = P..M`` of ``bucket`` as float32: a scalar (Baseline) is repeated."""
    N, P, M = _check_bucket(bucket)
    if M - P + 1 > MAX_THRESHOLD_STATES:
        raise ValueError(f"threshold policy: bucket (N={N}, P={P}, M={M}) has {M - P + 1:,} "
                         f"token states that can offload, above the supported "
                         f"{MAX_THRESHOLD_STATES:,}; use a smaller depth")
    t = np.asarray(theta, dtype=np.float32)
    if t.ndim == 0:
        return np.full(M - P + 1, t, dtype=np.float32)
    if t.shape != (M - P + 1,):
        raise ValueError(f"theta has shape {t.shape}, bucket (N={N}, P={P}, M={M}) "
                         f"needs a scalar or ({M - P + 1},) for n = P..M")
    return t


def simulate_thresholds(metric, reward, interarrival, theta, bucket, *, trace=False):
    """Run a threshold policy on one stream (1-D inputs) or ``S`` streams (2-D inputs).

    Each stream starts with a full bucket. ``theta`` is a scalar (Baseline) or
    ``M-P+1`` thresholds for ``n = P..M``; metrics are compared in float32.

    Returns ``(total_reward (S,), n_offloaded (S,), token_hist (M+1,))`` and, with
    ``trace``, also ``decisions`` (uint8) and ``tokens`` (int32, scaled tokens
    before each decision) shaped like the inputs. For 1-D inputs ``S = 1`` and
    the per-image arrays are 1-D.
    """
    N, P, M = _check_bucket(bucket)
    m = np.asarray(metric)
    one = m.ndim == 1
    as2 = (lambda x: np.asarray(x)[None, :]) if one else np.asarray
    out = _simulate_native(as2(metric), as2(reward), as2(interarrival),
                           threshold_vector(theta, bucket), N, P, M, trace)
    if trace and one:
        out = out[:3] + (out[3][0], out[4][0])
    return out
