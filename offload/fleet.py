"""Many cameras behind one shared switch bucket: the multi-camera simulator (issue 18).

The model of the published multi-camera study (``ayanc/edgeml.mdp``,
``mcsimulate``): ``K`` cameras, each with its own token bucket ``(r_i, b_i)``
and policy, send through one switch bucket ``(r_g, b_g)``. In each time slot
every camera with an image decides with its own bucket; the switch then takes
the cameras' sends one camera at a time, in a fixed order (``0..K-1``) or in
an order drawn afresh per slot and stream, refilling its own ``N_g`` after
every camera's turn (so ``r_g`` is a rate per image of the merged stream of
``K`` cameras at one image per slot; the server's switch rate per slot is
``K * r_g``). A send the switch refuses has spent the camera's token and
earns nothing.

Beyond the published code: each camera has its own streams (any generator of
``offload.sequences``, so its own arrivals: a camera with no image in a slot
still gives the switch its refill), its own profile, bucket and policy
(thresholds, or a send table: a DQN blob's or a ceiling's decisions per image
and token state), and optionally reacts to a refusal (``feedback``).

Units: each bucket's tokens are its own *scaled tokens*
(``offload.bucket.Bucket``); time is in slots. ``run_fleet`` runs the native
loop (``offload_native.fleet_walk``); ``fleet_walk_numpy`` is its numpy twin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from offload import policies, simulate
from offload.bucket import Bucket
from offload.scenario import named_seed
from offload_native import fleet_walk

__all__ = ["Camera", "FleetResult", "StreamStack", "stack_streams", "run_fleet", "run_pooled",
           "fleet_walk_numpy", "turn_order", "dqn_send_table", "ceiling_send_table", "FEEDBACK",
           "ORDERS"]

#: What a camera does when the switch refuses its send (``run_fleet(feedback=...)``):
#: nothing (the published model); wait the Retry-After the 429 announces; or
#: put its own token back, as if it had not sent.
FEEDBACK = {"none": 0, "retry-after": 1, "refund": 2}
#: The switch's turn order: ``0..K-1`` every slot, or a random permutation per slot and stream.
ORDERS = ("fixed", "random")
_KINDS = {"thresholds": 0, "table": 1, "pooled": 2}


@dataclass(frozen=True, eq=False)
class Camera:
    """One camera: its test (or training) streams, its own bucket and its policy.

    ``theta``: thresholds for ``n = P..M`` of ``bucket`` (``M-P+1`` values; a
    scalar is repeated); or ``send``: bool ``(S, L, M-P+1)``, whether the
    policy sends image ``k`` of stream ``s`` at ``n`` tokens (a DQN blob's or
    a ceiling's decisions; see ``dqn_send_table``). ``name`` labels it.
    """

    streams: simulate.Streams
    bucket: Bucket
    theta: np.ndarray | None = None
    send: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        if (self.theta is None) == (self.send is None):
            raise ValueError(f"camera {self.name!r}: give exactly one of theta or send")
        if self.theta is not None:
            object.__setattr__(self, "theta", policies.threshold_vector(self.theta, self.bucket))
        else:
            S, L = self.streams.shape
            want = (S, L, self.bucket.send_states)
            if np.shape(self.send) != want:
                raise ValueError(f"camera {self.name!r}: send table has shape "
                                 f"{np.shape(self.send)}, its streams and bucket need {want}")

    @property
    def kind(self):
        return "thresholds" if self.theta is not None else "table"


@dataclass
class FleetResult:
    """What a fleet achieved, per camera (arrays ``(K,)``, summed over streams)."""

    strategy: str
    buckets: list            # per camera: (rate, depth) or None (pooled), as the strategy chose
    reward_total: np.ndarray  # float64: reward earned (sends the switch admitted)
    sent: np.ndarray          # int64: sends made by each camera
    refused: np.ndarray       # int64: of them, refused by the switch
    images: np.ndarray        # int64: images that arrived
    weak_loss_total: np.ndarray  # float64: weak loss summed over those images
    stream_reward: np.ndarray = None  # float64 (S,): each stream's reward per image, all cameras

    @property
    def reward_se(self):
        """Standard error of ``reward`` from the spread of the streams' rewards (NaN for one stream)."""
        s = self.stream_reward
        return float(np.std(s, ddof=1) / np.sqrt(len(s))) if s is not None and len(s) > 1 \
            else float("nan")

    @property
    def reward(self):
        """Mean reward per image over the whole fleet."""
        return float(self.reward_total.sum() / max(1, self.images.sum()))

    @property
    def avg_loss(self):
        """Mean loss per image (weak loss minus reward; lower is better)."""
        return float((self.weak_loss_total.sum() - self.reward_total.sum())
                     / max(1, self.images.sum()))

    @property
    def switch_refusals(self):
        """Sends the switch refused, all cameras and streams together."""
        return int(self.refused.sum())

    @property
    def share(self):
        """Each camera's share of the sends the switch admitted (sums to 1; zeros if none)."""
        admitted = (self.sent - self.refused).astype(np.float64)
        return admitted / admitted.sum() if admitted.sum() else admitted

    def row(self):
        """A flat dict for tables and JSON (lists, no arrays)."""
        return {"strategy": self.strategy, "avg_loss": self.avg_loss, "reward": self.reward,
                "switch_refusals": self.switch_refusals,
                "refused_per_send": float(self.refused.sum() / max(1, self.sent.sum())),
                "sends_per_image": float(self.sent.sum() / max(1, self.images.sum())),
                "share": [float(x) for x in self.share],
                "buckets": [None if b is None else {"rate": b[0], "depth": b[1]}
                            for b in self.buckets]}


def turn_order(S, T, K, seed):
    """A random turn order per stream and slot: uint8 ``(S, T, K)`` permutations of ``0..K-1``.

    Drawn from ``named_seed(seed, "fleet-order")``, so a run is repeatable.
    """
    if K > 255:
        raise ValueError(f"{K} cameras: the random turn order supports at most 255")
    rng = np.random.default_rng(named_seed(seed, "fleet-order"))
    base = np.broadcast_to(np.arange(K, dtype=np.uint8), (S, T, K))
    return np.ascontiguousarray(rng.permuted(base, axis=2))


@dataclass(eq=False)
class StreamStack:
    """The cameras' streams stacked for the native loop (``(K, S, L)`` arrays), built once.

    A search that runs many buckets and policies on the same streams passes one
    ``stack_streams`` result to every ``run_fleet`` call instead of restacking.
    """

    metric: np.ndarray
    reward: np.ndarray
    interarrival: np.ndarray
    weak_cumsum: np.ndarray  # float64 (K, S, L): running weak loss, for avg_loss
    T: int                   # horizon (slots)


def stack_streams(streams):
    """A ``StreamStack`` of a list of ``Streams`` (one per camera, all one ``(S, L)`` shape)."""
    shapes = {st.shape for st in streams}
    if len(shapes) != 1:
        raise ValueError(f"every camera needs streams of one (S, L) shape, got {sorted(shapes)}")
    stack = lambda f: np.ascontiguousarray(np.stack([f(st) for st in streams]))
    last = min(int(st.interarrival[:, :-1].sum(axis=1).min()) for st in streams)
    return StreamStack(stack(lambda st: st.metric), stack(lambda st: st.reward),
                       stack(lambda st: st.interarrival),
                       np.cumsum(stack(lambda st: st.weak_loss), axis=2, dtype=np.float64),
                       last + 1)


def _pack(cameras, switch, theta_g, kinds):
    """The native loop's policy arrays from the cameras."""
    S, L = cameras[0].streams.shape
    W = max([c.bucket.send_states for c in cameras])
    theta = np.zeros((len(cameras), W), np.float32)
    tables = [c.send for c, k in zip(cameras, kinds) if k == 1]
    table = np.zeros((max(1, len(tables)), S if tables else 1, L if tables else 1, W), np.uint8)
    tindex = np.zeros(len(cameras), np.int64)
    t = 0
    for i, c in enumerate(cameras):
        w = c.bucket.send_states
        if c.theta is not None:
            theta[i, :w] = c.theta
        elif kinds[i] == 1:
            table[t, :, :, :w] = c.send
            tindex[i], t = t, t + 1
    g = (policies.threshold_vector(theta_g, switch) if theta_g is not None
         else np.zeros(switch.send_states, np.float32))
    return dict(kind=np.asarray(kinds, np.uint8), theta=theta, table=table, table_index=tindex,
                buckets=np.array([tuple(c.bucket) for c in cameras], np.int64), theta_g=g)


def _walk(cameras, switch, *, kinds, theta_g, order, seed, feedback, native, T, stack):
    if not cameras:
        raise ValueError("a fleet needs at least one camera")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} (one of {', '.join(ORDERS)})")
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback={feedback!r} (one of {', '.join(FEEDBACK)})")
    stack = stack_streams([c.streams for c in cameras]) if stack is None else stack
    a = _pack(cameras, switch, theta_g, kinds)
    T = stack.T if T is None else int(T)
    S = cameras[0].streams.shape[0]
    od = turn_order(S, T, len(cameras), seed) if order == "random" else None
    walk = fleet_walk if native else fleet_walk_numpy
    out = walk(stack.metric, stack.reward, stack.interarrival, a["kind"], a["theta"], a["table"],
               a["table_index"], a["buckets"], switch.N, switch.P, switch.M, a["theta_g"], T,
               od, FEEDBACK[feedback])
    return out, stack


def _result(name, buckets, out, stack):
    (total, sent, refused, images), K = out, out[0].shape[1]
    S = images.shape[0]
    idx = np.maximum(images - 1, 0)  # (S, K): the last image that arrived
    weak = stack.weak_cumsum[np.arange(K)[None, :], np.arange(S)[:, None], idx]
    weak = np.where(images > 0, weak, 0.0).sum(axis=0)
    per_stream = total.sum(axis=1) / np.maximum(1, images.sum(axis=1))
    return FleetResult(name, list(buckets), total.sum(axis=0), sent.sum(axis=0),
                       refused.sum(axis=0), images.sum(axis=0), weak, per_stream)


def run_fleet(cameras, switch, *, name="fleet", buckets=None, order="fixed", seed=0,
              feedback="none", native=True, T=None, stack=None):
    """Simulate ``cameras`` (a list of ``Camera``) sending through ``switch`` (a ``Bucket``).

    ``order``: ``"fixed"`` (the published one) or ``"random"`` (a permutation
    per slot and stream from ``seed``). ``feedback``: a key of ``FEEDBACK``.
    ``T``: slots to run (default: one past the earliest last arrival of any
    camera's stream, so every camera has images all along). ``buckets``: the ``(rate,
    depth)`` per camera to record in the result. ``native=False`` runs the
    numpy twin (same numbers, bit for bit). ``stack``: the cameras' streams
    as ``stack_streams`` gives them, when the caller runs many policies on them.
    """
    kinds = [_KINDS[c.kind] for c in cameras]
    out, stack = _walk(cameras, switch, kinds=kinds, theta_g=None, order=order, seed=seed,
                       feedback=feedback, native=native, T=T, stack=stack)
    return _result(name, buckets or [None] * len(cameras), out, stack)


def run_pooled(cameras, switch, theta_g, *, name="pooled", order="fixed", seed=0, native=True,
               T=None, stack=None):
    """One decision maker for the whole fleet: thresholds ``theta_g`` on the switch's tokens.

    The cameras' own buckets and policies are ignored; each image is decided,
    on its camera's turn, with the switch's tokens (so nothing is refused):
    the published "pooled" ceiling, one bucket ``(r_g, b_g)`` over the merged stream.
    """
    out, stack = _walk(cameras, switch, kinds=[2] * len(cameras), theta_g=theta_g, order=order,
                       seed=seed, feedback="none", native=native, T=T, stack=stack)
    return _result(name, [None] * len(cameras), out, stack)


def _decide_numpy(c, k, has, arrays, n, g, resume, t, rows):
    """The decisions of camera ``c`` on streams ``rows`` at its turn: bool, one per stream."""
    kind, theta, table, tindex, buckets, Pg, thg, metric = arrays
    m = metric[c, rows, k]
    if kind[c] == 2:  # pooled: the switch's tokens decide
        ok = g >= Pg
        return has & ok & (m >= thg[np.where(ok, g - Pg, 0)])
    P = buckets[c, 1]
    ok = (n >= P) & (t >= resume)
    w = np.where(ok, n - P, 0)
    if kind[c] == 0:
        return has & ok & (m >= theta[c, w])
    return has & ok & (table[tindex[c], rows, k, w] != 0)


def fleet_walk_numpy(metric, reward, interarrival, kind, theta, table, table_index, buckets,
                     Ng, Pg, Mg, theta_g, T, order=None, feedback=0):
    """Numpy twin of ``offload_native.fleet_walk``: all streams at once, one camera turn per step."""
    K, S, L = metric.shape
    rows = np.arange(S)
    total, sent = np.zeros((S, K)), np.zeros((S, K), np.int64)
    refused, images = np.zeros((S, K), np.int64), np.zeros((S, K), np.int64)
    n = np.broadcast_to(buckets[:, 2], (S, K)).copy()
    nxt, kidx, resume = (np.zeros((S, K), np.int64) for _ in range(3))
    g = np.full(S, Mg, np.int64)
    arrays = (kind, theta, table, table_index, buckets, Pg, theta_g, metric)
    for t in range(T):
        for j in range(K):
            i = order[:, t, j].astype(np.int64) if order is not None else np.full(S, j)
            k = kidx[rows, i]
            has = (nxt[rows, i] == t) & (k < L)
            kc = np.minimum(k, L - 1)
            a = np.zeros(S, bool)
            for c in np.unique(i):  # cameras differ in bucket and kind: one group per camera
                sel = i == c
                a[sel] = _decide_numpy(c, kc[sel], has[sel], arrays, n[sel, c], g[sel],
                                       resume[sel, c], t, rows[sel])
            N_i, P_i, M_i = (buckets[i, q] for q in range(3))
            own = has & (kind[i] != 2)
            ia = interarrival[i, rows, kc]
            n_new = np.minimum(M_i, n[rows, i] - P_i * a + N_i * np.minimum(ia, M_i))
            n[rows, i] = np.where(own, n_new, n[rows, i])
            admit = a & (g >= Pg)
            refuse = a & ~admit
            g = g - Pg * admit
            total[rows, i] += np.where(admit, reward[i, rows, kc], 0.0)
            sent[rows, i] += a
            refused[rows, i] += refuse
            if feedback == 2:
                n[rows, i] = np.where(refuse, np.minimum(M_i, n[rows, i] + P_i), n[rows, i])
            elif feedback == 1:
                need = Pg - np.minimum(Mg, g + Ng)
                wait = (need + K * Ng - 1) // (K * Ng)
                resume[rows, i] = np.where(refuse & (need > 0), t + wait, resume[rows, i])
            images[rows, i] += has
            nxt[rows, i] = np.where(has, t + ia, nxt[rows, i])
            kidx[rows, i] = k + has
            g = np.minimum(Mg, g + Ng)
    return total, sent, refused, images


def dqn_send_table(policy, streams, *, int8=True, threads=None):
    """A DQN policy blob's decisions on ``streams``: bool ``(S, L, M-P+1)`` for ``Camera(send=...)``.

    The DQN's inputs (metrics and inter-arrival times) do not depend on its
    actions, so every image's Q-vector, hence its decision at every token
    state, is known before the walk (as ``simulate.run_dqn`` uses). Memory:
    ``S * L * (M-P+1)`` bytes.
    """
    from offload import mlp

    if policy.kind != "dqn":
        raise ValueError(f"dqn_send_table needs a DQN policy, this one is {policy.kind!r}")
    threads = (os.cpu_count() or 1) if threads is None else int(threads)
    net = policy.qmlp.native() if int8 else None
    S, L = streams.shape
    out = np.zeros((S, L, policy.bucket.send_states), bool)
    for k0, k1, x in simulate.input_blocks(streams, policy.H, policy.interarrival):
        q = (net.forward(x, threads=threads) if int8
             else mlp.forward_float(policy.qmlp.float_layers, x))
        out[:, k0:k1] = policy.bucket.prefers_send(np.asarray(q, np.float32).reshape(S, k1 - k0, -1))
    return out


def ceiling_send_table(ceiling, streams, bucket):
    """A ceiling's (``offload.ceiling``) decisions on ``streams``: bool ``(S, L, M-P+1)``.

    The ceiling knows each image's hidden generator state, so ``streams``
    must come from ``make_streams(..., hidden=True)``; it offloads iff the
    image's expected reward is at least ``theta[g, s, n]`` (as ``run_ceiling``).
    """
    if streams.location is None or streams.arrival_state is None:
        raise ValueError("a ceiling camera needs streams with their hidden state "
                         "(make_streams(..., hidden=True))")
    g = ceiling.bin_of(streams.location)
    s = streams.arrival_state.astype(np.int64)
    return streams.raw_metric[:, :, None] >= ceiling.theta[:, :, bucket.P:][g, s]
