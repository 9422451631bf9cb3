"""The structure-aware ceiling: value iteration against a loop twin, and bounds on real runs."""

import numpy as np
import pytest

from offload import ceiling, policies, sequences, simulate
from offload.bucket import Bucket
from offload.scenario import Scenario
from offload.synthetic import synthetic_profile
from offload.profile import TEST, TRAIN


def _brute_theta(raw, N, P, M, starts, width, rho, gaps, law, gamma, sweeps):
    """The ceiling's value iteration written out state by state, image by image."""
    n_img = len(raw)
    G, S = len(starts), law.shape[0]
    V = np.zeros((G, S, M + 1))
    theta = np.full((G, S, M + 1), np.inf)
    for _ in range(sweeps):
        newV = np.zeros_like(V)
        for g in range(G):
            for s in range(S):
                def W(m):
                    tot = 0.0
                    for i, gap in enumerate(gaps):
                        nn = min(M, m + N * gap)
                        for t in range(S):
                            nxt = (1 - rho) * V[g, t, nn] + rho * V[:, t, nn].mean()
                            tot += law[s, i, t] * nxt
                    return tot
                imgs = [raw[(starts[g] + d) % n_img] for d in range(width)]
                for n in range(M + 1):
                    if n >= P:
                        w0, w1 = W(n), W(n - P)
                        newV[g, s, n] = np.mean([max(f + gamma * w1, gamma * w0) for f in imgs])
                        theta[g, s, n] = gamma * (w0 - w1)
                    else:
                        newV[g, s, n] = gamma * W(n)
        V = newV - newV.max()
    return theta


@pytest.mark.parametrize("choice,arrivals", [("iid", "periodic"), ("location-reset", "periodic"),
                                             ("location-reset", "markov"), ("iid", "markov")])
def test_value_iteration_equals_loop_twin(choice, arrivals):
    rng = np.random.default_rng(3)
    raw = np.sort(rng.normal(size=7)) * 0.2
    N, P, M = 1, 3, 5
    markov = (1, 2, 0.2, 0.3)
    sweeps = 25
    sc = _scenario(Bucket(N, P, M), choice=choice, spread=0.3, rprob=0.2, arrivals=arrivals,
                   markov=markov, seed=1)
    c = ceiling.ceiling_policy(raw, sc, bins=100, max_sweeps=sweeps, discount=0.95)
    assert 2 <= c.sweeps <= sweeps  # the twin runs as many sweeps as it did
    starts, width, G = ceiling.image_windows(len(raw), choice, 0.3, 100)
    gaps, law = ceiling.arrival_law(arrivals, markov, seed=sc.seed_for("ceiling"))
    want = _brute_theta(raw, N, P, M, starts, width, 0.2 if choice != "iid" else 0.0, gaps, law,
                        0.95, c.sweeps)
    assert G == (7 if choice != "iid" else 1) and c.theta.shape == want.shape
    np.testing.assert_allclose(c.theta, want, rtol=1e-9, atol=1e-12)


def _scenario(bucket, **kw):
    """A scenario whose (rate, depth) scale to ``bucket``."""
    sc = Scenario(bucket.N / bucket.P, bucket.M / bucket.P, **kw)
    assert sc.bucket == bucket
    return sc


def test_arrival_law():
    gaps, law = ceiling.arrival_law("periodic")
    assert gaps.tolist() == [1] and law.shape == (1, 1, 1)
    gaps, law = ceiling.arrival_law("markov", (1, 3, 0.01, 0.02), seed=1, sample=50_000)
    np.testing.assert_allclose(law.sum(axis=(1, 2)), 1.0)
    # Long sojourns: state 1 mostly gives gap 1 and stays, state 2 gap 3 and stays.
    assert law[0, gaps.tolist().index(1), 0] > 0.95
    assert law[1, gaps.tolist().index(3), 1] > 0.9


def _hidden_streams(prof, choice, arrivals, length, n_seq, seed, markov=(1, 3, 0.01, 0.02)):
    te = prof.split == TEST
    m = prof.standardized_metric().astype(np.float32)
    return simulate.make_streams(m[te], prof.reward[te], prof.weak_loss[te], Scenario(choice=choice, spread=0.1, rprob=0.01, arrivals=arrivals, markov=markov, seed=seed), length=length, n_seq=n_seq, raw_metric=prof.metric[te], hidden=True), m, te


def test_hidden_state_does_not_change_the_streams():
    prof = synthetic_profile(3000, seed=2)
    for choice, arrivals in (("location-reset", "markov"), ("iid", "periodic")):
        st, m, te = _hidden_streams(prof, choice, arrivals, 400, 3, 5)
        plain = simulate.make_streams(m[te], prof.reward[te], prof.weak_loss[te], Scenario(choice=choice, spread=0.1, rprob=0.01, arrivals=arrivals, markov=(1, 3, 0.01, 0.02), seed=5), length=400, n_seq=3, raw_metric=prof.metric[te])
        np.testing.assert_array_equal(st.metric, plain.metric)
        np.testing.assert_array_equal(st.interarrival, plain.interarrival)
        assert plain.location is None and st.location.shape == st.metric.shape
    idx, loc = sequences.location_reset(500, 300, 2, 0.1, 0.05, 9, return_locations=True)
    np.testing.assert_array_equal(idx, sequences.location_reset(500, 300, 2, 0.1, 0.05, 9))
    assert np.all((idx - loc) % 500 <= 50)


@pytest.mark.parametrize("choice,arrivals", [("location-reset", "periodic"), ("iid", "markov")])
def test_ceiling_sits_between_mdp_and_the_metric_oracle(choice, arrivals):
    """Valued by metrics, no causal policy beats the metric oracle on the metric sum; knowing
    the hidden state, the ceiling beats the i.i.d. MDP and Baseline on true rewards."""
    prof = synthetic_profile(20000, seed=1)
    N, P, M = 1, 10, 40
    st, m, te = _hidden_streams(prof, choice, arrivals, 20000, 8, 11)
    sc = _scenario(Bucket(N, P, M), choice=choice, spread=0.1, rprob=0.01, arrivals=arrivals,
                   markov=(1, 3, 0.01, 0.02), seed=4)
    c = ceiling.ceiling_policy(prof.metric[te], sc, metric=m[te])
    assert c.converged
    res = ceiling.run_ceiling(c, st, Bucket(N, P, M))
    tr = prof.split == TRAIN
    ia = None if arrivals == "periodic" else st.interarrival.ravel()[:100_000]
    mdp = simulate.run_thresholds(policies.mdp_thresholds(m[tr], prof.reward[tr], Bucket(N, P, M), interarrival=ia), st, Bucket(N, P, M))
    base = simulate.run_thresholds(policies.baseline_threshold(m[tr], 0.1, st.mean_interarrival), st, Bucket(N, P, M))
    assert res.mean_reward > mdp.mean_reward > base.mean_reward
    # The same runs valued by metrics: the metric oracle bounds every causal policy.
    by_metric = simulate.Streams(st.metric, st.raw_metric, st.weak_loss, st.interarrival,
                                 st.raw_metric, st.location, st.arrival_state)
    oracle = simulate.run_oracle(by_metric, Bucket(N, P, M), metric_only=True)
    assert ceiling.run_ceiling(c, by_metric, Bucket(N, P, M)).mean_reward <= oracle.mean_reward + 1e-12
    assert res.token_hist.sum() == st.metric.size


def test_errors():
    raw = np.linspace(0, 1, 50)
    sc = Scenario(choice="iid")
    with pytest.raises(ValueError, match="no images"):
        ceiling.ceiling_policy([], sc)
    with pytest.raises(ValueError, match="image choice"):
        ceiling.image_windows(50, "bursty", 0.1, 10)
    with pytest.raises(ValueError, match="arrival process"):
        ceiling.arrival_law("poisson")
    with pytest.raises(ValueError, match="order the images differently"):
        ceiling.ceiling_policy(raw, sc, metric=-raw)
    with pytest.raises(ValueError, match="fewer bins"):
        ceiling.ceiling_policy(np.linspace(0, 1, 200_000), Scenario(depth=400),
                               bins=100_000)
    c = ceiling.ceiling_policy(raw, sc)
    st = simulate.Streams(np.zeros((1, 5)), np.zeros((1, 5)), np.zeros((1, 5)),
                          np.ones((1, 5), np.int64))
    with pytest.raises(ValueError, match="hidden state"):
        ceiling.run_ceiling(c, st, Bucket(1, 10, 40))
