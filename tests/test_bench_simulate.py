"""Simulator throughput, in decisions (images x streams) per second.

* ``sim-thresholds``: a threshold policy (MDP-like, one threshold per token
  count, bucket (1, 10, 40)) on 64 streams x 20,000 images, in the native loop
  (``run_thresholds``) and in numpy vectorised across streams
  (``run_thresholds_numpy``, one numpy step per image position).
* ``sim-dqn``: the paper-size DQN (5 x 64, 96 metrics + 96 inter-arrival
  times, bucket (1, 10, 40)) batched across 64 streams x 300 images, with the
  native int8 forward (``QuantMLP``) and the float32 numpy forward (float
  layers).

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
from offload.simulate import Streams

from conftest import dqn_inputs, random_network

N, P, M = 1, 10, 40
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
    layers = random_network(rng, 2 * H, mlp.q_length(N, P, M))
    q = mlp.quantize(layers, dqn_inputs(rng, 4000), segments=(0, H))
    return _streams(rng, 64, 300), layers, q


def _check(res, st, benchmark):
    benchmark.extra_info["decisions"] = int(st.metric.size)
    assert res.token_hist.sum() == st.metric.size
    assert 0 < res.offload_rate < 1


@pytest.mark.benchmark(group="sim-thresholds")
def test_sim_thresholds_native(benchmark, thr):
    st, theta = thr
    res = benchmark(simulate.run_thresholds, theta, st, N, P, M)
    _check(res, st, benchmark)


@pytest.mark.benchmark(group="sim-thresholds")
def test_sim_thresholds_numpy(benchmark, thr):
    st, theta = thr
    res = benchmark.pedantic(simulate.run_thresholds_numpy, (theta, st, N, P, M),
                             rounds=3, iterations=1)
    _check(res, st, benchmark)


@pytest.mark.benchmark(group="sim-dqn")
def test_sim_dqn_int8_native(benchmark, dqn):
    st, _, q = dqn
    res = benchmark.pedantic(simulate.run_dqn, (q, st, N, P, M, H, True), rounds=3, iterations=1)
    _check(res, st, benchmark)


@pytest.mark.benchmark(group="sim-dqn")
def test_sim_dqn_float_numpy(benchmark, dqn):
    st, layers, _ = dqn
    res = benchmark.pedantic(simulate.run_dqn, (layers, st, N, P, M, H, True), rounds=3,
                             iterations=1)
    _check(res, st, benchmark)
