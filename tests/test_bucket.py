"""Token bucket: (rate, depth) -> (N, P, M) and the native bucket vs the SPEC model."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from offload.bucket import Bucket, TokenBucket, scale, step_reference


@pytest.mark.parametrize("rate, depth, expected", [
    (0.1, 4, (1, 10, 40)),
    (0.25, 2, (1, 4, 8)),
    (0.05, 20, (1, 20, 400)),
    (0.5, 1, (1, 2, 2)),
    (0.2, 2.5, (2, 10, 25)),  # P'=5 leaves frac(12.5); P'=10 is the first exact one
])
def test_scale_examples(rate, depth, expected):
    assert scale(rate, depth) == expected


def _brute_scale(rate, depth):
    best = min(range(1, 101), key=lambda p: (((rate * p) % 1 + (depth * p) % 1) / p, p))
    N, M = math.floor(rate * best), math.floor(depth * best)
    g = math.gcd(math.gcd(N, best), M)
    return N // g, best // g, M // g


@given(st.floats(0.02, 0.98), st.floats(1.0, 50.0))
def test_scale_matches_definition(rate, depth):
    try:
        N, P, M = scale(rate, depth)
    except ValueError:
        N, P, M = _brute_scale(rate, depth)
        assert N == 0 or N >= P or M < P
        return
    assert (N, P, M) == _brute_scale(rate, depth)
    assert math.gcd(math.gcd(N, P), M) == 1
    assert 0 < N < P <= M
    # The approximation is within one step of the best denominator's grid.
    assert abs(N / P - rate) < 1.0 / P + 1e-9 and abs(M / P - depth) < 1.0 / P + 1e-9


@pytest.mark.parametrize("rate, depth, msg", [
    (0.0, 4, "rate"), (1.0, 4, "rate"), (-0.1, 4, "rate"), (0.1, 0.5, "depth"),
    (float("nan"), 4, "finite"), ("x", 4, "numbers"), (0.001, 4, "no valid bucket"),
])
def test_scale_rejects(rate, depth, msg):
    with pytest.raises(ValueError, match=msg):
        scale(rate, depth)


@pytest.mark.parametrize("args", [(0, 10, 40), (10, 10, 40), (1, 10, 9), (-1, 2, 3)])
def test_bucket_rejects_bad_parameters(args):
    with pytest.raises(ValueError, match="invalid bucket"):
        TokenBucket(*args)


def test_bucket_basics():
    b = TokenBucket(1, 10, 40)
    assert b.tokens == 40 and b.can_offload()
    assert b.step(True, 1) == 31
    for _ in range(3):
        b.step(True, 1)
    assert b.tokens == 4 and not b.can_offload()
    with pytest.raises(ValueError, match="cannot offload"):
        b.step(True, 1)
    assert b.tokens == 4  # a refused offload changes nothing
    with pytest.raises(ValueError, match="slots"):
        b.step(False, 0)
    assert b.step(False, 100) == 40
    b.reset(12)
    assert b.tokens == 12
    with pytest.raises(ValueError):
        b.reset(41)


bucket_params = st.tuples(st.integers(1, 20), st.integers(2, 30), st.integers(0, 80)).map(
    lambda t: (t[0] if t[0] < t[1] else t[1] - 1, t[1], t[1] + t[2]))
events = st.lists(st.tuples(st.booleans(), st.integers(1, 12)), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(bucket_params, events)
def test_bucket_matches_reference_model(params, evs):
    N, P, M = params
    b = TokenBucket(N, P, M)
    n = M
    for want, slots in evs:
        assert N <= b.tokens <= M  # at every decision time
        assert b.can_offload() == (n >= P)
        a = want and n >= P
        n = step_reference(n, a, slots, N, P, M)
        assert b.step(a, slots) == n == b.tokens
        assert 0 <= b.tokens <= M


@settings(max_examples=150, deadline=None)
@given(bucket_params, st.lists(st.integers(1, 6), min_size=1, max_size=400))
def test_greedy_rate_and_burst_limits(params, gaps):
    """Offload whenever allowed: the long-run rate and every burst stay within the bucket."""
    N, P, M = params
    b = TokenBucket(N, P, M)
    times, sent = [], []
    t = 0
    for g in gaps:
        a = b.can_offload()
        b.step(a, g)
        times.append(t)
        sent.append(a)
        t += g
    # Long-run rate: at most b + r*elapsed tokens ever spent.
    assert sum(sent) * P <= M + N * t
    # Any window of images [i, j]: offloads <= floor(b) + what refills in between.
    prefix = [0]
    for a in sent:
        prefix.append(prefix[-1] + a)
    for i in range(len(sent)):
        for j in range(i, min(len(sent), i + 60)):
            burst = prefix[j + 1] - prefix[i]
            assert burst <= (M + N * (times[j] - times[i])) // P


@pytest.mark.parametrize("triple", [(1, 10, 40), (2, 5, 13), (1, 2, 3), (3, 4, 9)])
def test_bucket_value_owns_the_layouts(triple):
    """Q-vector layout: Q(n, 0) for n = N..M, then Q(n, 1) for n = P..M (SPEC section 2)."""
    N, P, M = triple
    b = Bucket(N, P, M)
    assert tuple(b) == triple and b.states == M - N + 1 and b.send_states == M - P + 1
    assert b.q_length == 2 * (M + 1) - N - P
    pos = [b.q_index(n, 0) for n in range(N, M + 1)] + [b.q_index(n, 1) for n in range(P, M + 1)]
    assert pos == list(range(b.q_length))
    q = np.arange(b.q_length, dtype=float)[::-1].copy()
    np.testing.assert_array_equal(q[b.q_keep], [q[b.q_index(n, 0)] for n in range(N, M + 1)])
    np.testing.assert_array_equal(q[b.q_send], [q[b.q_index(n, 1)] for n in range(P, M + 1)])
    np.testing.assert_array_equal(b.prefers_send(q), [q[b.q_index(n, 1)] >= q[b.q_index(n, 0)]
                                                      for n in range(P, M + 1)])
    assert b.can_send(P) and not b.can_send(P - 1)
    assert b.step(M, True, 1) == step_reference(M, True, 1, N, P, M)


def test_bucket_refuses_what_is_not_a_bucket():
    assert Bucket.from_rate(0.1, 4) == Bucket(1, 10, 40)
    for bad, match in (((2, 2, 4), "0 < N < P <= M"), ((1.0, 2, 4), "integer"),
                       ((1, 4, 3), "0 < N < P <= M")):
        with pytest.raises(ValueError, match=match):
            Bucket(*bad)


@pytest.mark.parametrize("slot_s", [0.2, 0.1, 1 / 3, 0.25])
def test_slot_start_is_where_slot_index_begins_the_slot(slot_s):
    """``slot_start(s)`` is in slot ``s`` by ``slot_index``, within float rounding of
    ``t0 + (s - 1/2) slot_s``, also where that product rounds below the boundary
    (4.3 s with 0.2 s slots)."""
    from offload.bucket import slot_index, slot_start

    for t0 in (0.0, 12.7):
        for s in range(0, 200):
            t = slot_start(s, t0, slot_s)
            assert slot_index(t, t0, slot_s) == s
            assert abs(t - (t0 + (s - 0.5) * slot_s)) < 1e-9
    assert slot_index(4.3, 0.0, 0.2) == 21 and slot_start(22, 0.0, 0.2) > 4.3
