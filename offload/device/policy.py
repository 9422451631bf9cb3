"""Metric and decision for one frame: weak logits -> standardised metric -> offload or not.

``FrameMetric`` is the blob's metric pipeline for one frame (SPEC 3): entropy
of ``softmax(tinv * logits)`` in nats, raw metric ``f(h)`` by linear
interpolation in the blob's table, standardised with the blob's mean and std.

``Policy`` runs the blob's decision with the bucket, one frame at a time:

* DQN blobs: the native fused ``Decider`` (history ring, int8 network, rule,
  bucket). ``step(metric, slots)``: ``slots`` is the number of time slots
  since the previous decided frame (``i[k-1]``; ignored for the first). The
  Decider refills ``N * slots`` (clamped to ``M``) at that moment, decides at
  count ``n`` and spends ``P`` at once when offloading.
* Threshold blobs (MDP, Baseline): offload iff ``n >= P`` and
  ``metric >= theta[n - P]``, with the native ``TokenBucket``. Its ``step``
  applies SPEC 1's whole update ``n <- min(M, n - P*a + N*I)`` once ``I`` is
  known, i.e. when the next frame arrives; the count seen at every decision,
  and the ``tokens_after = n - P*a`` logged, are the same as the Decider's.

Both give exactly the decisions of ``offload.decider.decide_sequence_reference``
(resp. the threshold rule with ``offload.bucket.step_reference``) on the same
metrics and inter-arrival times, which the tests check.
"""

from __future__ import annotations

import math

import numpy as np

from offload.bucket import TokenBucket
from offload.decider import from_policy

__all__ = ["FrameMetric", "Policy"]


class FrameMetric:
    """Entropy -> metric -> standardised metric of one frame, from a policy blob."""

    def __init__(self, blob):
        self.tinv = float(blob.tinv)
        self.lut_x = np.asarray(blob.lut_x, np.float64)
        self.lut_y = np.asarray(blob.lut_y, np.float64)
        self.mean, self.std = float(blob.metric_mean), float(blob.metric_std)

    def probabilities(self, logits):
        """Calibrated class probabilities ``softmax(tinv * logits)`` (float64)."""
        z = np.asarray(logits, np.float64)
        a = self.tinv * (z - z.max())
        e = np.exp(a)
        return e / e.sum()

    def __call__(self, logits):
        """``(probabilities, entropy in nats, raw metric, standardised metric)``.

        Same arithmetic as ``offload.metric.entropy`` / ``apply_metric_map`` /
        ``standardize`` (the tests compare them), specialised to one vector.
        """
        z = np.asarray(logits, np.float64)
        a = self.tinv * (z - z.max())
        e = np.exp(a)
        s = e.sum()
        h = max(math.log(s) - float(e @ a) / s, 0.0)
        raw = float(np.interp(h, self.lut_x, self.lut_y))
        return e / s, h, raw, (raw - self.mean) / self.std


class Policy:
    """A blob's per-frame decision with its token bucket (scaled tokens).

    ``decide(metric, slots) -> (offload, n_before, n_after)``: ``n_before`` is
    the count the decision saw (after the refill for ``slots``), ``n_after``
    the count once the decision's token is spent.
    """

    def __init__(self, blob):
        self.kind = blob.kind
        self.N, self.P, self.M = blob.N, blob.P, blob.M
        self._first = True
        if blob.kind == "dqn":
            self._decider = from_policy(blob)
            self._step = self._step_dqn
        else:
            self._theta = [float(t) for t in blob.theta]
            self._bucket = TokenBucket(blob.N, blob.P, blob.M)
            self._last = False
            self._step = self._step_thresholds

    def _step_dqn(self, metric, slots):
        a = self._decider.step(metric, slots)
        return a, self._decider.last_n, self._decider.bucket.tokens

    def _step_thresholds(self, metric, slots):
        b = self._bucket
        if not self._first:
            b.step(self._last, slots)  # the previous decision's update, now that I is known
        n = b.tokens
        a = n >= self.P and metric >= self._theta[n - self.P]
        self._last = a
        return a, n, n - self.P * a

    def decide(self, metric, slots):
        """Decide on one frame; ``slots`` (>= 1) since the previous decided frame, 0 for the first."""
        if not self._first and slots < 1:
            raise ValueError(f"slots={slots}: frames are at least 1 slot apart")
        out = self._step(metric, int(slots))
        self._first = False
        return out
