"""Token bucket: ``(rate, depth)`` to integers ``(N, P, M)``, and the bucket itself.

Units: ``rate`` is real tokens per time slot, ``depth`` real tokens. The bucket
works in *scaled tokens*: one real token is ``P`` scaled tokens, it refills
``N`` per slot and holds at most ``M`` (so ``r ~ N/P`` and ``b ~ M/P``).
"""

import math

from offload_native import TokenBucket

__all__ = ["scale", "TokenBucket", "step_reference", "slot_index"]


def scale(rate, depth, max_denominator=100):
    """Turn a real ``(rate, depth)`` into integer ``(N, P, M)`` (SPEC section 1).

    For each denominator ``P'`` in ``1..max_denominator`` the error is
    ``(frac(rate*P') + frac(depth*P')) / P'``; the first ``P'`` with the least
    error wins, ``N = floor(rate*P')``, ``M = floor(depth*P')``, and all three are
    divided by their gcd.

    Parameters
    ----------
    rate : float
        Tokens per time slot, ``0 < rate < 1``.
    depth : float
        Bucket depth in tokens, ``depth >= 1``.

    Returns
    -------
    (N, P, M) : tuple of int
        Refill per slot, cost of an offload, capacity, all in scaled tokens.

    Raises
    ------
    ValueError
        If the inputs are not finite numbers or give ``N == 0``, ``N >= P`` or
        ``M < P``.
    """
    try:
        rate = float(rate)
        depth = float(depth)
    except (TypeError, ValueError):
        raise ValueError(f"rate={rate!r} and depth={depth!r} must be numbers") from None
    if not (math.isfinite(rate) and math.isfinite(depth)):
        raise ValueError(f"rate={rate} and depth={depth} must be finite")
    if not 0 < rate < 1:
        raise ValueError(f"rate={rate} tokens/slot must be in (0, 1)")
    if depth < 1:
        raise ValueError(f"depth={depth} tokens must be >= 1")
    best = None
    for p in range(1, max_denominator + 1):
        rp, bp = rate * p, depth * p
        err = ((rp - math.floor(rp)) + (bp - math.floor(bp))) / p
        if best is None or err < best[0]:
            best = (err, p)
    p = best[1]
    N, M = math.floor(rate * p), math.floor(depth * p)
    g = math.gcd(math.gcd(N, p), M) or 1
    N, P, M = N // g, p // g, M // g
    if N == 0 or N >= P or M < P:
        raise ValueError(
            f"rate={rate}, depth={depth} give N={N}, P={P}, M={M}: no valid bucket "
            f"(need 0 < N < P <= M); use a rate of at least 1/{max_denominator}")
    return N, P, M


def step_reference(n, offload, slots, N, P, M):
    """Plain-Python bucket update (SPEC section 1), the model the native one is tested against.

    ``n`` scaled tokens before the decision, ``slots`` until the next image;
    returns the count then. Raises ``ValueError`` on an infeasible offload.
    """
    if offload and n < P:
        raise ValueError(f"cannot offload with {n} < P={P}")
    return min(M, n - P * int(bool(offload)) + N * slots)


def slot_index(t, t0, slot_s):
    """The time slot holding clock reading ``t`` (s), counted from ``t0`` (s): ``round((t - t0) / slot_s)``.

    Half-up rounding, the one slotting rule the device and the server share:
    slot ``s`` covers ``[t0 + (s - 1/2) slot_s, t0 + (s + 1/2) slot_s)``.
    """
    return int(math.floor((t - t0) / slot_s + 0.5))
