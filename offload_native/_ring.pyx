# cython: language_level=3
"""History ring buffer that writes the DQN input vector (SPEC section 6).

Each ring stores its values twice (length ``2*H``) and is written backwards, so
the newest-first window is always the contiguous slice ``buf[pos:pos+H]``: a push
is O(1) and writing the input is one copy, with no allocation per frame.
"""

from libc.string cimport memcpy, memset


cdef class HistoryRing:
    """The last ``H`` standardised metrics and inter-arrival times.

    ``push(metric, slots)`` is called once per image ``k`` with its metric
    ``m[k]`` and ``slots = i[k-1]``, the time slots since the previous image. The
    input vector is ``m[k], ..., m[k-H+1]`` followed, when ``interarrival`` is
    true, by ``i[k-1], ..., i[k-H]``; positions before the first image are 0
    (so the ``slots`` passed with the very first image is recorded as 0).
    """

    def __init__(self, int H, bint interarrival=True):
        if H < 1:
            raise ValueError(f"history length H={H} must be >= 1")
        self.H = H
        self.interarrival = interarrival
        self.mbuf = memoryview(bytearray(8 * H)).cast('f')
        self.ibuf = memoryview(bytearray(8 * H)).cast('f')
        self.pos = 0
        self.count = 0

    @property
    def input_size(self):
        """Length of the input vector (``H`` or ``2*H`` floats)."""
        return 2 * self.H if self.interarrival else self.H

    def reset(self):
        """Forget all history (start of a new stream)."""
        memset(&self.mbuf[0], 0, 2 * self.H * sizeof(float))
        memset(&self.ibuf[0], 0, 2 * self.H * sizeof(float))
        self.pos = 0
        self.count = 0

    cpdef void push(self, float metric, float slots=0.0):
        """Record image ``k``: its standardised metric and ``i[k-1]`` (slots)."""
        cdef int p = self.pos - 1 if self.pos > 0 else self.H - 1
        if self.count == 0:
            slots = 0.0
        self.mbuf[p] = metric
        self.mbuf[p + self.H] = metric
        self.ibuf[p] = slots
        self.ibuf[p + self.H] = slots
        self.pos = p
        self.count += 1

    cdef void write_c(self, float* out) noexcept nogil:
        memcpy(out, &self.mbuf[self.pos], self.H * sizeof(float))
        if self.interarrival:
            memcpy(out + self.H, &self.ibuf[self.pos], self.H * sizeof(float))

    cpdef void write(self, float[::1] out) except *:
        """Write the input vector, newest first, into ``out`` (float32, ``input_size``)."""
        if out.shape[0] != self.input_size:
            raise ValueError(
                f"output buffer has {out.shape[0]} floats, the input needs {self.input_size}")
        self.write_c(&out[0])
