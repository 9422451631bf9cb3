from libc.stdint cimport int16_t, int32_t

cdef enum:
    MAX_LAYERS = 64
    TILE = 4                 # inputs per step of the batched forward

cdef struct LayerC:
    int din
    int dout
    int nseg
    bint leaky
    const int16_t* W         # dout x din, row-major, int8 values
    const int32_t* seg_start # nseg + 1 boundaries, last == din
    const float* seg_inv     # nseg: 1 / input scale
    const float* seg_zp      # nseg: input zero point (as float)
    const float* mult        # nseg x dout
    const float* offset      # dout
    float qlo                # this layer's input codes are clamped to [qlo, qhi]
    float qhi


cdef class Int8MLP:
    cdef LayerC L[MAX_LAYERS]
    cdef int nl
    cdef list keep
    cdef int16_t* buf_a
    cdef int16_t* buf_b
    cdef int32_t* acc        # nseg x dout scratch for the dot products
    cdef float* ybuf         # dout scratch for requantisation
    cdef int width           # widest layer input or output
    cdef int accsize         # largest nseg x dout
    cdef readonly int input_size
    cdef readonly int output_size
    cdef readonly int act_bits
    cdef void forward_c(self, const float* x, float* out) noexcept nogil
    cdef void forward_tile(self, const float* X, int R, float* out, int16_t* A, int16_t* B,
                           int32_t* acc, float* y) noexcept nogil
    cdef int forward_rows(self, const float* X, Py_ssize_t rows, float* out) noexcept nogil
    cpdef void forward1(self, const float[::1] x, float[::1] out) except *
