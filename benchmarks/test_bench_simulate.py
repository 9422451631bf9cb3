"""Simulator throughput, in decisions (images x streams) per second.

* ``sim-thresholds``: a threshold policy (MDP-like, one threshold per token
  count, bucket (1, 10, 40)) on 64 streams x 20,000 images, in the native loop
  (``run_thresholds``) and in numpy vectorised across streams
  (``run_thresholds_numpy``, one numpy step per image position).
* ``sim-dqn``: the paper-size DQN (5 x 64, 96 metrics + 96 inter-arrival
  times, bucket (1, 10, 40)) batched across 64 streams x 2,000 images:
  ``run_dqn`` with the native int8 forward on 1 and on 2 threads; the path it
  replaced (one input at a time through the int8 network, numpy windows,
  numpy token walk: ``_run_dqn_previous`` below, the same operations); and the
  float32 numpy forward (float layers).

The contenders of a group agree: the two threshold loops and the three int8
runs give the same rewards and token histograms; the float run's decisions are
SPEC section 2's rule on the float network's Q-values at the token counts it
traced, and those counts are the token bucket's walk of its decisions.

Run the comparison with
``pytest benchmarks/test_bench_simulate.py --benchmark-enable --benchmark-group-by=group``;
decisions per second = ``extra_info["decisions"]`` / mean time (``--benchmark-json``
keeps both). numpy's BLAS may use several threads for the float forward; on
a small shared machine pin it with ``OPENBLAS_NUM_THREADS=1`` (thread
hand-offs on busy cores can cost more than the 64 x 192 matmuls themselves).
Without ``--benchmark-enable`` each contender executes once, with its checks.
"""

import numpy as np
import pytest

from numpy.lib.stride_tricks import sliding_window_view

from offload import mlp, sequences, simulate
from offload.bucket import Bucket, step_reference
from offload.simulate import Streams

from helpers import dqn_inputs, random_network

BUCKET = Bucket(1, 10, 40)
N, P, M = BUCKET
H = 96
BLOCK_ROWS = 1 << 15  # rows per network call of the previous path


def _streams(rng, S, L):
    weak = rng.integers(0, 2, size=(S, L)).astype(np.float32)
    strong = (rng.random((S, L)) < 0.2).astype(np.float32)
    ia = sequences.markov_arrivals(L, S, 1, 3, 0.05, 0.05, 1)
    return Streams(rng.normal(size=(S, L)).astype(np.float32), weak - strong, weak, ia)


@pytest.fixture(scope="module")
def thr():
    rng = np.random.default_rng(1)
    theta = np.linspace(2.0, 0.5, M - P + 1).astype(np.float32)
    return _streams(rng, 64, 20_000), theta


@pytest.fixture(scope="module")
def dqn():
    rng = np.random.default_rng(2)
    layers = random_network(rng, 2 * H, Bucket(N, P, M).q_length)
    q = mlp.quantize(layers, dqn_inputs(rng, 4000), segments=(0, H))
    return _streams(rng, 64, 2000), layers, q


@pytest.fixture(scope="module")
def thr_reference(thr):
    st, theta = thr
    return simulate.run_thresholds(theta, st, BUCKET)


@pytest.fixture(scope="module")
def dqn_reference(dqn):
    st, _, q = dqn
    return _run_dqn_previous(q.native(), st)


def _check(res, st, benchmark):
    benchmark.extra_info["decisions"] = int(st.metric.size)
    assert res.token_hist.sum() == st.metric.size
    assert 0 < res.offload_rate < 1


def _same(res, ref):
    np.testing.assert_array_equal(res.stream_reward, ref.stream_reward)
    np.testing.assert_array_equal(res.token_hist, ref.token_hist)


@pytest.mark.benchmark(group="sim-thresholds")
def test_sim_thresholds_native(benchmark, thr):
    st, theta = thr
    res = benchmark(simulate.run_thresholds, theta, st, BUCKET)
    _check(res, st, benchmark)
    _same(res, simulate.run_thresholds_numpy(theta, st, BUCKET))


@pytest.mark.benchmark(group="sim-thresholds")
def test_sim_thresholds_numpy(benchmark, thr, thr_reference):
    st, theta = thr
    res = benchmark.pedantic(simulate.run_thresholds_numpy, (theta, st, BUCKET),
                             rounds=3, iterations=1)
    _check(res, st, benchmark)
    _same(res, thr_reference)


def _windows_numpy(st, k0, k1):
    """SPEC section 6 inputs of positions ``k0..k1-1``, (S, k1-k0, 2H), by numpy strides.

    ``m[k], ..., m[k-H+1]`` then ``i[k-1], ..., i[k-H]``, zeros before the start.
    """
    S = st.shape[0]
    pm = np.concatenate([np.zeros((S, H - 1), np.float32), st.metric], axis=1)
    pi = np.concatenate([np.zeros((S, H), np.float32), st.interarrival.astype(np.float32)], axis=1)
    return np.concatenate([sliding_window_view(pm, H, axis=1)[:, k0:k1, ::-1],
                           sliding_window_view(pi, H, axis=1)[:, k0:k1, ::-1]], axis=2)


def _run_dqn_previous(nat, st):
    """``run_dqn`` before the tiled, threaded forward and the native walk and windows."""
    S, L = st.shape
    n, total, count, hist = simulate.walk_start(BUCKET, S)
    step = max(1, BLOCK_ROWS // S)
    for k0 in range(0, L, step):
        k1 = min(L, k0 + step)
        x = np.ascontiguousarray(_windows_numpy(st, k0, k1)).reshape(-1, 2 * H)
        q = nat.forward_rowwise(x).reshape(S, k1 - k0, -1)
        send = BUCKET.prefers_send(q)
        simulate.walk_block_numpy(send, st.reward, st.interarrival, k0, n, total, count, hist,
                                  N, P, M)
    return simulate.SimResult.from_totals("previous", st, total, count, token_hist=hist)


@pytest.mark.benchmark(group="sim-dqn")
@pytest.mark.parametrize("threads", [1, 2])
def test_sim_dqn_int8_native(benchmark, dqn, dqn_reference, threads):
    st, _, q = dqn
    res = benchmark.pedantic(simulate.run_dqn, (q, st, BUCKET),
                             {"H": H, "threads": threads}, rounds=3, iterations=1)
    _check(res, st, benchmark)
    _same(res, dqn_reference)  # the same decisions as the path it replaced


@pytest.mark.benchmark(group="sim-dqn")
def test_sim_dqn_int8_previous_path(benchmark, dqn):
    st, _, q = dqn
    res = benchmark.pedantic(_run_dqn_previous, (q.native(), st), rounds=3, iterations=1)
    _check(res, st, benchmark)
    _same(res, simulate.run_dqn(q, st, BUCKET, H=H, threads=1))


@pytest.mark.benchmark(group="sim-dqn")
def test_sim_dqn_float_numpy(benchmark, dqn):
    st, layers, _ = dqn
    res = benchmark.pedantic(simulate.run_dqn, (layers, st, BUCKET), {"H": H}, rounds=3,
                             iterations=1)
    _check(res, st, benchmark)
    tr = simulate.run_dqn(layers, st, BUCKET, H=H, trace=True)
    _same(tr, res)
    _check_float_trace(tr, st, layers)


def _check_float_trace(tr, st, layers):
    """The traced decisions are the rule on the float Q-values at the traced token
    counts (where the two Q-values are not within float rounding of each other),
    and the traced counts are the bucket's walk of those decisions."""
    S, L = st.shape
    x = np.ascontiguousarray(_windows_numpy(st, 0, L)).reshape(S * L, 2 * H)
    q = mlp.forward_float(layers, x).reshape(S, L, -1)
    n = tr.tokens.astype(np.int64)
    j = np.clip(n - P, 0, M - P)[..., None]
    keep = np.take_along_axis(q[:, :, BUCKET.q_keep_sendable], j, 2)[..., 0]
    send = np.take_along_axis(q[:, :, BUCKET.q_send], j, 2)[..., 0]
    want = (n >= P) & (send >= keep)
    clear = (n < P) | (np.abs(send - keep) > 1e-4)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(tr.decisions.astype(bool)[clear], want[clear])
    for s in range(0, S, 16):
        walk = [M]
        for k in range(L - 1):
            walk.append(step_reference(walk[-1], bool(tr.decisions[s, k]),
                                       int(st.interarrival[s, k]), N, P, M))
        np.testing.assert_array_equal(n[s], walk)
