# cython: language_level=3
"""Hand-written int8 MLP forward pass and the DQN decision rule.

The arithmetic mirrors ``offload.mlp.forward_int8`` (numpy) step for step:
int8 weights, int8 or 16-bit activations (``act_bits``), int32 dot products,
float32 requantisation ``y = offset + sum_s mult[s] * acc[s]``,
LeakyReLU(0.2), then either float Q-values (last layer) or the next layer's
activation codes. 16-bit activation codes are clamped to +-32767, so an
int32 sum of up to ``MAX_IN_16`` products cannot overflow. The inner dot
product is a plain reduction over contiguous rows so the C compiler vectorises
it. The int8 values are held widened to int16 in memory (weights once at load,
activations as they are produced): the products are the same, but the compiler
then maps the loop straight onto 16-bit multiply-add instructions (pmaddwd on
x86, smlal on ARM) instead of unpacking bytes first, about twice as fast.

``forward`` (a batch, for the simulator) runs ``TILE`` inputs at a time:
each weight row is then read once per tile instead of once per input, which
matters because the paper-size network's weights (66 KB as int16) do not fit
in L1. It can split the rows over threads. Every output is bit-identical to
``forward1`` (same operations in the same order).
"""

from concurrent.futures import ThreadPoolExecutor

from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.stdint cimport int8_t, int16_t, int32_t



import numpy as np

# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to the
# nearest integer, ties to even: the same result as rintf / numpy.rint, but
# inline (rintf is a library call without SSE4.1, and this runs 500 times a decision).
cdef float ROUND_MAGIC = 12582912.0


#: Code ranges of the two activation widths (16-bit leaves out -32768, see above).
CODE_RANGE = {8: (-128.0, 127.0), 16: (-32767.0, 32767.0)}
#: Most inputs a layer may have with 16-bit activations: 516 * 32767 * 127 < 2**31.
MAX_IN_16 = 516


cdef inline int16_t to_code(float v, float lo, float hi) noexcept nogil:
    """Clamp to [lo, hi] and round half to even (inputs are finite).

    Written as selects, not branches, so loops over it vectorise (min/max).
    """
    v = v if v < hi else hi
    v = v if v > lo else lo
    return <int16_t> ((v + ROUND_MAGIC) - ROUND_MAGIC)

cdef inline void dot_rows(const int16_t* W, const int16_t* x, int din, int dout, int a, int b,
                          int32_t* acc) noexcept nogil:
    """acc[j] = sum_{i in [a, b)} W[j, i] * x[i]: four rows at a time, sharing each x load."""
    cdef int j = 0, i
    cdef int32_t a0, a1, a2, a3, xi
    cdef const int16_t* r0
    cdef const int16_t* r1
    cdef const int16_t* r2
    cdef const int16_t* r3
    while j + 4 <= dout:
        r0 = W + j * din
        r1 = r0 + din
        r2 = r1 + din
        r3 = r2 + din
        a0 = 0; a1 = 0; a2 = 0; a3 = 0
        for i in range(a, b):
            xi = x[i]
            a0 = a0 + r0[i] * xi
            a1 = a1 + r1[i] * xi
            a2 = a2 + r2[i] * xi
            a3 = a3 + r3[i] * xi
        acc[j] = a0; acc[j + 1] = a1; acc[j + 2] = a2; acc[j + 3] = a3
        j += 4
    while j < dout:
        r0 = W + j * din
        a0 = 0
        for i in range(a, b):
            a0 = a0 + r0[i] * x[i]
        acc[j] = a0
        j += 1


cdef inline void dot_tile(const int16_t* W, const int16_t* X, int ldx, int din, int dout,
                          int a, int b, int32_t* acc) noexcept nogil:
    """acc[r * dout + j] = sum_{i in [a, b)} W[j, i] * X[r * ldx + i], r < TILE (= 4).

    Four weight rows times four inputs per pass: sixteen sums sharing eight
    loads (about 15% faster than 2 x 4 with AVX-512 here; NEON also has 32
    vector registers), then one row at a time for the rest.
    """
    cdef int j = 0, i
    cdef int32_t s00, s01, s02, s03, s10, s11, s12, s13
    cdef int32_t s20, s21, s22, s23, s30, s31, s32, s33
    cdef int32_t w0i, w1i, w2i, w3i, p, q, r, t
    cdef const int16_t* w0
    cdef const int16_t* w1
    cdef const int16_t* w2
    cdef const int16_t* w3
    cdef const int16_t* x0 = X
    cdef const int16_t* x1 = X + ldx
    cdef const int16_t* x2 = X + 2 * ldx
    cdef const int16_t* x3 = X + 3 * ldx
    while j + 4 <= dout:
        w0 = W + j * din
        w1 = w0 + din
        w2 = w1 + din
        w3 = w2 + din
        s00 = 0; s01 = 0; s02 = 0; s03 = 0; s10 = 0; s11 = 0; s12 = 0; s13 = 0
        s20 = 0; s21 = 0; s22 = 0; s23 = 0; s30 = 0; s31 = 0; s32 = 0; s33 = 0
        for i in range(a, b):
            w0i = w0[i]; w1i = w1[i]; w2i = w2[i]; w3i = w3[i]
            p = x0[i]; q = x1[i]; r = x2[i]; t = x3[i]
            s00 = s00 + w0i * p; s01 = s01 + w0i * q; s02 = s02 + w0i * r; s03 = s03 + w0i * t
            s10 = s10 + w1i * p; s11 = s11 + w1i * q; s12 = s12 + w1i * r; s13 = s13 + w1i * t
            s20 = s20 + w2i * p; s21 = s21 + w2i * q; s22 = s22 + w2i * r; s23 = s23 + w2i * t
            s30 = s30 + w3i * p; s31 = s31 + w3i * q; s32 = s32 + w3i * r; s33 = s33 + w3i * t
        acc[j] = s00; acc[dout + j] = s01; acc[2 * dout + j] = s02; acc[3 * dout + j] = s03
        acc[j + 1] = s10; acc[dout + j + 1] = s11
        acc[2 * dout + j + 1] = s12; acc[3 * dout + j + 1] = s13
        acc[j + 2] = s20; acc[dout + j + 2] = s21
        acc[2 * dout + j + 2] = s22; acc[3 * dout + j + 2] = s23
        acc[j + 3] = s30; acc[dout + j + 3] = s31
        acc[2 * dout + j + 3] = s32; acc[3 * dout + j + 3] = s33
        j += 4
    while j < dout:
        w0 = W + j * din
        s00 = 0; s01 = 0; s02 = 0; s03 = 0
        for i in range(a, b):
            w0i = w0[i]
            s00 = s00 + w0i * x0[i]; s01 = s01 + w0i * x1[i]
            s02 = s02 + w0i * x2[i]; s03 = s03 + w0i * x3[i]
        acc[j] = s00; acc[dout + j] = s01; acc[2 * dout + j] = s02; acc[3 * dout + j] = s03
        j += 1


cdef inline void layer_output(const LayerC* lay, const int32_t* acc, int seg_stride,
                              const LayerC* nxt_lay, float* y, float* out,
                              int16_t* nxt) noexcept nogil:
    """One layer's output from its int32 sums ``acc[s * seg_stride + j]``.

    ``y = offset + sum_s mult[s] * acc[s]``, LeakyReLU(0.2) when the layer has
    it, then float Q-values into ``out`` (last layer: ``nxt_lay`` NULL) or
    int8 activations for ``nxt_lay`` into ``nxt``. The one definition both
    forward paths use, so they stay bit-identical. Separate passes over j so
    each pass vectorises; LeakyReLU as max(y, 0.2 y) avoids a branch.
    """
    cdef int j, s
    cdef float v, inv, zp
    for j in range(lay.dout):
        y[j] = lay.offset[j]
    for s in range(lay.nseg):
        for j in range(lay.dout):
            y[j] = y[j] + lay.mult[s * lay.dout + j] * <float> acc[s * seg_stride + j]
    if lay.leaky:
        for j in range(lay.dout):
            v = y[j] * <float> 0.2
            y[j] = y[j] if y[j] > v else v
    if nxt_lay == NULL:
        for j in range(lay.dout):
            out[j] = y[j]
    else:
        inv = nxt_lay.seg_inv[0]
        zp = nxt_lay.seg_zp[0]
        for j in range(lay.dout):
            nxt[j] = to_code(y[j] * inv + zp, nxt_lay.qlo, nxt_lay.qhi)


cdef class Int8MLP:
    """An int8 MLP built from ``offload.mlp.QuantMLP.native_args()``.

    ``act_bits`` (8 or 16) is the width of the activation codes (the
    weights are int8 either way). ``forward1(x, out)`` runs one float32
    input vector into a preallocated float32 Q-vector without allocating;
    ``forward(X)`` runs a batch (rows of ``X``).
    """


    def __cinit__(self):
        self.buf_a = NULL
        self.buf_b = NULL
        self.acc = NULL
        self.ybuf = NULL

    def __init__(self, layers, int act_bits=8):
        cdef const int16_t[:, ::1] W
        cdef const int32_t[::1] st
        cdef const float[::1] inv, zp, off
        cdef const float[:, ::1] mult
        cdef int l, width = 0, accsize = 0
        layers = list(layers)
        if act_bits not in CODE_RANGE:
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        qlo, qhi = CODE_RANGE[act_bits]
        if not 1 <= len(layers) <= MAX_LAYERS:
            raise ValueError(f"need 1..{MAX_LAYERS} layers, got {len(layers)}")
        self.keep = []
        for l, (w_, st_, inv_, zp_, mult_, off_, leaky) in enumerate(layers):
            w_ = np.ascontiguousarray(w_, dtype=np.int8).astype(np.int16)
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
            if act_bits == 16 and din > MAX_IN_16:
                raise ValueError(f"layer {l}: {din} inputs; 16-bit activations allow at most "
                                 f"{MAX_IN_16} (the int32 sums could overflow)")
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
            self.L[l].qlo = qlo
            self.L[l].qhi = qhi
            width = max(width, din, dout)
            accsize = max(accsize, nseg * dout)
        self.nl = len(layers)
        self.act_bits = act_bits
        self.width = width
        self.accsize = accsize
        self.input_size = self.L[0].din
        self.output_size = self.L[self.nl - 1].dout
        self.buf_a = <int16_t*> malloc(width * sizeof(int16_t))
        self.buf_b = <int16_t*> malloc(width * sizeof(int16_t))
        self.acc = <int32_t*> malloc(accsize * sizeof(int32_t))
        self.ybuf = <float*> malloc(width * sizeof(float))
        if self.buf_a == NULL or self.buf_b == NULL or self.acc == NULL or self.ybuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.buf_a)
        free(self.buf_b)
        free(self.acc)
        free(self.ybuf)

    cdef void forward_c(self, const float* x, float* out) noexcept nogil:
        cdef int l, s, i
        cdef float inv, zp
        cdef const int16_t* cur
        cdef int16_t* nxt
        cdef int16_t* tmp
        cdef LayerC* lay = &self.L[0]
        # Quantise the input, one (scale, zero point) per segment.
        for s in range(lay.nseg):
            inv = lay.seg_inv[s]
            zp = lay.seg_zp[s]
            for i in range(lay.seg_start[s], lay.seg_start[s + 1]):
                self.buf_a[i] = to_code(x[i] * inv + zp, lay.qlo, lay.qhi)
        cur = self.buf_a
        nxt = self.buf_b
        for l in range(self.nl):
            lay = &self.L[l]
            for s in range(lay.nseg):
                dot_rows(lay.W, cur, lay.din, lay.dout, lay.seg_start[s], lay.seg_start[s + 1],
                         self.acc + s * lay.dout)
            layer_output(lay, self.acc, lay.dout, &self.L[l + 1] if l + 1 < self.nl else NULL,
                         self.ybuf, out, nxt)
            tmp = <int16_t*> cur
            cur = nxt
            nxt = tmp

    cdef void forward_tile(self, const float* X, int R, float* out, int16_t* A, int16_t* B,
                           int32_t* acc, float* y) noexcept nogil:
        """``R <= TILE`` input rows (``X``, ``input_size`` apart) -> Q rows into ``out``.

        ``A``, ``B``: TILE x width int16 scratch; ``acc``: TILE x accsize;
        ``y``: width floats. Rows ``R..TILE-1`` of the scratch are computed
        too (zeros in, ignored out): one code path for every tile.
        """
        cdef int l, s, i, r, w = self.width
        cdef float inv, zp
        cdef const int16_t* cur
        cdef int16_t* nxt
        cdef int16_t* tmp
        cdef LayerC* lay = &self.L[0]
        for r in range(TILE):
            if r < R:
                for s in range(lay.nseg):
                    inv = lay.seg_inv[s]
                    zp = lay.seg_zp[s]
                    for i in range(lay.seg_start[s], lay.seg_start[s + 1]):
                        A[r * w + i] = to_code(X[r * lay.din + i] * inv + zp, lay.qlo, lay.qhi)
            else:
                memset(A + r * w, 0, lay.din * sizeof(int16_t))
        cur = A
        nxt = B
        for l in range(self.nl):
            lay = &self.L[l]
            for s in range(lay.nseg):
                dot_tile(lay.W, cur, w, lay.din, lay.dout, lay.seg_start[s], lay.seg_start[s + 1],
                         acc + s * TILE * lay.dout)
            for r in range(TILE):
                if l + 1 == self.nl and r >= R:
                    break
                layer_output(lay, acc + r * lay.dout, TILE * lay.dout,
                             &self.L[l + 1] if l + 1 < self.nl else NULL, y,
                             out + r * lay.dout, nxt + r * w)
            tmp = <int16_t*> cur
            cur = nxt
            nxt = tmp

    cdef int forward_rows(self, const float* X, Py_ssize_t rows, float* out) noexcept nogil:
        """``rows`` inputs -> Q rows, TILE at a time, in scratch of its own (so threads
        may share the object). Returns -1 when the scratch cannot be allocated."""
        cdef Py_ssize_t k
        cdef int R
        cdef int16_t* A = <int16_t*> malloc(2 * TILE * self.width * sizeof(int16_t))
        cdef int32_t* acc = <int32_t*> malloc(TILE * self.accsize * sizeof(int32_t))
        cdef float* y = <float*> malloc(self.width * sizeof(float))
        if A == NULL or acc == NULL or y == NULL:
            free(A); free(acc); free(y)
            return -1
        k = 0
        while k < rows:
            R = <int> (rows - k if rows - k < TILE else TILE)
            self.forward_tile(X + k * self.input_size, R, out + k * self.output_size,
                              A, A + TILE * self.width, acc, y)
            k += TILE
        free(A); free(acc); free(y)
        return 0

    cpdef void forward1(self, const float[::1] x, float[::1] out) except *:
        """One input vector (float32, ``input_size``) -> Q-values into ``out``."""
        if x.shape[0] != self.input_size or out.shape[0] != self.output_size:
            raise ValueError(
                f"forward1 expects x of {self.input_size} and out of {self.output_size} floats, "
                f"got {x.shape[0]} and {out.shape[0]}")
        self.forward_c(&x[0], &out[0])

    def forward(self, X, int threads=1):
        """Batch forward: ``X`` (B, input_size) float32 -> (B, output_size) float32.

        Bit-identical to ``forward1`` row by row. ``threads > 1`` splits the
        rows over that many threads (the work runs without the GIL); each
        thread gets at least a few thousand rows, so small batches stay on one.
        """
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.input_size:
            raise ValueError(f"forward expects (B, {self.input_size}) inputs, got {X.shape}")
        B = X.shape[0]
        out = np.empty((B, self.output_size), dtype=np.float32)
        # Thread start-up costs ~0.1 ms; below ~2,000 rows a thread would not earn it.
        nt = max(1, min(int(threads), B // 2048))
        if nt == 1:
            self._rows(X, out, 0, B)
        elif B:
            cuts = [(B * t // nt) // TILE * TILE for t in range(nt)] + [B]
            with ThreadPoolExecutor(nt) as pool:
                for f in [pool.submit(self._rows, X, out, a, b) for a, b in zip(cuts, cuts[1:])]:
                    f.result()
        return out

    def forward_rowwise(self, X):
        """Batch forward one input at a time through ``forward1``'s path (the
        batched ``forward`` before tiling: its reference and benchmark rival)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.input_size:
            raise ValueError(f"forward_rowwise expects (B, {self.input_size}) inputs, got {X.shape}")
        out = np.empty((X.shape[0], self.output_size), dtype=np.float32)
        cdef const float[:, ::1] xv = X
        cdef float[:, ::1] ov = out
        cdef Py_ssize_t k
        with nogil:
            for k in range(xv.shape[0]):
                self.forward_c(&xv[k, 0], &ov[k, 0])
        return out

    def _rows(self, const float[:, ::1] xv, float[:, ::1] ov, Py_ssize_t a, Py_ssize_t b):
        cdef int rc = 0
        if b > a:
            with nogil:
                rc = self.forward_rows(&xv[a, 0], b - a, &ov[a, 0])
        if rc:
            raise MemoryError("no memory for the int8 forward's scratch buffers")


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
