# cython: language_level=3
"""The multi-camera loop: ``K`` cameras, each with its own bucket, behind one switch bucket.

Units: token counts are *scaled tokens* of each bucket (a camera's ``N_i, P_i,
M_i``; the switch's ``Ng, Pg, Mg``); time is in *slots*; ``interarrival[i, s, k]``
is the slots from camera ``i``'s image ``k`` to its image ``k+1`` on stream ``s``.

Per stream, every bucket starts full. In each slot ``t`` the switch gives the
cameras one turn each, in ``order`` (``0..K-1`` unless an order per stream and
slot is given). On its turn, a camera whose next image arrives at ``t``
decides with its own bucket (kind 0: ``metric >= theta[i, n-P_i]``; kind 1:
``table[...]``; kind 2, *pooled*: with the switch's tokens and ``theta_g``,
its own bucket ignored) and pays its own token; a send then needs ``Pg``
switch tokens, else it is refused (the camera's token is spent, nothing is
earned). After every turn the switch refills ``Ng``, capped at ``Mg``. Since a
camera's decision never depends on the switch's state in the same slot, this
turn-by-turn walk is the published "all cameras decide, then the switch takes
their sends in order" (``mcsimulate``).

``feedback`` after a refusal: 0 nothing; 1 *Retry-After*: the camera sends
nothing before slot ``t + ceil((Pg - g') / (K Ng))`` (``g'`` the switch's
tokens after the turn, ``K Ng`` its refill per slot), the wait a 429 announces;
2 *refund*: the camera puts its token back (its own bucket acts as if it had
not sent).

The numpy twin is ``offload.fleet.fleet_walk_numpy``; tests compare the two.
"""

from libc.stdint cimport int64_t, uint8_t

import numpy as np


cdef inline int64_t _refill(int64_t n, int64_t i, int64_t N, int64_t M) noexcept nogil:
    """``min(M, n + N*i)``, with ``i`` capped at ``M`` first (enough to fill any bucket)."""
    if i > M:
        i = M
    n += N * i
    return M if n > M else n


def _check(long long N, long long P, long long M, what):
    if N <= 0 or N >= P or M < P:
        raise ValueError(f"invalid {what} bucket (N={N}, P={P}, M={M}): need 0 < N < P <= M")


def fleet_walk(metric, reward, interarrival, kind, theta, table, table_index, buckets,
               long long Ng, long long Pg, long long Mg, theta_g, long long T, order=None,
               int feedback=0):
    """Walk ``S`` streams of a ``K``-camera fleet through ``T`` slots.

    Parameters
    ----------
    metric, reward : float32 (K, S, L); interarrival : int64 (K, S, L), slots >= 1
    kind : uint8 (K,)
        0 thresholds, 1 send table, 2 pooled (decides with the switch's tokens).
    theta : float32 (K, W)
        Camera ``i``'s thresholds ``theta[i, n - P_i]``, ``n = P_i..M_i`` (W >= M_i-P_i+1).
    table : uint8 (Kt, S, L, W)
        Send tables (DQN, ceiling): camera ``i`` of kind 1 sends image ``k`` of
        stream ``s`` at ``n`` tokens iff ``table[table_index[i], s, k, n - P_i]``.
    buckets : int64 (K, 3)
        ``N_i, P_i, M_i`` per camera (scaled tokens of each camera's own bucket).
    Ng, Pg, Mg : int
        The switch bucket; it refills ``Ng`` per camera turn (``K Ng`` per slot).
    theta_g : float32 (Mg-Pg+1,)
        Thresholds on the switch's tokens for pooled cameras (any array otherwise).
    T : int
        Slots to walk; every stream of every camera must hold its images up to ``T``.
    order : uint8 (S, T, K), optional
        The cameras' turn order per stream and slot (a permutation of ``0..K-1``).
    feedback : int
        0 none, 1 Retry-After, 2 refund (see the module).

    Returns
    -------
    total : float64 (S, K)  reward earned (sends the switch admitted)
    sent : int64 (S, K)     sends the camera made
    refused : int64 (S, K)  sends the switch refused
    images : int64 (S, K)   images that arrived within the ``T`` slots
    """
    _check(Ng, Pg, Mg, "switch")
    cdef const float[:, :, ::1] m = metric
    cdef const float[:, :, ::1] r = reward
    cdef const int64_t[:, :, ::1] ia = interarrival
    cdef const uint8_t[::1] kd = kind
    cdef const float[:, ::1] th = theta
    cdef const uint8_t[:, :, :, ::1] tb = table
    cdef const int64_t[::1] ti = table_index
    cdef const int64_t[:, ::1] bk = buckets
    cdef const float[::1] thg = theta_g
    cdef Py_ssize_t K = m.shape[0], S = m.shape[1], L = m.shape[2]
    if (r.shape[0] != K or ia.shape[0] != K or r.shape[1] != S or ia.shape[1] != S
            or r.shape[2] != L or ia.shape[2] != L or kd.shape[0] != K or th.shape[0] != K
            or ti.shape[0] != K or bk.shape[0] != K or bk.shape[1] != 3):
        raise ValueError("fleet_walk: inconsistent shapes")
    cdef Py_ssize_t i
    for i in range(K):
        _check(bk[i, 0], bk[i, 1], bk[i, 2], f"camera {i}")
        if kd[i] > 2:
            raise ValueError(f"camera {i}: kind {kd[i]} (0 thresholds, 1 table, 2 pooled)")
        if kd[i] == 0 and th.shape[1] < bk[i, 2] - bk[i, 1] + 1:
            raise ValueError(f"camera {i}: theta holds {th.shape[1]} thresholds, "
                             f"its bucket needs {bk[i, 2] - bk[i, 1] + 1}")
        if kd[i] == 1 and (ti[i] < 0 or ti[i] >= tb.shape[0] or tb.shape[1] != S
                           or tb.shape[2] != L or tb.shape[3] < bk[i, 2] - bk[i, 1] + 1):
            raise ValueError(f"camera {i}: send table does not fit the streams and bucket")
        if kd[i] == 2 and thg.shape[0] != Mg - Pg + 1:
            raise ValueError(f"pooled camera {i}: theta_g needs {Mg - Pg + 1} thresholds")
    if feedback < 0 or feedback > 2:
        raise ValueError(f"feedback={feedback} (0 none, 1 Retry-After, 2 refund)")
    cdef bint shuffled = order is not None
    cdef const uint8_t[:, :, ::1] od = order if shuffled else np.zeros((1, 1, 1), np.uint8)
    if shuffled and (od.shape[0] != S or od.shape[1] < T or od.shape[2] != K):
        raise ValueError(f"order must be (S, T, K) = ({S}, {T}, {K}), got {tuple(od.shape)}")
    if np.asarray(interarrival).size and np.asarray(interarrival).min() < 1:
        raise ValueError("interarrival times must be >= 1 slot")
    total = np.zeros((S, K), np.float64)
    sent = np.zeros((S, K), np.int64)
    refused = np.zeros((S, K), np.int64)
    images = np.zeros((S, K), np.int64)
    state = np.zeros((4, K), np.int64)  # per camera: tokens, next arrival, image index, resume
    _walk(m, r, ia, kd, th, tb, ti, bk, Ng, Pg, Mg, thg, T, od, shuffled, feedback,
          total, sent, refused, images, state)
    return total, sent, refused, images


cdef void _walk(const float[:, :, ::1] m, const float[:, :, ::1] r, const int64_t[:, :, ::1] ia,
                const uint8_t[::1] kd, const float[:, ::1] th, const uint8_t[:, :, :, ::1] tb,
                const int64_t[::1] ti, const int64_t[:, ::1] bk, int64_t Ng, int64_t Pg,
                int64_t Mg, const float[::1] thg, int64_t T, const uint8_t[:, :, ::1] od,
                bint shuffled, int feedback, double[:, ::1] total, int64_t[:, ::1] sent,
                int64_t[:, ::1] refused, int64_t[:, ::1] images, int64_t[:, ::1] st) noexcept nogil:
    cdef Py_ssize_t K = m.shape[0], S = m.shape[1], L = m.shape[2]
    cdef Py_ssize_t W = th.shape[1], TW = tb.shape[3]
    cdef Py_ssize_t s, i, j, k, off
    cdef int64_t t, g, n, P, need, per_slot = K * Ng
    cdef int64_t* tok = &st[0, 0]
    cdef int64_t* nxt = &st[1, 0]
    cdef int64_t* kix = &st[2, 0]
    cdef int64_t* res = &st[3, 0]
    cdef const float* mp = &m[0, 0, 0]
    cdef const float* rp = &r[0, 0, 0]
    cdef const int64_t* ip = &ia[0, 0, 0]
    cdef const float* thp = &th[0, 0]
    cdef const float* thgp = &thg[0]
    cdef const uint8_t* tbp = &tb[0, 0, 0, 0]
    cdef const uint8_t* odp
    cdef bint a
    for s in range(S):
        g = Mg
        for i in range(K):
            tok[i] = bk[i, 2]
            nxt[i] = 0
            kix[i] = 0
            res[i] = 0
        for t in range(T):
            if shuffled:
                odp = &od[s, t, 0]
            for j in range(K):
                i = odp[j] if shuffled else j
                if nxt[i] == t and kix[i] < L:
                    k = kix[i]
                    off = (i * S + s) * L + k
                    a = False
                    if kd[i] == 2:
                        if g >= Pg:
                            a = mp[off] >= thgp[g - Pg]
                    else:
                        n = tok[i]
                        P = bk[i, 1]
                        if n >= P and t >= res[i]:
                            if kd[i] == 0:
                                a = mp[off] >= thp[i * W + n - P]
                            else:
                                a = tbp[(ti[i] * S + s) * L * TW + k * TW + n - P] != 0
                        if a:
                            n -= P
                        tok[i] = _refill(n, ip[off], bk[i, 0], bk[i, 2])
                    if a:
                        sent[s, i] += 1
                        if g >= Pg:
                            g -= Pg
                            total[s, i] += rp[off]
                        else:
                            refused[s, i] += 1
                            if feedback == 2:
                                n = tok[i] + bk[i, 1]
                                tok[i] = n if n < bk[i, 2] else bk[i, 2]
                            elif feedback == 1:
                                need = Pg - (g + Ng if g + Ng < Mg else Mg)
                                if need > 0:
                                    res[i] = t + (need + per_slot - 1) // per_slot
                    images[s, i] += 1
                    nxt[i] = t + ip[off]
                    kix[i] = k + 1
                g = g + Ng if g + Ng < Mg else Mg
