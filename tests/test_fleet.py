"""The multi-camera simulator (offload.fleet): native loop vs numpy twin, hand-worked cases, limits."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from offload import blob, fleet, mlp, policies, sequences, simulate
from offload.bucket import Bucket
from offload.simulate import Streams

from helpers import random_network


def streams(metric=None, reward=None, ia=None, *, rng=None, S=2, L=8, arrivals="periodic"):
    """Streams from given arrays, or random ones (metrics N(0,1), rewards N(0,1))."""
    if metric is None:
        metric = rng.normal(size=(S, L))
        reward = rng.normal(size=(S, L))
        ia = (sequences.periodic(L, S) if arrivals == "periodic"
              else rng.choice([1, 2, 3, 7], size=(S, L)))
    metric = np.atleast_2d(np.asarray(metric, np.float32))
    reward = np.atleast_2d(np.asarray(reward, np.float32))
    ia = np.ones(metric.shape, np.int64) if ia is None else np.atleast_2d(ia)
    return Streams(metric, reward, np.ones(metric.shape, np.float32), ia)


def always(bucket, st):
    """A camera that sends whenever its own bucket allows."""
    return fleet.Camera(st, bucket, theta=np.float32(-np.inf))


def per_camera(res):
    return res.reward_total.tolist(), res.sent.tolist(), res.refused.tolist()


# ----------------------------------------------------------------------------- hand-worked cases


def two_cameras(reward0=1.0, reward1=10.0, L=4):
    return [streams(np.zeros(L), np.full(L, reward0)), streams(np.zeros(L), np.full(L, reward1))]


def test_two_cameras_fixed_order_by_hand():
    # Cameras (N, P, M) = (1, 2, 2), always send; switch (1, 2, 2) refills 1 per camera turn.
    # Slot 0: camera 0 sends (switch 2 -> 0, +1), refill -> 1; camera 1 sends, refused (1 < 2),
    # refill -> 2. Slot 1: both have 1 token, no send. Slot 2 = slot 0. Slot 3 = slot 1.
    s0, s1 = two_cameras()
    cams = [always(Bucket(1, 2, 2), s0), always(Bucket(1, 2, 2), s1)]
    res = fleet.run_fleet(cams, Bucket(1, 2, 2))
    assert per_camera(res) == ([2.0, 0.0], [2, 2], [0, 2])
    assert res.switch_refusals == 2 and res.images.tolist() == [4, 4]
    assert res.share.tolist() == [1.0, 0.0]
    # avg loss: weak loss 1 per image, reward 2 over 8 images.
    assert res.avg_loss == pytest.approx(1 - 2 / 8)


def test_two_cameras_refund_by_hand():
    # Refund: a refused camera gets its token back. Slot 0: cam 0 admitted (+1), cam 1 refused,
    # keeps 2 tokens. Slot 1: cam 0 has 1 (no send), cam 1 sends at switch 2: admitted (+10).
    # Slot 2: cam 0 (2 tokens) refused at switch 1, refunded; cam 1 has 1. Slot 3: cam 0 admitted
    # (+1), cam 1 (2 tokens again) refused at switch 1.
    s0, s1 = two_cameras()
    cams = [always(Bucket(1, 2, 2), s0), always(Bucket(1, 2, 2), s1)]
    res = fleet.run_fleet(cams, Bucket(1, 2, 2), feedback="refund")
    assert per_camera(res) == ([2.0, 10.0], [3, 3], [1, 2])


def test_two_cameras_retry_after_by_hand():
    # Cameras (1, 2, 4), switch (1, 6, 6): refill 2 per slot, so a refusal at switch g' after the
    # turn announces ceil((6 - g') / 2) slots. Without feedback camera 0 is admitted once and
    # both then waste tokens on refusals; honouring Retry-After, camera 0 keeps a token for slot 3.
    s0, s1 = two_cameras()
    mk = lambda: [always(Bucket(1, 2, 4), s0), always(Bucket(1, 2, 4), s1)]
    plain = fleet.run_fleet(mk(), Bucket(1, 6, 6))
    assert per_camera(plain) == ([1.0, 0.0], [3, 3], [2, 3])
    ra = fleet.run_fleet(mk(), Bucket(1, 6, 6), feedback="retry-after")
    assert per_camera(ra) == ([2.0, 0.0], [3, 3], [1, 3])


def test_switch_refills_on_turns_without_images():
    # Camera 1's images come every 3 slots (slots 0 and 3 of the T = 6 slots camera 0 fills).
    # The switch (1, 2, 2) refills on camera 1's empty turns too, so camera 0 (6 tokens, refill 1,
    # sends at slots 0..4) always finds it full; camera 1 finds 1 token at slots 0 and 3.
    s0 = streams(np.zeros(6), np.ones(6))
    s1 = streams(np.zeros(6), np.full(6, 5.0), np.full(6, 3))
    res = fleet.run_fleet([always(Bucket(1, 2, 6), s0), always(Bucket(1, 2, 6), s1)],
                          Bucket(1, 2, 2))
    assert res.images.tolist() == [6, 2]
    assert per_camera(res) == ([5.0, 0.0], [5, 2], [0, 2])


def test_random_order_is_seeded_and_fair():
    L = 2000
    sts = [streams(np.zeros(L), np.ones(L)) for _ in range(3)]
    cams = [always(Bucket(1, 2, 4), s) for s in sts]
    fixed = fleet.run_fleet(cams, Bucket(1, 2, 2))
    a = fleet.run_fleet(cams, Bucket(1, 2, 2), order="random", seed=5)
    b = fleet.run_fleet(cams, Bucket(1, 2, 2), order="random", seed=5)
    assert per_camera(a) == per_camera(b)
    assert fixed.share[0] > 0.45  # the fixed order favours camera 0 ...
    assert np.all(np.abs(a.share - 1 / 3) < 0.05)  # ... the random one does not


# ----------------------------------------------------------------------------- against single cameras


def test_big_switch_is_independent_single_cameras():
    rng = np.random.default_rng(1)
    cams = [fleet.Camera(streams(rng=rng, S=3, L=500, arrivals=arr), b,
                         theta=rng.normal(size=b.send_states))
            for b, arr in [(Bucket(1, 4, 9), "periodic"), (Bucket(2, 5, 17), "gaps")]]
    switch = Bucket(99, 100, 100_000)  # refills almost a send per turn: never refuses here
    res = fleet.run_fleet(cams, switch)
    T = fleet.stack_streams([c.streams for c in cams]).T
    assert res.switch_refusals == 0
    for i, c in enumerate(cams):
        # only the images that arrive within the T slots count: cut each stream there
        arrival = np.cumsum(c.streams.interarrival, axis=1) - c.streams.interarrival
        total = sent = 0
        for s in range(3):
            n = int((arrival[s] < T).sum())
            tot, cnt, _ = policies.simulate_thresholds(
                c.streams.metric[s, :n], c.streams.reward[s, :n], c.streams.interarrival[s, :n],
                c.theta, c.bucket)
            total, sent = total + float(tot[0]), sent + int(cnt[0])
        assert float(res.reward_total[i]) == pytest.approx(total, rel=1e-12)
        assert int(res.sent[i]) == sent


def test_pooled_is_one_bucket_over_the_merged_stream():
    rng = np.random.default_rng(2)
    K, S, L = 3, 2, 400
    sts = [streams(rng=rng, S=S, L=L) for _ in range(K)]
    switch = Bucket(1, 10, 40)
    theta = np.sort(rng.normal(size=switch.send_states))[::-1]
    res = fleet.run_pooled([always(Bucket(1, 2, 2), s) for s in sts], switch, theta)
    # merged stream: slot by slot, camera 0, 1, 2; one camera turn = one refill
    merged_m = np.stack([s.metric for s in sts], axis=2).reshape(S, L * K)
    merged_r = np.stack([s.reward for s in sts], axis=2).reshape(S, L * K)
    tot, cnt, _ = policies.simulate_thresholds(merged_m, merged_r, np.ones((S, L * K), np.int64),
                                               theta, switch)
    assert res.reward_total.sum() == pytest.approx(tot.sum(), rel=1e-12)
    assert res.sent.sum() == cnt.sum() and res.switch_refusals == 0


def small_dqn_blob(rng, bucket, H=4):
    layers = random_network(rng, 2 * H, bucket.q_length, hidden=(16, 16))
    calib = rng.normal(size=(500, 2 * H)).astype(np.float32)
    calib[:, H:] = rng.integers(1, 5, size=(500, H))
    q = mlp.quantize(layers, calib, segments=(0, H))
    lx = np.linspace(0, 2, 8).astype(np.float32)
    return blob.Policy("dqn", *bucket, 0.0, 1.0, lx, lx, T=H + 1, interarrival=True, qmlp=q)


def test_dqn_camera_matches_the_single_camera_simulator():
    rng = np.random.default_rng(3)
    b = Bucket(2, 5, 13)
    pol = small_dqn_blob(rng, b)
    s = streams(rng=rng, S=3, L=300)
    cam = fleet.Camera(s, b, send=fleet.dqn_send_table(pol, s, threads=1))
    res = fleet.run_fleet([cam], Bucket(99, 100, 100_000))
    want = simulate.run_policy(pol, s, threads=1)
    assert res.switch_refusals == 0
    assert res.reward == pytest.approx(want.mean_reward, rel=1e-12)
    assert res.sent.sum() == round(want.offload_rate * 3 * 300)


# ----------------------------------------------------------------------------- native vs numpy twin


@st.composite
def fleets(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    K = draw(st.integers(1, 4))
    S, L = draw(st.integers(1, 3)), draw(st.integers(2, 40))
    arrivals = draw(st.sampled_from(["periodic", "gaps"]))
    cams = []
    for _ in range(K):
        P = draw(st.integers(2, 6))
        N = draw(st.integers(1, P - 1))
        b = Bucket(N, P, P + draw(st.integers(0, 10)))
        s = streams(rng=rng, S=S, L=L, arrivals=arrivals)
        if draw(st.booleans()):
            cams.append(fleet.Camera(s, b, send=rng.random((S, L, b.send_states)) < 0.6))
        else:
            cams.append(fleet.Camera(s, b, theta=rng.normal(size=b.send_states)))
    Pg = draw(st.integers(2, 8))
    switch = Bucket(draw(st.integers(1, Pg - 1)), Pg, Pg + draw(st.integers(0, 12)))
    return cams, switch, seed


@settings(max_examples=60, deadline=None)
@given(fleets(), st.sampled_from(fleet.ORDERS), st.sampled_from(sorted(fleet.FEEDBACK)))
def test_native_equals_numpy_twin(fl, order, feedback):
    cams, switch, seed = fl
    a = fleet.run_fleet(cams, switch, order=order, feedback=feedback, seed=seed)
    b = fleet.run_fleet(cams, switch, order=order, feedback=feedback, seed=seed, native=False)
    for f in ("reward_total", "sent", "refused", "images", "weak_loss_total"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    theta = np.random.default_rng(seed).normal(size=switch.send_states)
    p = fleet.run_pooled(cams, switch, theta, order=order, seed=seed)
    q = fleet.run_pooled(cams, switch, theta, order=order, seed=seed, native=False)
    np.testing.assert_array_equal(p.reward_total, q.reward_total)
    np.testing.assert_array_equal(p.sent, q.sent)


# ----------------------------------------------------------------------------- refusals


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(4)
    b = Bucket(1, 2, 4)
    s = streams(rng=rng, S=2, L=10)
    with pytest.raises(ValueError, match="exactly one of theta or send"):
        fleet.Camera(s, b)
    with pytest.raises(ValueError, match="send table has shape"):
        fleet.Camera(s, b, send=np.zeros((2, 10, 9), bool))
    with pytest.raises(ValueError, match="one \\(S, L\\) shape"):
        fleet.run_fleet([always(b, s), always(b, streams(rng=rng, S=3, L=10))], b)
    with pytest.raises(ValueError, match="order="):
        fleet.run_fleet([always(b, s)], b, order="round-robin")
    with pytest.raises(ValueError, match="feedback="):
        fleet.run_fleet([always(b, s)], b, feedback="retry")
    with pytest.raises(ValueError, match="at least one camera"):
        fleet.run_fleet([], b)


def test_ceiling_camera_matches_run_ceiling():
    from offload import ceiling
    from offload.profile import TEST
    from offload.scenario import Scenario
    from offload.synthetic import synthetic_profile

    prof = synthetic_profile(2000, seed=5)
    te = prof.indices(TEST)
    m = prof.standardized_metric().astype(np.float32)
    sc = Scenario(0.2, 3.0, "location-reset", 0.2, 0.05)
    st = sc.streams(m[te], prof.reward[te], prof.weak_loss[te], length=400, n_seq=3,
                    raw_metric=prof.metric[te], hidden=True)
    c = ceiling.ceiling_policy(prof.metric[te], sc, metric=m[te], bins=16)
    cam = fleet.Camera(st, sc.bucket, send=fleet.ceiling_send_table(c, st, sc.bucket))
    res = fleet.run_fleet([cam], Bucket(99, 100, 100_000))
    want = ceiling.run_ceiling(c, st, sc.bucket)
    assert res.switch_refusals == 0
    assert res.reward == pytest.approx(want.mean_reward, rel=1e-12)
    with pytest.raises(ValueError, match="hidden state"):
        fleet.ceiling_send_table(c, Streams(st.metric, st.reward, st.weak_loss, st.interarrival),
                                 sc.bucket)
