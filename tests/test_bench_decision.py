"""One device decision, side by side: native int8 vs numpy float32, torch and LiteRT.

A decision is what the device does per frame once it has the metric: push it
into the history ring, write the DQN input, run the MLP, apply the decision rule
of SPEC section 2, and step the token bucket. All contenders share the ring,
the decision rule and the bucket; they differ only in the forward pass, and all
run the same weights (the paper's 5x64 network, 96 metrics + 96 inter-arrival
times, bucket (1, 10, 40)).

Run the comparison with
``pytest tests/test_bench_decision.py --benchmark-enable --benchmark-group-by=group``;
in the normal test run each contender executes once, as a test that it works.
"""

import numpy as np
import pytest

from offload import mlp
from offload.bucket import Bucket, TokenBucket
from offload.ring import HistoryRing

from conftest import dqn_inputs

H = 96


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    N, P, M = 1, 10, 40
    layers = mlp.he_uniform([2 * H, 64, 64, 64, 64, 64, Bucket(N, P, M).q_length], rng)
    q = mlp.quantize(layers, dqn_inputs(rng, 4000), segments=(0, H))
    metrics = rng.normal(size=4096).astype(np.float32)
    gaps = rng.integers(1, 4, size=4096)
    return (N, P, M), layers, q, metrics, gaps


def _decision_loop(forward, decide_fn, setup):
    """A closure making one decision per call with the given forward pass."""
    (N, P, M), _, _, metrics, gaps = setup
    metrics, gaps = metrics.tolist(), gaps.tolist()  # plain floats: no numpy scalar overhead
    ring = HistoryRing(H, True)
    bucket = TokenBucket(N, P, M)
    x = np.zeros(2 * H, np.float32)
    state = {"k": 0}

    def one():
        k = state["k"] = (state["k"] + 1) & 4095
        ring.push(metrics[k], gaps[k - 1])
        ring.write(x)
        q = forward(x)
        a = (decide_fn(q, bucket.tokens, N, P, M) if decide_fn is mlp.decide
             else decide_fn(q, bucket.tokens, Bucket(N, P, M)))
        bucket.step(a, gaps[k])
        return a

    return one


@pytest.mark.benchmark(group="decision")
def test_decision_native_int8(benchmark, setup):
    nat = setup[2].native()
    out = np.empty(nat.output_size, np.float32)

    def forward(x):
        nat.forward1(x, out)
        return out

    benchmark(_decision_loop(forward, mlp.decide, setup))


@pytest.mark.benchmark(group="decision")
@pytest.mark.parametrize("act_bits", [8, 16])
def test_decision_native_fused(benchmark, setup, act_bits):
    """The same steps in one native call (what the device loop runs), with int8 or
    16-bit activation codes (the trainer's default: docs/blob.md)."""
    from offload.decider import Decider

    (N, P, M), layers, q, metrics, gaps = setup
    if act_bits == 16:
        q = mlp.quantize(layers, dqn_inputs(np.random.default_rng(8), 4000), segments=(0, H),
                         act_bits=16)
    d = Decider(q.native(), HistoryRing(H, True), TokenBucket(N, P, M))
    ms, gs = metrics.tolist(), gaps.tolist()
    state = {"k": 0}

    def one():
        k = state["k"] = (state["k"] + 1) & 4095
        return d.step(ms[k], gs[k - 1])

    benchmark(one)


@pytest.mark.benchmark(group="decision")
def test_decision_numpy_float32(benchmark, setup):
    layers = setup[1]
    benchmark(_decision_loop(lambda x: mlp.forward_float(layers, x), mlp.decide_reference, setup))


@pytest.mark.benchmark(group="decision")
def test_decision_torch_float32(benchmark, setup):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    mods = []
    for i, (w, b) in enumerate(setup[1]):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if i + 1 < len(setup[1]):
            mods.append(torch.nn.LeakyReLU(0.2))
    net = torch.nn.Sequential(*mods).eval()

    def forward(x):
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    benchmark(_decision_loop(forward, mlp.decide_reference, setup))


@pytest.mark.benchmark(group="decision")
def test_decision_litert_float32(benchmark, setup):
    pytest.importorskip("ai_edge_litert")
    from offload.litert_mlp import LiteRTMLP

    lite = LiteRTMLP(setup[1])
    benchmark(_decision_loop(lite, mlp.decide_reference, setup))


def test_contenders_agree(setup):
    """The float contenders compute the same Q-values; int8 stays close."""
    _, layers, q, _, _ = setup
    x = dqn_inputs(np.random.default_rng(3), 1)[0]
    ref = mlp.forward_float(layers, x)
    qi = q.native().forward(x)[0]
    assert np.abs(qi - ref).max() < 0.05 * np.ptp(ref)
    try:
        from offload.litert_mlp import LiteRTMLP
    except ImportError:
        return
    np.testing.assert_allclose(LiteRTMLP(layers)(x), ref, rtol=1e-4, atol=1e-4)
