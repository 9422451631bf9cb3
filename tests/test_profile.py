"""Tests for offload.profile: schema, save/load, metric fit, importers."""

import os

import numpy as np
import pytest

from offload import metric as M
from offload import profile as P
from offload.profile import TEST, TRAIN, VALIDATION, Profile


def _softmax(a):
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ranks(logits, labels):
    true = logits[np.arange(len(labels)), labels]
    return 1 + (logits > true[:, None]).sum(axis=1)


def _synthetic(n=3000, c=10, t0=0.7, seed=0):
    """Weak logits, labels drawn from softmax(t0 * logits), ranks, strong ranks."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, c)).astype(np.float32)
    p = _softmax(t0 * z.astype(np.float64))
    y = np.minimum((p.cumsum(1) < rng.random((n, 1))).sum(1), c - 1)
    wrank = _ranks(z, y)
    srank = np.where(rng.random(n) < 0.8, 1, rng.integers(1, c + 1, n))
    split = rng.choice([TRAIN, VALIDATION, TEST], size=n, p=[0.6, 0.2, 0.2])
    return z, y, wrank, srank, split


def _full_profile():
    z, y, wrank, srank, split = _synthetic(n=400)
    prof = Profile.from_ranks(wrank, srank, split, k=1, weak_logits=z, labels=y, source="unit test é")
    return prof.fit_metric()


def _assert_same(a, b):
    for f in ("weak_loss", "strong_loss", "split", "k", "weak_rank", "strong_rank",
              "weak_logits", "labels", "entropy", "metric", "tinv", "lut_x", "lut_y",
              "metric_mean", "metric_std", "source"):
        va, vb = getattr(a, f), getattr(b, f)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype, f
            np.testing.assert_array_equal(va, vb, err_msg=f)
        else:
            assert va == vb, f


# ------------------------------------------------------------------ schema


def test_from_ranks_dtypes_and_reward():
    prof = Profile.from_ranks([1, 3, 7, 2], [1, 1, 9, 6], [0, 1, 2, 0], k=2)
    assert prof.n == 4
    assert prof.weak_loss.dtype == np.float32 and prof.split.dtype == np.int8
    assert prof.weak_rank.dtype == np.int16
    np.testing.assert_array_equal(prof.weak_loss, [0, 1, 1, 0])
    np.testing.assert_array_equal(prof.strong_loss, [0, 0, 1, 1])
    np.testing.assert_array_equal(prof.reward, [0, 1, 0, -1])
    np.testing.assert_array_equal(prof.indices(TRAIN), [0, 3])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weak_loss=[0, 1], strong_loss=[0], split=[0, 0]), "strong_loss"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 3]), "split"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0], k=0), "k"),
        (dict(weak_loss=[0, np.nan], strong_loss=[0, 1], split=[0, 0]), "weak_loss"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0], weak_rank=[1, 2]), "strong_rank"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0],
              weak_rank=[1, 1], strong_rank=[1, 2]), "weak_rank"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0],
              weak_rank=[0, 2], strong_rank=[1, 2]), "weak_rank"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0],
              weak_logits=np.zeros((2, 3)), labels=[0, 3]), "labels"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0], lut_x=[0, 1]), "lut"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0], metric_mean=0.0, metric_std=0.0),
         "metric_std"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0], tinv=-1.0), "tinv"),
        (dict(weak_loss=[0, 1], strong_loss=[0, 1], split=[0, 0], source=3), "source"),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Profile(**kwargs)


def test_take_and_standardized_metric():
    prof = _full_profile()
    with pytest.raises(ValueError):
        Profile.from_ranks([1, 2], [1, 1], [0, 0]).standardized_metric()
    s = prof.standardized_metric()
    train = prof.split == TRAIN
    assert s[train].mean() == pytest.approx(0, abs=1e-6)
    assert s[train].std() == pytest.approx(1, abs=1e-6)
    sub = prof.take(prof.indices(TEST))
    assert sub.n == np.count_nonzero(prof.split == TEST)
    assert np.all(sub.split == TEST)
    np.testing.assert_array_equal(sub.lut_x, prof.lut_x)
    mm = prof.metric_map()
    np.testing.assert_allclose(mm(prof.weak_logits), s, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ fit_metric


def test_fit_metric_fills_everything():
    z, y, wrank, srank, split = _synthetic(n=3000, t0=0.7)
    prof = Profile.from_ranks(wrank, srank, split, k=1, weak_logits=z, labels=y)
    prof.fit_metric()
    train = split == TRAIN
    assert prof.tinv == pytest.approx(M.calibrate(z[train], y[train]))
    assert abs(prof.tinv - 0.7) < 0.15
    assert prof.entropy.dtype == np.float32 and prof.entropy.shape == (3000,)
    np.testing.assert_allclose(prof.entropy, M.entropy(z, prof.tinv), rtol=1e-6)
    assert prof.lut_x.shape == prof.lut_y.shape == (1000,)
    assert prof.lut_x[0] == pytest.approx(prof.entropy[train].min())
    assert prof.lut_x[-1] == pytest.approx(prof.entropy[train].max())
    np.testing.assert_allclose(prof.metric, M.apply_metric_map(prof.entropy, prof.lut_x, prof.lut_y), rtol=1e-6)
    assert prof.metric_mean == pytest.approx(prof.metric[train].mean(dtype=np.float64))
    assert prof.metric_std == pytest.approx(prof.metric[train].std(dtype=np.float64))


def test_fit_metric_ignores_non_training_rewards():
    z, y, wrank, srank, split = _synthetic(n=1500, seed=2)
    a = Profile.from_ranks(wrank, srank, split, weak_logits=z, labels=y).fit_metric()
    other = split != TRAIN
    srank2 = srank.copy()
    srank2[other] = 1 + (srank2[other] % 10)
    b = Profile.from_ranks(wrank, srank2, split, weak_logits=z, labels=y).fit_metric()
    np.testing.assert_array_equal(a.lut_y, b.lut_y)
    assert a.tinv == b.tinv


def test_fit_metric_from_metric_only_and_errors():
    prof = Profile(weak_loss=[0, 1, 1, 0], strong_loss=[0, 0, 1, 0], split=[0, 0, 0, 2],
                   metric=[0.1, 0.5, 0.3, 0.9])
    prof.fit_metric()
    assert prof.metric_mean == pytest.approx(0.3)
    assert prof.lut_x is None
    with pytest.raises(ValueError, match="no weak_logits"):
        Profile(weak_loss=[0, 1], strong_loss=[0, 0], split=[0, 0]).fit_metric()
    with pytest.raises(ValueError, match="training"):
        Profile(weak_loss=[0, 1], strong_loss=[0, 0], split=[0, 2], metric=[1, 2]).fit_metric()


# ------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    prof = _full_profile()
    path = tmp_path / "p.npz"
    prof.save(path)
    back = Profile.load(path)
    _assert_same(prof, back)
    assert os.listdir(tmp_path) == ["p.npz"]  # no temporary left behind
    with np.load(path) as z:
        assert z["weak_rank"].dtype == np.int16 and z["split"].dtype == np.int8
        assert z["labels"].dtype == np.int64 and z["lut_y"].dtype == np.float32
        assert int(z["version"]) == P.SCHEMA_VERSION


def test_round_trip_minimal_and_compressed(tmp_path):
    prof = Profile(weak_loss=[0, 1, 1], strong_loss=[0, 0, 1], split=[0, 1, 2], k=5)
    path = str(tmp_path / "min.npz")
    prof.save(path, compress=True)
    back = Profile.load(path)
    _assert_same(prof, back)
    assert back.weak_rank is None and back.metric is None and back.source == ""


def test_save_overwrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "p.npz"
    Profile(weak_loss=[0, 1], strong_loss=[0, 0], split=[0, 0], source="old").save(path)
    Profile(weak_loss=[1, 1], strong_loss=[0, 0], split=[0, 0], source="new").save(path)
    assert Profile.load(path).source == "new"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError):
        Profile(weak_loss=[0, 0], strong_loss=[0, 0], split=[0, 0], source="newer").save(path)
    assert Profile.load(path).source == "new"
    assert os.listdir(tmp_path) == ["p.npz"]


def _write(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _good_arrays():
    return dict(weak_loss=np.zeros(3, np.float32), strong_loss=np.zeros(3, np.float32),
                split=np.zeros(3, np.int8), k=np.int64(1))


@pytest.mark.parametrize("drop", ["weak_loss", "strong_loss", "split", "k"])
def test_load_missing_key(tmp_path, drop):
    arrays = _good_arrays()
    del arrays[drop]
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=rf"bad\.npz.*{drop}"):
        Profile.load(path)


@pytest.mark.parametrize(
    "key,value",
    [
        ("weak_loss", np.zeros((3, 2), np.float32)),
        ("split", np.array(["a", "b", "c"])),
        ("k", np.array([1, 2])),
        ("metric", np.zeros(4, np.float32)),
        ("source", np.array(3)),
        ("weak_rank", np.array([1.5, 1, 1])),
        ("tinv", np.array([1.0, 2.0])),
    ],
)
def test_load_bad_key(tmp_path, key, value):
    arrays = _good_arrays()
    arrays[key] = value
    if key == "weak_rank":
        arrays["strong_rank"] = np.ones(3, np.int16)
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=rf"bad\.npz.*{key}"):
        Profile.load(path)


def test_load_corrupted_files(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("hello, not a zip")
    with pytest.raises(ValueError, match="text.npz"):
        Profile.load(text)
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(ValueError, match="array.npz"):
        Profile.load(npy)
    good = tmp_path / "good.npz"
    _full_profile().save(good)
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="trunc.npz"):
        Profile.load(truncated)
    pickled = _write(tmp_path / "pickled.npz", **_good_arrays(), source=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz"):
        Profile.load(pickled)
    newer = _write(tmp_path / "newer.npz", **_good_arrays(), version=np.int64(99))
    with pytest.raises(ValueError, match="newer"):
        Profile.load(newer)
    with pytest.raises(FileNotFoundError):
        Profile.load(tmp_path / "absent.npz")


# ------------------------------------------------------------------ importers


def _mdp_file(path, zero_based):
    z, y, wrank, srank, _ = _synthetic(n=900, seed=5)
    folds = np.arange(900) % 3
    off = 1 if zero_based else 0
    _write(path, wlogit=z, gt=y, wrank=wrank - off, srank=srank - off, split=folds)
    return z, y, wrank, srank, folds


@pytest.mark.parametrize("zero_based", [False, True])
def test_from_mdp_file(tmp_path, zero_based):
    path = tmp_path / "ofa.npz"
    z, y, wrank, srank, folds = _mdp_file(path, zero_based)
    prof = P.from_mdp_file(path, k=5)
    np.testing.assert_array_equal(prof.weak_rank, wrank)
    np.testing.assert_array_equal(prof.strong_rank, srank)
    np.testing.assert_array_equal(prof.weak_loss, wrank > 5)
    np.testing.assert_array_equal(prof.split, folds)  # fold 0/1/2 -> train/val/test
    np.testing.assert_array_equal(prof.weak_logits, z)
    np.testing.assert_array_equal(prof.labels, y)
    assert prof.k == 5 and prof.source.startswith("mdp:ofa.npz")
    assert ("0-based" in prof.source) == zero_based
    prof.fit_metric()
    out = tmp_path / "profile.npz"
    prof.save(out)
    _assert_same(prof, Profile.load(out))


def test_from_mdp_file_cross_validation_fold(tmp_path):
    path = tmp_path / "ofa.npz"
    _, _, _, _, folds = _mdp_file(path, zero_based=False)
    prof = P.from_mdp_file(path, test_fold=1)
    np.testing.assert_array_equal(prof.split, np.where(folds == 1, TEST, TRAIN))
    with pytest.raises(ValueError):
        P.from_mdp_file(path, test_fold=3)


def test_from_mdp_file_errors(tmp_path):
    path = _write(tmp_path / "m.npz", wlogit=np.zeros((3, 2)), gt=np.zeros(3, int),
                  wrank=np.ones(3, int), split=np.zeros(3, int))
    with pytest.raises(ValueError, match="m.npz.*srank"):
        P.from_mdp_file(path)
    path = _write(tmp_path / "n.npz", wlogit=np.zeros((3, 2)), gt=np.zeros(3, int),
                  wrank=np.array([1, -1, 2]), srank=np.ones(3, int), split=np.zeros(3, int))
    with pytest.raises(ValueError, match="n.npz.*wrank"):
        P.from_mdp_file(path)


def _dqn_arrays(seed=6, n_tr=300, n_ts=100):
    rng = np.random.default_rng(seed)
    return dict(
        metric_tr=rng.normal(size=n_tr), metric_ts=rng.normal(size=n_ts),
        wcost_tr=(rng.random(n_tr) < 0.3).astype(float), wcost_ts=(rng.random(n_ts) < 0.3).astype(float),
        scost_tr=(rng.random(n_tr) < 0.1).astype(float), scost_ts=(rng.random(n_ts) < 0.1).astype(float),
    )


def test_from_dqn_file(tmp_path):
    arrays = _dqn_arrays()
    path = _write(tmp_path / "fm_fold0_cost1.npz", **arrays)
    prof = P.from_dqn_file(path)
    assert prof.n == 400 and prof.k == 5
    np.testing.assert_array_equal(prof.split, [TRAIN] * 300 + [TEST] * 100)
    np.testing.assert_allclose(prof.metric, np.concatenate([arrays["metric_tr"], arrays["metric_ts"]]), rtol=1e-6)
    reward = np.concatenate([arrays["wcost_tr"] - arrays["scost_tr"], arrays["wcost_ts"] - arrays["scost_ts"]])
    np.testing.assert_array_equal(prof.reward, reward)
    assert prof.metric_mean == pytest.approx(np.mean(arrays["metric_tr"]), abs=1e-6)
    assert prof.metric_std == pytest.approx(np.std(arrays["metric_tr"]), rel=1e-5)
    assert prof.weak_rank is None and prof.lut_x is None
    out = tmp_path / "profile.npz"
    prof.save(out)
    _assert_same(prof, Profile.load(out))


def test_from_dqn_file_optional_table(tmp_path):
    xb = np.linspace(0, 3, 1000)
    path = _write(tmp_path / "d.npz", **_dqn_arrays(), tinv=np.float32(0.8), mtog=np.stack([xb, np.tanh(xb)]))
    prof = P.from_dqn_file(path, k=1)
    assert prof.tinv == pytest.approx(0.8) and prof.k == 1
    np.testing.assert_allclose(prof.lut_y, np.tanh(xb), rtol=1e-6)


def test_from_dqn_file_errors(tmp_path):
    arrays = _dqn_arrays()
    del arrays["scost_ts"]
    with pytest.raises(ValueError, match="d.npz.*scost_ts"):
        P.from_dqn_file(_write(tmp_path / "d.npz", **arrays))
    arrays = _dqn_arrays()
    arrays["wcost_tr"] = arrays["wcost_tr"][:-1]
    with pytest.raises(ValueError, match="e.npz.*wcost_tr"):
        P.from_dqn_file(_write(tmp_path / "e.npz", **arrays))
    arrays = _dqn_arrays()
    arrays["metric_ts"][0] = np.nan
    with pytest.raises(ValueError, match="f.npz.*metric"):
        P.from_dqn_file(_write(tmp_path / "f.npz", **arrays))


# ------------------------------------------------------------------ any layout


def test_read_profile_detects_each_layout(tmp_path):
    mdp = tmp_path / "ofa.npz"
    _mdp_file(mdp, zero_based=True)
    dqn = _write(tmp_path / "fm.npz", **_dqn_arrays())
    ours = tmp_path / "ours.npz"
    _full_profile().save(ours)
    assert [P.detect_layout(p) for p in (ours, mdp, dqn)] == ["offload", "mdp", "dqn"]

    a = P.read_profile(mdp)
    b = P.from_mdp_file(mdp).fit_metric()
    _assert_same(a, b)  # same import, metric fitted
    assert a.k == 1 and a.metric is not None
    assert P.read_profile(mdp, k=5).k == 5
    np.testing.assert_array_equal(P.read_profile(mdp, test_fold=0).split,
                                  P.from_mdp_file(mdp, test_fold=0).split)
    _assert_same(P.read_profile(dqn), P.from_dqn_file(dqn))
    assert P.read_profile(dqn).k == 5
    _assert_same(P.read_profile(ours), Profile.load(ours))


def test_read_profile_unknown_layout_lists_every_layout(tmp_path):
    path = _write(tmp_path / "other.npz", logits=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(ValueError) as info:
        P.read_profile(path)
    msg = str(info.value)
    assert "other.npz" in msg and "keys found: logits, y" in msg
    for keys in P.LAYOUTS.values():
        assert all(k in msg for k in keys)
    with pytest.raises(FileNotFoundError):
        P.read_profile(tmp_path / "missing.npz")


def test_read_profile_layout_with_bad_values_names_the_key(tmp_path):
    arrays = _dqn_arrays()
    arrays["wcost_tr"] = arrays["wcost_tr"][:-1]
    with pytest.raises(ValueError, match="wcost_tr"):
        P.read_profile(_write(tmp_path / "d.npz", **arrays))


def test_read_profile_partial_layout_names_the_missing_keys(tmp_path):
    arrays = _dqn_arrays()
    del arrays["scost_ts"], arrays["wcost_ts"]
    with pytest.raises(ValueError, match=r"missing key 'wcost_ts', 'scost_ts' of the DQN paper's"):
        P.read_profile(_write(tmp_path / "d.npz", **arrays))
