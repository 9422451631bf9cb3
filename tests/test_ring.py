"""History ring: native window vs the numpy reference, padding and errors."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from offload.ring import HistoryRing, input_size, window_reference


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.booleans(), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_ring_matches_reference(H, use_ia, length, seed):
    rng = np.random.default_rng(seed)
    metrics = rng.normal(size=length).astype(np.float32)
    ia = rng.integers(1, 9, size=length).astype(np.float32)
    ring = HistoryRing(H, use_ia)
    out = np.empty(ring.input_size, np.float32)
    assert ring.input_size == input_size(H, use_ia)
    for k in range(length):
        # image k arrives i[k-1] slots after image k-1 (nothing before the first)
        ring.push(metrics[k], ia[k - 1] if k > 0 else 99.0)
        ring.write(out)
        np.testing.assert_array_equal(out, window_reference(metrics, ia, k, H, use_ia))
    assert ring.count == length


def test_ring_order_and_padding_by_hand():
    ring = HistoryRing(3, True)
    out = np.empty(6, np.float32)
    ring.push(1.0, 7.0)   # first image: its slots are recorded as 0
    ring.write(out)
    assert out.tolist() == [1, 0, 0, 0, 0, 0]
    ring.push(2.0, 4.0)
    ring.push(3.0, 5.0)
    ring.push(4.0, 6.0)
    ring.write(out)
    assert out.tolist() == [4, 3, 2, 6, 5, 4]
    ring.reset()
    ring.write(out)
    assert out.tolist() == [0] * 6 and ring.count == 0


def test_ring_without_interarrival_and_errors():
    ring = HistoryRing(2, False)
    ring.push(5.0, 3.0)
    out = np.empty(2, np.float32)
    ring.write(out)
    assert out.tolist() == [5, 0]
    with pytest.raises(ValueError, match="needs 2"):
        ring.write(np.empty(4, np.float32))
    with pytest.raises(ValueError, match="H=0"):
        HistoryRing(0)
