"""Tests for the DQN trainer (training.dqn, SPEC section 6) and ``offload-train dqn``."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import random_network  # noqa: E402
from offload import blob, mlp, simulate  # noqa: E402
from offload.bucket import Bucket  # noqa: E402
from offload.profile import TEST, TRAIN, VALIDATION, Profile  # noqa: E402
from offload.ring import window_reference  # noqa: E402
from offload.scenario import Scenario  # noqa: E402
from offload.synthetic import synthetic_profile  # noqa: E402
from training import dqn  # noqa: E402

# A run small enough for tests: a few seconds on one core.
TINY = dict(T=9, layers=2, width=16, iterations=30, steps=4, batch=64, validate_every=5,
            train_streams=2, train_length=3000, val_streams=2, val_length=1000, test_streams=2,
            test_length=1000, calib_states=2000, int8_tune=5, threads=1, device="cpu")
TINY_FLAGS = ["-T", "9", "--layers", "2", "--width", "16", "--iterations", "30", "--steps", "4",
              "--batch", "64", "--validate-every", "5", "--train-streams", "2",
              "--train-length", "3000", "--val-streams", "2", "--val-length", "1000",
              "--test-streams", "2", "--test-length", "1000", "--int8-tune", "5", "--threads", "1",
              "--device", "cpu", "--quiet"]


# --------------------------------------------------------------------------- targets


def test_targets_hand_worked():
    # Bucket (N, P, M) = (1, 2, 3): Q(n,0) for n = 1, 2, 3, then Q(n,1) for n = 2, 3.
    N, P, M, g = 1, 2, 3, 0.5
    q_next = np.array([[1.0, 2.0, 3.0, 5.0, 0.0]] * 2)
    # best(1) = 1 (only a = 0 is feasible), best(2) = max(2, 5) = 5, best(3) = max(3, 0) = 3.
    R, I = np.array([0.5, 0.5]), np.array([1, 5])
    want = np.array([
        # I = 1: target(n,0) = g best(n+1) (n = 3 clamps at M); target(n,1) = R + g best(n-1)
        [0.5 * 5, 0.5 * 3, 0.5 * 3, 0.5 + 0.5 * 1, 0.5 + 0.5 * 5],
        # I = 5: every next state clamps at M = 3, best(3) = 3
        [1.5, 1.5, 1.5, 2.0, 2.0],
    ])
    got = dqn.q_targets(torch.tensor(q_next), torch.tensor(R), torch.tensor(I), Bucket(N, P, M), g)
    np.testing.assert_allclose(got.numpy(), want)
    np.testing.assert_allclose(dqn.q_targets_reference(q_next, R, I, Bucket(N, P, M), g), want)


def test_targets_infeasible_offload_uses_only_keep_values():
    # Right after an offload from n = P the bucket holds n' = N*I < P: only a' = 0 counts,
    # however large the (infeasible) Q(n', 1) entries would be if they existed.
    N, P, M, g = 1, 3, 5, 0.9
    L = Bucket(N, P, M).q_length
    q_next = np.zeros((1, L))
    q_next[0, :M - N + 1] = [10.0, 20.0, 30.0, 40.0, 50.0]     # Q(n,0), n = 1..5
    q_next[0, M - N + 1:] = [100.0, 0.0, 0.0]                 # Q(n,1), n = 3..5
    got = dqn.q_targets(torch.tensor(q_next), torch.tensor([1.0]), torch.tensor([1]), Bucket(N, P, M), g).numpy()[0]
    # offload at n = 3 -> n' = 1: best(1) = Q(1,0) = 10
    assert got[Bucket(N, P, M).q_index(3, 1)] == pytest.approx(1.0 + 0.9 * 10.0)
    # keep at n = 2 -> n' = 3: best(3) = max(30, 100) = 100
    assert got[Bucket(N, P, M).q_index(2, 0)] == pytest.approx(0.9 * 100.0)


@pytest.mark.parametrize("bucket", [(1, 10, 40), (1, 4, 8), (3, 7, 20)])
def test_targets_match_reference_on_random_batches(bucket):
    N, P, M = bucket
    rng = np.random.default_rng(1)
    B = 64
    q = rng.normal(size=(B, Bucket(N, P, M).q_length))
    R = rng.integers(-1, 2, size=B).astype(float)
    I = rng.integers(1, 3 * M, size=B)
    got = dqn.q_targets(torch.tensor(q), torch.tensor(R), torch.tensor(I), Bucket(N, P, M), 0.9999)
    np.testing.assert_allclose(got.numpy(), dqn.q_targets_reference(q, R, I, Bucket(N, P, M), 0.9999),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- replay


def _streams(rng, S, L, periodic=False):
    metric = rng.normal(size=(S, L)).astype(np.float32)
    reward = rng.integers(-1, 2, size=(S, L)).astype(np.float32)
    ia = np.ones((S, L), np.int64) if periodic else rng.integers(1, 6, size=(S, L))
    return simulate.Streams(metric, reward, np.zeros((S, L), np.float32), ia)


@pytest.mark.parametrize("use_ia", [True, False])
def test_replay_tuples_follow_spec_input_order(use_ia):
    rng = np.random.default_rng(2)
    H, S, L = 6, 3, 40
    st = _streams(rng, S, L)
    scale_ = 2.5
    rep = dqn.Replay(st, H, use_ia, ia_scale=scale_)
    s = np.array([0, 1, 2, 2, 0, 1])
    k = np.array([0, 1, 5, 6, 38, 20])    # at the start (zero padding), inside, at the end
    x, xn, R, I = rep.tuples(s, k)
    for b in range(len(s)):
        for pos, got in ((k[b], x[b]), (k[b] + 1, xn[b])):
            want = window_reference(st.metric[s[b]], st.interarrival[s[b]], pos, H, use_ia)
            if use_ia:
                want[H:] /= np.float32(scale_)
            np.testing.assert_array_equal(got, want)
        assert R[b] == st.reward[s[b], k[b]] and I[b] == st.interarrival[s[b], k[b]]


def test_replay_sampling_is_uniform_and_repeatable():
    rng = np.random.default_rng(3)
    st = _streams(rng, 2, 50)
    rep = dqn.Replay(st, 4, True)
    a = rep.sample(np.random.default_rng(7), 20000)
    b = rep.sample(np.random.default_rng(7), 20000)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # Every position 0..L-2 of every sequence can be drawn; the last cannot (it has no x').
    x = a[0]
    firsts = {tuple(r) for r in np.round(x[:, :1], 6)}
    assert len(firsts) == 2 * 49


# --------------------------------------------------------------------------- network


def test_exported_layers_compute_the_network_on_raw_slots():
    rng = np.random.default_rng(4)
    H, din, dout = 5, 10, 7
    net = dqn.build_network(din, dout, 3, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    x = rng.normal(size=(50, din)).astype(np.float32)
    x[:, H:] = rng.integers(1, 9, size=(50, H))
    ia_scale = 2.5
    xs = x.copy()
    xs[:, H:] /= ia_scale
    q = net(torch.from_numpy(xs)).detach().numpy()
    layers = dqn.export_layers(net, H, True, ia_scale)
    assert len(layers) == 4 and [w.shape for w, _ in layers][-1] == (dout, 16)
    np.testing.assert_allclose(mlp.forward_float(layers, x), q, rtol=1e-4, atol=1e-4)
    # Centred output: the same Q-vector less its mean, so the same decisions.
    qc = mlp.forward_float(dqn.center_output(layers), x)
    np.testing.assert_allclose(qc, q - q.mean(axis=1, keepdims=True), rtol=1e-4, atol=1e-4)


def test_he_uniform_initialisation_bounds():
    net = dqn.build_network(96, 71, 5, 64, torch.Generator().manual_seed(1))
    lins = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lins) == 6   # 5 hidden and the output
    for lin in lins:
        lim = np.sqrt(6.0 / lin.in_features)
        w = lin.weight.detach().numpy()
        assert np.abs(w).max() <= lim and np.abs(w).max() > 0.9 * lim
        assert not lin.bias.detach().numpy().any()


# --------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def small_profile():
    return synthetic_profile(4000, seed=3)


def _trainer(prof, tmp_path=None, markov=False, **over):
    sc = Scenario(0.1, 4, "location-reset", 0.1, 0.01, "markov" if markov else "periodic",
                  (1, 3, 0.01, 0.01), seed=0)
    cfg = dqn.DQNConfig(**{**TINY, "interarrival": markov, **over})
    ckpt = str(tmp_path / "run.ckpt") if tmp_path else None
    return dqn.Trainer(dqn.prepare_data(prof), sc, cfg, dqn.profile_fingerprint(prof),
                       checkpoint=ckpt)


def test_validation_split_is_used_or_held_out(small_profile):
    d = dqn.prepare_data(small_profile)
    assert d.val_source == "validation split"
    assert set(d.val) == set(small_profile.indices(VALIDATION))
    no_val = small_profile.take(np.flatnonzero(small_profile.split != VALIDATION))
    d2 = dqn.prepare_data(no_val, holdout=0.25)
    train0 = no_val.indices(TRAIN)
    assert len(np.intersect1d(d2.train, d2.val)) == 0
    assert sorted(np.concatenate([d2.train, d2.val])) == sorted(train0)
    assert abs(len(d2.val) - 0.25 * len(train0)) <= 1
    assert set(d2.test) == set(no_val.indices(TEST))


def test_training_reduces_the_loss_and_keeps_the_best(small_profile):
    tr = _trainer(small_profile, iterations=40)
    losses = [tr.iterate() for _ in range(30)]
    assert np.mean(losses[-5:]) < losses[0]
    tr2 = _trainer(small_profile)
    layers = tr2.run()
    assert tr2.stopped_by and tr2.curve
    assert tr2.best_val == max(c["dqn"] for c in tr2.curve)
    # The exported best network gives the recorded validation reward.
    res = simulate.run_dqn(layers, tr2.val, Bucket(1, 10, 40), H=tr2.cfg.H, use_interarrival=False)
    assert res.mean_reward == pytest.approx(tr2.best_val, abs=1e-12)


def test_stop_before_the_first_validation_still_judges_the_network(small_profile):
    tr = _trainer(small_profile, time_limit=1e-9)
    layers = tr.run()
    assert tr.iteration == 1 and tr.stopped_by.startswith("time limit")
    assert np.isfinite(tr.best_val) and tr.best_iteration == 1
    res = simulate.run_dqn(layers, tr.val, Bucket(1, 10, 40), H=tr.cfg.H, use_interarrival=False)
    assert res.mean_reward == pytest.approx(tr.best_val, abs=1e-12)


def test_int8_policy_agrees_with_float(small_profile):
    tr = _trainer(small_profile, iterations=30, val_streams=4, val_length=5000)
    layers = tr.run()
    q = dqn.quantize(tr, layers)
    st, H = tr.val, tr.cfg.H
    res = simulate.run_dqn(q, st, Bucket(1, 10, 40), H=H, use_interarrival=False, trace=True)
    agree = dqn.int8_agreement(layers, st, Bucket(1, 10, 40), res, H=H, use_ia=False)
    # The same count, directly with the numpy twins along the int8 trajectory.
    S, L = st.shape
    x = simulate.dqn_inputs(st, H, False, 0, L).reshape(S * L, -1)
    n = res.tokens.reshape(-1).astype(np.int64)
    a_f = mlp.decide_batch(mlp.forward_float(layers, x), n, Bucket(1, 10, 40))
    a_q = mlp.decide_batch(mlp.forward_int8(q, x), n, Bucket(1, 10, 40))
    assert agree["decisions"] == S * L
    assert agree["all"] == pytest.approx(np.mean(a_f == a_q), abs=2e-4)
    assert agree["n_ge_P"] >= 0.9   # a barely trained 2 x 16 net: many near-ties
    # Equalised float layers compute the same network.
    np.testing.assert_allclose(mlp.forward_float(q.float_layers, x[:500]),
                               mlp.forward_float(layers, x[:500]), rtol=1e-4, atol=1e-4)
    f = simulate.run_dqn(layers, st, Bucket(1, 10, 40), H=H, use_interarrival=False)
    assert abs(res.avg_loss - f.avg_loss) <= 0.001


def test_grid_mlp_runs_the_network_it_exports(rng):
    # GridMLP rounds in torch what offload.mlp.weight_grid rounds in numpy: the network
    # tuning judges must be the one it hands on.
    layers = random_network(rng, 20, 12, hidden=(16, 16))
    net = dqn.GridMLP(layers)
    x = rng.normal(size=(200, 20)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    grid = net.grid_layers()
    assert any(not np.array_equal(w, g) for (w, _), (g, _) in zip(layers, grid))
    np.testing.assert_allclose(got, mlp.forward_float(grid, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("markov", [False, True])
def test_int8_tuning_puts_the_float_policy_on_the_int8_grid(small_profile, markov):
    """After tuning, the blob's float reference is an on-grid network that quantisation
    keeps exactly, so the int8 policy (16-bit activations) decides like it."""
    tr = _trainer(small_profile, markov=markov, int8_tune=12, val_streams=4, val_length=5000)
    tr.run()
    layers, q, t = dqn.int8_policy(tr)
    assert q.act_bits == 16 and tr.cfg.activation_bits == 16
    for (w, b), lay, (wf, bf) in zip(layers, q.layers, q.float_layers):
        np.testing.assert_array_equal(lay.w_int8.astype(np.float32) * lay.w_scale[:, None], w)
        np.testing.assert_array_equal(mlp.weight_grid(w), w)
        np.testing.assert_array_equal(wf, w)
    assert t["iterations"] == 12 and len(t["curve"]) == 12 // tr.cfg.validate_every + 1
    # The kept network is the best validated one, the rounded untuned network included.
    assert t["val_best"] == max([t["val_rounded"]] + [c["dqn"] for c in t["curve"]])
    res_f = simulate.run_dqn(layers, tr.val, Bucket(1, 10, 40), H=tr.cfg.H, use_interarrival=markov)
    assert res_f.mean_reward == pytest.approx(t["val_best"], abs=1e-12)
    res_q = simulate.run_dqn(q, tr.val, Bucket(1, 10, 40), H=tr.cfg.H, use_interarrival=markov, trace=True)
    agree = dqn.int8_agreement(layers, tr.val, Bucket(1, 10, 40), res_q, H=tr.cfg.H, use_ia=markov)
    assert agree["n_ge_P"] >= 0.995, agree
    assert abs(res_q.avg_loss - res_f.avg_loss) <= 0.001


def test_without_tuning_the_best_network_is_quantised_as_it_is(small_profile):
    tr = _trainer(small_profile, int8_tune=0, act_bits=8)
    tr.run()
    layers, q, tuning = dqn.int8_policy(tr)
    assert tuning is None and q.act_bits == 8
    for (w, _), (w0, _) in zip(layers, tr.best_layers()):
        np.testing.assert_array_equal(w, w0)


def test_ema_judges_and_keeps_the_weight_average(small_profile, tmp_path):
    tr = _trainer(small_profile, ema=0.5)
    before = {k: v.clone() for k, v in tr.ema_state.items()}
    tr.iterate()
    tr.update_ema()
    for k, v in tr.net.state_dict().items():
        torch.testing.assert_close(tr.ema_state[k], 0.5 * before[k] + 0.5 * v)
    tr = _trainer(small_profile, tmp_path, ema=0.9, iterations=10)
    layers = tr.run()
    assert any(not torch.equal(tr.ema_state[k], v) for k, v in tr.net.state_dict().items())
    res = simulate.run_dqn(layers, tr.val, Bucket(1, 10, 40), H=tr.cfg.H, use_interarrival=False)
    assert res.mean_reward == pytest.approx(tr.best_val, abs=1e-12)
    # A resumed run goes on from the same average.
    tr2 = _trainer(small_profile, tmp_path, ema=0.9, iterations=20)
    tr2.restore(str(tmp_path / "run.ckpt"))
    for k, v in tr.ema_state.items():
        assert torch.equal(tr2.ema_state[k], v)


def test_activation_width_follows_the_widest_layer():
    assert dqn.DQNConfig(T=97, interarrival=True).activation_bits == 16
    assert dqn.DQNConfig(T=300, interarrival=True).activation_bits == 8   # 598 inputs
    with pytest.raises(ValueError, match="act_bits=16 allows at most 516 inputs"):
        dqn.DQNConfig(T=300, interarrival=True, act_bits=16).validate()
    assert dqn.DQNConfig(T=300, interarrival=True, act_bits=8).validate().activation_bits == 8


def test_checkpoint_resume_continues_where_it_stopped(small_profile, tmp_path):
    tr = _trainer(small_profile, tmp_path, iterations=10)
    tr.run()
    assert os.path.exists(tmp_path / "run.ckpt")
    tr2 = _trainer(small_profile, tmp_path, iterations=20)
    tr2.restore(str(tmp_path / "run.ckpt"))
    assert tr2.iteration == 10 and tr2.curve == tr.curve
    for (k, a), b in zip(tr.net.state_dict().items(), tr2.net.state_dict().values()):
        assert torch.equal(a, b), k
    tr2.run()
    assert tr2.iteration == 20 and len(tr2.curve) == 4


def test_checkpoint_for_another_bucket_or_layout_is_refused(small_profile, tmp_path):
    tr = _trainer(small_profile, tmp_path, iterations=5)
    tr.run()
    path = str(tmp_path / "run.ckpt")
    other = _trainer(small_profile, None, width=8)
    with pytest.raises(dqn.CheckpointError, match="network layout"):
        other.restore(path)
    sc = Scenario(0.25, 2, seed=0)
    cfg = dqn.DQNConfig(**TINY)
    d = dqn.prepare_data(small_profile)
    with pytest.raises(dqn.CheckpointError, match="bucket"):
        dqn.Trainer(d, sc, cfg, dqn.profile_fingerprint(small_profile)).restore(path)
    with pytest.raises(dqn.CheckpointError, match="profile"):
        _ = dqn.Trainer(d, tr.sc, tr.cfg, "another-profile").restore(path)


def test_ceiling_targets_hand_worked():
    # N, P, M = 1, 2, 3: Q(n,0) = g W[n] for n = 1..3, Q(n,1) = f + g W[n-2] for n = 2..3.
    W = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=torch.float64)
    got = dqn.ceiling_targets(W, torch.tensor([0.5]), Bucket(1, 2, 3), 0.5)
    np.testing.assert_allclose(got.numpy(), [[0.5, 1.0, 2.0, 0.5 + 0.0, 0.5 + 0.5]])


@pytest.mark.parametrize("markov", [False, True])
def test_ceiling_targets_follow_the_ceilings_own_decisions(small_profile, markov):
    """Each training tuple's target prefers offloading exactly where the ceiling offloads."""
    tr = _trainer(small_profile, markov=markov, targets="ceiling")
    N, P, M = tr.sc.bucket
    x, tq = tr.sample_targets(4000)
    assert x.shape == (4000, tr.din) and tq.shape == (4000, tr.sc.bucket.q_length)
    # The same positions again, from the same generator state.
    tr.rng = np.random.default_rng(tr.sc.seed_for("replay"))
    s, k = tr.replay.positions(tr.rng, 4000)
    np.testing.assert_array_equal(x.numpy(), tr.replay.tuples(s, k)[0])
    theta = tr.ceiling.theta[tr.ceil_g[s, k], tr.ceil_s[s, k]]          # (B, M+1)
    f = tr.ceil_f[s, k].astype(np.float64)
    q = tq.numpy().astype(np.float64)
    for n in range(P, M + 1):
        d = q[:, Bucket(N, P, M).q_index(n, 1)] - q[:, Bucket(N, P, M).q_index(n, 0)]
        np.testing.assert_allclose(d, f - theta[:, n], atol=2e-5)
    assert len(np.unique(tr.ceil_g)) > (1 if not markov else 0)
    if markov:
        assert set(np.unique(tr.ceil_s)) == {0, 1}


def test_training_on_ceiling_targets_reduces_the_loss_and_checkpoints(small_profile, tmp_path):
    tr = _trainer(small_profile, targets="ceiling")
    losses = [tr.iterate() for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    tr = _trainer(small_profile, tmp_path, targets="ceiling", iterations=10)
    layers = tr.run()
    res = simulate.run_dqn(layers, tr.val, Bucket(1, 10, 40), H=tr.cfg.H, use_interarrival=False)
    assert res.mean_reward == pytest.approx(tr.best_val, abs=1e-12)
    # Its checkpoint does not resume a Q-learning run, nor the other way round.
    with pytest.raises(dqn.CheckpointError, match="network layout"):
        _trainer(small_profile).restore(str(tmp_path / "run.ckpt"))


def test_expected_reward_validation_scores_offloads_by_their_metric(small_profile, tmp_path):
    true_tr = _trainer(small_profile)
    exp_tr = _trainer(small_profile, tmp_path, val_reward="expected", iterations=5)
    # Same seed: the same network and validation images; only the rewards differ.
    st = true_tr.val
    assert np.array_equal(exp_tr.val.metric, st.metric)
    assert not np.array_equal(st.reward, st.raw_metric)
    res = simulate.run_dqn(true_tr.forward_fn(), st, Bucket(1, 10, 40), H=true_tr.cfg.H, use_interarrival=False, trace=True)
    want = float((st.raw_metric * res.decisions).sum()) / st.reward.size
    assert exp_tr.validate() == pytest.approx(want, rel=1e-6)
    assert true_tr.validate() == pytest.approx(res.mean_reward, rel=1e-12)
    # MDP and Baseline are scored alike, so the progress bar compares like with like.
    mdp = simulate.run_thresholds(true_tr.theta_mdp, st, Bucket(1, 10, 40), trace=True)
    assert exp_tr.val_mdp == pytest.approx(
        float((st.raw_metric * mdp.decisions).sum()) / st.reward.size, rel=1e-6)
    # A run validated one way does not resume the other (best rewards would not compare).
    exp_tr.run()
    with pytest.raises(dqn.CheckpointError, match="network layout"):
        _trainer(small_profile).restore(str(tmp_path / "run.ckpt"))
    with pytest.raises(ValueError, match="val_reward"):
        dqn.DQNConfig(val_reward="noisy").validate()


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04broken zip"])
def test_corrupt_checkpoint_is_refused(small_profile, tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    tr = _trainer(small_profile)
    with pytest.raises(dqn.CheckpointError, match="not a readable DQN checkpoint"):
        tr.restore(str(path))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="discount"):
        dqn.DQNConfig(discount=1.0).validate()
    with pytest.raises(ValueError, match="targets"):
        dqn.DQNConfig(targets="oracle").validate()
    with pytest.raises(ValueError, match="unknown preset"):
        dqn.preset("slow")
    assert dqn.preset("paper").steps * dqn.preset("paper").batch * 4000 == 65_536_000


# --------------------------------------------------------------------------- command line


# Subprocesses start outside the repository: ``python -m`` puts the working
# directory first on sys.path, where the source tree would shadow the install.
def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "training.cli", "dqn", *args],
                          capture_output=True, text=True, timeout=240, cwd=tempfile.gettempdir(),
                          **kw)


@pytest.fixture(scope="module")
def profile_file(small_profile, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "p.npz"
    small_profile.save(str(path))
    return str(path)


def test_cli_end_to_end_blob_runs_in_offload_sim(profile_file, tmp_path):
    out = tmp_path / "fig7.bin"
    r = _cli(["--profile", profile_file, "--rate", "0.1", "--depth", "4", "--choice",
              "location-reset", "--sp", "0.1", "--rprob", "0.01", "--arrivals", "periodic",
              "--preset", "quick", "--out", str(out), *TINY_FLAGS])
    assert r.returncode == 0, r.stderr
    pol = blob.read_blob(str(out))
    assert pol.kind == "dqn" and (pol.N, pol.P, pol.M) == (1, 10, 40) and pol.T == 9
    assert not pol.interarrival and pol.meta["device_ready"]
    rep = json.loads((tmp_path / "fig7.json").read_text())
    names = [row["policy"] for row in rep["test"]]
    assert names == ["dqn-float", "dqn-int8", "mdp", "baseline", "lower-bound", "oracle",
                     "oracle-metric", "belief", "ceiling"]
    shares = {row["policy"]: row["share_of_ceiling_gain"] for row in rep["test"]}
    assert shares["ceiling"] == 1.0 and shares["baseline"] == 0.0
    # The belief policy: every row's share of its gain beside the ceiling's; the
    # per-stream rewards give paired standard errors.
    belief = {row["policy"]: row["share_of_belief_gain"] for row in rep["test"]}
    assert belief["belief"] == 1.0 and belief["baseline"] == 0.0
    for row in rep["test"]:
        assert len(row["stream_reward"]) == 2
        assert np.mean(row["stream_reward"]) == pytest.approx(row["mean_reward"])
    assert rep["belief"]["bins"] == rep["ceiling"]["bins"] and rep["belief"]["arrival_states"] == 1
    assert "belief" not in rep["int8"] and "ceiling" not in rep["int8"]
    header = next(ln for ln in r.stdout.splitlines() if "policy" in ln)
    assert "share_of_belief_gain" in header and "share_of_ceiling_gain" in header
    assert any(ln.split()[:1] == ["belief"] for ln in r.stdout.splitlines())
    assert rep["training"]["curve"] and rep["int8"]["int8_agreement"]["decisions"] == 2000
    # Options not given keep the preset's values (a CLI default must not override them).
    given = {"iterations", "steps", "batch", "validate_every", "train_streams", "train_length",
             "val_streams", "val_length", "test_streams", "test_length"}
    for key, value in dqn.PRESETS["quick"].items():
        if key not in given:
            assert rep["config"][key] == value, key
    assert (tmp_path / "fig7.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sim = subprocess.run([sys.executable, "-m", "offload.cli", "--profile", profile_file,
                          "--policy", "baseline", "--policy", str(out), "--length", "500",
                          "--streams", "2"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    assert str(out) in sim.stdout


def test_cli_markov_from_dqn_layout_profile_without_validation_split(tmp_path):
    # A profile in the DQN paper's layout (training and test only), saved and read back.
    rng = np.random.default_rng(5)
    n_tr, n_ts = 3000, 1500
    metric = rng.beta(1, 6, size=n_tr + n_ts).astype(np.float32)
    weak = (rng.random(n_tr + n_ts) < 0.2 + metric).astype(np.float32)
    strong = (rng.random(n_tr + n_ts) < 0.1).astype(np.float32)
    xb = np.linspace(0, 2, 50, dtype=np.float32)
    src = tmp_path / "dqn_layout.npz"
    np.savez(src, metric_tr=metric[:n_tr], metric_ts=metric[n_tr:], wcost_tr=weak[:n_tr],
             wcost_ts=weak[n_tr:], scost_tr=strong[:n_tr], scost_ts=strong[n_tr:],
             mtog=np.stack([xb, np.linspace(0, 0.5, 50)]).astype(np.float32))
    from offload.profile import from_dqn_file

    prof = from_dqn_file(str(src))
    path = tmp_path / "P.npz"
    prof.save(str(path))
    assert len(Profile.load(str(path)).indices(VALIDATION)) == 0
    out = tmp_path / "fig10.bin"
    r = _cli(["--profile", str(path), "--rate", "0.1", "--depth", "4", "--choice", "iid",
              "--arrivals", "markov", "--markov", "1", "3", "0.001", "0.0005", "--preset",
              "quick", "--out", str(out), *TINY_FLAGS])
    assert r.returncode == 0, r.stderr
    pol = blob.read_blob(str(out))
    assert pol.interarrival and pol.kind == "dqn"
    rep = json.loads((tmp_path / "fig10.json").read_text())
    assert "held out" in rep["profile"]["validation_from"]


def test_cli_interrupt_keeps_best_policy_and_resume_finishes(profile_file, tmp_path):
    out = tmp_path / "p.bin"
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--iterations") + 1] = "100000"
    args = ["--profile", profile_file, "--out", str(out), *flags]
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "dqn", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    ckpt = tmp_path / "p.ckpt"
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    first = blob.read_blob(str(out))
    rep = json.loads((tmp_path / "p.json").read_text())
    done = rep["training"]["iterations"]
    assert rep["test"] is None and rep["training"]["stopped_by"] == "stopped by SIGINT"
    assert first.kind == "dqn"
    # Rerun without --resume: refused, nothing overwritten.
    r = _cli(args)
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    flags[flags.index("--iterations") + 1] = str(done + 10)
    r = _cli(["--profile", profile_file, "--out", str(out), *flags, "--resume"])
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["training"]["iterations"] == done + 10 and rep["test"]
    assert blob.read_blob(str(out)).kind == "dqn"


def test_cli_refuses_corrupt_and_mismatched_checkpoints(profile_file, tmp_path):
    out = tmp_path / "p.bin"
    (tmp_path / "p.ckpt").write_bytes(b"\x00" * 64)
    r = _cli(["--profile", profile_file, "--out", str(out), "--resume", *TINY_FLAGS])
    assert r.returncode == 1 and "not a readable DQN checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    os.unlink(tmp_path / "p.ckpt")
    flags = list(TINY_FLAGS)
    flags[flags.index("--iterations") + 1] = "5"
    assert _cli(["--profile", profile_file, "--out", str(out), *flags]).returncode == 0
    r = _cli(["--profile", profile_file, "--out", str(out), "--depth", "2", "--resume", *flags])
    assert r.returncode == 1 and "bucket" in r.stderr and "Traceback" not in r.stderr


def test_cli_synthetic_profile_when_asked(tmp_path):
    out = tmp_path / "s.bin"
    r = _cli(["--synthetic", "3000", "--out", str(out), *TINY_FLAGS])
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["profile"]["source"].startswith("synthetic(n=3000")
    assert blob.read_blob(str(out)).meta["profile"] == "synthetic(3000)"


def test_cli_bad_arguments_get_one_clear_message(profile_file, tmp_path):
    r = _cli(["--profile", profile_file, "--out", str(tmp_path / "x.bin"), "--lr", "-1",
              *TINY_FLAGS])
    assert r.returncode != 0 and "'--lr': -1" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["--profile", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x.bin")])
    assert r.returncode != 0 and "Traceback" not in r.stderr
