"""The belief policy: the ceiling's values averaged over what the history reveals.

The structure-aware ceiling (``offload.ceiling``) knows the generator's hidden
state: the location-reset generator's location and the Markov arrivals'
state. A policy that sees only the history cannot. The best yardstick for
such a policy knows the generator's *model* but not its state: it keeps a
posterior over the hidden state, updated by Bayes' rule from every observed
metric and inter-arrival time with the generator's own laws, and takes the
action with the larger posterior-averaged ceiling Q-value (a QMDP rule):

    Q(n, 0) = gamma E_b W[g, s, n]      Q(n, 1) = f + gamma E_b W[g, s, n - P]

so it offloads iff ``n >= P`` and ``f >= E_b theta[g, s, n]``, with ``f`` the
image's expected reward and ``theta`` the ceiling's thresholds. A DQN's share
of the belief policy's gain over Baseline says how much of what the history
can reveal it uses; the belief policy itself stays below the ceiling on
average (it acts on less).

The laws, for a split of ``n`` images sorted by metric (``offload.ceiling``'s model):

* Location: ``G`` bins of locations (the ceiling's bins). Bin ``g`` holds
  locations ``ceil(g n / G) .. ceil((g+1) n / G) - 1``; within a bin the
  location is taken uniform (exact when ``G = n``). An image at sorted
  position ``i`` has likelihood ``P(i | g) = #{(l, d): l in bin g,
  d in 0..w-1, (l + d) mod n = i} / (w |bin g|)`` with window width
  ``w = floor(sp n) + 1``. The device sees the metric, not the position: an
  observed metric value is the group of positions with that value (ties),
  whose likelihoods add. Before each image after the first the location is
  kept with probability ``1 - rprob`` and redrawn uniformly otherwise; the
  first image's location is uniform.
* Arrival state: the ceiling's counted law ``P(gap, s' | s)``
  (``offload.ceiling.arrival_law``, the same seed); the gap before an image
  updates the belief over its state. A gap the law never saw is not
  evidence: the state then moves by the law's transition alone. The first
  image's state is drawn slot-stationary, as the generator draws it.

Location and arrival state are independent a priori, move independently and
are each seen through their own observation, so the posterior is the product
of the two marginals, which are filtered separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offload import ceiling as ceiling_mod
from offload import sequences, simulate

__all__ = ["BeliefModel", "belief_model", "location_likelihood", "bin_bounds", "tie_groups",
           "filter_locations", "filter_arrivals", "posteriors", "expected_threshold", "run_belief"]

#: Sorted positions per chunk when the location likelihoods are built.
_CHUNK = 2048


@dataclass
class BeliefModel:
    """What the belief policy knows of a generator (``belief_model``).

    Attributes
    ----------
    values : float32 (T,)
        Distinct standardised metrics of the split, ascending: observation ``t``.
    lik : float64 (T, G)
        ``P(observing values[t] | location bin g)``.
    mass : float64 (G,)
        Share of locations in each bin (the uniform prior over locations).
    rprob : float
        Per-image probability that the location is redrawn (0 for i.i.d.).
    gaps : int64 (K,)
        Gap values (slots) the arrival law knows.
    law : float64 (A, K + 1, A)
        ``P(gap gaps[k], next state | state)``; the last column is the law's
        transition with the gap marginalised (for a gap it never saw).
    initial : float64 (A,)
        Arrival state of a sequence's first image.
    """

    values: np.ndarray
    lik: np.ndarray
    mass: np.ndarray
    rprob: float
    gaps: np.ndarray
    law: np.ndarray
    initial: np.ndarray

    def observe(self, metric):
        """Observation index of each standardised metric; ``ValueError`` for one not in the split."""
        metric = np.asarray(metric, np.float32)
        t = np.clip(np.searchsorted(self.values, metric), 0, len(self.values) - 1)
        if metric.size and not np.array_equal(self.values[t], metric):
            raise ValueError("the streams hold metrics that are not in the split the belief "
                             "policy was built for (another profile or split)")
        return t


def bin_bounds(n, G):
    """``(G + 1,)`` int64: bin ``g`` holds locations ``bounds[g] .. bounds[g+1] - 1``.

    The ceiling's binning: ``Ceiling.bin_of(l) = l G // n``.
    """
    g = np.arange(G + 1, dtype=np.int64)
    return -((-g * n) // G)


def location_likelihood(n, spread, G, positions):
    """``P(sorted position i | location bin g)`` for ``positions`` (1-D int): float64 ``(len, G)``.

    ``n`` images, window ``floor(spread n) + 1`` wide (a window wider than
    ``n`` wraps onto itself, as the generator's ``(l + d) mod n`` does).
    """
    w = int(np.floor(spread * n)) + 1
    r = np.arange(n, dtype=np.int64)
    c = (w - 1 - r) // n + 1              # how many offsets d in 0..w-1 land r after l
    cum = np.concatenate([[0], np.cumsum(c)])

    def upto(x):                          # sum of c(r mod n) over r in 0..x-1, any integer x
        return (x // n) * w + cum[x % n]

    bounds = bin_bounds(n, G)
    a, b = bounds[:-1], bounds[1:]
    i = np.asarray(positions, np.int64)[:, None]
    # locations l in [a, b) reach i with offset r = i - l over r in [i-b+1, i-a]
    count = upto(i - a + 1) - upto(i - b + 1)
    return count / (w * (b - a)).astype(np.float64)


def tie_groups(sorted_metric):
    """``(values, starts)``: distinct values of an ascending array and where each run starts."""
    m = np.asarray(sorted_metric)
    starts = np.flatnonzero(np.concatenate([[True], m[1:] != m[:-1]])) if m.size else \
        np.zeros(0, np.int64)
    return m[starts], starts


def belief_model(split_metric, scenario, *, bins, seed_name="ceiling"):
    """The belief policy's knowledge of ``scenario``'s generators over a split.

    Parameters
    ----------
    split_metric : (n,) float
        Standardised metrics of the images the generator draws from (the
        ones ``make_streams`` sorts), any order.
    scenario : offload.scenario.Scenario
    bins : int
        Location bins: the ceiling's (``Ceiling.bins``), so that its
        thresholds are indexed alike.
    seed_name : str
        Seed of the arrival law's draw; the ceiling's (``ceiling_policy``'s ``seed_name``).
    """
    m = np.sort(np.asarray(split_metric, np.float32).ravel(), kind="stable")
    n = m.size
    if n == 0:
        raise ValueError("belief_model: no images")
    values, starts = tie_groups(m)
    if scenario.choice == "iid":
        G, rprob = 1, 0.0
        lik = np.ones((len(values), 1))
        mass = np.ones(1)
    else:
        G, rprob = int(min(n, bins)), float(scenario.rprob)
        group = np.repeat(np.arange(len(values)), np.diff(np.append(starts, n)))
        lik = np.zeros((len(values), G))
        for i0 in range(0, n, _CHUNK):  # a group's likelihood is the sum over its positions
            pos = np.arange(i0, min(n, i0 + _CHUNK))
            np.add.at(lik, group[pos], location_likelihood(n, scenario.spread, G, pos))
        bounds = bin_bounds(n, G)
        mass = np.diff(bounds) / n
    gaps, law = ceiling_mod.arrival_law(scenario.arrivals, scenario.markov,
                                        scenario.seed_for(seed_name))
    law = np.concatenate([law, law.sum(axis=1, keepdims=True)], axis=1)
    if scenario.arrivals == "markov":
        initial = np.array(sequences.markov_stationary(scenario.markov[2], scenario.markov[3]))
    else:
        initial = np.ones(1)
    return BeliefModel(values, lik, mass, rprob, gaps, law, initial)


def filter_locations(obs, model, *, belief=None):
    """Posterior over location bins at each image, given it and every image before.

    ``obs`` (S, K) observation indices (``BeliefModel.observe``) of
    consecutive images; ``belief`` (S, G) the posterior at the image before
    the first of them, ``None`` when they start their sequences. Returns
    float64 ``(S, K, G)``.
    """
    S, K = obs.shape
    lik, mass, rho = model.lik, model.mass, model.rprob
    out = np.empty((S, K, lik.shape[1]))
    b = belief
    for k in range(K):
        pred = mass[None, :] if b is None else (1.0 - rho) * b + rho * mass
        post = pred * lik[obs[:, k]]
        total = post.sum(axis=1, keepdims=True)
        if not np.all(total > 0):
            raise ValueError("an observed metric is impossible under the generator's model "
                             "(streams not drawn by this scenario's image choice)")
        b = out[:, k] = post / total
    return out


def filter_arrivals(gaps_before, model, *, belief=None):
    """Posterior over the arrival state at each image, given every gap before it.

    ``gaps_before`` (S, K): the gap (slots) that ended at each image;
    ``belief`` (S, A) the posterior at the image before the first, ``None``
    when they start their sequences (then the first gap is not used and the
    first image's state is ``model.initial``). Returns float64 ``(S, K, A)``.
    """
    S, K = gaps_before.shape
    A = model.law.shape[0]
    j = np.searchsorted(model.gaps, gaps_before)
    known = (j < len(model.gaps)) & (model.gaps[np.minimum(j, len(model.gaps) - 1)] == gaps_before)
    j = np.where(known, j, len(model.gaps))
    out = np.empty((S, K, A))
    b = belief
    for k in range(K):
        if b is None:
            post = np.broadcast_to(model.initial, (S, A))
        else:
            # post[s'] = sum_s b[s] P(gap, s' | s)
            post = np.einsum("xs,sxt->xt", b, model.law[:, j[:, k], :])
            total = post.sum(axis=1, keepdims=True)
            if not np.all(total > 0):
                raise ValueError("an observed gap is impossible under the arrival law")
            post = post / total
        b = out[:, k] = post
    return out


def posteriors(model, streams, *, block=4096):
    """Yield ``(k0, k1, pg, pa)``: the posteriors at positions ``k0..k1-1`` of every stream.

    ``pg`` (S, k1-k0, G) over location bins, ``pa`` (S, k1-k0, A) over
    arrival states, each given the image at its position and all before it.
    The posterior depends only on what was observed, not on the decisions,
    so it comes block by block ahead of the token walk.
    """
    S, L = streams.shape
    obs = model.observe(streams.metric)
    bg = ba = None
    for k0 in range(0, L, block):
        k1 = min(L, k0 + block)
        pg = filter_locations(obs[:, k0:k1], model, belief=bg)
        before = streams.interarrival[:, max(k0 - 1, 0):k1 - 1]
        if k0 == 0:  # the first image has no gap before it
            before = np.concatenate([np.ones((S, 1), np.int64), before], axis=1)
        pa = filter_arrivals(before, model, belief=ba)
        bg, ba = pg[:, -1], pa[:, -1]
        yield k0, k1, pg, pa


def expected_threshold(theta, pg, pa, n):
    """``E_b theta[g, s, n]`` per stream: ``theta`` (G, A, M+1), ``pg`` (S, G), ``pa`` (S, A), ``n`` (S,) tokens ``>= P``."""
    per_state = np.einsum("sg,gas->sa", pg, theta[:, :, n])
    return np.einsum("sa,sa->s", per_state, pa)


def run_belief(model, ceiling, streams, bucket, *, name="belief", trace=False):
    """Score the belief policy on ``streams`` (true rewards): a ``simulate.SimResult``.

    ``ceiling`` the ceiling solved for the split ``model`` was built on, the
    same bucket (scaled tokens). Offloads iff ``n >= P`` and
    ``raw_metric >= E_b theta[g, s, n]``, the threshold at the stream's own
    token count only (so the cost does not grow with the bucket). ``trace``
    keeps each decision and token count.
    """
    G, A = ceiling.theta.shape[:2]
    if model.lik.shape[1] != G or model.law.shape[0] != A:
        raise ValueError(f"belief model ({model.lik.shape[1]} bins, {model.law.shape[0]} "
                         f"arrival states) does not match the ceiling ({G} bins, {A} states)")
    S, L = streams.shape
    N, P, M = bucket
    n, total, count, hist = simulate.walk_start(bucket, S)
    dec = np.zeros((S, L), np.uint8) if trace else None
    tok = np.zeros((S, L), np.int32) if trace else None
    for k0, _, pg, pa in posteriors(model, streams):
        for j in range(pg.shape[1]):
            k = k0 + j
            ok = n >= P
            thr = expected_threshold(ceiling.theta, pg[:, j], pa[:, j], np.where(ok, n, P))
            a = ok & (streams.raw_metric[:, k] >= thr)
            np.add.at(hist, n, 1)
            if trace:
                dec[:, k], tok[:, k] = a, n
            total += np.where(a, streams.reward[:, k], 0.0)
            count += a
            n = np.minimum(M, n - P * a + N * streams.interarrival[:, k])
    res = simulate.SimResult.from_totals(name, streams, total, count, token_hist=hist)
    res.decisions, res.tokens = dec, tok
    return res
