"""The DQN's convergence rule and time to quality (training.dqn.convergence) on synthetic curves."""

import numpy as np
import pytest

from training import dqn
from training.dqn.convergence import CONVERGED, best_gains, plateau_action, time_to_quality

BASE = 0.01   # Baseline's validation reward in every synthetic curve


def _curve(gains, lrs=None, every=25, per_validation=1.5):
    """Validation records with these gains over Baseline (``lrs``: per record, default 1e-3)."""
    lrs = lrs or [1e-3] * len(gains)
    return [{"iteration": every * (i + 1), "seconds": per_validation * (i + 1), "lr": lr,
             "loss": 0.0, "dqn": BASE + g, "mdp": BASE, "baseline": BASE}
            for i, (g, lr) in enumerate(zip(gains, lrs))]


def _first_action(gains, window, tol, decays, lrs=None):
    """The first validation (index) at which the rule answers, and its answer."""
    curve = _curve(gains, lrs)
    for i in range(len(curve)):
        act = plateau_action(curve[:i + 1], window, tol, decays)
        if act:
            return i, act
    return None, None


def _rise_then_flat(n_rise=30, n_flat=40, top=0.004):
    rise = [top * (1 - np.exp(-5 * (i + 1) / n_rise)) for i in range(n_rise)]
    return rise + [rise[-1]] * n_flat


def test_rising_then_flat_stops_at_the_right_validation():
    gains = _rise_then_flat()
    # Growth over the last 5 validations of the rise: top * (e^{-5 (k-5)/30} - e^{-5 k/30}),
    # which first falls below 1% of the best gain at some k <= 30; with the flat tail
    # the first plateau is the first index i with G[i] - G[i-5] < 0.01 G[i].
    G = best_gains(_curve(gains))
    want = next(i for i in range(5, len(G)) if G[i] - G[i - 5] < 0.01 * G[i])
    assert want < 30 + 5                                 # found on the rise or just after it
    assert _first_action(gains, window=5, tol=0.01, decays=0) == (want, "stop")
    # With one decay first: the plateau decays at the same validation.
    assert _first_action(gains, window=5, tol=0.01, decays=1) == (want, "decay")


def test_after_a_decay_the_window_counts_only_the_new_learning_rate():
    gains = _rise_then_flat(n_rise=20, n_flat=30)
    i0, act = _first_action(gains, window=4, tol=0.01, decays=1)
    assert act == "decay"
    # The trainer decays at record i0, so records after it carry the new rate.
    lrs = [1e-3] * (i0 + 1) + [3e-4] * (len(gains) - i0 - 1)
    curve = _curve(gains, lrs)
    # 3 records at the new rate: not yet a window; 4: flat since the best before the change.
    assert plateau_action(curve[:i0 + 4], 4, 0.01, 1) is None
    assert plateau_action(curve[:i0 + 5], 4, 0.01, 1) == "stop"
    # A new rate that still improves by more than the tolerance is not a plateau.
    better = gains[:i0 + 1] + [gains[i0] * (1 + 0.02 * k) for k in range(1, 5)]
    assert plateau_action(_curve(better, lrs[:i0 + 5]), 4, 0.01, 1) is None


def test_noisy_plateau_within_tolerance_stops():
    rng = np.random.default_rng(0)
    # A plateau at 0.004 with validation noise of 0.1% of it; tolerance 0.5% over 10.
    gains = list(0.004 * (1 + 0.001 * rng.standard_normal(40)))
    i, act = _first_action(gains, window=10, tol=0.005, decays=0)
    assert (i, act) == (10, "stop")       # the first validation with a full window


def test_still_rising_does_not_stop():
    # Growing by 0.3% of itself per validation: 3% per window of 10, above a 1% tolerance.
    gains = [0.002 * 1.003 ** i for i in range(200)]
    assert _first_action(gains, window=10, tol=0.01, decays=0) == (None, None)
    # Noisy, but its running best still climbs by more than the tolerance.
    rng = np.random.default_rng(1)
    noisy = [g * (1 + 0.002 * rng.standard_normal()) for g in gains]
    assert _first_action(noisy, window=10, tol=0.01, decays=0) == (None, None)


def test_too_few_points_or_no_gain_or_off_does_not_stop():
    flat = [0.004] * 10
    for n in range(11):                   # window 10 needs 11 records (10 growths)
        assert plateau_action(_curve(flat[:n]), 10, 0.01, 0) is None
    assert plateau_action(_curve([0.004] * 11), 10, 0.01, 0) == "stop"
    # A curve that never beat Baseline has no relative gain to converge.
    assert plateau_action(_curve([-0.001] * 30), 10, 0.01, 0) is None
    assert plateau_action(_curve([0.0] * 30), 10, 0.01, 0) is None
    # window 0: the rule is off.
    assert plateau_action(_curve(flat * 5), 0, 0.01, 0) is None


def test_time_to_quality_on_a_synthetic_curve():
    gains = [-0.002, 0.001, 0.003, 0.00395, 0.00397, 0.0039, 0.004, 0.0038]
    curve = _curve(gains, every=25, per_validation=2.0)
    ttq = time_to_quality(curve, 0.99)
    # 99% of the best gain 0.004 is 0.00396: first reached by the 5th record.
    assert ttq["final_gain"] == pytest.approx(0.004)
    assert (ttq["iteration"], ttq["seconds"]) == (125, 10.0)
    assert ttq["gain"] == pytest.approx(0.00397)
    assert time_to_quality(curve, 0.98)["iteration"] == 100     # 0.00395 >= 0.00392
    assert time_to_quality(curve, 1.0)["iteration"] == 175
    assert time_to_quality([], 0.99)["iteration"] is None
    never = time_to_quality(_curve([-0.001, -0.0005]), 0.99)
    assert never["iteration"] is None and never["final_gain"] == pytest.approx(-0.0005)


def test_the_convergence_stop_is_opt_in_and_one_option_away():
    # measured too early in one setting (docs/dqn.md), so neither preset turns it on
    q = dqn.preset("quick")
    assert q.converge_window == 0 and q.time_limit == 480
    rule = dqn.preset("quick", converge_window=20, time_limit=300.0)
    assert rule.converge_window == 20 and rule.patience == q.patience
    assert dqn.DQNConfig().converge_window == 0 and dqn.preset("paper").converge_window == 0
    with pytest.raises(ValueError, match="converge_tol"):
        dqn.DQNConfig(converge_tol=0.0).validate()
    with pytest.raises(ValueError, match="converge_window"):
        dqn.DQNConfig(converge_window=-1).validate()


# --------------------------------------------------------------------------- trainer


TINY = dict(T=9, layers=2, width=16, iterations=200, steps=4, batch=64, validate_every=5,
            train_streams=2, train_length=3000, val_streams=2, val_length=1000, test_streams=2,
            test_length=1000, calib_states=2000, int8_tune=5, threads=1, device="cpu")


def test_trainer_stops_when_validation_converged():
    pytest.importorskip("torch")
    from offload.scenario import Scenario
    from offload.synthetic import synthetic_profile

    prof = synthetic_profile(4000, seed=3)
    sc = Scenario(0.1, 4, "location-reset", 0.1, 0.01, "periodic", (1, 3, 0.01, 0.01), seed=0)
    cfg = dqn.DQNConfig(**TINY, converge_window=3, converge_tol=0.05, converge_decays=1)
    tr = dqn.Trainer(dqn.prepare_data(prof), sc, cfg, dqn.profile_fingerprint(prof))
    tr.run()
    assert tr.stopped_by == CONVERGED and tr.iteration < cfg.iterations
    # It stopped where the rule says so, and not one validation earlier.
    assert plateau_action(tr.curve, 3, 0.05, 1) == "stop"
    assert plateau_action(tr.curve[:-1], 3, 0.05, 1) != "stop"
    lrs = [c["lr"] for c in tr.curve]
    assert lrs[0] == cfg.lr and lrs[-1] == pytest.approx(cfg.lr * cfg.lr_decay)  # one decay
    ttq = time_to_quality(tr.curve)
    assert ttq["final_gain"] == pytest.approx(tr.best_val - tr.val_base)
    assert ttq["iteration"] <= tr.best_iteration
