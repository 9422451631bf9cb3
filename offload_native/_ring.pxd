cdef class HistoryRing:
    cdef float[::1] mbuf
    cdef float[::1] ibuf
    cdef readonly int H
    cdef readonly bint interarrival
    cdef int pos
    cdef readonly long long count
    cpdef void push(self, float metric, float slots=*)
    cdef void write_c(self, float* out) noexcept nogil
    cpdef void write(self, float[::1] out) except *
