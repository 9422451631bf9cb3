"""The belief policy: its filters against brute-force posteriors, hand-worked cases, and the ceiling."""

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from offload import belief, ceiling, policies, simulate
from offload.bucket import Bucket
from offload.cli import sim_main
from offload.profile import TEST, TRAIN
from offload.scenario import Scenario
from offload.synthetic import synthetic_profile


def _scenario(bucket, **kw):
    sc = Scenario(bucket.N / bucket.P, bucket.M / bucket.P, **kw)
    assert sc.bucket == bucket
    return sc


def _window(n, spread):
    return int(np.floor(spread * n)) + 1


def _p_position(i, l, n, spread):
    """P(sorted position i | location l), written out over the offsets d."""
    w = _window(n, spread)
    return sum((l + d) % n == i for d in range(w)) / w


@pytest.mark.parametrize("n,spread,G", [(7, 0.3, 7), (7, 0.3, 3), (5, 1.0, 5), (9, 0.0, 4),
                                        (12, 0.5, 5)])
def test_location_likelihood_counts_every_offset(n, spread, G):
    bounds = belief.bin_bounds(n, G)
    c = ceiling.Ceiling(np.zeros((G, 1, 1)), n, G, 1, True)
    # the ceiling's binning: location l is in bin l G // n
    for g in range(G):
        assert all(c.bin_of(l) == g for l in range(bounds[g], bounds[g + 1]))
    lik = belief.location_likelihood(n, spread, G, np.arange(n))
    want = np.array([[np.mean([_p_position(i, l, n, spread) for l in range(bounds[g], bounds[g + 1])])
                      for g in range(G)] for i in range(n)])
    np.testing.assert_allclose(lik, want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lik.sum(axis=0), 1.0)  # each bin's images: one distribution


def test_hand_worked_two_bins():
    """n = 4 images, sp = 0.25 (windows of 2), bins {0, 1} and {2, 3}, rprob 0.5."""
    sc = Scenario(choice="location-reset", spread=0.25, rprob=0.5)
    model = belief.belief_model(np.array([0.0, 1.0, 2.0, 3.0]), sc, bins=2)
    # position 1 is reached from l = 0 (d = 1) and l = 1 (d = 0): each 1/2; bin {2, 3} never
    np.testing.assert_allclose(model.lik[1], [0.5, 0.0])
    # position 0 from l = 0 (d = 0) and l = 3 (d = 1): 1/4 for each bin
    np.testing.assert_allclose(model.lik[0], [0.25, 0.25])
    post = belief.filter_locations(np.array([[1, 0, 3]]), model)[0]
    np.testing.assert_allclose(post[0], [1.0, 0.0])     # seen 1: bin {0, 1} for sure
    # predicted 0.5 * 1 + 0.5 * 0.5 = 0.75 for bin {0, 1}; seeing 0 is as likely from both
    np.testing.assert_allclose(post[1], [0.75, 0.25])
    np.testing.assert_allclose(post[2], [0.0, 1.0])     # 3 only from {2, 3}
    # The thresholds average the ceiling's over the belief: 0.2 in bin 0, 0.6 in bin 1, so
    # 0.2, 0.75 * 0.2 + 0.25 * 0.6 = 0.3 and 0.6 at the three images.
    theta = np.full((2, 1, 5), np.inf)
    theta[0, 0, 2:], theta[1, 0, 2:] = 0.2, 0.6
    c = ceiling.Ceiling(theta, 4, 2, 1, True)
    np.testing.assert_allclose(belief.expected_threshold(theta, post, np.ones((3, 1)),
                                                         np.full(3, 2)), [0.2, 0.3, 0.6])
    # (N, P, M) = (1, 2, 4): every image finds a token; expected rewards 0.3, 0.29, 0.7
    st = simulate.Streams(np.array([[1.0, 0.0, 3.0]]), np.zeros((1, 3)), np.zeros((1, 3)),
                          np.ones((1, 3), np.int64), np.array([[0.3, 0.29, 0.7]]))
    res = belief.run_belief(model, c, st, Bucket(1, 2, 4), trace=True)
    assert res.decisions[0].tolist() == [1, 0, 1] and res.tokens[0].tolist() == [4, 3, 4]


def _brute_locations(obs_positions, n, spread, rho, groups):
    """P(location at each step | observed groups so far), summing over every location path."""
    K = len(obs_positions)
    out = np.zeros((K, n))
    for k in range(K):
        for path in itertools.product(range(n), repeat=k + 1):
            p = 1.0 / n
            for j, l in enumerate(path):
                if j:
                    p *= (1 - rho) * (path[j - 1] == l) + rho / n
                p *= sum(_p_position(i, l, n, spread) for i in groups[obs_positions[j]])
            out[k, path[-1]] += p
        out[k] /= out[k].sum()
    return out


@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0])
def test_location_filter_equals_brute_force_posterior(rho):
    # 6 images with a tie (two share a metric): the device sees values, not positions
    metric = np.array([0.5, -1.0, 2.0, 0.5, 3.0, 1.0], np.float32)
    sc = Scenario(choice="location-reset", spread=0.34, rprob=rho)
    model = belief.belief_model(metric, sc, bins=6)      # one bin per location: exact
    values, starts = belief.tie_groups(np.sort(metric))
    ends = np.append(starts[1:], 6)
    groups = [list(range(a, b)) for a, b in zip(starts, ends)]
    group_of = np.repeat(np.arange(len(values)), ends - starts)
    rng = np.random.default_rng(4)
    for _ in range(3):  # sequences the generator could draw
        loc, obs = rng.integers(6), []
        for k in range(4):
            if k and rng.random() < rho:
                loc = rng.integers(6)
            obs.append(group_of[(loc + rng.integers(_window(6, 0.34))) % 6])
        obs = np.array(obs)
        want = _brute_locations(obs, 6, 0.34, rho, groups)
        got = belief.filter_locations(obs[None, :], model)[0]
        np.testing.assert_allclose(got, want, atol=1e-12)
        # in two blocks, the second started from the first's last posterior
        a = belief.filter_locations(obs[None, :2], model)
        b = belief.filter_locations(obs[None, 2:], model, belief=a[0, -1][None])
        np.testing.assert_allclose(np.concatenate([a, b], axis=1)[0], want, atol=1e-12)
    assert model.observe(np.array([0.5, 3.0])).tolist() == [1, 4]
    with pytest.raises(ValueError, match="not in the split"):
        model.observe(np.array([0.25], np.float32))


def test_first_image_posterior_is_exact_with_coarse_bins():
    """Before any transition, a uniform location within each bin is the truth."""
    n, spread, G = 10, 0.3, 3
    sc = Scenario(choice="location-reset", spread=spread, rprob=0.1)
    model = belief.belief_model(np.arange(n, dtype=np.float32), sc, bins=G)
    bounds = belief.bin_bounds(n, G)
    for i in range(n):
        p_loc = np.array([_p_position(i, l, n, spread) for l in range(n)])
        want = np.array([p_loc[bounds[g]:bounds[g + 1]].sum() for g in range(G)])
        got = belief.filter_locations(np.array([[i]]), model)[0, 0]
        np.testing.assert_allclose(got, want / want.sum(), atol=1e-14)


def _arrival_model(law, initial):
    gaps = np.array([1, 2, 3])
    full = np.concatenate([law, law.sum(axis=1, keepdims=True)], axis=1)
    return belief.BeliefModel(np.zeros(1, np.float32), np.ones((1, 1)), np.ones(1), 0.0, gaps,
                              full, np.asarray(initial, float))


def test_arrival_filter_equals_brute_force_posterior():
    rng = np.random.default_rng(7)
    law = rng.random((2, 3, 2))
    law /= law.sum(axis=(1, 2), keepdims=True)
    model = _arrival_model(law, [0.3, 0.7])
    gaps = np.array([1, 3, 3, 2, 1])  # the gaps before images 1..5
    before = np.concatenate([[0], gaps])[None]  # image 0 has no gap before it
    got = belief.filter_arrivals(before, model)[0]
    for k in range(len(gaps) + 1):
        want = np.zeros(2)
        for path in itertools.product(range(2), repeat=k + 1):
            p = model.initial[path[0]]
            for j in range(k):
                p *= law[path[j], gaps[j] - 1, path[j + 1]]
            want[path[-1]] += p
        np.testing.assert_allclose(got[k], want / want.sum(), atol=1e-14)
    # a gap the law never saw (7 slots) is no evidence: the state moves by the transition alone
    post = belief.filter_arrivals(np.array([[0, 7]]), model)[0, 1]
    np.testing.assert_allclose(post, model.initial @ law.sum(axis=1))


def _runs(prof, sc, length, n_seq, bins):
    te, tr = prof.split == TEST, prof.split == TRAIN
    m = prof.standardized_metric().astype(np.float32)
    st = simulate.make_streams(m[te], prof.reward[te], prof.weak_loss[te], sc, length=length,
                               n_seq=n_seq, raw_metric=prof.metric[te], hidden=True)
    # valued by expected rewards: the comparison then has no coin flips in it
    st = simulate.Streams(st.metric, st.raw_metric, st.weak_loss, st.interarrival,
                          st.raw_metric, st.location, st.arrival_state)
    c = ceiling.ceiling_policy(prof.metric[te], sc, metric=m[te], bins=bins)
    model = belief.belief_model(m[te], sc, bins=c.bins)
    ia = None if sc.arrivals == "periodic" else st.interarrival.ravel()[:100_000]
    mdp = simulate.run_thresholds(policies.mdp_thresholds(m[tr], prof.reward[tr], sc.bucket,
                                                          interarrival=ia), st, sc.bucket)
    return (belief.run_belief(model, c, st, sc.bucket), ceiling.run_ceiling(c, st, sc.bucket),
            mdp, c, model, st)


@pytest.mark.parametrize("choice,arrivals", [("location-reset", "periodic"), ("iid", "markov"),
                                             ("location-reset", "markov")])
def test_belief_sits_between_mdp_and_the_ceiling(choice, arrivals):
    prof = synthetic_profile(12000, seed=3)
    sc = _scenario(Bucket(1, 10, 40), choice=choice, spread=0.1, rprob=0.02, arrivals=arrivals,
                   markov=(1, 3, 0.01, 0.02), seed=2)
    bel, ceil, mdp, *_ = _runs(prof, sc, 20000, 6, 128)
    assert mdp.mean_reward < bel.mean_reward <= ceil.mean_reward
    assert bel.token_hist.sum() == 6 * 20000


def test_belief_is_the_ceiling_when_nothing_is_hidden():
    prof = synthetic_profile(6000, seed=5)
    sc = _scenario(Bucket(1, 10, 40), choice="iid", arrivals="periodic", seed=1)
    bel, ceil, *_ = _runs(prof, sc, 5000, 3, 64)
    assert bel.mean_reward == ceil.mean_reward and bel.offload_rate == ceil.offload_rate


def test_mismatched_ceiling_is_refused():
    prof = synthetic_profile(6000, seed=5)
    sc = _scenario(Bucket(1, 10, 40), choice="location-reset", arrivals="periodic", seed=1)
    _, _, _, c, model, st = _runs(prof, sc, 500, 2, 64)
    other = ceiling.Ceiling(c.theta[:32], c.n_images, 32, 1, True)
    with pytest.raises(ValueError, match="does not match the ceiling"):
        belief.run_belief(model, other, st, sc.bucket)


def test_offload_sim_policy_belief(tmp_path):
    out = tmp_path / "t.json"
    r = CliRunner().invoke(sim_main, ["--synthetic", "6000", "--choice", "location-reset",
                                      "--arrivals", "markov", "--markov", "1", "3", "0.01", "0.02",
                                      "--length", "3000", "--streams", "3", "--policy", "belief",
                                      "--policy", "ceiling", "--policy", "mdp", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["policy"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"belief", "ceiling", "mdp"}
    assert rows["belief"]["share_of_belief_gain"] == pytest.approx(1.0)
    assert rows["ceiling"]["share_of_ceiling_gain"] == pytest.approx(1.0)
    assert "share_of_belief_gain" in rows["mdp"]
    # belief alone needs no hidden state in the streams
    r = CliRunner().invoke(sim_main, ["--synthetic", "3000", "--length", "500", "--streams", "2",
                                      "--choice", "location-reset", "--policy", "belief"])
    assert r.exit_code == 0, r.output
    assert "share_of_belief_gain" in r.output and "share_of_ceiling_gain" not in r.output
