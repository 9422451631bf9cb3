"""Input sequences (SPEC section 4): which image arrives, and when.

A test or training run is a set of ``n_seq`` sequences of ``length`` arrivals.
Image sequences hold dataset indices (int64, ``0..n_images-1``) into a profile
sorted by metric, so an index range is a metric range. Arrival sequences hold
inter-arrival times: entry ``[j, k]`` is the number of time slots from
arrival ``k`` to arrival ``k + 1`` (int64, ``>= 1``).

Every generator is vectorised (no Python loop per element) and repeatable:
the same arguments and ``seed`` give the same array. ``seed`` is anything
``numpy.random.default_rng`` accepts (normally an int).
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
]

# Refuse requests whose sojourn table would exceed this many entries.
_MAX_SOJOURNS = 200_000_000


# --------------------------------------------------------------------------- validation


def _count(value, name, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
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
    n_images = _count(n_images, "n_images", 1)
    length = _count(length, "length", 0)
    n_seq = _count(n_seq, "n_seq", 0)
    return _rng(seed).integers(0, n_images, size=(n_seq, length), dtype=np.int64)


def location_reset(n_images, length, n_seq, spread, rprob, seed):
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

    Returns
    -------
    ndarray of int64, shape (n_seq, length)
        Image indices in ``0..n_images-1``.
    """
    n_images = _count(n_images, "n_images", 1)
    length = _count(length, "length", 0)
    n_seq = _count(n_seq, "n_seq", 0)
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
    loc += rng.integers(0, width + 1, size=shape, dtype=np.int64)
    loc %= n_images
    return loc


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


def markov_stationary(tprob1, tprob2):
    """Long-run share of *slots* spent in states 1 and 2: ``(tprob2, tprob1) / (tprob1 + tprob2)``."""
    p1 = _fraction(tprob1, "tprob1", lo_open=True)
    p2 = _fraction(tprob2, "tprob2", lo_open=True)
    return p2 / (p1 + p2), p1 / (p1 + p2)


def markov_arrivals_per_sojourn(interval, tprob):
    """Mean arrivals in one sojourn of a state (see ``markov_arrivals``).

    A sojourn lasts ``L ~ Geometric(tprob)`` slots (``L >= 1``) and holds
    ``floor(L / interval)`` arrivals, whose mean is
    ``q**(interval-1) / (1 - q**interval)`` with ``q = 1 - tprob``.
    """
    interval = _count(interval, "interval", 1)
    p = _fraction(tprob, "tprob", lo_open=True)
    q = 1.0 - p
    return q ** (interval - 1) / (1.0 - q ** interval)


def markov_mean_interarrival(i1, i2, tprob1, tprob2):
    """Long-run mean inter-arrival time (slots) of ``markov_arrivals``.

    By renewal-reward over one state-1 plus one state-2 sojourn:
    ``(1/tprob1 + 1/tprob2) / (a1 + a2)`` with ``a_s`` from
    ``markov_arrivals_per_sojourn(i_s, tprob_s)``. When both states keep the
    same state for long compared to ``i_s`` this is close to
    ``1 / (pi1/i1 + pi2/i2)``.
    """
    a = markov_arrivals_per_sojourn(i1, tprob1) + markov_arrivals_per_sojourn(i2, tprob2)
    if a == 0:
        raise ValueError(
            f"no image can ever arrive with i1={i1}, i2={i2}, tprob1={tprob1}, tprob2={tprob2}"
        )
    return (1.0 / float(tprob1) + 1.0 / float(tprob2)) / a


def _sojourns(rng, n_seq, need, intervals, tprobs, per_sojourn):
    """State sojourns per sequence: lengths (slots), states (0/1), arrivals in each.

    Column ``j`` of a row is in state ``first XOR (j odd)``; ``first`` is drawn
    from the stationary slot shares. Columns are added until every row holds
    at least ``need`` arrivals.
    """
    pi1 = tprobs[1] / (tprobs[0] + tprobs[1])
    first = (rng.random(n_seq) >= pi1).astype(np.int8)[:, None]
    mean = per_sojourn.mean()
    block = int(math.ceil(1.2 * need / mean + 6.0 * math.sqrt(need / mean) + 2))
    block += block % 2
    if block * n_seq > _MAX_SOJOURNS:
        raise ValueError(
            f"arrival parameters give {mean:.3g} arrivals per sojourn: "
            f"{n_seq} x {need} arrivals would need too many sojourns"
        )
    lengths, states, counts = [], [], []
    total = np.zeros(n_seq, dtype=np.int64)
    while n_seq and total.min() < need:
        col = np.arange(len(lengths) * block, (len(lengths) + 1) * block)
        st = first ^ (col & 1).astype(np.int8)
        ln = rng.geometric(tprobs[st])
        ct = ln // intervals[st]
        lengths.append(ln)
        states.append(st)
        counts.append(ct)
        total += ct.sum(axis=1)
    if not lengths:
        empty = np.zeros((n_seq, 0), dtype=np.int64)
        return empty, empty.astype(np.int8), empty
    if len(lengths) == 1:
        return lengths[0], states[0], counts[0]
    return np.hstack(lengths), np.hstack(states), np.hstack(counts)


def markov_arrivals(length, n_seq, i1, i2, tprob1, tprob2, seed, return_states=False):
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

    Parameters
    ----------
    length, n_seq : int
        Inter-arrival times per sequence, and number of sequences (``>= 0``).
    i1, i2 : int
        Slots between arrivals in states 1 and 2 (``>= 1``).
    tprob1, tprob2 : float
        Per-slot probability of leaving state 1 / state 2, in (0, 1].
    seed : int
        Random seed.
    return_states : bool
        Also return the state (1 or 2) of the sojourn in which the arrival
        ending each gap falls.

    Returns
    -------
    gaps : ndarray of int64, shape (n_seq, length)
        Inter-arrival times in slots, ``>= 1``.
    states : ndarray of int8, shape (n_seq, length)
        Only with ``return_states``.
    """
    length = _count(length, "length", 0)
    n_seq = _count(n_seq, "n_seq", 0)
    intervals = np.array([_count(i1, "i1", 1), _count(i2, "i2", 1)], dtype=np.int64)
    tprobs = np.array(
        [_fraction(tprob1, "tprob1", lo_open=True), _fraction(tprob2, "tprob2", lo_open=True)]
    )
    per_sojourn = np.array(
        [markov_arrivals_per_sojourn(i, p) for i, p in zip(intervals, tprobs)]
    )
    if per_sojourn.sum() == 0:
        raise ValueError(
            f"no image can ever arrive with i1={i1}, i2={i2}, tprob1={tprob1}, tprob2={tprob2}"
        )
    rng = _rng(seed)
    need = length + 1
    lengths, states, counts = _sojourns(rng, n_seq, need, intervals, tprobs, per_sojourn)
    starts = np.cumsum(lengths, axis=1) - lengths
    done = np.cumsum(counts, axis=1) - counts
    take = np.clip(need - done, 0, counts).ravel()
    sojourn = np.repeat(np.arange(take.size), take)
    first_of = np.repeat(np.cumsum(take) - take, take)
    m = np.arange(sojourn.size, dtype=np.int64) - first_of + 1
    st = states.ravel()[sojourn]
    times = starts.ravel()[sojourn] + intervals[st] * m
    times = times.reshape(n_seq, need)
    gaps = np.diff(times, axis=1)
    if return_states:
        return gaps, (st.reshape(n_seq, need)[:, 1:] + 1).astype(np.int8)
    return gaps
