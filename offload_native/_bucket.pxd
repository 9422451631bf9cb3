cdef class TokenBucket:
    cdef readonly long long N, P, M
    cdef long long n
    cpdef bint can_offload(self)
    cpdef long long step(self, bint offload, long long slots) except -1
