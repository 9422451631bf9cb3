"""Tests for offload.sequences (SPEC section 4)."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
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


@pytest.mark.timeout(60)
def test_location_reset_ten_million_elements_quickly():
    a = S.location_reset(50000, 10000, 1000, 0.1, 0.01, seed=9)
    assert a.size == 10**7


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
    """Loop form of the slot accounting: arrivals at T + m*I_s inside each sojourn.

    Python integers, so the slot counts are exact however long the sojourns.
    """
    out = []
    for row_l, row_s in zip(lengths, states):
        times, t0 = [], 0
        for length, s in zip(row_l, row_s):
            i = int(intervals[s])
            for m in range(1, min(int(length) // i, need - len(times)) + 1):
                times.append(t0 + i * m)
            t0 += int(length)
            if len(times) >= need:
                break
        times = times[:need]
        out.append([b - a for a, b in zip(times, times[1:])])
    return np.array(out, dtype=np.int64).reshape(len(lengths), need - 1)


def _supported(i1, i2, p1, p2):
    """Whether markov_arrivals accepts these parameters (the only documented refusals)."""
    try:
        return S.markov_mean_interarrival(i1, i2, p1, p2) <= S.MAX_MEAN_INTERARRIVAL
    except ValueError:  # no image can ever arrive
        return False


# tprob over (0, 1] with its edges: exactly 1, the largest double below 1,
# near-1 values that make sojourns shorter than their interval, and tiny ones
# whose sojourns outlast any slot counter.
TPROB = st.one_of(
    st.floats(0.0, 1.0, exclude_min=True),
    st.sampled_from([1.0, 1 - 2**-53, 0.99999, 0.9921875, 0.5, 1e-9, 1e-300, 5e-324]),
)
# Intervals from 1 to far longer than most sojourns.
INTERVAL = st.one_of(st.integers(1, 8), st.integers(9, 10**6), st.just(2**62))


@given(
    i1=INTERVAL,
    i2=INTERVAL,
    p1=TPROB,
    p2=TPROB,
    length=st.integers(1, 60),
    n_seq=st.integers(1, 4),
    seed=st.integers(0, 10**6),
)
def test_markov_matches_loop_reference(i1, i2, p1, p2, length, n_seq, seed):
    # Only supported parameters; the refusals have their own tests below.
    assume(_supported(i1, i2, p1, p2))
    gaps, states = S.markov_arrivals(length, n_seq, i1, i2, p1, p2, seed, return_states=True)
    rng = np.random.default_rng(seed)
    lengths, sojourn_states, _ = S.sojourn_table(rng, n_seq, length + 1, [i1, i2], [p1, p2])
    np.testing.assert_array_equal(gaps, _reference_gaps(lengths, sojourn_states, [i1, i2], length + 1))
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
    lengths, states, counts = S.sojourn_table(rng, 4000, 50, intervals, tprobs)
    pi1, _ = S.markov_stationary(0.05, 0.02)
    assert abs((states[:, 0] == 0).mean() - pi1) < 0.03
    assert abs(lengths[states == 0].mean() - 20) < 0.5
    assert abs(lengths[states == 1].mean() - 50) < 1.5
    share = lengths[states == 0].sum() / lengths.sum()
    assert abs(share - pi1) < 0.01
    # Arrivals per sojourn, capped at the 50 needed.
    np.testing.assert_array_equal(counts, np.minimum(lengths // intervals[states], 50))
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


@pytest.mark.timeout(60)
def test_markov_large_request_is_quick():
    a = S.markov_arrivals(2000, 1000, 1, 6, 0.1, 0.025, seed=16)
    assert a.shape == (1000, 2000)


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


# ------------------------------------------------------------------ the whole domain
#
# Every public generator returns valid output or raises ValueError, for any
# arguments, edges included. A hang or a runaway allocation would blow the
# test's pytest-timeout (the whole test, all examples, must finish well within
# it) or the machine's memory; no wall-clock numbers are asserted.

COUNT = st.one_of(st.integers(-2, 3), st.integers(4, 200), st.sampled_from([1.5, True, None, "3"]))
FRACTION = st.one_of(
    st.floats(0.0, 1.0),
    st.sampled_from([0.0, 1.0, 1 - 2**-53, 5e-324, -0.0, -1e-9, 1 + 2**-52, float("nan"),
                     float("inf"), "x", None]),
)
TPROB_ANY = st.one_of(TPROB, st.sampled_from([0.0, -0.5, 1.5, float("nan"), "x", None]))
INTERVAL_ANY = st.one_of(INTERVAL, st.sampled_from([0, -3, 2**62 + 1, 2**70, 2.5, True, None]))
SEED = st.one_of(st.integers(0, 2**32), st.sampled_from([-1, True, "seed"]))


def _ints(*values):
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _fractions(*values, lo_open=False):
    return all(isinstance(v, (int, float)) and ((0 < v <= 1) if lo_open else (0 <= v <= 1))
               for v in values)


def _valid_seed(seed):
    return isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0


def _indices_ok(a, n, length, n_seq):
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (n_seq, length)
    assert a.size == 0 or (0 <= a.min() and a.max() < n)


@pytest.mark.timeout(240)
@given(n=COUNT, length=COUNT, n_seq=COUNT, seed=SEED)
def test_iid_whole_domain(n, length, n_seq, seed):
    try:
        a = S.iid(n, length, n_seq, seed)
    except ValueError:
        assert not (_ints(n, length, n_seq) and n >= 1 and length >= 0 and n_seq >= 0
                    and _valid_seed(seed))
        return
    _indices_ok(a, n, length, n_seq)


@pytest.mark.timeout(240)
@given(n=COUNT, length=COUNT, n_seq=COUNT, spread=FRACTION, rprob=FRACTION, seed=SEED)
def test_location_reset_whole_domain(n, length, n_seq, spread, rprob, seed):
    try:
        a = S.location_reset(n, length, n_seq, spread, rprob, seed)
    except ValueError:
        assert not (_ints(n, length, n_seq) and n >= 1 and length >= 0 and n_seq >= 0
                    and _fractions(spread, rprob) and _valid_seed(seed))
        return
    _indices_ok(a, n, length, n_seq)


@pytest.mark.timeout(240)
@given(length=COUNT, n_seq=COUNT)
def test_periodic_whole_domain(length, n_seq):
    try:
        a = S.periodic(length, n_seq)
    except ValueError:
        assert not (_ints(length, n_seq) and length >= 0 and n_seq >= 0)
        return
    assert a.dtype == np.int64 and a.shape == (n_seq, length) and np.all(a == 1)


@pytest.mark.timeout(240)
@given(length=COUNT, n_seq=COUNT, i1=INTERVAL_ANY, i2=INTERVAL_ANY, p1=TPROB_ANY, p2=TPROB_ANY,
       seed=SEED)
def test_markov_whole_domain(length, n_seq, i1, i2, p1, p2, seed):
    try:
        gaps, states = S.markov_arrivals(length, n_seq, i1, i2, p1, p2, seed, return_states=True)
    except ValueError:
        # Refused: bad arguments, or (documented) no arrivals / mean above the cap.
        assert not (_ints(length, n_seq, i1, i2) and length >= 0 and n_seq >= 0
                    and 1 <= min(i1, i2) and max(i1, i2) <= 2**62
                    and _fractions(p1, p2, lo_open=True) and _valid_seed(seed)
                    and _supported(i1, i2, p1, p2))
        return
    assert _supported(i1, i2, p1, p2)
    assert gaps.dtype == np.int64 and gaps.shape == (n_seq, length)
    assert states.dtype == np.int8 and states.shape == (n_seq, length)
    if gaps.size:
        assert gaps.min() >= 1 and set(np.unique(states)) <= {1, 2}
        # Two arrivals in one state are at least that state's interval apart.
        same = states[:, 1:] == states[:, :-1]
        intervals = np.array([0, i1, i2])
        assert np.all(gaps[:, 1:][same] >= intervals[states[:, 1:][same]])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    (7, 2, 2, 4, 1.0, 0.99, 3),       # mean 2e6 slots: used to take seconds and 2 GB
    (50, 1, 2, 4, 1.0, 0.99, 0),      # offload-sim --markov 2 4 1.0 0.99 --streams 1
    (1, 1, 5, 5, 0.9921875, 1.0, 0),
    (1, 1, 2, 2, 1.0, 1 - 2**-53, 0),
    (1, 1, 3, 2, 0.99999, 1.0, 0),
    (10, 3, 10**6, 1, 1e-8, 0.5, 0),  # intervals far longer than the mean gap allows
])
def test_markov_refuses_rare_arrivals(args):
    i1, i2, p1, p2 = args[2:6]
    mean = S.markov_mean_interarrival(i1, i2, p1, p2)
    assert mean > S.MAX_MEAN_INTERARRIVAL
    with pytest.raises(ValueError, match=r"i1=\d+, i2=\d+, tprob1=.*tprob2=.* mean inter-arrival "
                                         r"time of .* slots, above the supported 1,000 slots"):
        S.markov_arrivals(*args)


def test_markov_cap_is_on_the_mean():
    # Just under the cap: generated (1,000 sojourns per value at most).
    assert S.markov_mean_interarrival(2, 2, 1.0, 0.9979) <= S.MAX_MEAN_INTERARRIVAL
    gaps = S.markov_arrivals(20, 2, 2, 2, 1.0, 0.9979, seed=1)
    assert gaps.shape == (2, 20) and gaps.min() >= 2
    assert S.markov_mean_interarrival(2, 2, 1.0, 0.9985) > S.MAX_MEAN_INTERARRIVAL
    with pytest.raises(ValueError, match="above the supported"):
        S.markov_arrivals(20, 2, 2, 2, 1.0, 0.9985, seed=1)


def test_markov_memory_is_chunked(monkeypatch):
    # A request far larger than one block runs in chunks of sequences and in
    # several blocks per row, and gives exactly what one big block gives.
    args = (400, 30, 2, 3, 0.4, 0.3, 5)
    whole = S.markov_arrivals(*args, return_states=True)
    monkeypatch.setattr(S, "BLOCK_ENTRIES", 64)
    rows, block = S.plan_blocks(30, 401, (S.markov_arrivals_per_sojourn(2, 0.4)
                                    + S.markov_arrivals_per_sojourn(3, 0.3)) / 2)
    assert rows == 1 and block == 64
    small = S.markov_arrivals(*args, return_states=True)
    assert small[0].shape == (30, 400) and small[0].min() >= 1
    # Other draws, same law: compare a few moments with the big-block run.
    assert abs(small[0].mean() - whole[0].mean()) < 0.1 * whole[0].mean()
    assert abs((small[1] == 1).mean() - (whole[1] == 1).mean()) < 0.1


def test_markov_tiny_tprob_and_huge_interval():
    # Sojourns longer than any slot counter: every arrival in the first sojourn.
    gaps, states = S.markov_arrivals(5, 2, 1, 3, 1e-300, 1e-300, seed=0, return_states=True)
    assert np.all((gaps == 1) & (states == 1) | (gaps == 3) & (states == 2))
    assert S.markov_arrivals_per_sojourn(1, 5e-324) == np.inf
    assert S.markov_mean_interarrival(1, 1, 5e-324, 5e-324) == pytest.approx(1.0)
    assert S.markov_mean_interarrival(2**62, 1, 0.5, 0.5) == pytest.approx(2.0)
    gaps = S.markov_arrivals(5, 2, 2**62, 1, 0.5, 0.5, seed=0)
    assert gaps.min() >= 1
