"""Tests for offload.sequences (SPEC section 4)."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import sequences as S


# ------------------------------------------------------------------ iid


def test_iid_shape_range_and_repeatability():
    a = S.iid(50, 200, 30, seed=1)
    assert a.shape == (30, 200) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, S.iid(50, 200, 30, seed=1))
    assert not np.array_equal(a, S.iid(50, 200, 30, seed=2))
    counts = np.bincount(a.ravel(), minlength=50)
    assert counts.min() > 0.7 * a.size / 50 and counts.max() < 1.3 * a.size / 50


def test_empty_shapes():
    assert S.iid(5, 0, 3, seed=0).shape == (3, 0)
    assert S.location_reset(5, 0, 3, 0.1, 0.1, seed=0).shape == (3, 0)
    assert S.markov_arrivals(0, 2, 1, 3, 0.1, 0.1, seed=0).shape == (2, 0)
    assert S.markov_arrivals(4, 0, 1, 3, 0.1, 0.1, seed=0).shape == (0, 4)


# ------------------------------------------------------------------ location reset


def test_location_reset_shape_range_repeatable():
    a = S.location_reset(1000, 500, 20, 0.1, 0.05, seed=3)
    assert a.shape == (20, 500) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, S.location_reset(1000, 500, 20, 0.1, 0.05, seed=3))
    assert not np.array_equal(a, S.location_reset(1000, 500, 20, 0.1, 0.05, seed=4))


def test_location_reset_no_reset_no_spread_is_constant_rows():
    a = S.location_reset(10**6, 300, 40, 0.0, 0.0, seed=5)
    assert np.all(a == a[:, :1])
    assert len(np.unique(a[:, 0])) > 30  # starting locations are uniform


def test_location_reset_mean_run_length():
    # spread 0: the index only changes at a reset (a new location equal to the
    # old one has probability 1e-7 here).
    rprob = 0.02
    a = S.location_reset(10**7, 20000, 20, 0.0, rprob, seed=6)
    changes = np.count_nonzero(np.diff(a, axis=1))
    runs = changes + a.shape[0]
    mean_run = a.size / runs
    assert abs(mean_run - 1 / rprob) < 0.06 / rprob
    assert abs(changes / (a.size - a.shape[0]) - rprob) < 0.1 * rprob


def test_location_reset_spread_inside_a_run():
    n, spread = 10000, 0.05
    width = int(spread * n)
    # The offsets are drawn after the jumps and locations, so spread=0 with the
    # same seed gives the bare locations.
    loc = S.location_reset(n, 3000, 10, 0.0, 0.01, seed=7)
    idx = S.location_reset(n, 3000, 10, spread, 0.01, seed=7)
    d = (idx - loc) % n
    assert d.min() == 0 and d.max() == width
    assert abs(d.mean() - width / 2) < 0.02 * width
    # Black-box form: consecutive images within a run are within the window.
    step = np.abs(np.diff(idx, axis=1))
    near = np.minimum(step, n - step) <= width
    assert near.mean() > 1 - 0.01 - 0.005


def test_location_reset_full_spread_is_close_to_uniform():
    a = S.location_reset(20, 5000, 20, 1.0, 0.0, seed=8)
    counts = np.bincount(a.ravel(), minlength=20)
    # d in 0..20 inclusive: image (loc mod 20) gets 2 of 21 offsets.
    assert counts.min() > 0.6 * a.size / 20


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    length=st.integers(0, 40),
    n_seq=st.integers(0, 5),
    spread=st.floats(0, 1),
    rprob=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_location_reset_property(n, length, n_seq, spread, rprob, seed):
    a = S.location_reset(n, length, n_seq, spread, rprob, seed)
    assert a.shape == (n_seq, length)
    if a.size:
        assert 0 <= a.min() and a.max() < n


def test_location_reset_ten_million_elements_quickly():
    start = time.perf_counter()
    a = S.location_reset(50000, 10000, 1000, 0.1, 0.01, seed=9)
    assert a.size == 10**7
    assert time.perf_counter() - start < 15.0


@pytest.mark.parametrize(
    "args",
    [
        (0, 10, 1, 0.1, 0.1),
        (10, -1, 1, 0.1, 0.1),
        (10, 10, 1.5, 0.1, 0.1),
        (10, 10, True, 0.1, 0.1),
        (10, 10, 1, -0.1, 0.1),
        (10, 10, 1, 1.1, 0.1),
        (10, 10, 1, 0.1, -0.01),
        (10, 10, 1, 0.1, 1.01),
        (10, 10, 1, float("nan"), 0.1),
        (10, 10, 1, 0.1, "x"),
    ],
)
def test_location_reset_validation(args):
    with pytest.raises(ValueError):
        S.location_reset(*args, seed=0)


# ------------------------------------------------------------------ periodic


def test_periodic():
    a = S.periodic(7, 3)
    assert a.shape == (3, 7) and a.dtype == np.int64 and np.all(a == 1)
    with pytest.raises(ValueError):
        S.periodic(-1, 3)


# ------------------------------------------------------------------ Markov arrivals


def _reference_gaps(lengths, states, intervals, need):
    """Loop form of the slot accounting: arrivals at T + m*I_s inside each sojourn."""
    out = []
    for row_l, row_s in zip(lengths, states):
        times, t0 = [], 0
        for length, s in zip(row_l, row_s):
            i = intervals[s]
            times.extend(t0 + i * m for m in range(1, length // i + 1))
            t0 += length
            if len(times) >= need:
                break
        out.append(np.diff(times[:need]))
    return np.array(out, dtype=np.int64).reshape(len(lengths), need - 1)


@settings(max_examples=25, deadline=None)
@given(
    i1=st.integers(1, 6),
    i2=st.integers(1, 6),
    p1=st.floats(0.05, 1.0),
    p2=st.floats(0.05, 1.0),
    length=st.integers(1, 60),
    n_seq=st.integers(1, 4),
    seed=st.integers(0, 10**6),
)
def test_markov_matches_loop_reference(i1, i2, p1, p2, length, n_seq, seed):
    intervals = np.array([i1, i2])
    tprobs = np.array([p1, p2])
    per = np.array([S.markov_arrivals_per_sojourn(i, p) for i, p in zip(intervals, tprobs)])
    if per.sum() == 0:
        with pytest.raises(ValueError):
            S.markov_arrivals(length, n_seq, i1, i2, p1, p2, seed)
        return
    gaps, states = S.markov_arrivals(length, n_seq, i1, i2, p1, p2, seed, return_states=True)
    rng = np.random.default_rng(seed)
    lengths, sojourn_states, _ = S._sojourns(rng, n_seq, length + 1, intervals, tprobs, per)
    np.testing.assert_array_equal(gaps, _reference_gaps(lengths, sojourn_states, intervals, length + 1))
    assert gaps.min() >= 1
    assert set(np.unique(states)) <= {1, 2}


@pytest.mark.parametrize(
    "i1,i2,p1,p2",
    [(1, 3, 0.02, 0.01), (1, 6, 0.3, 0.075), (2, 5, 0.2, 0.6), (3, 3, 0.5, 0.5)],
)
def test_markov_mean_interarrival_and_state_share(i1, i2, p1, p2):
    gaps, states = S.markov_arrivals(20000, 20, i1, i2, p1, p2, seed=11, return_states=True)
    mean = S.markov_mean_interarrival(i1, i2, p1, p2)
    assert abs(gaps.mean() - mean) < 0.02 * mean
    a1 = S.markov_arrivals_per_sojourn(i1, p1)
    a2 = S.markov_arrivals_per_sojourn(i2, p2)
    assert abs((states == 1).mean() - a1 / (a1 + a2)) < 0.02
    # Two arrivals in one sojourn are exactly I_s apart; across sojourns the
    # gap is never shorter than 1 and in the same state never shorter than I_s.
    same = states[:, 1:] == states[:, :-1]
    g, s = gaps[:, 1:], states[:, 1:]
    for state, interval, p in ((1, i1, p1), (2, i2, p2)):
        sel = same & (s == state)
        assert np.all(g[sel] >= interval)
        if 1 / p >= 5 * interval:  # long sojourns: most gaps are inside one
            assert np.mean(g[sel] == interval) > 0.5


def test_markov_closed_forms():
    assert S.markov_arrivals_per_sojourn(1, 0.25) == pytest.approx(4.0)
    assert S.markov_arrivals_per_sojourn(3, 1.0) == 0.0
    assert S.markov_mean_interarrival(1, 1, 0.3, 0.7) == pytest.approx(1.0)
    pi1, pi2 = S.markov_stationary(0.001, 0.0005)
    assert pi1 == pytest.approx(1 / 3) and pi2 == pytest.approx(2 / 3)
    # Long sojourns: close to the slot-share formula 1 / (pi1/I1 + pi2/I2).
    approx = 1 / (pi1 / 1 + pi2 / 3)
    assert S.markov_mean_interarrival(1, 3, 0.001, 0.0005) == pytest.approx(approx, rel=2e-3)
    # E[floor(L / I)] by direct summation of the geometric law.
    p, i = 0.3, 4
    lengths = np.arange(1, 400)
    direct = np.sum((1 - p) ** (lengths - 1) * p * (lengths // i))
    assert S.markov_arrivals_per_sojourn(i, p) == pytest.approx(direct)


def test_markov_sojourns_slot_occupancy():
    rng = np.random.default_rng(12)
    intervals, tprobs = np.array([1, 3]), np.array([0.05, 0.02])
    per = np.array([S.markov_arrivals_per_sojourn(i, p) for i, p in zip(intervals, tprobs)])
    lengths, states, counts = S._sojourns(rng, 4000, 50, intervals, tprobs, per)
    pi1, _ = S.markov_stationary(0.05, 0.02)
    assert abs((states[:, 0] == 0).mean() - pi1) < 0.03
    assert abs(lengths[states == 0].mean() - 20) < 0.5
    assert abs(lengths[states == 1].mean() - 50) < 1.5
    share = lengths[states == 0].sum() / lengths.sum()
    assert abs(share - pi1) < 0.01
    np.testing.assert_array_equal(counts, lengths // intervals[states])
    assert np.all(counts.sum(axis=1) >= 50)
    # States alternate along a row.
    assert np.all(states[:, 1:] != states[:, :-1])


def test_markov_first_state_is_stationary():
    _, states = S.markov_arrivals(1, 4000, 1, 2, 0.001, 0.003, seed=13, return_states=True)
    pi1, _ = S.markov_stationary(0.001, 0.003)
    assert abs((states[:, 0] == 1).mean() - pi1) < 0.03


def test_markov_repeatable_and_degenerate():
    a = S.markov_arrivals(300, 5, 1, 3, 0.05, 0.02, seed=14)
    assert a.dtype == np.int64 and a.shape == (5, 300)
    np.testing.assert_array_equal(a, S.markov_arrivals(300, 5, 1, 3, 0.05, 0.02, seed=14))
    assert not np.array_equal(a, S.markov_arrivals(300, 5, 1, 3, 0.05, 0.02, seed=15))
    assert np.all(S.markov_arrivals(100, 3, 1, 1, 1.0, 1.0, seed=0) == 1)
    # Always switching, state 2 (I=3) never completes an interval: arrivals
    # happen in the 1-slot state-1 sojourns only, every 2 slots.
    assert np.all(S.markov_arrivals(100, 3, 1, 3, 1.0, 1.0, seed=0) == 2)


def test_markov_large_request_is_quick():
    start = time.perf_counter()
    a = S.markov_arrivals(2000, 1000, 1, 6, 0.1, 0.025, seed=16)
    assert a.shape == (1000, 2000)
    assert time.perf_counter() - start < 15.0


@pytest.mark.parametrize(
    "args",
    [
        (10, 1, 0, 3, 0.1, 0.1),
        (10, 1, 1, 0, 0.1, 0.1),
        (10, 1, 1.0, 3, 0.1, 0.1),
        (10, 1, 1, 3, 0.0, 0.1),
        (10, 1, 1, 3, 0.1, 1.5),
        (10, 1, 1, 3, 0.1, -0.2),
        (-1, 1, 1, 3, 0.1, 0.1),
        (10, 1, 2, 2, 1.0, 1.0),  # no image can ever arrive
    ],
)
def test_markov_validation(args):
    with pytest.raises(ValueError):
        S.markov_arrivals(*args, seed=0)


def test_bad_seed():
    with pytest.raises(ValueError):
        S.iid(5, 5, 1, seed=-1)
    with pytest.raises(ValueError):
        S.iid(5, 5, 1, seed=True)
