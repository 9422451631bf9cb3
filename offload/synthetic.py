"""A synthetic profile with correlated classifier outputs, for demos and tests.

Each image has a hidden difficulty ``d`` in [0, 1]. The weak classifier's
logits favour the true class by ``5 (1 - d)`` plus noise, so hard images get
flat, high-entropy outputs and are often wrong; the strong classifier is right
with probability ``0.97 - 0.35 d``. Offloading hard images therefore pays, and
the entropy-based metric carries that information, as in the paper's section II.
Losses are top-1.
"""

import numpy as np

from offload.profile import Profile

__all__ = ["synthetic_profile"]


def synthetic_profile(n_images=20000, n_classes=10, seed=0, fractions=(0.5, 0.1, 0.4)):
    """A fitted ``Profile`` of ``n_images`` synthetic images.

    ``fractions`` = shares of the train / validation / test splits.
    """
    if n_images < 20:
        raise ValueError(f"n_images={n_images}: need at least 20 images")
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}: need at least 2 classes")
    rng = np.random.default_rng(seed)
    d = rng.random(n_images)
    labels = rng.integers(0, n_classes, n_images)
    logits = rng.normal(0.0, 1.0, (n_images, n_classes))
    logits[np.arange(n_images), labels] += 5.0 * (1.0 - d)
    weak_rank = 1 + (logits > logits[np.arange(n_images), labels][:, None]).sum(axis=1)
    strong_ok = rng.random(n_images) < 0.97 - 0.35 * d
    strong_rank = np.where(strong_ok, 1, 2)
    cuts = np.cumsum(np.asarray(fractions, float) / np.sum(fractions))[:2] * n_images
    split = np.searchsorted(cuts, np.arange(n_images), side="right").astype(np.int8)
    prof = Profile.from_ranks(weak_rank.astype(np.int16), strong_rank.astype(np.int16), split,
                              k=1, weak_logits=logits.astype(np.float32), labels=labels,
                              source=f"synthetic(n={n_images}, seed={seed})")
    return prof.fit_metric()
