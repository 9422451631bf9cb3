"""Tests for offload.metric (SPEC section 3)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import metric as M


def _softmax(a):
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def _synthetic(n, c, t0, seed=0, scale=2.0):
    """Logits z ~ N(0, scale^2) and labels drawn from softmax(t0 * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=scale, size=(n, c))
    p = _softmax(t0 * z)
    y = (p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return z, np.minimum(y, c - 1)


def _xent(z, y, t):
    a = t * z
    lse = np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
    return np.mean(lse - a[np.arange(len(y)), y])


# ------------------------------------------------------------------ topk_loss


def test_topk_loss_values_and_dtype():
    loss = M.topk_loss([1, 2, 5, 6, 1000], k=5)
    assert loss.dtype == np.float32
    np.testing.assert_array_equal(loss, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(M.topk_loss(np.array([1, 2, 3])), [0, 1, 1])


@pytest.mark.parametrize("rank,k", [([0, 1], 1), ([1, 2], 0), ([1.5], 1)])
def test_topk_loss_rejects_bad_input(rank, k):
    with pytest.raises(ValueError):
        M.topk_loss(rank, k)


# ------------------------------------------------------------------ calibrate


@pytest.mark.parametrize("t0", [0.4, 0.8, 1.3])
def test_calibrate_recovers_known_temperature(t0):
    z, y = _synthetic(20000, 10, t0, seed=int(t0 * 10))
    t = M.calibrate(z, y)
    assert abs(t - t0) < 0.06


def test_calibrate_matches_fine_grid_minimum():
    z, y = _synthetic(1000, 7, 0.9, seed=3)
    t = M.calibrate(z, y)
    grid = np.linspace(0, 2, 1001)
    fine = grid[np.argmin([_xent(z, y, g) for g in grid])]
    assert abs(t - fine) <= 2e-3
    assert _xent(z, y, t) <= _xent(z, y, fine) + 1e-6


def test_calibrate_stays_in_range():
    z, y = _synthetic(5000, 10, 5.0, seed=1)
    assert M.calibrate(z, y) == pytest.approx(2.0)
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5000, 10))
    y = rng.integers(0, 10, 5000)  # labels unrelated to logits: t -> 0
    assert 0.0 <= M.calibrate(z, y) < 0.1


def test_calibrate_is_stable_for_huge_logits():
    z, y = _synthetic(2000, 10, 1.0, seed=4)
    t = M.calibrate(z * 1e4, y)
    assert np.isfinite(t) and 0 <= t <= 2


@pytest.mark.timeout(60)  # a bound on a hang, not a speed claim (machines are shared)
def test_calibrate_finishes_on_60k_by_10():
    z, y = _synthetic(60000, 10, 0.7, seed=5)
    t = M.calibrate(z, y)
    assert np.isfinite(t) and 0 <= t <= 2


def test_calibrate_rejects_bad_input():
    z = np.zeros((4, 3))
    with pytest.raises(ValueError, match="labels"):
        M.calibrate(z, [0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        M.calibrate(z, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        M.calibrate(np.full((2, 3), np.nan), [0, 1])
    with pytest.raises(ValueError, match="2-D"):
        M.calibrate(np.zeros(3), [0])


# ------------------------------------------------------------------ entropy


@pytest.mark.parametrize("c", [2, 10, 1000])
def test_entropy_of_uniform_is_log_c(c):
    assert M.entropy(np.full(c, 3.7)) == pytest.approx(np.log(c))
    assert M.entropy(np.random.default_rng(0).normal(size=c), tinv=0.0) == pytest.approx(np.log(c))


def test_entropy_matches_direct_formula_and_is_stable():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 12))
    p = _softmax(0.6 * z)
    np.testing.assert_allclose(M.entropy(z, 0.6), -(p * np.log(p)).sum(1), rtol=1e-12)
    huge = np.array([[1e5, 0.0, -1e5], [1e300, 1e300, -1e300]])
    h = M.entropy(huge)
    assert np.all(np.isfinite(h))
    np.testing.assert_allclose(h, [0.0, np.log(2)], atol=1e-12)


def test_entropy_keeps_leading_shape():
    z = np.zeros((2, 3, 5))
    assert M.entropy(z).shape == (2, 3)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-50, 50), min_size=1, max_size=20),
    st.floats(0, 2),
)
def test_entropy_bounds(z, tinv):
    h = M.entropy(np.array(z), tinv)
    assert -1e-12 <= h <= np.log(len(z)) + 1e-9


def test_entropy_rejects_bad_input():
    with pytest.raises(ValueError):
        M.entropy([1.0, np.nan])
    with pytest.raises(ValueError):
        M.entropy([1.0, 2.0], tinv=-1)


# ------------------------------------------------------------------ dequantize


def test_dequantize_int8_and_uint8():
    q = np.array([-128, -3, 0, 127], dtype=np.int8)
    np.testing.assert_allclose(M.dequantize(q, 0.5, -3), [-62.5, 0.0, 1.5, 65.0])
    u = np.array([0, 128, 255], dtype=np.uint8)
    out = M.dequantize(u, 0.25, 128)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-32.0, 0.0, 31.75])


def test_entropy_from_quantised_outputs():
    rng = np.random.default_rng(3)
    real = rng.normal(scale=3, size=(20, 10))
    scale, zp = 0.1, 5
    q = np.clip(np.round(real / scale) + zp, -128, 127).astype(np.int8)
    approx = M.entropy(M.dequantize(q, scale, zp), 0.8)
    np.testing.assert_allclose(approx, M.entropy(real, 0.8), atol=0.05)


@pytest.mark.parametrize(
    "q,scale,zp",
    [
        (np.array([1, 2], dtype=np.int32), 0.1, 0),
        (np.array([1, 2], dtype=np.int8), 0.0, 0),
        (np.array([1, 2], dtype=np.int8), 0.1, 200),
        (np.array([1, 2], dtype=np.uint8), 0.1, -1),
    ],
)
def test_dequantize_rejects_bad_input(q, scale, zp):
    with pytest.raises(ValueError):
        M.dequantize(q, scale, zp)


# ------------------------------------------------------------------ metric map


def _reference_fit(h, r):
    """Brute-force SPEC section 3 fit with full kernel matrices."""
    xb = np.linspace(h.min(), h.max(), 1000)

    def nw(hh, rr, bw):
        w = np.exp(-((xb[:, None] - hh[None, :]) / bw) ** 2)
        return (w @ rr) / w.sum(1)

    errs = []
    bws = [2.0**e * (h.max() - h.min()) for e in np.arange(-8, -3.9, 0.5)]
    for bw in bws:
        pred = np.interp(h[1::2], xb, nw(h[0::2], r[0::2], bw))
        errs.append(np.mean((pred - r[1::2]) ** 2))
    return xb, nw(h, r, bws[int(np.argmin(errs))])


def test_bandwidth_candidates():
    bws = M.bandwidth_candidates(1.0, 3.0)
    assert len(bws) == 9
    np.testing.assert_allclose(bws, 2.0 * 2.0 ** np.arange(-8, -3.9, 0.5))


def test_fit_matches_brute_force():
    rng = np.random.default_rng(7)
    h = rng.uniform(0, 2, 1500)
    r = (rng.random(1500) < h / 2).astype(float) - (rng.random(1500) < 0.1)
    xb, yb = M.fit_metric_map(h, r)
    xr, yr = _reference_fit(h, r)
    np.testing.assert_allclose(xb, xr)
    np.testing.assert_allclose(yb, yr, atol=1e-12)


def test_fit_recovers_smooth_function():
    rng = np.random.default_rng(8)
    h = rng.uniform(0, 3, 20000)
    r = np.sin(2 * h) + rng.normal(scale=0.3, size=h.size)
    xb, yb = M.fit_metric_map(h, r)
    assert xb.shape == yb.shape == (1000,)
    assert xb[0] == h.min() and xb[-1] == h.max()
    inner = (xb > 0.1) & (xb < 2.9)
    assert np.max(np.abs(yb[inner] - np.sin(2 * xb[inner]))) < 0.08


def test_fit_handles_gaps_between_samples():
    h = np.concatenate([np.linspace(0, 0.1, 500), [10.0, 10.0]])
    r = np.concatenate([np.zeros(500), [1.0, 1.0]])
    xb, yb = M.fit_metric_map(h, r)
    assert np.all(np.isfinite(yb))
    assert yb[-1] == pytest.approx(1.0)
    assert yb[0] == pytest.approx(0.0)


@pytest.mark.timeout(120)  # a bound on a hang, not a speed claim (machines are shared)
def test_fit_finishes_on_60k():
    rng = np.random.default_rng(9)
    h = rng.gamma(2.0, 0.5, 60000)
    r = (rng.random(h.size) < np.tanh(h)).astype(float) - (rng.random(h.size) < 0.1)
    xb, yb = M.fit_metric_map(h, r)
    assert len(xb) == len(yb) == 1000 and np.all(np.isfinite(yb))


@pytest.mark.parametrize(
    "h,r,match",
    [
        ([], [], "empty"),
        ([1.0], [0.0], "at least 2"),
        ([1.0, 1.0, 1.0], [0.0, 1.0, 0.0], "equal"),
        ([1.0, np.nan, 2.0], [0.0, 1.0, 0.0], "entropy contains NaN"),
        ([1.0, 2.0, 3.0], [0.0, np.nan, 0.0], "reward contains NaN"),
        ([1.0, 2.0], [0.0], "length"),
    ],
)
def test_fit_rejects_degenerate_input(h, r, match):
    with pytest.raises(ValueError, match=match):
        M.fit_metric_map(np.array(h), np.array(r))


def test_apply_metric_map_interpolates_and_clamps():
    xb, yb = np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0])
    out = M.apply_metric_map([-5, 0.5, 1.5, 9, np.nan], xb, yb)
    np.testing.assert_allclose(out[:4], [0.0, 1.0, 1.5, 1.0])
    assert np.isnan(out[4])
    with pytest.raises(ValueError):
        M.apply_metric_map([1.0], [2.0, 1.0], [0.0, 0.0])


# ------------------------------------------------------------------ standardisation


def test_metric_stats_and_standardize():
    m = np.array([1.0, 2.0, 3.0, 4.0])
    mean, std = M.metric_stats(m)
    assert mean == 2.5 and std == pytest.approx(np.std(m))
    s = M.standardize(m, mean, std)
    assert s.mean() == pytest.approx(0) and s.std() == pytest.approx(1)
    assert M.metric_stats(np.full(5, 0.3)) == (pytest.approx(0.3), 1.0)
    with pytest.raises(ValueError):
        M.standardize(m, 0.0, 0.0)
    with pytest.raises(ValueError):
        M.metric_stats([])


def test_metric_map_bundle():
    z, y = _synthetic(4000, 10, 0.7, seed=11)
    rng = np.random.default_rng(12)
    h_true = M.entropy(z, 0.7)
    reward = (rng.random(len(y)) < h_true / np.log(10)).astype(float)
    mm = M.MetricMap.from_training(reward, logits=z, labels=y)
    assert abs(mm.tinv - 0.7) < 0.15
    h = M.entropy(z, mm.tinv)
    xb, yb = M.fit_metric_map(h, reward)
    np.testing.assert_allclose(mm.xbins, xb)
    np.testing.assert_allclose(mm.ybins, yb)
    raw = M.apply_metric_map(h, xb, yb)
    np.testing.assert_allclose(mm(z), (raw - raw.mean()) / raw.std(), rtol=1e-10)
    np.testing.assert_allclose(mm(z[0]), mm(z)[0])
    via_entropy = M.MetricMap.from_training(reward, entropy=h)
    assert via_entropy.tinv == 1.0
    np.testing.assert_allclose(via_entropy.from_entropy(h), mm(z))
    with pytest.raises(ValueError):
        M.MetricMap.from_training(reward)
