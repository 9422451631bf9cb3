"""Structure-aware ceilings: the best a policy could do if it knew the generator's hidden state.

The DQN sees only a history of metrics and inter-arrival times; from it, it
can at best infer where the location-reset generator currently draws images
(``location``) and which state the Markov-modulated arrivals are in
(``arrival_state``). The ceiling is an MDP over ``(image state g, arrival
state s, tokens n)`` that *knows* both, valued by metrics (the expected reward
``f(h)`` of each image) and scored on true rewards, like the metric-only
oracle. Unlike the oracles it does not know the future: it is the best
*causal* policy that knows the hidden state, so the share of
``ceiling - Baseline`` a policy captures says how much of what history can
reveal it uses. (It is optimal in expectation; on a finite test sequence a
policy may beat it by chance.)

The model, for a test split of ``n`` images sorted by metric (``raw`` their
expected rewards, ascending):

* Image state ``g``: i.i.d. images have one state whose window is every
  image. Location reset ``(sp, rprob)`` has a location ``l`` whose window is
  images ``l .. l + floor(sp * n)`` (mod ``n``), kept with probability
  ``1 - rprob`` at each arrival and redrawn uniformly otherwise. Locations
  are grouped into ``bins`` equal ranges (``bins >= n`` is exact), each
  represented by its middle location.
* Arrival state ``s``: periodic arrivals have one state and ``I = 1``.
  Markov-modulated arrivals have two; the joint law ``P(I, s' | s)`` of the
  gap after an image and the next image's state is counted on a long draw of
  the generator (another seed than the test's).
* Tokens (scaled): ``n' = min(M, n - P a + N I)`` (SPEC section 1).

Value iteration, discount 0.9999 as the MDP baseline (SPEC section 5): with
``W[g, s, m]`` the expected value after the decision with ``m`` tokens left,

    theta[g, s, n] = gamma * (W[g, s, n] - W[g, s, n - P])        (n >= P)
    V[g, s, n]     = gamma * W[g, s, n] + E_{f ~ window g} max(f - theta, 0)

so the policy offloads iff ``f >= theta[g, s, n]``; the expectation is exact
over the window's images (prefix sums over the sorted rewards).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offload import sequences, simulate
from offload_native import walk_block

__all__ = ["Ceiling", "arrival_law", "ceiling_policy", "run_ceiling", "image_windows", "MAX_STATES"]

#: Largest ``bins x arrival states x (M + 1)`` table value iteration accepts.
MAX_STATES = 1 << 22
#: Slots of arrivals drawn to count ``P(I, s' | s)``.
_ARRIVAL_SAMPLE = 400_000


@dataclass
class Ceiling:
    """A structure-aware ceiling policy.

    Attributes
    ----------
    theta : float64 (G, S, M + 1)
        Offload iff ``n >= P`` and the image's expected reward ``f >= theta[g, s, n]``.
    n_images : int
        Images in the split the generator draws from (locations ``0 .. n_images-1``).
    bins : int
        Location bins ``G`` (1 for i.i.d. images).
    sweeps : int
        Value-iteration sweeps run.
    converged : bool
    W : float64 (G, S, M + 1)
        Expected (relative) value after a decision that leaves ``m`` tokens,
        in reward units: ``Q(n, 0) = gamma W[g, s, n]`` and
        ``Q(n, 1) = f + gamma W[g, s, n - P]``.
    discount : float
    """

    theta: np.ndarray
    n_images: int
    bins: int
    sweeps: int
    converged: bool
    W: np.ndarray = None
    discount: float = 0.9999

    def bin_of(self, location):
        """Bin of each location (array of ints in ``0 .. n_images-1``)."""
        return (np.asarray(location, np.int64) * self.bins) // self.n_images


def arrival_law(arrivals, markov=None, seed=0, sample=_ARRIVAL_SAMPLE):
    """``(gaps, law)``: the gap values (slots) and ``law[s, i, s']`` = P(gap ``gaps[i]``, next state ``s'`` | ``s``).

    Periodic arrivals: one state and gap 1. Markov-modulated arrivals
    ``markov = (I1, I2, tprob1, tprob2)``: counted over ``sample`` gaps of
    the generator drawn with ``seed``; a state never seen keeps the other
    state's law (it cannot matter then).
    """
    if arrivals == "periodic":
        return np.array([1], np.int64), np.ones((1, 1, 1))
    if arrivals != "markov":
        raise ValueError(f"unknown arrival process {arrivals!r} (periodic, markov)")
    i1, i2, t1, t2 = markov
    gaps, starts = sequences.markov_arrivals(sample, 1, i1, i2, t1, t2, seed,
                                             arrival_states=True)
    g, s = gaps[0, :-1], starts[0, :-1].astype(np.int64) - 1
    s_next = starts[0, 1:].astype(np.int64) - 1
    values, gi = np.unique(g, return_inverse=True)
    counts = np.zeros((2, len(values), 2))
    np.add.at(counts, (s, gi, s_next), 1.0)
    totals = counts.sum(axis=(1, 2))
    for st in (0, 1):
        if totals[st] == 0:
            counts[st] = counts[1 - st]
            totals[st] = totals[1 - st]
    return values.astype(np.int64), counts / totals[:, None, None]


def image_windows(n, choice, spread, bins):
    """Per image state: ``(starts, width, G)`` of the windows of sorted images it draws from.

    ``G`` location bins over ``n`` images sorted by metric (1 for i.i.d.), each
    window ``width`` images wide starting at ``starts[g]`` (circular).
    """
    if choice == "iid":
        return np.zeros(1, np.int64), n, 1
    if choice != "location-reset":
        raise ValueError(f"unknown image choice {choice!r} (iid, location-reset)")
    G = int(min(n, bins))
    mids = ((2 * np.arange(G, dtype=np.int64) + 1) * n) // (2 * G)
    return mids, int(np.floor(spread * n)) + 1, G


def _excess(raw_c, n, starts, width, theta):
    """``mean over window g of max(f - theta, 0)`` for ``theta`` (G, ...), windows circular."""
    G = len(starts)
    shape = theta.shape
    th = theta.reshape(G, -1)
    total = np.zeros_like(th)
    a = starts[:, None]
    b_end = a + width  # exclusive, may pass n
    for lo, hi in ((a, np.minimum(b_end, n)), (np.zeros_like(a), np.maximum(b_end - n, 0))):
        j = np.clip(np.searchsorted(raw_c[1], th, side="left"), lo, np.maximum(hi, lo))
        hi_b = np.broadcast_to(np.maximum(hi, lo), j.shape)
        total += (raw_c[0][hi_b] - raw_c[0][j]) - th * (hi_b - j)
    return (total / width).reshape(shape)


def ceiling_policy(raw_metric, scenario, *, metric=None, bins=512, discount=0.9999,
                   max_sweeps=20_000, seed_name="ceiling"):
    """Solve the structure-aware ceiling MDP for images with expected rewards ``raw_metric``.

    Parameters
    ----------
    raw_metric : (n,) float
        Expected reward ``f(h)`` of every image of the split the generator
        draws from (any order).
    metric : (n,) float, optional
        The metric ``make_streams`` sorts those images by (standardised),
        when ``raw_metric`` is not it; both must order the images alike.
    scenario : offload.scenario.Scenario
        The bucket (scaled tokens) and the generators, as ``offload.simulate.make_streams``
        draws them.
    bins : int
        Location bins (exact when ``>= n``).
    discount : float
        As the MDP baseline's value iteration (SPEC section 5).
    max_sweeps : int
        Stop after this many sweeps; stops earlier when no threshold moves by
        more than ``1e-6 * max|f|`` (SPEC section 5's rule).
    seed_name : str
        Which of the scenario's named seeds (``Scenario.seed_for``) the long
        arrival draw that ``arrival_law`` counts uses: ``"ceiling"`` for the
        ceiling of the test images, ``"training-ceiling"`` for the trainer's.

    Returns
    -------
    Ceiling

    Raises
    ------
    ValueError
        For an empty split, unknown generators, or a state table above ``MAX_STATES``.
    """
    raw = np.asarray(raw_metric, np.float64).ravel()
    n = raw.size
    if n == 0:
        raise ValueError("ceiling_policy: no images")
    # make_streams's order (by metric); within ties of a float32 metric, by raw
    # metric, which only swaps images the windows cannot tell apart.
    order = np.argsort(raw, kind="stable") if metric is None else np.lexsort(
        (raw, np.asarray(metric).ravel()))
    raw = raw[order]
    if np.any(np.diff(raw) < 0):
        raise ValueError("ceiling_policy: metric and raw_metric order the images differently")
    N, P, M = scenario.bucket
    starts, width, G = image_windows(n, scenario.choice, scenario.spread, bins)
    gaps, law = arrival_law(scenario.arrivals, scenario.markov, scenario.seed_for(seed_name))
    S = law.shape[0]
    if G * S * (M + 1) > MAX_STATES:
        raise ValueError(f"ceiling table of {G} location bins x {S} arrival states x {M + 1} "
                         f"token states exceeds {MAX_STATES:,}; use fewer bins")
    rho = scenario.rprob if scenario.choice == "location-reset" else 0.0
    raw_c = (np.concatenate([[0.0], np.cumsum(raw)]), raw)
    tokens = np.arange(M + 1)
    nxt = np.minimum(M, tokens[:, None] + N * gaps[None, :])  # (m, gap) -> n'
    V = np.zeros((G, S, M + 1))
    theta = np.full((G, S, M + 1), np.inf)
    tol = 1e-6 * max(float(np.abs(raw).max()), 1e-12)
    sendable = scenario.bucket.can_send(tokens)
    converged = False
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        # Image state moves (stay, or a fresh uniform location), then tokens refill.
        U = (1.0 - rho) * V + rho * V.mean(axis=0, keepdims=True)       # (G, S', n')
        Ug = U[:, :, nxt]                                                # (G, S', m, gap)
        W = np.einsum("sit,gtmi->gsm", law, Ug)                          # (G, S, m)
        new_theta = np.full_like(theta, np.inf)
        new_theta[:, :, sendable] = discount * (W[:, :, sendable] - W[:, :, tokens[sendable] - P])
        gain = np.zeros_like(W)
        gain[:, :, sendable] = _excess(raw_c, n, starts, width, new_theta[:, :, sendable])
        V = discount * W + gain
        V -= V.max()  # relative values: thresholds only see differences
        moved = np.abs(new_theta[:, :, sendable] - theta[:, :, sendable])
        theta = new_theta
        if sweeps > 1 and float(moved.max(initial=0.0)) <= tol:
            converged = True
            break
    return Ceiling(theta, n, G, sweeps, converged, W, discount)


def run_ceiling(ceiling, streams, bucket, *, name="ceiling"):
    """Score a ceiling on streams made with ``make_streams(..., hidden=True)`` (true rewards)."""
    if streams.location is None or streams.arrival_state is None:
        raise ValueError("run_ceiling needs streams with their hidden state "
                         "(make_streams(..., hidden=True))")
    S, L = streams.shape
    g = ceiling.bin_of(streams.location)
    s = streams.arrival_state.astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= ceiling.bins or s.max() >= ceiling.theta.shape[1]):
        raise ValueError("streams do not match the ceiling (other split size or arrivals)")
    N, P, M = bucket
    n = np.full(S, M, np.int64)
    total, count = np.zeros(S), np.zeros(S, np.int64)
    hist = np.zeros(M + 1, np.int64)
    th = ceiling.theta[:, :, P:]  # (G, S, M-P+1)
    step = max(1, (1 << 16) // max(S, 1))
    for k0 in range(0, L, step):
        k1 = min(L, k0 + step)
        send = streams.raw_metric[:, k0:k1, None] >= th[g[:, k0:k1], s[:, k0:k1]]
        walk_block(send, streams.reward, streams.interarrival, k0, n, total, count, hist,
                   N, P, M)
    return simulate.SimResult.from_totals(name, streams, total, count, token_hist=hist)
