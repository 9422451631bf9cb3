"""The replay buffer: long training sequences and vectorised sampling of SPEC section 6 tuples.

A training tuple is a random position ``k`` in one of the sequences; since the
inputs do not depend on the decisions, the sequences are all the buffer holds.
Inter-arrival times are slots, divided by ``ia_scale`` (their training mean).
"""

from __future__ import annotations

import numpy as np

from offload.ring import input_size

__all__ = ["Replay"]


class Replay:
    """Training sequences and vectorised sampling of SPEC section 6 tuples.

    For each sequence, the metrics are stored with ``H - 1`` zeros in front and
    the inter-arrival times (divided by ``ia_scale``) with ``H`` zeros, so the
    ``H + 1`` values that make both ``x`` (position ``k``) and ``x'`` (position
    ``k + 1``) are one contiguous slice of each.
    """

    def __init__(self, streams, H, use_interarrival, ia_scale=1.0):
        S, L = streams.shape
        if L < 2:
            raise ValueError(f"training sequences need >= 2 images, got {L}")
        self.S, self.L, self.H, self.use_ia = S, L, H, use_interarrival
        self.ia_scale = float(ia_scale)
        self.pm = np.concatenate([np.zeros((S, H - 1), np.float32), streams.metric], axis=1)
        self.pm_flat = self.pm.ravel()
        if use_interarrival:
            ia = streams.interarrival.astype(np.float32) / np.float32(self.ia_scale)
            self.pi = np.concatenate([np.zeros((S, H), np.float32), ia], axis=1)
            self.pi_flat = self.pi.ravel()
        self.reward = streams.reward
        self.interarrival = streams.interarrival
        self.din = input_size(H, use_interarrival)
        self._rev = np.arange(H, -1, -1)

    def positions(self, rng, B):
        """``B`` uniform random positions ``(s, k)``, ``k`` in ``0..L-2`` (so ``x'`` exists)."""
        return rng.integers(0, self.S, size=B), rng.integers(0, self.L - 1, size=B)

    def sample(self, rng, B):
        """``B`` tuples at uniform random positions: see ``positions`` and ``tuples``."""
        return self.tuples(*self.positions(rng, B))

    def tuples(self, s, k):
        """Training tuples ``(x, x', R, I)`` at positions ``k`` of sequences ``s``.

        ``x`` (float32 ``(B, din)``) is the input at position ``k``
        (``m[k..k-H+1]``, then ``i[k-1..k-H] / ia_scale``), ``x'`` the one at
        ``k + 1``; ``R = reward[k]``, ``I = interarrival[k]`` (slots).
        """
        s, k = np.asarray(s, np.int64), np.asarray(k, np.int64)
        B, H = len(s), self.H
        # Reversed slices: column 0 is the newest value (m[k+1], i[k]).
        cols = k[:, None] + self._rev[None, :]
        gm = np.take(self.pm_flat, cols + (s * self.pm.shape[1])[:, None])
        x = np.empty((B, self.din), np.float32)
        xn = np.empty((B, self.din), np.float32)
        x[:, :H], xn[:, :H] = gm[:, 1:], gm[:, :H]
        if self.use_ia:
            gi = np.take(self.pi_flat, cols + (s * self.pi.shape[1])[:, None])
            x[:, H:], xn[:, H:] = gi[:, 1:], gi[:, :H]
        return x, xn, self.reward[s, k], self.interarrival[s, k]

    def raw_states(self, rng, count):
        """Inputs ``x`` in the exported network's units (raw slots): int8 calibration."""
        x = self.sample(rng, count)[0]
        if self.use_ia:
            x[:, self.H:] *= np.float32(self.ia_scale)
        return x
