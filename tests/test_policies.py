"""Lower bound, Baseline, MDP value iteration and the native threshold simulation."""

import numpy as np
import pytest

from offload.bucket import Bucket
from offload.policies import (
    baseline_threshold, interarrival_distribution, lower_bound, mdp_thresholds, oracle,
    oracle_metric, simulate_thresholds, threshold_vector,
)
from offload_native import simulate_thresholds as simulate_native, upper_hull


# ----------------------------------------------------------------------------- references

def reference_mdp(metrics, rewards, N, P, M, interarrival=None, g=0.9999, max_sweeps=10_000,
                  rtol=1e-6):
    """SPEC section 5 value iteration, one token state at a time, argmax over all j.

    The score ``G(j) + g (F(j) E1 + (1-F(j)) E0)`` is evaluated as
    ``g E0 + G(j) + F(j) g (E1 - E0)`` (the same number, arranged so that exactly
    tied thresholds stay exactly tied and ``argmax`` takes the first). Only the
    last of a run of equal metrics is a candidate threshold.
    """
    K = len(metrics)
    order = np.argsort(-np.asarray(metrics), kind="stable")
    m = np.asarray(metrics, float)[order]
    G = np.cumsum(np.asarray(rewards, float)[order]) / K
    F = np.arange(1, K + 1) / K
    cand = [j for j in range(K) if j == K - 1 or m[j] != m[j + 1]]
    if interarrival is None:
        dist = [(1, 1.0)]
    else:
        vals, counts = np.unique(interarrival, return_counts=True)
        dist = [(int(v), c / len(interarrival)) for v, c in zip(vals, counts)]
    V = {n: 0.0 for n in range(N, M + 1)}
    theta = None
    tol = rtol * np.max(np.abs(metrics))
    for _ in range(max_sweeps):
        newV, newT = {}, []
        for n in range(N, M + 1):
            E0 = sum(p * V[min(M, n + N * i)] for i, p in dist)
            if n < P:
                newV[n] = g * E0
                continue
            E1 = sum(p * V[min(M, n - P + N * i)] for i, p in dist)
            scores = [g * E0 + G[j] + F[j] * (g * (E1 - E0)) for j in cand]
            b = int(np.argmax(scores))
            newV[n] = scores[b]
            newT.append(m[cand[b]])
        newT = np.array(newT)
        V = newV
        done = theta is not None and np.max(np.abs(newT - theta)) <= tol
        theta = newT
        if done:
            break
    return theta


def reference_simulation(metric, reward, ia, theta, N, P, M):
    """Plain Python threshold policy on one stream (SPEC sections 1-2)."""
    n, total, sent = M, 0.0, 0
    hist = np.zeros(M + 1, dtype=np.int64)
    dec, tok = [], []
    for k in range(len(metric)):
        a = n >= P and metric[k] >= theta[n - P]
        hist[n] += 1
        dec.append(a)
        tok.append(n)
        if a:
            total += float(reward[k])
            sent += 1
        n = min(M, n - P * a + N * int(ia[k]))
    return total, sent, hist, np.array(dec, np.uint8), np.array(tok, np.int32)


def make_data(rng, K, ties=False):
    m = rng.normal(size=K)
    if ties:
        m = np.round(m, 1)
    r = (rng.random(K) < 1 / (1 + np.exp(-2 * m))).astype(float) - (rng.random(K) < 0.2)
    return m, r


# --------------------------------------------------------------- lower bound / baseline

def test_baseline_threshold_is_the_quantile():
    rng = np.random.default_rng(0)
    m = rng.normal(size=1001)
    assert baseline_threshold(m, 0.1) == np.quantile(m, 0.9)
    assert baseline_threshold(m, 0.1, 2.5) == np.quantile(m, 0.75)
    assert baseline_threshold(m, 0.5, 3.0) == m.min()  # rate*tau >= 1: offload everything
    # about a fraction rate*tau of the training images is at or above it
    assert np.mean(m >= baseline_threshold(m, 0.2)) == pytest.approx(0.2, abs=2e-3)


def test_lower_bound_direct():
    rng = np.random.default_rng(1)
    tm = rng.normal(size=500)
    m, r = make_data(rng, 300)
    thr = np.quantile(tm, 1 - 0.1 * 1.5)
    expect = np.sum(r[m >= thr]) / len(m)
    assert lower_bound(tm, m, r, 0.1, 1.5) == pytest.approx(expect, abs=1e-15)


@pytest.mark.parametrize("call, match", [
    (lambda: baseline_threshold([1.0, 2.0], 0.0), "rate"),
    (lambda: baseline_threshold([1.0, 2.0], 0.1, 0.5), "mean_interarrival"),
    (lambda: baseline_threshold([], 0.1), "non-empty"),
    (lambda: baseline_threshold([1.0, np.nan], 0.1), "NaN"),
    (lambda: lower_bound([1.0, 2.0], [1.0, 2.0], [1.0], 0.1), "mismatched"),
])
def test_lower_bound_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- MDP

@pytest.mark.parametrize("case", [
    dict(seed=0, K=40, bucket=(1, 4, 8)),
    dict(seed=1, K=60, bucket=(1, 3, 7), ia=True),
    dict(seed=2, K=50, bucket=(2, 5, 12), ties=True),
    dict(seed=3, K=30, bucket=(1, 2, 5), ia=True, ties=True),
    dict(seed=4, K=45, bucket=(1, 4, 8), continuous=True),
    dict(seed=5, K=45, bucket=(3, 4, 9), ia=True, continuous=True, g=0.99),
])
def test_mdp_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    m, r = make_data(rng, case["K"], case.get("ties", False))
    if case.get("continuous"):
        r = rng.normal(size=case["K"])
    ia = rng.choice([1, 2, 5], size=200, p=[0.6, 0.3, 0.1]) if case.get("ia") else None
    g = case.get("g", 0.9999)
    got = mdp_thresholds(m, r, Bucket(*case["bucket"]), interarrival=ia, discount=g)
    want = reference_mdp(m, r, *case["bucket"], interarrival=ia, g=g)
    N, P, M = case["bucket"]
    assert got.shape == (M - P + 1,)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", [
    dict(seed=10, K=300, bucket=(1, 10, 40)),
    dict(seed=11, K=300, bucket=(1, 4, 8), ia=True),
    dict(seed=12, K=200, bucket=(2, 5, 12), ties=True, ia=True),
    dict(seed=13, K=200, bucket=(1, 3, 10), continuous=True),
])
@pytest.mark.parametrize("sweeps", [1, 2, 7, 60])
def test_mdp_trajectory_matches_reference(case, sweeps):
    """Without the early stop: the thresholds after a fixed number of sweeps."""
    rng = np.random.default_rng(case["seed"])
    m, r = make_data(rng, case["K"], case.get("ties", False))
    if case.get("continuous"):
        r = rng.normal(size=case["K"])
    ia = rng.choice([1, 2, 9], size=300, p=[0.5, 0.3, 0.2]) if case.get("ia") else None
    got = mdp_thresholds(m, r, Bucket(*case["bucket"]), interarrival=ia, max_sweeps=sweeps, rtol=-1)
    want = reference_mdp(m, r, *case["bucket"], interarrival=ia, max_sweeps=sweeps, rtol=-1)
    np.testing.assert_array_equal(got, want)
    if case["seed"] == 10 and sweeps == 60:
        assert len(set(got.tolist())) > 1  # thresholds do depend on n


def test_mdp_thresholds_are_metrics_and_nonincreasing():
    rng = np.random.default_rng(3)
    m, r = make_data(rng, 5000)
    for bucket in [(1, 10, 40), (1, 4, 8)]:
        for ia in [None, rng.choice([1, 3], 1000)]:
            th = mdp_thresholds(m, r, Bucket(*bucket), interarrival=ia)
            assert np.all(np.isin(th, m))
            # typical, not a theorem: more tokens, lower threshold
            assert np.all(np.diff(th) <= 0)


def test_mdp_ties_offload_whole_runs():
    # Every metric appears 4 times: the threshold can only sit at the end of a run.
    rng = np.random.default_rng(4)
    base, r = make_data(rng, 60)
    m = np.repeat(np.round(base[:15], 2), 4)
    th = mdp_thresholds(m, r, Bucket(1, 4, 8))
    assert np.all(np.isin(th, m))


def test_upper_hull():
    x = np.arange(1.0, 8.0)
    y = np.array([0.0, 2.0, 3.0, 3.5, 4.0, 4.0, 1.0])
    h = upper_hull(x, y)
    assert h.tolist() == [0, 1, 2, 4, 5, 6]  # (4, 3.5) lies on the chord 3->5
    assert upper_hull([1.0], [2.0]).tolist() == [0]


def test_interarrival_distribution():
    v, p = interarrival_distribution([1, 3, 3, 1, 1, 2])
    assert v.tolist() == [1, 2, 3] and np.allclose(p, [0.5, 1 / 6, 1 / 3])
    v, p = interarrival_distribution(None)
    assert v.tolist() == [1] and p.tolist() == [1.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(metrics=[1.0, 2.0], rewards=[1.0], N=1, P=2, M=2), "mismatched"),
    (dict(metrics=[1.0, 2.0], rewards=[1.0, 0.0], N=2, P=2, M=2), "0 < N < P <= M"),
    (dict(metrics=[1.0, 2.0], rewards=[1.0, 0.0], N=1, P=3, M=2), "0 < N < P <= M"),
    (dict(metrics=[1.0, 2.0], rewards=[1.0, 0.0], N=1.0, P=3, M=4), "integer"),
    (dict(metrics=[1.0, 2.0], rewards=[1.0, 0.0], N=1, P=2, M=2, interarrival=[1, 0]),
     ">= 1 slot"),
    (dict(metrics=[1.0, 2.0], rewards=[1.0, 0.0], N=1, P=2, M=2, discount=1.0), "discount"),
    (dict(metrics=[], rewards=[], N=1, P=2, M=2), "non-empty"),
    (dict(metrics=[1.0, 2.0], rewards=[1.0, 0.0], N=1, P=2, M=2, max_sweeps=0), "max_sweeps"),
])
def test_mdp_bad_inputs(kwargs, match):
    kwargs = dict(kwargs)
    triple = [kwargs.pop(k) for k in ("N", "P", "M")]
    with pytest.raises(ValueError, match=match):
        mdp_thresholds(kwargs.pop("metrics"), kwargs.pop("rewards"), Bucket(*triple), **kwargs)


# ----------------------------------------------------------------------------- simulation

@pytest.mark.parametrize("bucket", [(1, 10, 40), (1, 4, 8), (2, 3, 3)])
def test_native_simulation_matches_python(bucket):
    N, P, M = bucket
    rng = np.random.default_rng(M)
    S, L = 3, 400
    metric = rng.normal(size=(S, L)).astype(np.float32)
    reward = rng.integers(-1, 2, size=(S, L)).astype(np.float32)
    ia = rng.choice([1, 2, 7], size=(S, L)).astype(np.int64)
    theta = np.sort(rng.normal(size=M - P + 1))[::-1].astype(np.float32)
    theta[0] = metric[0, 5]  # an exact tie offloads
    tot, cnt, hist, dec, tok = simulate_native(metric, reward, ia, theta, N, P, M, True)
    hist_ref = np.zeros(M + 1, dtype=np.int64)
    for s in range(S):
        t, c, h, d, k = reference_simulation(metric[s], reward[s], ia[s], theta, N, P, M)
        assert tot[s] == t and cnt[s] == c
        np.testing.assert_array_equal(dec[s], d)
        np.testing.assert_array_equal(tok[s], k)
        hist_ref += h
    np.testing.assert_array_equal(hist, hist_ref)
    assert hist.sum() == S * L
    assert dec.dtype == np.uint8 and tok.dtype == np.int32
    tot2, cnt2, hist2 = simulate_native(metric, reward, ia, theta, N, P, M)
    np.testing.assert_array_equal(tot2, tot)
    np.testing.assert_array_equal(cnt2, cnt)
    np.testing.assert_array_equal(hist2, hist)


def test_simulation_wrapper_one_stream_and_scalar_theta():
    rng = np.random.default_rng(9)
    m, r = make_data(rng, 500)
    ia = np.ones(500, dtype=np.int64)
    tot, cnt, hist, dec, tok = simulate_thresholds(m, r, ia, 0.8, Bucket(1, 10, 40), trace=True)
    t, c, h, d, k = reference_simulation(m.astype(np.float32), r, ia,
                                         np.full(31, np.float32(0.8)), 1, 10, 40)
    assert tot.shape == (1,) and tot[0] == t and cnt[0] == c
    assert dec.shape == (500,) and np.array_equal(dec, d) and np.array_equal(tok, k)
    assert threshold_vector(0.8, Bucket(1, 10, 40)).shape == (31,)


def test_huge_bucket_is_refused_before_allocating():
    m = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="smaller depth"):
        simulate_thresholds(m, m, np.ones(5, np.int64), 0.8, Bucket(1, 2, 1 << 40))


def test_policies_never_beat_the_oracles():
    rng = np.random.default_rng(11)
    train_m, train_r = make_data(rng, 3000)
    m, r = make_data(rng, 2000)
    ia = rng.choice([1, 3], size=2000)
    N, P, M = 1, 4, 8
    best, _ = oracle(r, ia, Bucket(N, P, M))
    by_metric, _ = oracle_metric(m, r, ia, Bucket(N, P, M))
    assert by_metric <= best
    for theta in [baseline_threshold(train_m, 0.25, ia.mean()),
                  mdp_thresholds(train_m, train_r, Bucket(N, P, M), interarrival=ia)]:
        tot, cnt, hist = simulate_thresholds(m, r, ia, theta, Bucket(N, P, M))
        assert tot[0] <= best
        assert hist[:P].sum() + hist[P:].sum() == len(m)


@pytest.mark.parametrize("call, match", [
    (lambda: simulate_native(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 4)),
                             np.zeros(3), 1, 2, 4), "same shape"),
    (lambda: simulate_native(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)),
                             np.zeros(2), 1, 2, 4), r"needs \(3,\)"),
    (lambda: simulate_native(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)),
                             np.zeros(3), 1, 2, 4), ">= 1 slot"),
    (lambda: simulate_native(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)),
                             np.zeros(3), 2, 2, 4), "0 < N < P <= M"),
    (lambda: simulate_thresholds(np.zeros(3), np.zeros(3), np.ones(3), np.zeros(2), Bucket(1, 2, 4)),
     "needs a scalar"),
])
def test_simulation_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
