"""Oracle DP (offload.policies.oracle / oracle_metric, native oracle_dp) against brute force."""

import numpy as np
import pytest

from offload.bucket import Bucket
from offload.policies import oracle, oracle_metric
from offload_native import oracle_dp


def all_masks(L):
    """Every offload set of ``L`` images, one per row (2^L x L, bool)."""
    return ((np.arange(2 ** L)[:, None] >> np.arange(L)[None, :]) & 1).astype(bool)


def feasible(masks, ia, N, P, M):
    """Which rows of ``masks`` respect the bucket (starting full), SPEC section 1."""
    masks = np.atleast_2d(masks)
    n = np.full(masks.shape[0], M)
    ok = np.ones(masks.shape[0], dtype=bool)
    for k in range(masks.shape[1]):
        a = masks[:, k]
        ok &= ~(a & (n < P))
        n = np.minimum(M, n - P * a + N * ia[k])
    return ok


def brute(values, ia, N, P, M):
    """Best total value over all feasible offload sets, and the best set (first found)."""
    masks = all_masks(len(values))
    ok = feasible(masks, ia, N, P, M)
    totals = np.where(ok, masks.astype(float) @ values, -np.inf)
    i = int(np.argmax(totals))
    return totals[i], masks[i]


def reference_dp(values, ia, N, P, M):
    """Full-table backward DP in plain Python, strict preference for offloading."""
    L = len(values)
    W = [[0.0] * (M + 1) for _ in range(L + 1)]
    for k in range(L - 1, -1, -1):
        for n in range(N if k else M, M + 1):
            keep = W[k + 1][min(M, n + N * ia[k])]
            best = keep
            if n >= P:
                best = max(keep, values[k] + W[k + 1][min(M, n - P + N * ia[k])])
            W[k][n] = best
    mask = np.zeros(L, dtype=bool)
    n = M
    for k in range(L):
        if n >= P:
            keep = W[k + 1][min(M, n + N * ia[k])]
            mask[k] = values[k] + W[k + 1][min(M, n - P + N * ia[k])] > keep
        n = min(M, n - P * mask[k] + N * ia[k])
    return W[0][M], mask


def random_case(rng, L, max_ia=4):
    P = int(rng.integers(2, 7))
    N = int(rng.integers(1, P))
    M = int(rng.integers(P, 4 * P + 1))
    ia = rng.integers(1, max_ia + 1, L)
    return N, P, M, ia


@pytest.mark.parametrize("seed", range(6))
def test_oracle_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        L = int(rng.integers(1, 13))
        N, P, M, ia = random_case(rng, L)
        if rng.random() < 0.3:
            ia = np.ones(L, dtype=np.int64)
        r = (rng.integers(-1, 2, L) if seed % 2 else rng.normal(size=L)).astype(float)
        best, _ = brute(r, ia, N, P, M)
        total, mask = oracle(r, ia, Bucket(N, P, M))
        assert mask.dtype == bool and mask.shape == (L,)
        assert total == pytest.approx(best, abs=1e-9)
        assert feasible(mask, ia, N, P, M)[0]
        assert r[mask].sum() == pytest.approx(total, abs=1e-9)
        assert not np.any(mask & (r <= 0))  # never spends a token for nothing


@pytest.mark.parametrize("seed", range(4))
def test_oracle_metric_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(25):
        L = int(rng.integers(1, 13))
        N, P, M, ia = random_case(rng, L)
        m = rng.normal(size=L)
        r = rng.integers(-1, 2, L).astype(float)
        best_m, best_set = brute(m, ia, N, P, M)
        total, mask = oracle_metric(m, r, ia, Bucket(N, P, M))
        assert feasible(mask, ia, N, P, M)[0]
        assert m[mask].sum() == pytest.approx(best_m, abs=1e-9)
        np.testing.assert_array_equal(mask, best_set)  # continuous metrics: unique optimum
        assert total == r[mask].sum()
        assert total <= oracle(r, ia, Bucket(N, P, M))[0] + 1e-12


@pytest.mark.parametrize("block", [1, 2, 7, 64, None])
def test_native_blocks_match_full_table(block):
    rng = np.random.default_rng(7)
    for trial in range(6):
        L = 300
        N, P, M, ia = random_case(rng, L, max_ia=3 if trial % 2 else 40)
        v = rng.integers(-1, 2, L).astype(float) if trial < 3 else rng.normal(size=L)
        ref_total, ref_mask = reference_dp(v, ia, N, P, M)
        total, mask = oracle_dp(v, ia, N, P, M, block=block)
        assert total == ref_total
        np.testing.assert_array_equal(mask.astype(bool), ref_mask)


def test_known_small_sequence():
    # N=1, P=2, M=2: after an offload the bucket holds 1 (< P) for one image.
    total, mask = oracle([1.0, 2.0, 3.0], [1, 1, 1], Bucket(1, 2, 2))
    assert total == 4.0
    assert mask.tolist() == [True, False, True]
    # A long gap refills the bucket: both sends are possible.
    total, mask = oracle([0.5, 1.0, 3.0], [1, 2, 1], Bucket(1, 2, 2))
    assert total == 4.0 and mask.tolist() == [False, True, True]


def test_empty_and_all_negative():
    total, mask = oracle([], [], Bucket(1, 10, 40))
    assert total == 0.0 and mask.shape == (0,)
    total, mask = oracle([-1.0, 0.0, -0.5], [1, 5, 1], Bucket(1, 10, 40))
    assert total == 0.0 and not mask.any()


def test_huge_interarrival_is_capped():
    v = np.ones(5)
    ia = np.array([10 ** 15, 1, 10 ** 12, 1, 1])
    total, mask = oracle(v, ia, Bucket(1, 2, 2))
    assert total == 3.0 and feasible(mask, ia, 1, 2, 2)[0]


@pytest.mark.parametrize("args, match", [
    (([1.0, 2.0], [1], 1, 2, 2), "mismatched"),
    (([1.0, 2.0], [1, 0], 1, 2, 2), ">= 1 slot"),
    (([1.0, np.nan], [1, 1], 1, 2, 2), "NaN"),
    (([1.0], [1], 2, 2, 4), "0 < N < P <= M"),
    (([1.0], [1], 0, 2, 4), "0 < N < P <= M"),
    (([1.0], [1], 1, 4, 3), "0 < N < P <= M"),
    (([1.0], [1.5], 1, 2, 4), "whole numbers"),
    (([[1.0]], [1], 1, 2, 4), "1-D"),
])
def test_oracle_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        oracle(args[0], args[1], Bucket(*args[2:]))


def test_oracle_metric_bad_inputs():
    with pytest.raises(ValueError, match="mismatched"):
        oracle_metric([1.0, 2.0], [1.0], [1, 1], Bucket(1, 2, 2))
    with pytest.raises(ValueError, match="0 < N < P <= M"):
        oracle_metric([1.0], [1.0], [1], Bucket(3, 2, 2))
    with pytest.raises(ValueError, match="same length"):
        oracle_dp(np.ones(3), np.ones(2, dtype=np.int64), 1, 2, 2)
    with pytest.raises(ValueError, match="block"):
        oracle_dp(np.ones(3), np.ones(3, dtype=np.int64), 1, 2, 2, block=0)
