"""One device decision, side by side: native int8 vs numpy float32, torch and LiteRT.

A decision is what the device does per frame once it has the metric: push it
into the history ring, write the DQN input, run the MLP, apply the decision rule
of SPEC section 2, and step the token bucket. All contenders share the ring,
the decision rule and the bucket; they differ only in the forward pass, and all
run the same weights (the paper's 5x64 network, 96 metrics + 96 inter-arrival
times, bucket (1, 10, 40)).

Each contender also makes the same decisions as its reference over a fixed
sequence of frames: the int8 ones as the native int8 forward with the native
decision rule, the float ones as the numpy float32 forward (whose Q-margins on
that sequence are checked to be far above float rounding, so the comparison
can be exact).

Run the comparison with
``pytest benchmarks/test_bench_decision.py --benchmark-enable --benchmark-group-by=group``;
without ``--benchmark-enable`` each contender executes once, with its check.
"""

import numpy as np
import pytest

from offload import mlp
from offload.bucket import Bucket, TokenBucket
from offload.ring import HistoryRing

from helpers import dqn_inputs

H = 96
STEPS = 1000       # decisions compared with the reference
MIN_MARGIN = 1e-3  # |Q(n,1) - Q(n,0)| of the float reference: far above float32 rounding


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


def _decisions(one):
    """The first STEPS decisions of a fresh decision closure."""
    return [bool(one()) for _ in range(STEPS)]


def _native_forward(nat):
    out = np.empty(nat.output_size, np.float32)

    def forward(x):
        nat.forward1(x, out)
        return out

    return forward


@pytest.fixture(scope="module")
def int8_reference(setup):
    """Decisions of the native int8 forward with the native decision rule."""
    return _decisions(_decision_loop(_native_forward(setup[2].native()), mlp.decide, setup))


@pytest.fixture(scope="module")
def float_reference(setup):
    """Decisions of the numpy float32 forward, after checking none of them is a near-tie."""
    layers = setup[1]
    margins = []

    def decide(q, n, bucket):
        if bucket.can_send(n):
            margins.append(abs(q[bucket.q_index(n, 1)] - q[bucket.q_index(n, 0)]))
        return mlp.decide_reference(q, n, bucket)

    ref = _decisions(_decision_loop(lambda x: mlp.forward_float(layers, x), decide, setup))
    assert any(ref) and not all(ref)
    assert min(margins) > MIN_MARGIN
    return ref


@pytest.mark.benchmark(group="decision")
def test_decision_native_int8(benchmark, setup, int8_reference):
    forward = _native_forward(setup[2].native())
    benchmark(_decision_loop(forward, mlp.decide, setup))
    # the native rule agrees with the numpy one on the same int8 Q-vectors
    assert _decisions(_decision_loop(forward, mlp.decide_reference, setup)) == int8_reference


@pytest.mark.benchmark(group="decision")
@pytest.mark.parametrize("act_bits", [8, 16])
def test_decision_native_fused(benchmark, setup, int8_reference, act_bits):
    """The same steps in one native call (what the device loop runs), with int8 or
    16-bit activation codes (the trainer's default: docs/blob.md); the same
    decisions as the unfused steps on the same network."""
    (N, P, M), layers, q, metrics, gaps = setup
    ref = int8_reference
    if act_bits == 16:
        q = mlp.quantize(layers, dqn_inputs(np.random.default_rng(8), 4000), segments=(0, H),
                         act_bits=16)
        ref = _decisions(_decision_loop(_native_forward(q.native()), mlp.decide, setup))
    benchmark(_fused(q, setup))
    assert _decisions(_fused(q, setup)) == ref


def _fused(q, setup):
    from offload.decider import Decider

    (N, P, M), _, _, metrics, gaps = setup
    d = Decider(q.native(), HistoryRing(H, True), TokenBucket(N, P, M))
    ms, gs = metrics.tolist(), gaps.tolist()
    state = {"k": 0}

    def one():
        k = state["k"] = (state["k"] + 1) & 4095
        return d.step(ms[k], gs[k - 1])

    return one


@pytest.mark.benchmark(group="decision")
def test_decision_numpy_float32(benchmark, setup, float_reference):
    layers = setup[1]
    benchmark(_decision_loop(lambda x: mlp.forward_float(layers, x), mlp.decide_reference, setup))
    # and the numpy rule agrees with the native one on float Q-vectors
    assert _decisions(_decision_loop(lambda x: mlp.forward_float(layers, x), mlp.decide,
                                     setup)) == float_reference


@pytest.mark.benchmark(group="decision")
def test_decision_torch_float32(benchmark, setup, float_reference):
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
    assert _decisions(_decision_loop(forward, mlp.decide_reference, setup)) == float_reference


@pytest.mark.benchmark(group="decision")
def test_decision_litert_float32(benchmark, setup, float_reference):
    pytest.importorskip("ai_edge_litert")
    from offload.litert_mlp import LiteRTMLP

    lite = LiteRTMLP(setup[1])
    benchmark(_decision_loop(lite, mlp.decide_reference, setup))
    assert _decisions(_decision_loop(lite, mlp.decide_reference, setup)) == float_reference

