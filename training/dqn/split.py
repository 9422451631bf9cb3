"""A profile's images split for DQN training: training, validation and test (``Data``).

Metrics are standardised (training mean and standard deviation); the test
images are kept apart for the final report only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from offload.profile import TEST, TRAIN, VALIDATION
from offload.scenario import named_seed

__all__ = ["Data", "prepare_data", "profile_fingerprint"]


@dataclass
class Data:
    """Standardised metrics, rewards and losses of a profile, split three ways."""

    metric: np.ndarray       # (n,) float32 standardised
    raw_metric: np.ndarray   # (n,) float32 expected reward f(h)
    reward: np.ndarray       # (n,) float32
    weak_loss: np.ndarray    # (n,) float32
    train: np.ndarray        # indices
    val: np.ndarray
    test: np.ndarray
    val_source: str = "validation split"

    def streams(self, scenario, part, *, length, n_seq, hidden=False):
        """``scenario``'s streams over the ``part`` images (``"train"``, ``"val"``, ``"test"``),
        drawn with the scenario's seeds of that purpose."""
        idx = {"train": self.train, "val": self.val, "test": self.test}[part]
        purpose = {"train": "training", "val": "validation", "test": "test"}[part]
        return scenario.streams(self.metric[idx], self.reward[idx], self.weak_loss[idx],
                                raw_metric=self.raw_metric[idx], length=length, n_seq=n_seq,
                                purpose=purpose, hidden=hidden)


def prepare_data(prof, holdout=0.2, seed=0):
    """Split a fitted profile for training: its validation split, or a held-out share of training.

    Test images are kept apart for the final report only. ``seed`` is the
    scenario's seed (its ``"holdout"`` stream draws the held-out share).
    """
    train, val, test = prof.indices(TRAIN), prof.indices(VALIDATION), prof.indices(TEST)
    source = "validation split"
    if len(val) == 0:
        rng = np.random.default_rng(named_seed(seed, "holdout"))
        perm = rng.permutation(train)
        cut = int(round(len(train) * holdout))
        val, train = np.sort(perm[:cut]), np.sort(perm[cut:])
        source = f"{holdout:.0%} of the training split held out (profile has no validation split)"
    if len(train) < 2 or len(val) < 1 or len(test) < 1:
        raise ValueError(f"profile needs training, validation and test images "
                         f"(has {len(train)} train, {len(val)} validation, {len(test)} test)")
    m = prof.standardized_metric().astype(np.float32)
    return Data(m, prof.metric.astype(np.float32), prof.reward.astype(np.float32),
                prof.weak_loss.astype(np.float32), train, val, test, source)


def profile_fingerprint(prof):
    """A short hash of what training reads from a profile (to match checkpoints)."""
    h = hashlib.sha256()
    for a in (prof.metric, prof.reward, prof.split):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
