"""Regression targets of a batch of tuples for every token state at once (torch).

Q-learning targets (``q_targets``, SPEC section 6, with its plain-loop twin
``q_targets_reference``) and the structure-aware ceiling's Q-values
(``ceiling_targets``); both in the bucket's Q-vector layout
(``offload.bucket.Bucket``), not yet mean-shifted. Tokens are scaled tokens,
inter-arrival times slots.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["q_targets", "ceiling_targets", "q_targets_reference"]


def q_targets(q_next, R, I, bucket, discount):
    """Regression targets for every token state at once (torch).

    ``q_next`` (B, bucket.q_length) target-network Q-vectors of ``x'``; ``R`` (B,)
    rewards; ``I`` (B,) slots to the next image. Returns (B, same) targets in
    the bucket's Q-vector layout (SPEC section 2; not yet mean-shifted).
    """
    N, P, M = bucket
    q0, q1 = q_next[:, bucket.q_keep], q_next[:, bucket.q_send]
    best = torch.cat([q0[:, :P - N], torch.maximum(q_next[:, bucket.q_keep_sendable], q1)],
                     dim=1)
    refill = (N * torch.clamp(I, max=M)).to(torch.long)[:, None]
    n = torch.arange(N, M + 1, device=q_next.device)[None, :]
    idx0 = torch.clamp(n + refill, max=M) - N
    idx1 = torch.clamp(n[:, P - N:] - P + refill, max=M) - N
    t0 = discount * best.gather(1, idx0)
    t1 = R.to(q_next.dtype)[:, None] + discount * best.gather(1, idx1)
    return torch.cat([t0, t1], dim=1)


def ceiling_targets(W, f, bucket, discount):
    """Regression targets from the structure-aware ceiling (torch), Q-vector layout.

    ``W`` (B, M+1): the ceiling's value after a decision leaving ``m``
    tokens (``offload.ceiling.Ceiling.W``) at each tuple's hidden state;
    ``f`` (B,) the image's expected reward. ``Q(n, 0) = g W[n]`` for
    ``n = N..M`` and ``Q(n, 1) = f + g W[n - P]`` for ``n = P..M``, so
    ``Q(n, 1) - Q(n, 0) = f - theta[n]``: the ceiling's own decision.
    """
    t0 = discount * W[:, bucket.N:bucket.M + 1]                       # n = N..M
    t1 = f.to(W.dtype)[:, None] + discount * W[:, :bucket.send_states]  # n - P for n = P..M
    return torch.cat([t0, t1], dim=1)


def q_targets_reference(q_next, R, I, bucket, discount):
    """Plain-loop twin of ``q_targets`` (numpy, one tuple and one state at a time)."""
    q_next = np.asarray(q_next, np.float64)
    out = np.zeros_like(q_next)
    N, P, M = bucket

    def best(row, n):
        v = row[bucket.q_index(n, 0)]
        if bucket.can_send(n):
            v = max(v, row[bucket.q_index(n, 1)])
        return v

    for b in range(q_next.shape[0]):
        for n in range(N, M + 1):
            keep = min(M, n + N * int(I[b]))
            out[b, bucket.q_index(n, 0)] = discount * best(q_next[b], keep)
            if bucket.can_send(n):
                out[b, bucket.q_index(n, 1)] = (
                    R[b] + discount * best(q_next[b], min(M, n - P + N * int(I[b]))))
    return out
