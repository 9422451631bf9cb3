# cython: language_level=3
"""One fused device decision per frame: ring push, int8 forward, rule, token spend.

The same steps as calling ``HistoryRing.push/write``, ``Int8MLP.forward1``,
``decide`` and ``TokenBucket.step`` one after another (the tests check exactly
that), but in one call with no Python in between, which is what the device loop
runs for every frame.
"""

from ._bucket cimport TokenBucket
from ._ring cimport HistoryRing
from ._mlp cimport Int8MLP


cdef class Decider:
    """DQN policy state on the device: history, network and bucket together.

    ``step(metric, slots)`` handles frame ``k``: ``metric`` is its standardised
    metric and ``slots = i[k-1]`` the time slots since frame ``k-1`` (ignored
    for the first frame). It refills the bucket for those slots, pushes the
    history, runs the network, applies SPEC section 2's rule at the bucket's
    count ``n`` (scaled tokens) and, when offloading, spends ``P`` at once.
    """

    cdef readonly HistoryRing ring
    cdef readonly Int8MLP mlp
    cdef readonly TokenBucket bucket
    cdef float[::1] x
    cdef float[::1] q
    cdef readonly long long last_n

    def __init__(self, Int8MLP mlp, HistoryRing ring, TokenBucket bucket):
        cdef long long want = 2 * (bucket.M + 1) - bucket.N - bucket.P
        if mlp.input_size != ring.input_size:
            raise ValueError(f"network takes {mlp.input_size} inputs, history gives {ring.input_size}")
        if mlp.output_size != want:
            raise ValueError(f"network gives {mlp.output_size} Q-values, bucket "
                             f"(N={bucket.N}, P={bucket.P}, M={bucket.M}) needs {want}")
        self.mlp, self.ring, self.bucket = mlp, ring, bucket
        self.x = memoryview(bytearray(4 * mlp.input_size)).cast('f')
        self.q = memoryview(bytearray(4 * mlp.output_size)).cast('f')
        self.last_n = bucket.n

    @property
    def q_values(self):
        """The Q-vector of the last decision (a copy, float32 values as a list)."""
        return list(self.q)

    cpdef bint step(self, float metric, long long slots=0) except -1:
        """Decide on one frame; returns True to offload (its token already spent)."""
        cdef TokenBucket b = self.bucket
        cdef long long n
        cdef bint a
        if self.ring.count > 0:
            if slots < 1:
                raise ValueError(f"slots={slots}: frames are at least 1 slot apart")
            n = b.n + b.N * slots
            b.n = n if n < b.M else b.M
        self.ring.push(metric, slots)
        self.ring.write_c(&self.x[0])
        self.mlp.forward_c(&self.x[0], &self.q[0])
        n = b.n
        self.last_n = n
        a = n >= b.P and self.q[b.M - b.N + 1 + n - b.P] >= self.q[n - b.N]
        if a:
            b.n = n - b.P
        return a

    def reset(self):
        """New stream: empty history, full bucket."""
        self.ring.reset()
        self.bucket.reset()
        self.last_n = self.bucket.n
