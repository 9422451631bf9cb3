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

Run the comparison with
``pytest tests/test_bench_simulate.py --benchmark-enable --benchmark-group-by=group``;
decisions per second = ``extra_info["decisions"]`` / mean time (``--benchmark-json``
keeps both). numpy's BLAS may use several threads for the float forward; on
a small shared machine pin it with ``OPENBLAS_NUM_THREADS=1`` (thread
hand-offs on busy cores can cost more than the 64 x 192 matmuls themselves).
In the normal test run each contender executes once, as a test
that it works.
"""

import numpy as np
import pytest

from offload import mlp, sequences, simulate
from offload.bucket import Bucket
from offload.simulate import Streams

from conftest import dqn_inputs, random_network

BUCKET = Bucket(1, 10, 40)
N, P, M = BUCKET
H = 96


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


def _check(res, st, benchmark):
    benchmark.extra_info["decisions"] = int(st.metric.size)
    assert res.token_hist.sum() == st.metric.size
    assert 0 < res.offload_rate < 1


@pytest.mark.benchmark(group="sim-thresholds")
def test_sim_thresholds_native(benchmark, thr):
    st, theta = thr
    res = benchmark(simulate.run_thresholds, theta, st, BUCKET)
    _check(res, st, benchmark)


@pytest.mark.benchmark(group="sim-thresholds")
def test_sim_thresholds_numpy(benchmark, thr):
    st, theta = thr
    res = benchmark.pedantic(simulate.run_thresholds_numpy, (theta, st, BUCKET),
                             rounds=3, iterations=1)
    _check(res, st, benchmark)


def _run_dqn_previous(nat, st):
    """``run_dqn`` before the tiled, threaded forward and the native walk and windows."""
    S, L = st.shape
    rm, ri = simulate._windows(st, H, True)
    n = np.full(S, M, np.int64)
    total, count, hist = np.zeros(S), np.zeros(S, np.int64), np.zeros(M + 1, np.int64)
    step = max(1, simulate._BLOCK_ROWS // S)
    for k0 in range(0, L, step):
        k1 = min(L, k0 + step)
        x = simulate._block_numpy(rm, ri, H, k0, k1).reshape(-1, 2 * H)
        q = nat.forward_rowwise(x).reshape(S, k1 - k0, -1)
        send = q[:, :, M - N + 1:] >= q[:, :, P - N:M - N + 1]
        simulate.walk_block_numpy(send, st.reward, st.interarrival, k0, n, total, count, hist,
                                  N, P, M)
    return simulate.SimResult.from_totals("previous", st, total, count, token_hist=hist)


@pytest.mark.benchmark(group="sim-dqn")
@pytest.mark.parametrize("threads", [1, 2])
def test_sim_dqn_int8_native(benchmark, dqn, threads):
    st, _, q = dqn
    res = benchmark.pedantic(simulate.run_dqn, (q, st, BUCKET),
                             {"H": H, "threads": threads}, rounds=3, iterations=1)
    _check(res, st, benchmark)
    # The same decisions as the path it replaced, in the normal test run too.
    prev = _run_dqn_previous(q.native(), st)
    np.testing.assert_array_equal(res.stream_reward, prev.stream_reward)
    np.testing.assert_array_equal(res.token_hist, prev.token_hist)


@pytest.mark.benchmark(group="sim-dqn")
def test_sim_dqn_int8_previous_path(benchmark, dqn):
    st, _, q = dqn
    res = benchmark.pedantic(_run_dqn_previous, (q.native(), st), rounds=3, iterations=1)
    _check(res, st, benchmark)


@pytest.mark.benchmark(group="sim-dqn")
def test_sim_dqn_float_numpy(benchmark, dqn):
    st, layers, _ = dqn
    res = benchmark.pedantic(simulate.run_dqn, (layers, st, BUCKET), {"H": H}, rounds=3,
                             iterations=1)
    _check(res, st, benchmark)
