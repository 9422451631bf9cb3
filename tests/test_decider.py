"""The fused native Decider equals ring + int8 forward + rule + bucket done in numpy."""

import numpy as np
import pytest

from offload import mlp
from offload.blob import Policy
from offload.bucket import Bucket, TokenBucket
from offload.decider import Decider, decide_sequence_reference, from_policy
from offload.ring import HistoryRing

from helpers import random_network


@pytest.mark.parametrize("use_ia", [True, False])
def test_decider_matches_reference(use_ia):
    rng = np.random.default_rng(11)
    N, P, M, H = 2, 5, 13, 6
    din = 2 * H if use_ia else H
    layers = random_network(rng, din, Bucket(N, P, M).q_length, hidden=(16, 16))
    calib = rng.normal(size=(500, din)).astype(np.float32)
    if use_ia:
        calib[:, H:] = rng.integers(1, 4, size=(500, H))
    q = mlp.quantize(layers, calib, segments=(0, H) if use_ia else (0,))
    metrics = rng.normal(size=300).astype(np.float32)
    gaps = rng.integers(1, 4, size=300)
    want, states = decide_sequence_reference(q, metrics, gaps, Bucket(N, P, M), H=H, use_interarrival=use_ia)
    d = Decider(q.native(), HistoryRing(H, use_ia), TokenBucket(N, P, M))
    got, seen = [], []
    for k in range(300):
        got.append(d.step(metrics[k], gaps[k - 1] if k else 0))
        seen.append(d.last_n)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(seen, states)
    assert 0 < np.mean(got) < 1  # the test exercises both decisions
    d.reset()
    assert d.bucket.tokens == M and d.ring.count == 0


def test_decider_errors(paper_net):
    (N, P, M), _, q = paper_net
    with pytest.raises(ValueError, match="inputs"):
        Decider(q.native(), HistoryRing(10, True), TokenBucket(N, P, M))
    with pytest.raises(ValueError, match="Q-values"):
        Decider(q.native(), HistoryRing(96, True), TokenBucket(N, P, M + 1))
    d = Decider(q.native(), HistoryRing(96, True), TokenBucket(N, P, M))
    d.step(0.0, 0)
    with pytest.raises(ValueError, match="slots"):
        d.step(0.0, 0)
    lut = np.linspace(0, 1, 4, dtype=np.float32)
    pol = Policy("thresholds", N, P, M, 0.0, 1.0, lut, lut, theta=np.zeros(M - P + 1, np.float32))
    with pytest.raises(ValueError, match="thresholds"):
        from_policy(pol)
    pol = Policy("dqn", N, P, M, 0.0, 1.0, lut, lut, T=97, interarrival=True, qmlp=q)
    assert from_policy(pol).step(1.0) in (True, False)
