# cython: language_level=3
"""Tight loops for the policies: the oracle DP, threshold-policy simulation, upper hull.

Units: token counts ``n`` are *scaled tokens* (``N`` refilled per time slot, ``P``
per offload, ``M`` at most, SPEC section 1); inter-arrival times are *slots*
(``>= 1``), ``interarrival[k]`` being the slots between image ``k`` and ``k+1``.

Oracle DP (``oracle_dp``)
-------------------------
``W_k(n)`` is the best total value of images ``k..L-1`` when the bucket holds
``n`` before the decision on image ``k`` (``N <= n <= M``; ``n = M`` at ``k = 0``)::

    W_L(n) = 0
    W_k(n) = max(W_{k+1}(min(M, n + N*I_k)),
                 v_k + W_{k+1}(min(M, n - P + N*I_k))   if n >= P)

Storing every decision would take ``L x (M-P+1)`` entries (hundreds of MB at
``L = 10^7``), so the backward pass keeps only a checkpoint of ``W`` at the end
of every block of ``B ~ sqrt(L)`` images; the forward pass then recomputes one
block at a time backwards from its checkpoint, keeping that block's rows of
``W``, and walks through it, deciding each image by the same comparison the
backward step made. Cost: two backward passes, memory about
``2 sqrt(L) x (M-N+1)`` doubles. Each step is a few contiguous shifted loops
over the token states that the C compiler vectorises.
Ties are broken towards *not* offloading (an image is sent only when that is
strictly better), so the mask never spends a token for nothing; in particular
images with ``v <= 0`` are never sent, and their steps (a pure shift of ``W``)
are merged, so the cost is proportional to the number of positive values.
"""

from libc.string cimport memcpy, memset
from libc.stdint cimport int64_t, int32_t, uint8_t

import numpy as np


def _check_bucket(long long N, long long P, long long M):
    if N <= 0 or N >= P or M < P:
        raise ValueError(f"invalid bucket (N={N}, P={P}, M={M}): need 0 < N < P <= M")


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _imax(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


cdef inline void _step_keep(const double* Wn, double* Wc, Py_ssize_t s,
                            Py_ssize_t N, Py_ssize_t M) noexcept nogil:
    """``Wc[n] = Wn[min(M, n+s)]`` for ``n = N..M`` (arrays indexed by ``n - N``)."""
    cdef Py_ssize_t n, c = _imax(N, _imin(M + 1, M - s + 1))
    cdef const double* src = Wn + s
    cdef double top = Wn[M - N]
    for n in range(0, c - N):          # n + s <= M: a shifted copy
        Wc[n] = src[n]
    for n in range(c - N, M - N + 1):  # clamped at M
        Wc[n] = top


cdef inline void _step_send(const double* Wn, double* Wc, double v, Py_ssize_t s,
                            Py_ssize_t N, Py_ssize_t P, Py_ssize_t M) noexcept nogil:
    """``Wc[n] = max(Wc[n], v + Wn[min(M, n-P+s)])`` for ``n = P..M``."""
    cdef Py_ssize_t n, c = _imax(P, _imin(M + 1, M + P - s + 1))
    cdef Py_ssize_t off = s - P
    cdef double top = v + Wn[M - N]
    cdef double x
    for n in range(P - N, c - N):
        x = v + Wn[n + off]
        Wc[n] = x if x > Wc[n] else Wc[n]
    for n in range(c - N, M - N + 1):
        Wc[n] = top if top > Wc[n] else Wc[n]


cdef inline Py_ssize_t _shift(int64_t i, Py_ssize_t N, Py_ssize_t M) noexcept nogil:
    """Refill ``N*i`` scaled tokens, capped at ``M`` (enough to fill any bucket)."""
    if i > M:
        i = M
    return _imin(M, N * <Py_ssize_t> i)


cdef inline Py_ssize_t _merged_shift(double vk, int64_t iak, Py_ssize_t* t, Py_ssize_t N,
                                     Py_ssize_t M) noexcept nogil:
    """Walking backwards: the refill to apply at image ``k``, or -1 to skip it.

    An image with ``v <= 0`` is skipped and its refill added to the pending
    ``*t``; a positive image applies its own refill plus the pending one.
    """
    cdef Py_ssize_t s = _shift(iak, N, M)
    if not vk > 0:
        t[0] = _imin(M, t[0] + s)
        return -1
    s = _imin(M, s + t[0])
    t[0] = 0
    return s


cdef void _block_values(const double* v, const int64_t* ia, Py_ssize_t lo, Py_ssize_t hi,
                        double** Wn, double** Wc, Py_ssize_t N, Py_ssize_t P,
                        Py_ssize_t M) noexcept nogil:
    """Turn ``*Wn = W_hi`` into ``*Wn = W_lo`` (``*Wc`` is scratch; the two swap).

    An image with ``v <= 0`` is never offloaded (``W`` is nondecreasing in
    ``n``, in floating point too, so sending it cannot be strictly better): its
    step is a pure shift of ``W`` by the refill, and runs of such images are
    merged into one shift, applied with the next positive image's step.
    """
    cdef Py_ssize_t k, s, t = 0
    cdef double* tmp
    for k in range(hi - 1, lo - 1, -1):
        s = _merged_shift(v[k], ia[k], &t, N, M)
        if s < 0:
            continue
        _step_keep(Wn[0], Wc[0], s, N, M)
        _step_send(Wn[0], Wc[0], v[k], s, N, P, M)
        tmp = Wn[0]; Wn[0] = Wc[0]; Wc[0] = tmp
    if t > 0:
        _step_keep(Wn[0], Wc[0], t, N, M)
        tmp = Wn[0]; Wn[0] = Wc[0]; Wc[0] = tmp


cdef void _block_rows(const double* v, const int64_t* ia, Py_ssize_t lo, Py_ssize_t hi,
                      double* R, int32_t* src, Py_ssize_t* seff, Py_ssize_t B,
                      Py_ssize_t N, Py_ssize_t P, Py_ssize_t M) noexcept nogil:
    """Recompute a block keeping what the forward walk needs.

    ``R`` has ``B+1`` rows of ``M-N+1`` doubles, row ``B`` holding ``W_hi``. For
    each positive image ``k``, row ``k-lo`` receives ``W_k``; ``src[k-lo]`` is
    the row its step read and ``seff[k-lo]`` the refill it applied (its own plus
    that of the skipped images after it).
    """
    cdef Py_ssize_t k, s, t = 0, cur = B, S0 = M - N + 1
    for k in range(hi - 1, lo - 1, -1):
        s = _merged_shift(v[k], ia[k], &t, N, M)
        if s < 0:
            continue
        _step_keep(R + cur * S0, R + (k - lo) * S0, s, N, M)
        _step_send(R + cur * S0, R + (k - lo) * S0, v[k], s, N, P, M)
        src[k - lo] = <int32_t> cur
        seff[k - lo] = s
        cur = k - lo


def oracle_dp(values, interarrival, long long N, long long P, long long M, block=None):
    """Exact best offload set for one sequence under the bucket (starting full).

    Parameters
    ----------
    values : float64 array (L,)
        Value of offloading each image (true reward, or metric for the
        metric-only oracle).
    interarrival : int64 array (L,)
        Slots (``>= 1``) from image ``k`` to image ``k+1``; the last is unused
        but must be valid.
    N, P, M : int
        Bucket in scaled tokens (``0 < N < P <= M``).
    block : int, optional
        Checkpoint spacing (images); about ``sqrt(L)`` by default.

    Returns
    -------
    (best, mask) : (float, uint8 array (L,))
        The maximum total value and one offload set achieving it (1 = offload).
    """
    _check_bucket(N, P, M)
    v_arr = np.ascontiguousarray(values, dtype=np.float64)
    i_arr = np.ascontiguousarray(interarrival, dtype=np.int64)
    if v_arr.ndim != 1 or i_arr.ndim != 1 or v_arr.shape[0] != i_arr.shape[0]:
        raise ValueError(f"values {v_arr.shape} and interarrival {i_arr.shape} must be "
                         f"1-D of the same length")
    cdef Py_ssize_t L = v_arr.shape[0]
    mask = np.zeros(L, dtype=np.uint8)
    if L == 0:
        return 0.0, mask
    if i_arr.min() < 1:
        raise ValueError(f"interarrival times must be >= 1 slot, got {i_arr.min()}")
    cdef Py_ssize_t B
    if block is None:
        B = min(1 << 16, max(256, int(np.sqrt(L))))
    else:
        B = int(block)
        if B < 1:
            raise ValueError(f"block={block} must be >= 1")
    B = min(B, L)
    cdef Py_ssize_t nb = (L + B - 1) // B
    cdef Py_ssize_t S0 = M - N + 1
    ckpt_arr = np.empty((nb, S0), dtype=np.float64)
    wbuf = np.zeros((2, S0), dtype=np.float64)
    rows_arr = np.empty((B + 1, S0), dtype=np.float64)
    src_arr = np.empty(B, dtype=np.int32)
    seff_arr = np.empty(B, dtype=np.intp)
    cdef const double[::1] v = v_arr
    cdef const int64_t[::1] ia = i_arr
    cdef double[:, ::1] ck = ckpt_arr
    cdef double[:, ::1] w = wbuf
    cdef double[:, ::1] R = rows_arr
    cdef int32_t[::1] src = src_arr
    cdef Py_ssize_t[::1] seff = seff_arr
    cdef uint8_t[::1] mk = mask
    cdef Py_ssize_t k, b, lo, hi, n, s
    cdef double* Wn = &w[0, 0]
    cdef double* Wc = &w[1, 0]
    cdef const double* Ws
    cdef bint a
    cdef double best
    with nogil:
        # Backward pass: values only, checkpoint W at each block end.
        for b in range(nb - 1, -1, -1):
            lo = b * B
            hi = _imin(lo + B, L)
            memcpy(&ck[b, 0], Wn, S0 * sizeof(double))
            _block_values(&v[0], &ia[0], lo, hi, &Wn, &Wc, N, P, M)
        best = Wn[M - N]
        # Forward pass: recompute each block's rows, then follow the decisions,
        # comparing exactly the two numbers the backward step compared.
        n = M
        for b in range(nb):
            lo = b * B
            hi = _imin(lo + B, L)
            memcpy(&R[B, 0], &ck[b, 0], S0 * sizeof(double))
            _block_rows(&v[0], &ia[0], lo, hi, &R[0, 0], &src[0], &seff[0], B, N, P, M)
            for k in range(lo, hi):
                a = False
                if n >= P and v[k] > 0:
                    Ws = &R[src[k - lo], 0]
                    s = seff[k - lo]
                    a = v[k] + Ws[_imin(M, n - P + s) - N] > Ws[_imin(M, n + s) - N]
                mk[k] = a
                n = _imin(M, n - P * a + _shift(ia[k], N, M))
    return float(best), mask


def upper_hull(x, y):
    """Indices of the vertices of the upper convex hull of points sorted by ``x``.

    ``x`` must be strictly increasing. Collinear middle points are dropped, so
    consecutive edge slopes strictly decrease. Float64 in, int64 indices out.
    """
    xa = np.ascontiguousarray(x, dtype=np.float64)
    ya = np.ascontiguousarray(y, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != ya.shape:
        raise ValueError(f"x {xa.shape} and y {ya.shape} must be 1-D of the same length")
    cdef Py_ssize_t K = xa.shape[0]
    out = np.empty(K, dtype=np.int64)
    cdef const double[::1] px = xa
    cdef const double[::1] py = ya
    cdef int64_t[::1] h = out
    cdef Py_ssize_t j, t = 0
    cdef int64_t a, b
    with nogil:
        for j in range(K):
            while t >= 2:
                a = h[t - 2]
                b = h[t - 1]
                # drop b unless it lies strictly above the chord a -> j
                if (py[b] - py[a]) * (px[j] - px[a]) > (py[j] - py[a]) * (px[b] - px[a]):
                    break
                t -= 1
            h[t] = j
            t += 1
    return out[:t].copy()


def simulate_thresholds(metric, reward, interarrival, theta, long long N, long long P,
                        long long M, bint trace=False):
    """Run a threshold policy on ``S`` independent streams, each starting with a full bucket.

    At image ``k`` with ``n`` scaled tokens: offload iff ``n >= P`` and
    ``metric[k] >= theta[n-P]``; then ``n = min(M, n - P*a + N*interarrival[k])``.

    Parameters
    ----------
    metric : float32 (S, L)
        Standardised metrics per stream.
    reward : float32 (S, L)
        True reward of offloading each image.
    interarrival : int64 (S, L)
        Slots (``>= 1``) from each image to the next.
    theta : float32 (M-P+1,)
        ``theta[n-P]`` for ``n = P..M``.
    N, P, M : int
        Bucket (scaled tokens).
    trace : bool
        Also return per-image decisions and token states.

    Returns
    -------
    total_reward : float64 (S,)
    n_offloaded : int64 (S,)
    token_hist : int64 (M+1,)
        How many decisions (over all streams) were taken at each token count.
    decisions : uint8 (S, L), only with ``trace``
    tokens : int32 (S, L), only with ``trace``
        Token count (scaled tokens) before each decision.
    """
    _check_bucket(N, P, M)
    m_arr = np.ascontiguousarray(metric, dtype=np.float32)
    r_arr = np.ascontiguousarray(reward, dtype=np.float32)
    i_arr = np.ascontiguousarray(interarrival, dtype=np.int64)
    t_arr = np.ascontiguousarray(theta, dtype=np.float32)
    if m_arr.ndim != 2 or r_arr.shape != m_arr.shape or i_arr.shape != m_arr.shape:
        raise ValueError(f"metric {m_arr.shape}, reward {r_arr.shape} and interarrival "
                         f"{i_arr.shape} must be 2-D (streams, images) of the same shape")
    if t_arr.shape != (M - P + 1,):
        raise ValueError(f"theta has shape {t_arr.shape}, bucket (N={N}, P={P}, M={M}) "
                         f"needs ({M - P + 1},) thresholds for n = P..M")
    cdef Py_ssize_t S = m_arr.shape[0], L = m_arr.shape[1]
    total = np.zeros(S, dtype=np.float64)
    count = np.zeros(S, dtype=np.int64)
    hist = np.zeros(M + 1, dtype=np.int64)
    tshape = (int(S), int(L)) if trace else (1, 1)
    dec_arr = np.zeros(tshape, dtype=np.uint8)
    tok_arr = np.zeros(tshape, dtype=np.int32)
    cdef const float[:, ::1] m = m_arr
    cdef const float[:, ::1] r = r_arr
    cdef const int64_t[:, ::1] ia = i_arr
    cdef const float[::1] th = t_arr
    cdef double[::1] tot = total
    cdef int64_t[::1] cnt = count
    cdef int64_t[::1] hs = hist
    cdef uint8_t[:, ::1] dv = dec_arr
    cdef int32_t[:, ::1] tv = tok_arr
    cdef Py_ssize_t st, k, n, a, nsent
    cdef int64_t i
    cdef double acc
    cdef bint bad = False
    with nogil:
        for st in range(S):
            n = M
            acc = 0.0
            nsent = 0
            for k in range(L):
                i = ia[st, k]
                if i < 1:
                    bad = True
                    break
                a = 0
                if n >= P:
                    a = m[st, k] >= th[n - P]
                hs[n] += 1
                if trace:
                    dv[st, k] = <uint8_t> a
                    tv[st, k] = <int32_t> n
                if a:
                    acc += r[st, k]
                    nsent += 1
                n = _imin(M, n - P * a + _shift(i, N, M))
            tot[st] = acc
            cnt[st] = nsent
            if bad:
                break
    if bad:
        raise ValueError(f"interarrival times must be >= 1 slot, got {i_arr.min()}")
    if trace:
        return total, count, hist, dec_arr, tok_arr
    return total, count, hist


def walk_block(send, reward, interarrival, Py_ssize_t k0, n, total, count, hist,
               long long N, long long P, long long M, dec=None, tok=None):
    """Walk the token states of ``S`` streams through positions ``k0 .. k0+K-1``.

    The DQN simulator computes, for a block of ``K`` positions, whether the
    policy would offload at each token state; this walks the states through
    the block (SPEC section 1), updating the running sums in place.

    Parameters
    ----------
    send : bool or uint8 (S, K, M-P+1)
        ``send[s, j, n-P]``: offload image ``k0+j`` of stream ``s`` with ``n``
        scaled tokens (taken only when ``n >= P``).
    reward : float32 (S, L); interarrival : int64 (S, L), slots (>= 1)
    n : int64 (S,)
        Token state (scaled tokens) before image ``k0``; left at the state after the block.
    total : float64 (S,); count : int64 (S,); hist : int64 (M+1,)
        Reward sent, images offloaded, decisions per token state: added to.
    dec : uint8 (S, L); tok : int32 (S, L), optional
        When given, decisions and token states of the block are written there.
    """
    _check_bucket(N, P, M)
    sd = np.ascontiguousarray(send).view(np.uint8) if np.asarray(send).dtype == np.bool_ \
        else np.ascontiguousarray(send, dtype=np.uint8)
    cdef const uint8_t[:, :, ::1] sv = sd
    cdef const float[:, ::1] r = reward
    cdef const int64_t[:, ::1] ia = interarrival
    cdef int64_t[::1] nv = n
    cdef double[::1] tot = total
    cdef int64_t[::1] cnt = count
    cdef int64_t[::1] hs = hist
    cdef Py_ssize_t S = sv.shape[0], K = sv.shape[1]
    if (sv.shape[2] != M - P + 1 or r.shape[0] != S or ia.shape[0] != S or nv.shape[0] != S
            or tot.shape[0] != S or cnt.shape[0] != S or hs.shape[0] != M + 1
            or k0 < 0 or k0 + K > r.shape[1] or r.shape[1] != ia.shape[1]):
        raise ValueError("walk_block: inconsistent shapes")
    cdef bint trace = dec is not None
    cdef uint8_t[:, ::1] dv = dec if trace else np.zeros((1, 1), np.uint8)
    cdef int32_t[:, ::1] tv = tok if trace else np.zeros((1, 1), np.int32)
    cdef Py_ssize_t s, j, k
    cdef int64_t nn
    cdef bint a
    with nogil:
        for s in range(S):
            nn = nv[s]
            for j in range(K):
                k = k0 + j
                a = nn >= P and sv[s, j, nn - P] != 0
                hs[nn] += 1
                if trace:
                    dv[s, k] = a
                    tv[s, k] = <int32_t> nn
                if a:
                    tot[s] += r[s, k]
                    cnt[s] += 1
                    nn -= P
                nn += N * ia[s, k]
                if nn > M:
                    nn = M
            nv[s] = nn


def window_block(const float[:, ::1] rm, ri, Py_ssize_t H, Py_ssize_t start, Py_ssize_t stop):
    """DQN inputs of positions ``start..stop-1`` of every stream, from time-reversed histories.

    ``rm`` (S, L+H-1): metrics reversed with ``H-1`` leading zeros, so the
    window of position ``k`` is ``rm[s, L-1-k : L-1-k+H]``; ``ri`` (S, L+H)
    likewise for inter-arrival times, or None. Returns float32
    ``(S, stop-start, H or 2H)`` (``offload.simulate.dqn_inputs``), built with
    two ``memcpy`` per row instead of numpy's strided copy.
    """
    cdef Py_ssize_t S = rm.shape[0], Lm = rm.shape[1], s, k, w = 2 * H if ri is not None else H
    cdef const float[:, ::1] iv = ri if ri is not None else np.zeros((1, 1), np.float32)
    if H < 1 or start < 0 or stop < start or Lm - H + 1 < stop:
        raise ValueError(f"window_block: positions {start}..{stop} with H={H} outside {Lm - H + 1}")
    if ri is not None and (iv.shape[0] != S or iv.shape[1] != Lm + 1):
        raise ValueError("window_block: inter-arrival history must be (S, L+H)")
    out = np.empty((S, stop - start, w), np.float32)
    cdef float[:, :, ::1] o = out
    if S == 0 or stop == start:
        return out
    with nogil:
        for s in range(S):
            for k in range(start, stop):
                memcpy(&o[s, k - start, 0], &rm[s, Lm - H - k], H * sizeof(float))
                if w > H:
                    memcpy(&o[s, k - start, H], &iv[s, Lm + 1 - H - k], H * sizeof(float))
    return out
