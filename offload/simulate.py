"""Run policies over many parallel test streams under the token bucket.

A *stream* is one test sequence: per image its standardised metric, the true
reward of offloading it, the weak classifier's loss, and the slots until the
next image. ``Streams`` holds ``S`` of them as ``(S, L)`` arrays; ``make_streams``
builds them from a profile's test split and the generators of
``offload.sequences`` (SPEC section 4). Every run starts each stream with a full
bucket and an empty history and returns a ``SimResult``:

* ``mean_reward``: reward per image, averaged over all streams;
* ``avg_loss``: mean weak loss minus mean reward (SPEC section 5; lower is better);
* ``offload_rate``: offloads per image;
* ``token_hist``: how many decisions were taken at each token count ``n``;
* optionally the per-image trace (decisions, token counts) for plots.

Threshold policies run in a native loop; DQN policies run batched across
streams (one MLP call per image position for all streams).
"""

import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from offload import mlp, policies, sequences
from offload.ring import input_size
from offload_native import walk_block, window_block

__all__ = [
    "Streams", "SimResult", "make_streams", "run_thresholds", "run_thresholds_numpy", "run_dqn",
    "dqn_inputs", "input_blocks", "walk_block_numpy", "walk_start", "padded_windows",
    "window_block_numpy", "BLOCK_ROWS", "run_policy", "run_oracle", "run_lower_bound",
    "captured_share",
]


@dataclass
class Streams:
    """``S`` test streams of ``L`` images each (all arrays ``(S, L)``)."""

    metric: np.ndarray        # float32, standardised metric
    reward: np.ndarray        # float32, weak loss - strong loss
    weak_loss: np.ndarray     # float32
    interarrival: np.ndarray  # int64 slots to the next image (>= 1)
    raw_metric: np.ndarray = None  # float32 expected reward f(h); defaults to ``metric``
    # Hidden generator state, only for offload.ceiling (make_streams(hidden=True)):
    location: np.ndarray = None       # int64 run location in the metric-sorted images
    arrival_state: np.ndarray = None  # int8 arrival state of each image, 0 or 1

    def __post_init__(self):
        if self.raw_metric is None:
            self.raw_metric = self.metric
        self.metric = np.ascontiguousarray(self.metric, np.float32)
        self.reward = np.ascontiguousarray(self.reward, np.float32)
        self.weak_loss = np.ascontiguousarray(self.weak_loss, np.float32)
        self.interarrival = np.ascontiguousarray(self.interarrival, np.int64)
        self.raw_metric = np.ascontiguousarray(self.raw_metric, np.float32)
        shapes = {a.shape for a in (self.metric, self.reward, self.weak_loss, self.interarrival,
                                    self.raw_metric)}
        if len(shapes) != 1 or self.metric.ndim != 2:
            raise ValueError(f"stream arrays must share one (S, L) shape, got {sorted(shapes)}")
        if self.metric.size and self.interarrival.min() < 1:
            raise ValueError("inter-arrival times must be >= 1 slot")

    @property
    def shape(self):
        return self.metric.shape

    @property
    def mean_interarrival(self):
        return float(self.interarrival.mean())


@dataclass
class SimResult:
    """What one policy achieved on a set of streams."""

    policy: str
    mean_reward: float
    avg_loss: float
    offload_rate: float
    stream_reward: np.ndarray = None   # (S,) mean reward per image per stream
    token_hist: np.ndarray = None      # (M+1,) decisions at each token count
    decisions: np.ndarray = None       # (S, L) uint8, with trace
    tokens: np.ndarray = None          # (S, L) int32 scaled tokens before each decision
    feasible: bool = True              # False: ignores the bucket (lower bound)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_totals(cls, name, streams, total, count, **kw):
        """The result of policy ``name`` from its per-stream totals on ``streams``.

        ``total`` (S,) summed true reward, ``count`` (S,) images offloaded;
        other fields (``token_hist``, ``decisions``, ...) pass through.
        """
        S, L = streams.shape
        mean_reward = float(np.sum(total) / (S * L))
        return cls(name, mean_reward, float(streams.weak_loss.mean()) - mean_reward,
                   float(np.sum(count) / (S * L)), stream_reward=np.asarray(total) / L, **kw)

    def row(self):
        """A flat dict for tables (no arrays)."""
        return {"policy": self.policy, "avg_loss": self.avg_loss, "mean_reward": self.mean_reward,
                "offload_rate": self.offload_rate, "feasible": self.feasible, **self.extra}


def make_streams(metric, reward, weak_loss, scenario, *, length, n_seq, raw_metric=None,
                 purpose="test", hidden=False):
    """Streams of ``scenario``'s generators from one split's per-image arrays (SPEC section 4).

    The images are first sorted by metric so that an index range is a metric
    range (``metric`` standardised, ``raw_metric`` the expected reward it came
    from, used by the metric-only oracle). ``scenario`` (``offload.scenario.Scenario``)
    gives the image choice (``iid`` or ``location-reset`` with ``spread``,
    ``rprob``), the arrivals (``periodic`` or ``markov``) and, for ``purpose``
    (``"test"``, ``"training"``, ``"validation"``), the seeds. ``n_seq``
    sequences of ``length`` images. ``hidden=True`` also keeps the generators'
    hidden state (``location``: the run's location, 0 for i.i.d.;
    ``arrival_state``: 0 or 1, 0 for periodic) for ``offload.ceiling``; the
    streams are the same either way.
    """
    metric = np.asarray(metric, np.float32)
    order = np.argsort(metric, kind="stable")
    raw = metric if raw_metric is None else np.asarray(raw_metric, np.float32)
    metric, reward, weak_loss = metric[order], np.asarray(reward)[order], np.asarray(weak_loss)[order]
    raw = raw[order]
    n = len(metric)
    if n == 0:
        raise ValueError("no images to build streams from")
    image_seed, arrival_seed = scenario.stream_seeds(purpose)
    loc = state = None
    if scenario.choice == "iid":
        idx = sequences.iid(n, length, n_seq, image_seed)
        loc = np.zeros_like(idx) if hidden else None
    elif scenario.choice == "location-reset":
        idx = sequences.location_reset(n, length, n_seq, scenario.spread, scenario.rprob,
                                       image_seed, return_locations=hidden)
        if hidden:
            idx, loc = idx
    else:
        raise ValueError(f"unknown image choice {scenario.choice!r} (iid, location-reset)")
    if scenario.arrivals == "periodic":
        ia = sequences.periodic(length, n_seq)
        state = np.zeros(ia.shape, np.int8) if hidden else None
    elif scenario.arrivals == "markov":
        i1, i2, t1, t2 = scenario.markov
        ia = sequences.markov_arrivals(length, n_seq, i1, i2, t1, t2, arrival_seed,
                                       arrival_states=hidden)
        if hidden:
            ia, state = ia[0], (ia[1] - 1).astype(np.int8)
    else:
        raise ValueError(f"unknown arrival process {scenario.arrivals!r} (periodic, markov)")
    return Streams(metric[idx], reward[idx], weak_loss[idx], ia, raw[idx], loc, state)


def run_thresholds(theta, streams, bucket, *, trace=False, name="thresholds"):
    """A threshold policy (scalar = Baseline, or ``M-P+1`` values) in the native loop.

    ``bucket``: an ``offload.bucket.Bucket`` (scaled tokens).
    """
    out = policies.simulate_thresholds(streams.metric, streams.reward, streams.interarrival,
                                       theta, bucket, trace=trace)
    res = SimResult.from_totals(name, streams, out[0], out[1], token_hist=out[2])
    if trace:
        res.decisions, res.tokens = out[3], out[4]
    return res


def walk_start(bucket, S):
    """The state of ``S`` token walks before the first image: ``(n, total, count, hist)``.

    ``n`` (S,) scaled tokens, every bucket full (``M``); ``total`` (S,) summed
    reward and ``count`` (S,) offloads, zero; ``hist`` (M+1,) visits per token count.
    """
    M = bucket.M
    return (np.full(S, M, np.int64), np.zeros(S), np.zeros(S, np.int64),
            np.zeros(M + 1, np.int64))


def run_thresholds_numpy(theta, streams, bucket, *, name="thresholds"):
    """The same as ``run_thresholds``, vectorised across streams in numpy (a loop over images).

    The straightforward alternative the native loop is benchmarked against.
    """
    theta = policies.threshold_vector(theta, bucket)
    N, P, M = bucket
    S, L = streams.shape
    n, total, count, hist = walk_start(bucket, S)
    for k in range(L):
        np.add.at(hist, n, 1)
        ok = n >= P
        a = ok & (streams.metric[:, k] >= theta[np.where(ok, n - P, 0)])
        total += np.where(a, streams.reward[:, k], 0.0)
        count += a
        n = np.minimum(M, n - P * a + N * streams.interarrival[:, k])
    return SimResult.from_totals(name, streams, total, count, token_hist=hist)


def padded_windows(streams, H, use_ia):
    """Padded histories, time reversed, so each input window is a forward slice.

    ``rm[s, j]`` is ``m[s, L-1-j]`` with ``H-1`` zeros after the first image;
    ``ri`` likewise for inter-arrival times with ``H`` zeros. The window of
    position ``k`` (newest first) is then ``rm[s, Lm-H-k : Lm-k]``, a
    contiguous slice, which numpy copies much faster than a reversed one.
    """
    S, _ = streams.shape
    rm = np.ascontiguousarray(np.concatenate(
        [np.zeros((S, H - 1), np.float32), streams.metric], axis=1)[:, ::-1])
    ri = np.ascontiguousarray(np.concatenate(
        [np.zeros((S, H), np.float32), streams.interarrival.astype(np.float32)], axis=1)[:, ::-1]
    ) if use_ia else None
    return rm, ri


def dqn_inputs(streams, H, use_interarrival, start, stop):
    """SPEC section 6 inputs for positions ``start..stop-1`` of every stream.

    Returns float32 ``(S, stop-start, H or 2H)``: ``m[k], ..., m[k-H+1]`` and,
    with ``use_interarrival``, ``i[k-1], ..., i[k-H]`` (slots), zeros before
    the start of a stream. The inputs do not depend on the policy's actions,
    which is what lets a whole block of positions go through the network in
    one batch.
    """
    rm, ri = padded_windows(streams, H, use_interarrival)
    return window_block(rm, ri, H, start, stop)


def input_blocks(streams, H, use_interarrival, rows=None):
    """Yield ``(start, stop, x)`` over all positions, blocks of about ``rows`` inputs.

    ``x`` is :func:`dqn_inputs` of positions ``start..stop-1``, shaped
    ``(S * (stop-start), din)`` with stream-major rows. The default block
    keeps ``x`` to a few tens of MB whatever the number of streams.
    """
    S, L = streams.shape
    rm, ri = padded_windows(streams, H, use_interarrival)
    step = max(1, (rows or BLOCK_ROWS) // max(S, 1))
    for k0 in range(0, L, step):
        k1 = min(L, k0 + step)
        x = window_block(rm, ri, H, k0, k1)
        yield k0, k1, x.reshape(S * (k1 - k0), x.shape[2])


def window_block_numpy(rm, ri, H, start, stop):
    """Numpy twin of ``offload_native.window_block`` (tests compare the two)."""
    from numpy.lib.stride_tricks import sliding_window_view

    S = rm.shape[0]
    x = np.empty((S, stop - start, 2 * H if ri is not None else H), np.float32)
    for r, lo, hi in ((rm, 0, H), (ri, H, 2 * H)):
        if r is None:
            continue
        last = r.shape[1] - H  # window start of position 0
        x[:, :, lo:hi] = sliding_window_view(r, H, axis=1)[:, last - stop + 1:last - start + 1][:, ::-1]
    return x


def _forward_fn(network, H, use_interarrival, threads=1):
    """``(forward(x (B, din)) -> Q (B, out), din)`` for any network form run_dqn takes."""
    if isinstance(network, mlp.QuantMLP):
        network = network.native()
    if isinstance(network, mlp.Int8MLP):
        net = network
        forward, din = (lambda x: net.forward(x, threads=threads)), network.input_size
    elif callable(network):
        forward, din = network, getattr(network, "input_size", input_size(H, use_interarrival))
    else:
        layers = network
        forward, din = (lambda x: mlp.forward_float(layers, x)), np.shape(layers[0][0])[1]
    if din != input_size(H, use_interarrival):
        raise ValueError(f"network takes {din} inputs, H={H} "
                         f"{'with' if use_interarrival else 'without'} inter-arrival times "
                         f"gives {input_size(H, use_interarrival)}")
    return forward, din


# Rows per network call: big enough that per-call overhead vanishes, small
# enough that a block of inputs stays in a few tens of MB.
BLOCK_ROWS = 1 << 15


def run_dqn(network, streams, bucket, *, H, use_interarrival=True, trace=False, name="dqn",
            progress=False, threads=None, native_walk=True):
    """A DQN policy batched across streams and positions.

    ``network`` is a ``QuantMLP`` (runs the native int8 forward, as the device
    does), an ``Int8MLP``, a list of float ``(weight, bias)`` layers (runs the
    float32 numpy reference), or any callable mapping float32 inputs
    ``(B, din)`` to Q-vectors ``(B, out)``. The input at image ``k`` is SPEC
    section 6's window of ``H`` metrics and, optionally, ``H`` inter-arrival
    times (slots). ``bucket``: an ``offload.bucket.Bucket`` (scaled tokens).

    Since the inputs do not depend on the decisions, the Q-vectors of a block
    of positions of every stream are computed in one network call; only the
    token states (scaled tokens) are then walked image by image. The native
    int8 forward splits each block over ``threads`` threads (default: every
    CPU core); results do not depend on it. ``native_walk=False`` walks the
    token states with the numpy twin instead (same results; for tests).
    """
    threads = (os.cpu_count() or 1) if threads is None else int(threads)
    forward, din = _forward_fn(network, H, use_interarrival, threads)
    N, P, M = bucket
    S, L = streams.shape
    n, total, count, hist = walk_start(bucket, S)
    dec = np.zeros((S, L), np.uint8) if trace else None
    tok = np.zeros((S, L), np.int32) if trace else None
    walk = walk_block if native_walk else walk_block_numpy
    # disable=None: bars only on a terminal, never as clutter in logs and pipes.
    bar = tqdm(total=S * L, desc=name, unit="decision", unit_scale=True,
               disable=None if progress else True, leave=False)
    for k0, k1, x in input_blocks(streams, H, use_interarrival):
        q = np.asarray(forward(x), np.float32).reshape(S, k1 - k0, -1)
        # Q(n, 1) >= Q(n, 0) for every token state at once: (S, K, M-P+1).
        send = bucket.prefers_send(q)
        walk(send, streams.reward, streams.interarrival, k0, n, total, count, hist, N, P, M,
             dec, tok)
        bar.update(S * (k1 - k0))
    bar.close()
    return SimResult.from_totals(name, streams, total, count, token_hist=hist, decisions=dec,
                                 tokens=tok)


def walk_block_numpy(send, reward, interarrival, k0, n, total, count, hist, N, P, M,
                     dec=None, tok=None):
    """Numpy twin of ``offload_native.walk_block``: one numpy step per position, all streams at once."""
    rows = np.arange(len(n))
    for j in range(send.shape[1]):
        k = k0 + j
        ok = n >= P
        a = ok & send[rows, j, np.where(ok, n - P, 0)]
        np.add.at(hist, n, 1)
        if dec is not None:
            dec[:, k], tok[:, k] = a, n
        total += np.where(a, reward[:, k], 0.0)
        count += a
        n[:] = np.minimum(M, n - P * a + N * interarrival[:, k])


def run_policy(policy, streams, *, trace=False, name=None, int8=True, progress=False,
               threads=None):
    """Run a policy blob (``offload.blob.Policy``): thresholds natively, DQN int8 or float."""
    name = name or policy.meta.get("name", policy.kind)
    if policy.kind == "thresholds":
        return run_thresholds(policy.theta, streams, policy.bucket, trace=trace, name=name)
    net = policy.qmlp if int8 else policy.qmlp.float_layers
    return run_dqn(net, streams, policy.bucket, H=policy.H, use_interarrival=policy.interarrival,
                   trace=trace, name=name, progress=progress, threads=threads)


def run_oracle(streams, bucket, *, metric_only=False, progress=False):
    """Oracle per stream (SPEC section 5): true rewards, or metrics only (then scored on rewards).

    The metric-only form maximises the sum of ``raw_metric`` (expected rewards)
    sent. Both respect the bucket but know the future, so no device can run them.
    """
    S, L = streams.shape
    total = np.zeros(S)
    count = np.zeros(S, np.int64)
    for s in tqdm(range(S), desc="oracle-metric" if metric_only else "oracle", unit="stream",
                  disable=None if progress else True, leave=False):
        if metric_only:
            t, mask = policies.oracle_metric(streams.raw_metric[s], streams.reward[s],
                                             streams.interarrival[s], bucket)
        else:
            t, mask = policies.oracle(streams.reward[s], streams.interarrival[s], bucket)
        total[s], count[s] = t, mask.sum()
    return SimResult.from_totals("oracle-metric" if metric_only else "oracle", streams, total,
                                 count)


def run_lower_bound(train_metric, streams, rate):
    """Offload every test image above the training ``(1 - rate*tau)`` quantile, no bucket.

    Not feasible under the bucket; ``tau`` is the streams' mean inter-arrival time.
    """
    theta = policies.baseline_threshold(train_metric, rate, streams.mean_interarrival)
    a = streams.metric >= theta
    total = np.where(a, streams.reward, 0.0).sum(axis=1)
    return SimResult.from_totals("lower-bound", streams, total, a.sum(axis=1), feasible=False)


def captured_share(result, baseline, oracle):
    """Share of the gain ``oracle - baseline`` (mean reward) that ``result`` captures."""
    gain = oracle.mean_reward - baseline.mean_reward
    if abs(gain) < 1e-12:
        return float("nan")
    return (result.mean_reward - baseline.mean_reward) / gain
