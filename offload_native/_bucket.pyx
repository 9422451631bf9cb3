# cython: language_level=3
"""Token bucket with exact integer semantics (SPEC section 1).

All counts here are *scaled tokens*: one real token is ``P`` scaled tokens, the
bucket refills ``N`` scaled tokens per time slot and holds at most ``M``.
"""

cdef class TokenBucket:
    """A token bucket over scaled integer tokens.

    Parameters
    ----------
    N : int
        Refill per time slot (scaled tokens); the real rate is ``r = N / P``.
    P : int
        Cost of one offload (scaled tokens), i.e. scaled tokens per real token.
    M : int
        Capacity (scaled tokens); the real depth is ``b = M / P``.
    tokens : int, optional
        Starting count (scaled tokens); the bucket starts full by default.
    """

    def __init__(self, long long N, long long P, long long M, tokens=None):
        if N <= 0 or P <= 0 or N >= P or M < P:
            raise ValueError(
                f"invalid bucket (N={N}, P={P}, M={M}): need 0 < N < P <= M")
        self.N = N
        self.P = P
        self.M = M
        if tokens is None:
            self.n = M
        else:
            if not (0 <= tokens <= M):
                raise ValueError(f"tokens={tokens} outside 0..M={M}")
            self.n = tokens

    @property
    def tokens(self):
        """Current count (scaled tokens, ``0 <= tokens <= M``)."""
        return self.n

    cpdef bint can_offload(self):
        """True when at least one real token (``P`` scaled tokens) is available."""
        return self.n >= self.P

    cpdef long long step(self, bint offload, long long slots) except -1:
        """Apply the decision on one image, then refill until the next arrives.

        ``offload`` spends ``P`` scaled tokens; ``slots`` (>= 1) is the number of
        time slots until the next image, each adding ``N``. Returns the new count.
        Raises ``ValueError`` when offloading with fewer than ``P`` tokens or when
        ``slots < 1``.
        """
        if slots < 1:
            raise ValueError(f"slots={slots}: the next image arrives at least 1 slot later")
        if offload:
            if self.n < self.P:
                raise ValueError(
                    f"cannot offload with {self.n} scaled tokens (< P={self.P})")
            self.n -= self.P
        self.n += self.N * slots
        if self.n > self.M:
            self.n = self.M
        return self.n

    def reset(self, tokens=None):
        """Refill to full (or to ``tokens`` scaled tokens)."""
        if tokens is None:
            self.n = self.M
        elif 0 <= tokens <= self.M:
            self.n = tokens
        else:
            raise ValueError(f"tokens={tokens} outside 0..M={self.M}")

    def __repr__(self):
        return f"TokenBucket(N={self.N}, P={self.P}, M={self.M}, tokens={self.n})"
