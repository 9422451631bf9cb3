"""Int8 MLP: native vs numpy int8 twin (bit-exact) and vs the float32 reference."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from offload import mlp
from offload.bucket import Bucket
from offload.mlp import Int8MLP, decide

from helpers import dqn_inputs, random_network


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.sampled_from([1, 2, 5]),
       st.booleans(), st.sampled_from([8, 16]))
def test_native_equals_numpy_int8_twin(seed, din_half, depth, two_segments, bits):
    rng = np.random.default_rng(seed)
    din = 2 * din_half
    layers = random_network(rng, din, int(rng.integers(1, 90)), hidden=(int(rng.integers(1, 70)),) * depth)
    x = rng.normal(scale=3.0, size=(64, din)).astype(np.float32)
    # Calibrated on half the inputs, so the others also hit the clamps.
    q = mlp.quantize(layers, x[:32], segments=(0, din_half) if two_segments else (0,),
                     act_bits=bits)
    assert q.native().act_bits == bits
    np.testing.assert_array_equal(q.native().forward(x), mlp.forward_int8(q, x))
    np.testing.assert_array_equal(q.native().forward(x, threads=2), q.native().forward_rowwise(x))


def test_16_bit_activations_leave_only_the_weight_error(rng):
    """With weights exactly on their int8 grid, 16-bit codes track the float network
    about 256 times closer than 8-bit ones."""
    N, P, M = 1, 10, 40
    layers = random_network(rng, 192, Bucket(N, P, M).q_length)
    # Evaluated on the calibration inputs themselves: no input is clamped.
    calib = x = dqn_inputs(rng, 4000)
    q8 = mlp.quantize(layers, calib, segments=(0, 96))
    # The float network the int8 weights represent exactly.
    grid = [(lay.w_int8.astype(np.float32) * lay.w_scale[:, None], b)
            for lay, (_, b) in zip(q8.layers, layers)]
    ref = mlp.forward_float(grid, x)
    err = {}
    for bits in (8, 16):
        q = mlp.quantize(grid, calib, segments=(0, 96), act_bits=bits)
        for lay, lay8 in zip(q.layers, q8.layers):  # the grid survives quantisation
            np.testing.assert_array_equal(lay.w_int8, lay8.w_int8)
        err[bits] = np.abs(q.native().forward(x) - ref).max()
    assert err[16] < err[8] / 64, err


def test_16_bit_activations_refuse_layers_that_could_overflow(rng):
    from offload.mlp import MAX_IN_16
    layers = random_network(rng, MAX_IN_16 + 1, 3, hidden=(4,))
    calib = rng.normal(size=(16, MAX_IN_16 + 1)).astype(np.float32)
    with pytest.raises(ValueError, match="at most 516 inputs"):
        mlp.quantize(layers, calib, act_bits=16)
    q = mlp.quantize(layers, calib)  # 8-bit codes have no such limit
    with pytest.raises(ValueError, match="at most 516"):
        Int8MLP(q.native_args(), 16)
    with pytest.raises(ValueError, match="act_bits"):
        Int8MLP(q.native_args(), 12)
    with pytest.raises(ValueError, match="act_bits"):
        mlp.quantize(layers, calib, act_bits=4)


def test_int8_tracks_float_reference():
    """Decisions agree on >= 99.5% of random (input, n) pairs; Q error small vs output range."""
    agree, rel_err = [], []
    N, P, M = 1, 10, 40
    for seed in range(5):
        rng = np.random.default_rng(seed)
        layers = random_network(rng, 192, Bucket(N, P, M).q_length)
        q = mlp.quantize(layers, dqn_inputs(rng, 4000), segments=(0, 96))
        x = dqn_inputs(rng, 4000)
        n = rng.integers(N, M + 1, size=len(x))
        qi, qf = q.native().forward(x), mlp.forward_float(layers, x)
        agree.append(np.mean(mlp.decide_batch(qi, n, Bucket(N, P, M)) == mlp.decide_batch(qf, n, Bucket(N, P, M))))
        rel_err.append(np.abs(qi - qf).max() / np.ptp(qf))
    assert np.mean(agree) >= 0.995, agree
    assert max(rel_err) < 0.05, rel_err


def test_forward1_matches_batch(paper_net, rng):
    _, _, q = paper_net
    nat = q.native()
    x = dqn_inputs(rng, 8)
    out = np.empty(nat.output_size, np.float32)
    for row, want in zip(x, nat.forward(x)):
        nat.forward1(row, out)
        np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="expects"):
        nat.forward1(np.zeros(5, np.float32), out)
    with pytest.raises(ValueError, match="expects"):
        nat.forward(np.zeros((2, 5), np.float32))


def test_decide_layout_and_ties():
    N, P, M = 1, 4, 6
    L = Bucket(N, P, M).q_length
    assert L == (M - N + 1) + (M - P + 1) == 9
    q = np.zeros(L, np.float32)
    assert not decide(q, 3, N, P, M)            # n < P never offloads
    assert decide(q, 4, N, P, M)                 # tie offloads
    q[Bucket(N, P, M).q_index(5, 0)] = 1.0          # Q(5,0) at position 4
    assert Bucket(N, P, M).q_index(5, 0) == 4 and Bucket(N, P, M).q_index(5, 1) == 7
    assert not decide(q, 5, N, P, M)
    q[7] = 2.0
    assert decide(q, 5, N, P, M)
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = rng.normal(size=L).astype(np.float32)
        n = int(rng.integers(N, M + 1))
        assert decide(q, n, N, P, M) == mlp.decide_reference(q, n, Bucket(N, P, M))
        assert decide(q, n, N, P, M) == mlp.decide_batch(q[None], [n], Bucket(N, P, M))[0]


def test_decide_errors():
    with pytest.raises(ValueError, match="needs 9"):
        decide(np.zeros(8, np.float32), 4, 1, 4, 6)
    with pytest.raises(ValueError, match="outside"):
        decide(np.zeros(9, np.float32), 0, 1, 4, 6)


def test_quantize_and_native_errors(rng):
    layers = random_network(rng, 8, 3, hidden=(4,))
    with pytest.raises(ValueError, match="calibration"):
        mlp.quantize(layers, np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match="segments"):
        mlp.quantize(layers, np.zeros((4, 8), np.float32), segments=(0, 9))
    with pytest.raises(ValueError, match="layers"):
        Int8MLP([])
    q = mlp.quantize(layers, rng.normal(size=(16, 8)).astype(np.float32))
    args = q.native_args()
    bad = list(args[1])
    bad[0] = np.zeros((3, 5), np.int8)  # second layer input does not match first output
    with pytest.raises(ValueError, match="layer 1"):
        Int8MLP([args[0], tuple(bad)])


def test_equalize_keeps_the_function_and_evens_hidden_ranges(rng):
    layers = random_network(rng, 12, 7, hidden=(16, 16, 16))
    # Make the units' ranges very uneven.
    w0, b0 = layers[0]
    layers[0] = (w0 * np.geomspace(0.01, 10, 16, dtype=np.float32)[:, None], b0)
    x = rng.normal(size=(3000, 12)).astype(np.float32)
    eq = mlp.equalize(layers, x, alpha=1.0)
    np.testing.assert_allclose(mlp.forward_float(eq, x), mlp.forward_float(layers, x),
                               rtol=1e-4, atol=1e-4)

    def ranges(ls):
        h = x.astype(np.float64)
        out = []
        for w, b in ls[:-1]:
            h = h @ w.T.astype(np.float64) + b
            h = np.where(h < 0, 0.2 * h, h)
            out.append(h.max(0) - h.min(0))
        return out

    before, after = ranges(layers), ranges(eq)
    assert before[0].max() / before[0].min() > 100
    for r in after:
        np.testing.assert_allclose(r, r.max(), rtol=1e-3)   # alpha = 1: all equal


def test_correct_bias_removes_the_mean_int8_error(rng, paper_net):
    (N, P, M), layers, _ = paper_net
    x = dqn_inputs(rng, 4000)
    q = mlp.quantize(layers, x, segments=(0, 96))
    before = (mlp.forward_int8(q, x) - mlp.forward_float(layers, x)).mean(axis=0)
    mlp.correct_bias(q, x)
    after = (mlp.forward_int8(q, x) - mlp.forward_float(layers, x)).mean(axis=0)
    assert np.abs(after).max() < 0.2 * np.abs(before).max()
    # Still bit-identical to the native forward.
    np.testing.assert_array_equal(q.native().forward(x[:200]), mlp.forward_int8(q, x[:200]))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 9), st.sampled_from([1, 2, 3]))
def test_tiled_batch_forward_is_bit_identical(seed, extra, threads):
    """The tiled, threaded batch forward equals one-at-a-time and the numpy twin exactly."""
    rng = np.random.default_rng(seed)
    N, P, M = 1, 10, 40
    layers = random_network(rng, 192, Bucket(N, P, M).q_length)
    q = mlp.quantize(layers, dqn_inputs(rng, 2000), segments=(0, 96))
    nat = q.native()
    # Around tile edges, and past 2 x 2048 rows so that several threads run.
    for B in (0, 1, 3 + extra, 4 * extra, 4096 + extra):
        x = dqn_inputs(rng, B) if B else np.zeros((0, 192), np.float32)
        got = nat.forward(x, threads=threads)
        np.testing.assert_array_equal(got, nat.forward_rowwise(x))
        if B < 50:
            np.testing.assert_array_equal(got, mlp.forward_int8(q, x))


def test_batch_forward_refuses_bad_threads(paper_net):
    nat = paper_net[2].native()
    with pytest.raises(ValueError, match="threads"):
        nat.forward(np.zeros((2, nat.input_size), np.float32), threads=0)
    with pytest.raises(ValueError, match="expects"):
        nat.forward_rowwise(np.zeros((2, 5), np.float32))
