# cython: language_level=3
"""Hand-written int8 MLP forward pass and the DQN decision rule.

The arithmetic mirrors ``offload.mlp.forward_int8`` (numpy) step for step:
int8 inputs and weights, int32 dot products, float32 requantisation
``y = offset + sum_s mult[s] * acc[s]``, LeakyReLU(0.2), then either float
Q-values (last layer) or int8 activations for the next layer. The inner dot
product is a plain int8 x int8 -> int32 reduction over contiguous rows so the
C compiler vectorises it.
"""

from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport rintf, fminf, fmaxf
from libc.stdint cimport int8_t, int32_t

import numpy as np

cdef enum:
    MAX_LAYERS = 64

cdef struct LayerC:
    int din
    int dout
    int nseg
    bint leaky
    const int8_t* W          # dout x din, row-major
    const int32_t* seg_start # nseg + 1 boundaries, last == din
    const float* seg_inv     # nseg: 1 / input scale
    const float* seg_zp      # nseg: input zero point (as float)
    const float* mult        # nseg x dout
    const float* offset      # dout


cdef class Int8MLP:
    """An int8 MLP built from ``offload.mlp.QuantMLP.native_args()``.

    ``forward1(x, out)`` runs one float32 input vector into a preallocated float32
    Q-vector without allocating; ``forward(X)`` runs a batch (rows of ``X``).
    """

    cdef LayerC L[MAX_LAYERS]
    cdef int nl
    cdef list keep
    cdef int8_t* buf_a
    cdef int8_t* buf_b
    cdef readonly int input_size
    cdef readonly int output_size

    def __cinit__(self):
        self.buf_a = NULL
        self.buf_b = NULL

    def __init__(self, layers):
        cdef const int8_t[:, ::1] W
        cdef const int32_t[::1] st
        cdef const float[::1] inv, zp, off
        cdef const float[:, ::1] mult
        cdef int l, width = 0
        layers = list(layers)
        if not 1 <= len(layers) <= MAX_LAYERS:
            raise ValueError(f"need 1..{MAX_LAYERS} layers, got {len(layers)}")
        self.keep = []
        for l, (w_, st_, inv_, zp_, mult_, off_, leaky) in enumerate(layers):
            w_ = np.ascontiguousarray(w_, dtype=np.int8)
            st_ = np.ascontiguousarray(st_, dtype=np.int32)
            inv_ = np.ascontiguousarray(inv_, dtype=np.float32)
            zp_ = np.ascontiguousarray(zp_, dtype=np.float32)
            mult_ = np.ascontiguousarray(mult_, dtype=np.float32)
            off_ = np.ascontiguousarray(off_, dtype=np.float32)
            dout, din = w_.shape
            nseg = st_.shape[0] - 1
            if (nseg < 1 or st_[0] != 0 or st_[nseg] != din or np.any(np.diff(st_) <= 0)
                    or inv_.shape[0] != nseg or zp_.shape[0] != nseg
                    or mult_.shape[0] != nseg or mult_.shape[1] != dout
                    or off_.shape[0] != dout):
                raise ValueError(f"layer {l}: inconsistent shapes")
            if l > 0 and din != self.L[l - 1].dout:
                raise ValueError(f"layer {l}: input {din} != previous output {self.L[l - 1].dout}")
            if l > 0 and nseg != 1:
                raise ValueError(f"layer {l}: hidden inputs have one quantisation segment")
            self.keep.extend([w_, st_, inv_, zp_, mult_, off_])
            W = w_; st = st_; inv = inv_; zp = zp_; mult = mult_; off = off_
            self.L[l].din = din
            self.L[l].dout = dout
            self.L[l].nseg = nseg
            self.L[l].leaky = bool(leaky)
            self.L[l].W = &W[0, 0]
            self.L[l].seg_start = &st[0]
            self.L[l].seg_inv = &inv[0]
            self.L[l].seg_zp = &zp[0]
            self.L[l].mult = &mult[0, 0]
            self.L[l].offset = &off[0]
            width = max(width, din, dout)
        self.nl = len(layers)
        self.input_size = self.L[0].din
        self.output_size = self.L[self.nl - 1].dout
        self.buf_a = <int8_t*> malloc(width)
        self.buf_b = <int8_t*> malloc(width)
        if self.buf_a == NULL or self.buf_b == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.buf_a)
        free(self.buf_b)

    cdef void forward_c(self, const float* x, float* out) noexcept nogil:
        cdef int l, j, s, i, a, b
        cdef int32_t acc
        cdef float y, v, inv, zp
        cdef const int8_t* row
        cdef const int8_t* cur
        cdef int8_t* nxt
        cdef int8_t* tmp
        cdef LayerC* lay = &self.L[0]
        # Quantise the input, one (scale, zero point) per segment.
        for s in range(lay.nseg):
            inv = lay.seg_inv[s]
            zp = lay.seg_zp[s]
            for i in range(lay.seg_start[s], lay.seg_start[s + 1]):
                v = fminf(fmaxf(x[i] * inv + zp, -128.0), 127.0)
                self.buf_a[i] = <int8_t> rintf(v)
        cur = self.buf_a
        nxt = self.buf_b
        for l in range(self.nl):
            lay = &self.L[l]
            if l + 1 < self.nl:
                inv = self.L[l + 1].seg_inv[0]
                zp = self.L[l + 1].seg_zp[0]
            for j in range(lay.dout):
                row = lay.W + j * lay.din
                y = lay.offset[j]
                for s in range(lay.nseg):
                    a = lay.seg_start[s]
                    b = lay.seg_start[s + 1]
                    acc = 0
                    for i in range(a, b):
                        acc = acc + <int32_t> row[i] * <int32_t> cur[i]
                    y = y + lay.mult[s * lay.dout + j] * <float> acc
                if lay.leaky and y < 0:
                    y = y * <float> 0.2
                if l + 1 == self.nl:
                    out[j] = y
                else:
                    v = fminf(fmaxf(y * inv + zp, -128.0), 127.0)
                    nxt[j] = <int8_t> rintf(v)
            tmp = <int8_t*> cur
            cur = nxt
            nxt = tmp

    cpdef void forward1(self, const float[::1] x, float[::1] out) except *:
        """One input vector (float32, ``input_size``) -> Q-values into ``out``."""
        if x.shape[0] != self.input_size or out.shape[0] != self.output_size:
            raise ValueError(
                f"forward1 expects x of {self.input_size} and out of {self.output_size} floats, "
                f"got {x.shape[0]} and {out.shape[0]}")
        self.forward_c(&x[0], &out[0])

    def forward(self, X):
        """Batch forward: ``X`` (B, input_size) float32 -> (B, output_size) float32."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.input_size:
            raise ValueError(f"forward expects (B, {self.input_size}) inputs, got {X.shape}")
        out = np.empty((X.shape[0], self.output_size), dtype=np.float32)
        cdef const float[:, ::1] xv = X
        cdef float[:, ::1] ov = out
        cdef Py_ssize_t k
        if X.shape[0] > 0:
            with nogil:
                for k in range(xv.shape[0]):
                    self.forward_c(&xv[k, 0], &ov[k, 0])
        return out


cpdef bint decide(const float[::1] q, long long n, long long N, long long P, long long M) except -1:
    """SPEC section 2: offload iff ``n >= P`` and ``Q(n,1) >= Q(n,0)`` (ties offload).

    ``q`` is the full Q-vector: ``Q(n,0)`` for ``n = N..M`` then ``Q(n,1)`` for
    ``n = P..M``; ``n`` is the bucket count in scaled tokens (``N <= n <= M``).
    """
    if q.shape[0] != 2 * (M + 1) - N - P:
        raise ValueError(f"Q-vector has {q.shape[0]} values, bucket (N={N}, P={P}, M={M}) "
                         f"needs {2 * (M + 1) - N - P}")
    if n < N or n > M:
        raise ValueError(f"token state n={n} outside N..M = {N}..{M}")
    if n < P:
        return False
    return q[M - N + 1 + n - P] >= q[n - N]
