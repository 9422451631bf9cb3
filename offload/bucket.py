"""Token bucket: ``(rate, depth)`` to integers ``(N, P, M)``, and the bucket itself.

Units: ``rate`` is real tokens per time slot, ``depth`` real tokens. The bucket
works in *scaled tokens*: one real token is ``P`` scaled tokens, it refills
``N`` per slot and holds at most ``M`` (so ``r ~ N/P`` and ``b ~ M/P``).
"""

import math
from dataclasses import dataclass

import numpy as np

from offload_native import TokenBucket

__all__ = ["scale", "Bucket", "TokenBucket", "step_reference", "refill", "slot_index", "slot_start"]


def scale(rate, depth, max_denominator=100, *, any_rate=False):
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
    any_rate : bool
        Allow ``rate >= 1`` too (then ``N >= P``): a server switch that
        several devices send through refills more than one send per slot.
        A device's decision layouts (:class:`Bucket`) need ``rate < 1``.

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
    if not (0 < rate and (any_rate or rate < 1)):
        raise ValueError(f"rate={rate} tokens/slot must be "
                         f"{'> 0' if any_rate else 'in (0, 1)'}")
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
    if N == 0 or (N >= P and not any_rate) or M < P:
        raise ValueError(
            f"rate={rate}, depth={depth} give N={N}, P={P}, M={M}: no valid bucket "
            f"(need 0 < N < P <= M); use a rate of at least 1/{max_denominator}")
    return N, P, M


def refill(n, slots, N, M):
    """Scaled tokens ``n`` after ``slots`` time slots of refill: ``min(M, n + N * slots)``.

    The one refill rule: ``step_reference`` and the server's per-key bucket use it.
    """
    return min(M, n + N * slots)


def step_reference(n, offload, slots, N, P, M):
    """Plain-Python bucket update (SPEC section 1), the model the native one is tested against.

    ``n`` scaled tokens before the decision, ``slots`` until the next image;
    returns the count then. Raises ``ValueError`` on an infeasible offload.
    """
    if offload and n < P:
        raise ValueError(f"cannot offload with {n} < P={P}")
    return refill(n - P * int(bool(offload)), slots, N, M)


@dataclass(frozen=True)
class Bucket:
    """A token bucket in scaled tokens: refill ``N`` per slot, ``P`` per offload, at most ``M``.

    The one value type for ``(N, P, M)`` (SPEC section 1; ``0 < N < P <= M``).
    It also owns the two layouts that follow from it:

    * token states: a count ``n`` in ``N..M`` (``states`` of them) before a
      decision; a send is allowed iff ``n >= P`` (``send_states = M - P + 1``
      counts ``n = P..M``, the entries of a threshold vector);
    * the Q-vector (SPEC section 2): ``Q(n, 0)`` for ``n = N..M``, then
      ``Q(n, 1)`` for ``n = P..M`` (``q_length`` values).

    Unpacks as ``N, P, M = bucket`` for the native functions, which keep
    their integer arguments.
    """

    N: int
    P: int
    M: int

    def __post_init__(self):
        for name in ("N", "P", "M"):
            x = getattr(self, name)
            if not isinstance(x, (int, np.integer)) or isinstance(x, bool):
                raise ValueError(f"{name}={x!r} must be an integer (scaled tokens)")
            object.__setattr__(self, name, int(x))
        if not 0 < self.N < self.P <= self.M:
            raise ValueError(f"invalid bucket (N={self.N}, P={self.P}, M={self.M}): "
                             "need 0 < N < P <= M")

    @classmethod
    def from_rate(cls, rate, depth, max_denominator=100):
        """The bucket of real ``rate`` (tokens/slot) and ``depth`` (tokens), via ``scale``."""
        return cls(*scale(rate, depth, max_denominator))

    def __iter__(self):
        return iter((self.N, self.P, self.M))

    def __str__(self):
        return f"(N, P, M) = ({self.N}, {self.P}, {self.M})"

    # ------------------------------------------------------------ token states

    @property
    def states(self):
        """Token states ``n = N..M`` a decision can see: ``M - N + 1``."""
        return self.M - self.N + 1

    @property
    def send_states(self):
        """Token states that allow a send, ``n = P..M``: ``M - P + 1``."""
        return self.M - self.P + 1

    def can_send(self, n):
        """The send mask: ``n >= P`` (scaled tokens; scalars or arrays)."""
        return n >= self.P

    def step(self, n, offload, slots):
        """``step_reference`` for this bucket: the count ``slots`` after a decision at ``n``."""
        return step_reference(n, offload, slots, self.N, self.P, self.M)

    # ------------------------------------------------------------ Q-vector layout

    @property
    def q_length(self):
        """Length of the Q-vector: ``M-N+1`` values ``Q(n,0)`` then ``M-P+1`` values ``Q(n,1)``."""
        return self.states + self.send_states

    def q_index(self, n, a):
        """Position of ``Q(n, a)`` in the Q-vector (``n`` scaled tokens; scalars or arrays)."""
        return (n - self.N) if a == 0 else (self.states + n - self.P)

    @property
    def q_keep(self):
        """Slice of the Q-vector holding ``Q(n, 0)``, ``n = N..M``."""
        return slice(0, self.states)

    @property
    def q_send(self):
        """Slice of the Q-vector holding ``Q(n, 1)``, ``n = P..M``."""
        return slice(self.states, self.q_length)

    @property
    def q_keep_sendable(self):
        """Slice of the Q-vector holding ``Q(n, 0)`` for the states that can send, ``n = P..M``."""
        return slice(self.P - self.N, self.states)

    def prefers_send(self, q):
        """``Q(n, 1) >= Q(n, 0)`` for ``n = P..M`` of Q-vectors ``q`` (..., q_length) -> bool (..., M-P+1)."""
        return q[..., self.q_send] >= q[..., self.q_keep_sendable]


def slot_index(t, t0, slot_s):
    """The time slot holding clock reading ``t`` (s), counted from ``t0`` (s): ``round((t - t0) / slot_s)``.

    Half-up rounding, the one slotting rule the device and the server share:
    slot ``s`` covers ``[t0 + (s - 1/2) slot_s, t0 + (s + 1/2) slot_s)``.
    """
    return int(math.floor((t - t0) / slot_s + 0.5))


def slot_start(s, t0, slot_s):
    """Where slot ``s`` begins (clock reading, s): ``t0 + (s - 1/2) slot_s``, in slot ``s`` by :func:`slot_index`.

    In floating point that product can land a hair before the boundary as
    :func:`slot_index` sees it (``4.3 / 0.2 + 0.5`` floors to 21, not 22); it
    is then moved up by a few ulps until ``slot_index`` agrees, so a wait that
    ends there never ends in the slot it was meant to leave.
    """
    t = t0 + (s - 0.5) * slot_s
    while slot_index(t, t0, slot_s) < s:
        t = math.nextafter(t, math.inf)
    return t
