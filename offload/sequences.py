"""Input sequences (SPEC section 4): which image arrives, and when.

A test or training run is a set of ``n_seq`` sequences of ``length`` arrivals.
Image sequences hold dataset indices (int64, ``0..n_images-1``) into a profile
sorted by metric, so an index range is a metric range. Arrival sequences hold
inter-arrival times: entry ``[j, k]`` is the number of time slots from
arrival ``k`` to arrival ``k + 1`` (int64, ``>= 1``).

Every generator is vectorised (no Python loop per element) and repeatable:
the same arguments and ``seed`` give the same array. ``seed`` is anything
``numpy.random.default_rng`` accepts (normally an int).

Every generator either returns within a time proportional to its output or
raises ``ValueError`` at once, before drawing anything: ``iid``, ``periodic``
and ``location_reset`` do a fixed amount of work per value (``location_reset``
needs about 40 bytes per value at its peak); ``markov_arrivals`` refuses
parameters whose mean inter-arrival time is above ``MAX_MEAN_INTERARRIVAL``
and otherwise works per value in proportion to the sojourns it must simulate
(see there).
"""

import math
import numbers

import numpy as np

__all__ = [
    "iid",
    "location_reset",
    "periodic",
    "markov_arrivals",
    "markov_stationary",
    "markov_arrivals_per_sojourn",
    "markov_mean_interarrival",
    "markov_check",
    "MAX_MEAN_INTERARRIVAL",
    # the sampler's memory plan and its reference twin, for tests
    "BLOCK_ENTRIES",
    "plan_blocks",
    "sojourn_table",
]

# markov_arrivals refuses parameters whose long-run mean inter-arrival time
# (slots) is above this: its work per value grows with that mean (see there).
MAX_MEAN_INTERARRIVAL = 1_000
# Intervals (slots) beyond this are refused: slot counts are int64.
_MAX_INTERVAL = 2**62
# Sojourns drawn at once by markov_arrivals (rows x columns of one block):
# its memory bound; public so a test can shrink it to force chunking.
BLOCK_ENTRIES = 1 << 20


# --------------------------------------------------------------------------- validation


def _count(value, name, minimum, maximum=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _fraction(value, name, lo_open=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = (0.0 < v <= 1.0) if lo_open else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1]" if lo_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def _shape(n_images, length, n_seq):
    """Checked ``(n_images, length, n_seq)`` of an image-choice draw."""
    return _count(n_images, "n_images", 1), _count(length, "length", 0), _count(n_seq, "n_seq", 0)


def _rng(seed):
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"seed must be an int (or a numpy SeedSequence/Generator), got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad seed {seed!r}: {exc}") from None


# --------------------------------------------------------------------------- image choice


def iid(n_images, length, n_seq, seed):
    """I.i.d. image choice: every index uniform over the dataset.

    Parameters
    ----------
    n_images : int
        Dataset size (images), ``>= 1``.
    length : int
        Arrivals per sequence, ``>= 0``.
    n_seq : int
        Number of sequences, ``>= 0``.
    seed : int
        Random seed.

    Returns
    -------
    ndarray of int64, shape (n_seq, length)
        Image indices in ``0..n_images-1``.
    """
    n_images, length, n_seq = _shape(n_images, length, n_seq)
    return _rng(seed).integers(0, n_images, size=(n_seq, length), dtype=np.int64)


def location_reset(n_images, length, n_seq, spread, rprob, seed, return_locations=False):
    """Location-reset image choice: runs of images from a narrow index (metric) range.

    Each sequence has a location, uniform over ``0..n_images-1`` at the first
    arrival; at each later arrival, with probability ``rprob``, it jumps to a
    new uniform location. The image index is ``(location + d) mod n_images``
    with ``d`` uniform over ``0..floor(spread * n_images)`` (inclusive), drawn
    afresh for every arrival. Runs between jumps are geometric with mean
    ``1 / rprob`` arrivals (the first run is cut by the sequence start).

    Vectorised: the location at arrival ``k`` is the draw made at the last
    jump at or before ``k``, found with a running maximum over jump positions.

    Parameters
    ----------
    n_images : int
        Dataset size (images), ``>= 1``.
    length, n_seq : int
        Arrivals per sequence and number of sequences, ``>= 0``.
    spread : float
        Width of the sampling window as a fraction of the dataset, in [0, 1]
        (0: the same image for a whole run).
    rprob : float
        Probability of a jump at each arrival after the first, in [0, 1]
        (0: one location per sequence).
    seed : int
        Random seed.
    return_locations : bool
        Also return each arrival's location (before the offset ``d``): the
        hidden state a structure-aware ceiling (``offload.ceiling``) knows.

    Returns
    -------
    ndarray of int64, shape (n_seq, length)
        Image indices in ``0..n_images-1``.
    locations : ndarray of int64, shape (n_seq, length)
        Only with ``return_locations``.
    """
    n_images, length, n_seq = _shape(n_images, length, n_seq)
    spread = _fraction(spread, "spread")
    rprob = _fraction(rprob, "rprob")
    rng = _rng(seed)
    shape = (n_seq, length)
    jump = rng.random(shape) < rprob
    if length:
        jump[:, 0] = True
    loc = np.zeros(shape, dtype=np.int64)
    loc[jump] = rng.integers(0, n_images, size=int(jump.sum()), dtype=np.int64)
    last = np.where(jump, np.arange(length, dtype=np.int64), 0)
    np.maximum.accumulate(last, axis=1, out=last)
    loc = np.take_along_axis(loc, last, axis=1)
    width = math.floor(spread * n_images)
    idx = loc + rng.integers(0, width + 1, size=shape, dtype=np.int64)
    idx %= n_images
    return (idx, loc) if return_locations else idx


# --------------------------------------------------------------------------- arrivals


def periodic(length, n_seq):
    """Periodic arrivals: one image every slot.

    Returns
    -------
    ndarray of int64, shape (n_seq, length)
        All ones (slots).
    """
    length = _count(length, "length", 0)
    n_seq = _count(n_seq, "n_seq", 0)
    return np.ones((n_seq, length), dtype=np.int64)


def _per_sojourn_scaled(interval, p):
    """``tprob * markov_arrivals_per_sojourn(interval, tprob)``, in [0, 1].

    Computed with ``log1p``/``expm1`` so that it stays exact for tprob near 0
    (where ``1 - q**interval`` would round to 0) and never overflows.
    """
    if p == 1.0:
        return 1.0 if interval == 1 else 0.0
    lq = math.log1p(-p)
    return math.exp((interval - 1) * lq) * p / -math.expm1(interval * lq)


def _markov_params(i1, i2, tprob1, tprob2):
    i1 = _count(i1, "i1", 1, maximum=_MAX_INTERVAL)
    i2 = _count(i2, "i2", 1, maximum=_MAX_INTERVAL)
    p1 = _fraction(tprob1, "tprob1", lo_open=True)
    p2 = _fraction(tprob2, "tprob2", lo_open=True)
    return i1, i2, p1, p2


def markov_stationary(tprob1, tprob2):
    """Long-run share of *slots* spent in states 1 and 2: ``(tprob2, tprob1) / (tprob1 + tprob2)``."""
    p1 = _fraction(tprob1, "tprob1", lo_open=True)
    p2 = _fraction(tprob2, "tprob2", lo_open=True)
    return p2 / (p1 + p2), p1 / (p1 + p2)


def markov_arrivals_per_sojourn(interval, tprob):
    """Mean arrivals in one sojourn of a state (see ``markov_arrivals``).

    A sojourn lasts ``L ~ Geometric(tprob)`` slots (``L >= 1``) and holds
    ``floor(L / interval)`` arrivals, whose mean is
    ``q**(interval-1) / (1 - q**interval)`` with ``q = 1 - tprob``
    (``inf`` where that exceeds the float range, for tprob near 0).
    """
    interval = _count(interval, "interval", 1, maximum=_MAX_INTERVAL)
    p = _fraction(tprob, "tprob", lo_open=True)
    return _per_sojourn_scaled(interval, p) / p


def markov_mean_interarrival(i1, i2, tprob1, tprob2):
    """Long-run mean inter-arrival time (slots) of ``markov_arrivals``.

    By renewal-reward over one state-1 plus one state-2 sojourn:
    ``(1/tprob1 + 1/tprob2) / (a1 + a2)`` with ``a_s`` from
    ``markov_arrivals_per_sojourn(i_s, tprob_s)``. When both states keep the
    same state for long compared to ``i_s`` this is close to
    ``1 / (pi1/i1 + pi2/i2)``. ``inf`` where it exceeds the float range;
    ``ValueError`` where no image can ever arrive (``a1 = a2 = 0``).
    """
    i1, i2, p1, p2 = _markov_params(i1, i2, tprob1, tprob2)
    b1, b2 = _per_sojourn_scaled(i1, p1), _per_sojourn_scaled(i2, p2)
    if b1 == 0 and b2 == 0:
        raise ValueError(
            f"no image can ever arrive with i1={i1}, i2={i2}, tprob1={tprob1}, tprob2={tprob2}: "
            "every sojourn is shorter than its interval")
    # (1/p1 + 1/p2) / (b1/p1 + b2/p2), multiplied through by p1*p2/max(p1, p2):
    # no term overflows, however small the tprobs.
    top = max(p1, p2)
    r1, r2 = p1 / top, p2 / top
    den = r2 * b1 + r1 * b2
    return (r1 + r2) / den if den > 0 else math.inf


def markov_check(i1, i2, tprob1, tprob2):
    """Check Markov arrival parameters as ``markov_arrivals`` does; return the mean gap.

    Returns ``markov_mean_interarrival(i1, i2, tprob1, tprob2)`` (slots), or
    raises the ``ValueError`` that ``markov_arrivals`` would raise for these
    parameters: out of range, no image can ever arrive, or a mean
    inter-arrival time above ``MAX_MEAN_INTERARRIVAL``. Costs nothing, so
    callers can refuse bad parameters before any other work.
    """
    i1, i2, p1, p2 = _markov_params(i1, i2, tprob1, tprob2)
    mean = markov_mean_interarrival(i1, i2, p1, p2)
    if not mean <= MAX_MEAN_INTERARRIVAL:
        raise ValueError(
            f"Markov arrivals i1={i1}, i2={i2}, tprob1={tprob1}, tprob2={tprob2} have a mean "
            f"inter-arrival time of {mean:.4g} slots, above the supported "
            f"{MAX_MEAN_INTERARRIVAL:,} slots: images arrive too rarely "
            "(shorten the intervals, or lower a tprob so that sojourns outlast their interval)")
    return mean


def plan_blocks(n_seq, need, mean_per_sojourn):
    """``(rows, block)``: sequences per chunk and sojourn columns drawn per block.

    A block holds enough sojourns for ``need`` arrivals with a good margin, so
    one block is normally enough; it never holds more than ``BLOCK_ENTRIES``
    entries (rows x columns), so memory stays bounded whatever the parameters.
    """
    ratio = need / mean_per_sojourn  # mean_per_sojourn may be inf: ratio 0
    block = BLOCK_ENTRIES if ratio > BLOCK_ENTRIES else int(
        math.ceil(1.2 * ratio + 6.0 * math.sqrt(ratio) + 2))
    block = min(block + block % 2, BLOCK_ENTRIES)
    return max(1, min(n_seq, BLOCK_ENTRIES // block)), block


def _sojourn_blocks(rng, first, need, intervals, tprobs, block):
    """Yield ``(lengths, states, counts)`` blocks of ``block`` sojourns per row.

    Row ``r`` starts in state ``first[r]`` (0 for state 1, 1 for state 2) and
    alternates, so column ``j`` (counted over all blocks) is in state
    ``first XOR (j odd)``. ``counts`` are the arrivals in each sojourn,
    ``lengths // intervals[states]`` capped at ``need`` (more are never used,
    and the cap keeps the sums from overflowing for astronomically long
    sojourns). Blocks come until every row holds at least ``need`` arrivals.
    """
    rows = first.shape[0]
    total = np.zeros(rows, dtype=np.int64)
    col = 0
    while rows and total.min() < need:
        c = np.arange(col, col + block)
        st = first[:, None] ^ (c & 1).astype(np.int8)
        ln = rng.geometric(tprobs[st])
        ct = np.minimum(ln // intervals[st], need)
        total += ct.sum(axis=1)
        col += block
        yield ln, st, ct


def _first_states(rng, n_seq, tprobs):
    """First state per sequence (0 = state 1), drawn from the stationary slot shares."""
    pi1 = tprobs[1] / (tprobs[0] + tprobs[1])
    return (rng.random(n_seq) >= pi1).astype(np.int8)


def sojourn_table(rng, n_seq, need, intervals, tprobs):
    """The whole sojourn table ``(lengths, states, counts)``, one row per sequence.

    The reference twin for tests: with the same ``rng`` it holds exactly the
    sojourns ``markov_arrivals`` draws when the request fits in one chunk (see
    ``plan_blocks``); ``markov_arrivals`` itself consumes them block by block.
    ``lengths`` and ``states`` (0 = state 1) per sojourn, ``counts`` arrivals in each.
    """
    intervals = np.asarray(intervals, dtype=np.int64)
    tprobs = np.asarray(tprobs, dtype=np.float64)
    per = [_per_sojourn_scaled(int(i), float(p)) / float(p) for i, p in zip(intervals, tprobs)]
    first = _first_states(rng, n_seq, tprobs)
    rows, block = plan_blocks(n_seq, need, (per[0] + per[1]) / 2)
    if rows < n_seq:
        raise ValueError("request spans several chunks; sojourn_table is for small tests")
    blocks = list(_sojourn_blocks(rng, first, need, intervals, tprobs, block))
    if not blocks:
        empty = np.zeros((n_seq, 0), dtype=np.int64)
        return empty, empty.astype(np.int8), empty
    return tuple(np.hstack(parts) for parts in zip(*blocks))


def _arrival_times(rng, first, need, intervals, tprobs, block):
    """Slots of the first ``need`` arrivals of each row, and the state (0/1) of each."""
    rows = first.shape[0]
    times = np.empty((rows, need), dtype=np.int64)
    where = np.empty((rows, need), dtype=np.int8)
    filled = np.zeros(rows, dtype=np.int64)  # arrivals placed so far
    t0 = np.zeros(rows, dtype=np.int64)      # slot at which the next block starts
    base = (np.arange(rows, dtype=np.int64) * need)[:, None]
    for ln, st, ct in _sojourn_blocks(rng, first, need, intervals, tprobs, block):
        # Slot sums wrap around in int64 only after sojourns far longer than
        # any arrival that is used, and the wrap cancels in ends - ln.
        ends = np.cumsum(ln, axis=1)
        starts = t0[:, None] + ends - ln
        done = filled[:, None] + np.cumsum(ct, axis=1) - ct
        take = np.clip(need - done, 0, ct)
        tf = take.ravel()
        sojourn = np.repeat(np.arange(tf.size), tf)
        first_of = np.repeat(np.cumsum(tf) - tf, tf)
        m = np.arange(sojourn.size, dtype=np.int64) - first_of + 1
        s = st.ravel()[sojourn]
        pos = (base + done).ravel()[sojourn] + m - 1
        times.ravel()[pos] = starts.ravel()[sojourn] + intervals[s] * m
        where.ravel()[pos] = s
        filled += take.sum(axis=1)
        t0 += ends[:, -1]
    return times, where


def markov_arrivals(length, n_seq, i1, i2, tprob1, tprob2, seed, return_states=False,
                    arrival_states=False):
    """Two-state Markov-modulated periodic arrivals (inter-arrival times, slots).

    The modulating state alternates 1, 2, 1, ... Each stay (sojourn) in state
    ``s`` lasts ``L ~ Geometric(tprob_s)`` slots (``P(L = l) = (1-p)**(l-1) p``,
    ``l >= 1``, mean ``1/tprob_s``): time in a state is counted in slots,
    whether or not images arrive. The first state is state 1 with probability
    ``tprob2 / (tprob1 + tprob2)``, its long-run share of slots.

    Slot accounting (the choice the published DQN code makes): within a
    sojourn that starts at slot ``T`` and lasts ``L`` slots in state ``s``,
    images arrive at slots ``T + m * i_s`` for ``m = 1 .. floor(L / i_s)``;
    the arrival clock restarts at every state change. So when the state
    changes between two arrivals, that inter-arrival time is the slots left
    in the old sojourn after its last arrival plus ``i_new`` (or more, when
    a whole sojourn shorter than its interval passes with no arrival); a
    sojourn never carries a partial interval over. The time from slot 0 to
    the first arrival is not part of the output: entry ``k`` is the gap from
    arrival ``k`` to arrival ``k + 1``.

    Long-run mean inter-arrival: ``markov_mean_interarrival(i1, i2, tprob1,
    tprob2)`` = ``(1/tprob1 + 1/tprob2) / (a1 + a2)`` with
    ``a_s = q_s**(i_s-1) / (1 - q_s**i_s)``, ``q_s = 1 - tprob_s`` (mean
    arrivals per sojourn). The share of arrivals made in state ``s`` is
    ``a_s / (a1 + a2)``. Both hold over many sojourns: a sequence shorter
    than a few sojourns is dominated by its (slot-stationary) first state, so
    the average over such sequences differs from the long-run value.

    Limits and cost: parameters whose long-run mean inter-arrival time
    exceeds ``MAX_MEAN_INTERARRIVAL`` (1,000 slots; the slowest token rate
    ``offload.bucket.scale`` accepts, 0.01 per slot, then refills 10 tokens
    per image, so the bucket hardly matters) are refused with a
    ``ValueError`` before anything is drawn or allocated, as are parameters
    under which no image can ever arrive. The generator simulates every
    sojourn, including the empty ones (shorter than their interval), so its
    work is about ``n_seq * (length + 1) * 2 / (a1 + a2)`` sojourns (plus a
    20 % margin), where ``2 / (a1 + a2) <= mean inter-arrival <= 1,000``:
    a few sojourns per value for ordinary parameters, at most 1,000 at the
    cap (about 50 ns per sojourn on a desktop x86 core, so at most about
    50 us per value). Memory is a few times the output plus at most
    ``BLOCK_ENTRIES`` (about a million) sojourns at a time: sojourns are
    drawn in blocks, for a chunk of sequences at a time.

    Parameters
    ----------
    length, n_seq : int
        Inter-arrival times per sequence, and number of sequences (``>= 0``).
    i1, i2 : int
        Slots between arrivals in states 1 and 2 (``1 .. 2**62``).
    tprob1, tprob2 : float
        Per-slot probability of leaving state 1 / state 2, in (0, 1].
    seed : int
        Random seed.
    return_states : bool
        Also return the state (1 or 2) of the sojourn in which the arrival
        ending each gap falls.
    arrival_states : bool
        Also return the state (1 or 2) in which each gap starts: the state of
        arrival ``k`` for gap ``k`` (after ``states`` when both are asked).

    Returns
    -------
    gaps : ndarray of int64, shape (n_seq, length)
        Inter-arrival times in slots, ``>= 1``.
    states : ndarray of int8, shape (n_seq, length)
        Only with ``return_states``.
    starts : ndarray of int8, shape (n_seq, length)
        Only with ``arrival_states``.

    Raises
    ------
    ValueError
        For arguments out of range, parameters under which no image ever
        arrives, and a mean inter-arrival time above ``MAX_MEAN_INTERARRIVAL``.
    """
    length = _count(length, "length", 0)
    n_seq = _count(n_seq, "n_seq", 0)
    markov_check(i1, i2, tprob1, tprob2)
    i1, i2, p1, p2 = _markov_params(i1, i2, tprob1, tprob2)
    intervals = np.array([i1, i2], dtype=np.int64)
    tprobs = np.array([p1, p2])
    per_sojourn = (_per_sojourn_scaled(i1, p1) / p1 + _per_sojourn_scaled(i2, p2) / p2) / 2
    rng = _rng(seed)
    need = length + 1
    gaps = np.empty((n_seq, length), dtype=np.int64)
    states = np.empty((n_seq, length), dtype=np.int8) if return_states else None
    starts = np.empty((n_seq, length), dtype=np.int8) if arrival_states else None
    first = _first_states(rng, n_seq, tprobs)
    rows, block = plan_blocks(n_seq, need, per_sojourn)
    for r0 in range(0, n_seq, rows):
        r1 = min(n_seq, r0 + rows)
        times, where = _arrival_times(rng, first[r0:r1], need, intervals, tprobs, block)
        np.subtract(times[:, 1:], times[:, :-1], out=gaps[r0:r1])
        if return_states:
            np.add(where[:, 1:], 1, out=states[r0:r1])
        if arrival_states:
            np.add(where[:, :-1], 1, out=starts[r0:r1])
    if gaps.size and gaps.min() < 1:  # only with sojourns beyond 2**63 slots
        raise ValueError(
            f"Markov arrivals i1={i1}, i2={i2}, tprob1={tprob1}, tprob2={tprob2}: an "
            "inter-arrival time does not fit in 64-bit slot counts")
    out = (gaps,) + ((states,) if return_states else ()) + ((starts,) if arrival_states else ())
    return out if len(out) > 1 else gaps
