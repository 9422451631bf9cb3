"""How a fleet of ``K`` cameras shares one switch: the strategies of issue 18, and their search.

A fleet setting (``FleetSetting``) is the published one: ``K`` cameras, a
switch rate ``r_g`` (tokens per image of the merged stream, i.e. per camera
turn) and a per-camera share ``b_p`` of the switch depth ``b_g = K * b_p``.
The strategies pick every camera's bucket and policy:

* **isolated**: every camera ``(r_g, b_p)`` with the MDP policy for it;
* **hierarchical**: every camera ``(r_i, b_i)`` from a grid search on the
  training streams over the published grid (``GRID_RATES`` x ``GRID_DEPTHS``,
  skipping buckets smaller than ``(r_g, b_p)``), with the MDP policy for it;
* **pooled**: one decision maker with the bucket ``(r_g, b_g)`` over the
  merged stream (the MDP policy for it): a ceiling (its MDP assumes an image
  on every camera turn: exact for periodic arrivals);
* **hierarchical-retry-after**: hierarchical, searched and run with cameras
  that honour the Retry-After of a switch refusal (``fleet.FEEDBACK``).

Torch-free. The MDP solutions are cached per (camera data, bucket) in a
``PolicyCache``, so the grid search solves each bucket once for every fleet
size and strategy, and the search runs the native fleet loop once per grid
point on short training streams: seconds for the whole published grid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from offload import fleet, policies
from offload.bucket import Bucket
from offload.scenario import Scenario

__all__ = ["FleetSetting", "CameraData", "PolicyCache", "GRID_RATES", "GRID_DEPTHS", "grid_points",
           "camera_data", "fleet_streams", "isolated", "hierarchical", "pooled", "grid_search",
           "STRATEGIES", "run_strategies"]

#: The published grid of per-camera buckets (``runtest_mcam.py``): rates (tokens per slot)
#: 2/40 .. 20/40 and depths (tokens) 4/4 .. 40/4.
GRID_RATES = tuple(r / 40 for r in range(2, 21))
GRID_DEPTHS = tuple(b / 4 for b in range(4, 41))
#: The strategies ``run_strategies`` runs, in table order.
STRATEGIES = ("isolated", "hierarchical", "pooled", "hierarchical-retry-after")


@dataclass(frozen=True)
class FleetSetting:
    """``K`` cameras behind a switch ``(r_g, K * b_p)``; validated on construction.

    ``switch_rate`` r_g: tokens per camera turn (the merged stream's images),
    in (0, 1); ``depth_per_camera`` b_p: tokens, >= 1. Raises ``ValueError``
    naming the option when a camera's isolated bucket or the switch is invalid.
    """

    cameras: int
    switch_rate: float
    depth_per_camera: float

    def __post_init__(self):
        if not isinstance(self.cameras, (int, np.integer)) or self.cameras < 1:
            raise ValueError(f"cameras={self.cameras!r}: need at least 1")
        if self.cameras > 255:
            raise ValueError(f"cameras={self.cameras}: at most 255 supported")
        try:
            Bucket.from_rate(self.switch_rate, self.depth_per_camera)
            Bucket.from_rate(self.switch_rate, self.switch_depth)
        except ValueError as exc:
            raise ValueError(f"switch rate {self.switch_rate}, depth per camera "
                             f"{self.depth_per_camera}: no valid bucket for every camera "
                             f"({exc})") from None

    @property
    def switch_depth(self):
        """``b_g = K * b_p`` (tokens)."""
        return self.cameras * self.depth_per_camera

    @property
    def switch(self):
        """The switch bucket ``(r_g, b_g)`` in scaled tokens."""
        return Bucket.from_rate(self.switch_rate, self.switch_depth)

    @property
    def server_rate(self):
        """The switch's rate in tokens per slot of time, as the server's key file has it: ``K * r_g``."""
        return self.cameras * self.switch_rate

    def to_dict(self):
        N, P, M = self.switch
        return {"cameras": self.cameras, "switch_rate": self.switch_rate,
                "depth_per_camera": self.depth_per_camera, "switch_depth": self.switch_depth,
                "server_rate": self.server_rate, "switch_N": N, "switch_P": P, "switch_M": M}


@dataclass(eq=False)
class CameraData:
    """One camera's images and generators: its profile's splits and its scenario.

    ``train``: ``(metric, reward)`` of the training images (standardised
    metrics); ``test``: ``(metric, reward, weak_loss)`` of the test images.
    ``scenario``: its image choice, arrivals and seed (its bucket is not used:
    the strategies choose buckets). Cameras that share one ``CameraData`` draw
    disjoint streams from it.
    """

    name: str
    scenario: Scenario
    train: tuple
    test: tuple

    def arrivals(self):
        """The MDP's inter-arrival sample (None for periodic arrivals)."""
        return self.scenario.training_arrivals()


def camera_data(prof, scenario, name="camera"):
    """A ``CameraData`` from a ``Profile`` (its train and test splits) and a ``Scenario``."""
    from offload.profile import TEST, TRAIN

    m = prof.standardized_metric().astype(np.float32)
    tr, te = prof.indices(TRAIN), prof.indices(TEST)
    if len(tr) < 2 or len(te) < 1:
        raise ValueError(f"{name}: profile needs training and test images "
                         f"(has {len(tr)} train, {len(te)} test)")
    return CameraData(name, scenario, (m[tr], prof.reward[tr]),
                      (m[te], prof.reward[te], prof.weak_loss[te]))


def fleet_streams(datas, *, purpose, length, n_seq):
    """Each camera's ``n_seq`` streams of ``length`` images: a list of ``Streams``.

    ``purpose`` ``"test"`` draws from the test split, ``"training"`` from the
    training split (its weak loss is not needed there: zeros). Cameras sharing
    one ``CameraData`` get disjoint blocks of one draw, so they are independent.
    """
    groups = {}
    for i, d in enumerate(datas):
        groups.setdefault(id(d), []).append(i)
    out = [None] * len(datas)
    for members in groups.values():
        d = datas[members[0]]
        if purpose == "test":
            metric, reward, weak = d.test
        else:
            (metric, reward), weak = d.train, np.zeros(len(d.train[0]), np.float32)
        st = d.scenario.streams(metric, reward, weak, length=length, n_seq=n_seq * len(members),
                                purpose=purpose)
        for b, i in enumerate(members):
            sl = slice(b * n_seq, (b + 1) * n_seq)
            out[i] = type(st)(st.metric[sl], st.reward[sl], st.weak_loss[sl],
                              st.interarrival[sl], st.raw_metric[sl])
    return out


class PolicyCache:
    """MDP thresholds per (camera data, rate, depth), each solved once (SPEC section 5)."""

    def __init__(self):
        self._theta = {}
        self._merged = {}

    def __len__(self):
        return len(self._theta)

    def mdp(self, data, rate, depth, *, arrivals=True):
        """``(bucket, theta)`` of the MDP policy for ``(rate, depth)`` on ``data``'s training images.

        ``arrivals=False`` assumes periodic arrivals (the pooled policy's merged stream).
        """
        key = (id(data), float(rate), float(depth), arrivals)
        if key not in self._theta:
            bucket = Bucket.from_rate(rate, depth)
            theta = policies.mdp_thresholds(*data.train, bucket,
                                            interarrival=data.arrivals() if arrivals else None)
            self._theta[key] = (bucket, theta, data)  # data kept alive: its id is the key
        return self._theta[key][:2]

    def prefetch(self, data, buckets, *, workers=1, ray_address=None, progress=False):
        """Solve the MDPs of every ``(rate, depth)`` in ``buckets`` not yet cached.

        ``workers > 1`` solves them in that many local processes, ``ray_address``
        as tasks on that Ray cluster (like ``offload-train sweep --ray``); each
        bucket's value iteration is independent, so the numbers are the same.
        """
        todo = [rb for rb in dict.fromkeys(buckets)
                if (id(data), float(rb[0]), float(rb[1]), True) not in self._theta]
        args = [(data.train, rb, data.arrivals()) for rb in todo]
        with contextlib.ExitStack() as stack:
            if ray_address:
                thetas = _solve_on_ray(args, ray_address)
            elif workers <= 1 or len(todo) < 2:
                thetas = map(_solve, args)
            else:
                import concurrent.futures as cf
                import multiprocessing as mp

                pool = stack.enter_context(
                    cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")))
                thetas = pool.map(_solve, args, chunksize=max(1, len(args) // (4 * workers)))
            for rb, theta in tqdm(zip(todo, thetas), total=len(todo), desc="MDP policies",
                                  unit="bucket", leave=False, disable=None if progress else True):
                self._theta[(id(data), float(rb[0]), float(rb[1]), True)] = (
                    Bucket.from_rate(*rb), theta, data)

    def merged(self, datas):
        """One ``CameraData`` of every camera's training images together (the pooled policy's)."""
        key = tuple(id(d) for d in datas)
        if key not in self._merged:
            train = tuple(np.concatenate([d.train[j] for d in datas]) for j in (0, 1))
            self._merged[key] = (CameraData("merged", datas[0].scenario, train, ()), datas)
        return self._merged[key][0]


def _solve_on_ray(args, address):
    """``_solve`` over ``args`` as Ray tasks on the cluster at ``address``, results in order."""
    from offload.commandline import connect_ray

    ray = connect_ray(address)
    task = ray.remote(num_cpus=1, max_retries=0)(_solve)
    refs = [task.remote(a) for a in args]
    for ref in refs:
        yield ray.get(ref)


def _solve(args):
    """One MDP solve in a worker process: ``((metric, reward), (rate, depth), arrivals) -> theta``."""
    train, (rate, depth), arrivals = args
    return policies.mdp_thresholds(*train, Bucket.from_rate(rate, depth), interarrival=arrivals)


def grid_points(setting, rates=GRID_RATES, depths=GRID_DEPTHS, *, step=1):
    """The grid's ``(r_i, b_i)`` that are not smaller than ``(r_g, b_p)`` (the published skip rule).

    A point is skipped when ``r_i <= r_g and b_i < b_p`` or ``r_i < r_g and b_i <= b_p``.
    ``step`` keeps every ``step``-th rate and depth (a coarse look; 1 = the whole grid).
    """
    if int(step) < 1:
        raise ValueError(f"grid step {step}: need >= 1")
    rates, depths = rates[::int(step)], depths[::int(step)]
    r_g, b_p = setting.switch_rate, setting.depth_per_camera
    return [(r, b) for r in rates for b in depths
            if not ((r <= r_g and b < b_p) or (r < r_g and b <= b_p))]


def _cameras(datas, streams, buckets, cache):
    cams = []
    for d, st, (r, b) in zip(datas, streams, buckets):
        bucket, theta = cache.mdp(d, r, b)
        cams.append(fleet.Camera(st, bucket, theta=theta, name=d.name))
    return cams


def isolated(datas, setting, streams, cache, *, order="fixed", seed=0):
    """Every camera ``(r_g, b_p)`` with its MDP policy; a ``FleetResult``."""
    buckets = [(setting.switch_rate, setting.depth_per_camera)] * len(datas)
    return fleet.run_fleet(_cameras(datas, streams, buckets, cache), setting.switch,
                           name="isolated", buckets=buckets, order=order, seed=seed)


def pooled(datas, setting, streams, cache, *, order="fixed", seed=0):
    """One MDP policy for ``(r_g, b_g)`` on every camera's training images, deciding for all."""
    _, theta = cache.mdp(cache.merged(datas), setting.switch_rate, setting.switch_depth,
                         arrivals=False)
    cams = [fleet.Camera(st, setting.switch, theta=theta, name=d.name)
            for d, st in zip(datas, streams)]
    return fleet.run_pooled(cams, setting.switch, theta, order=order, seed=seed)


def grid_search(datas, setting, train_streams, cache, *, feedback="none", order="fixed", seed=0,
                points=None, workers=1, ray_address=None, progress=False):
    """Training reward of every grid point (every camera the same ``(r_i, b_i)``).

    Returns ``(points, rewards)``: the ``(r_i, b_i)`` searched (``grid_points``
    unless given) and the fleet's mean reward per image at each on the training
    streams. The MDP policies are solved first (``PolicyCache.prefetch``, in
    ``workers`` local processes or on ``ray_address``), then the fleet runs in this process.
    """
    points = grid_points(setting) if points is None else list(points)
    if not points:
        raise ValueError("the search grid has no bucket at least as large as (r_g, b_p)")
    for d in dict.fromkeys(datas):
        cache.prefetch(d, points, workers=workers, ray_address=ray_address, progress=progress)
    rewards = np.empty(len(points))
    stack = fleet.stack_streams(train_streams)
    for j, rb in enumerate(tqdm(points, desc="fleet grid", unit="bucket", leave=False,
                                disable=None if progress else True)):
        cams = _cameras(datas, train_streams, [rb] * len(datas), cache)
        rewards[j] = fleet.run_fleet(cams, setting.switch, order=order, seed=seed,
                                     feedback=feedback, stack=stack).reward
    return points, rewards


def hierarchical(datas, setting, streams, train_streams, cache, *, feedback="none", order="fixed",
                 seed=0, name="hierarchical", points=None, workers=1, ray_address=None,
                 progress=False):
    """The grid's best ``(r_i, b_i)`` on the training streams, run on ``streams``.

    Returns ``(FleetResult, search)``; ``search`` holds the grid points, their
    training rewards and the best point.
    """
    pts, rewards = grid_search(datas, setting, train_streams, cache, feedback=feedback,
                               order=order, seed=seed, points=points, workers=workers,
                               ray_address=ray_address,
                               progress=progress)
    best = pts[int(np.argmax(rewards))]  # first of equals, as the published nanargmax
    buckets = [best] * len(datas)
    res = fleet.run_fleet(_cameras(datas, streams, buckets, cache), setting.switch, name=name,
                          buckets=buckets, order=order, seed=seed, feedback=feedback)
    return res, {"points": pts, "train_reward": rewards, "best": best}


def run_strategies(datas, setting, *, length, n_seq, train_length, train_seq, cache=None,
                   order="fixed", seed=0, names=STRATEGIES, grid_step=1, workers=1,
                   ray_address=None, progress=False):
    """Every strategy in ``names`` on the same test streams: ``(results by name, searches)``.

    ``grid_step``: the hierarchical searches' grid (``grid_points(step=...)``);
    ``workers``: local processes for its MDP solves; ``ray_address``: a Ray cluster
    for them instead.
    """
    cache = PolicyCache() if cache is None else cache
    if len(datas) != setting.cameras:
        raise ValueError(f"{len(datas)} camera data for {setting.cameras} cameras")
    test = fleet_streams(datas, purpose="test", length=length, n_seq=n_seq)
    train = None
    if any(n.startswith("hierarchical") for n in names):
        train = fleet_streams(datas, purpose="training", length=train_length, n_seq=train_seq)
    out, searches = {}, {}
    for name in names:
        if name == "isolated":
            out[name] = isolated(datas, setting, test, cache, order=order, seed=seed)
        elif name == "pooled":
            out[name] = pooled(datas, setting, test, cache, order=order, seed=seed)
        elif name in ("hierarchical", "hierarchical-retry-after"):
            fb = "retry-after" if name.endswith("retry-after") else "none"
            out[name], searches[name] = hierarchical(
                datas, setting, test, train, cache, feedback=fb, order=order, seed=seed,
                name=name, points=grid_points(setting, step=grid_step), workers=workers,
                ray_address=ray_address,
                progress=progress)
        else:
            raise ValueError(f"unknown strategy {name!r} (one of {', '.join(STRATEGIES)})")
    return out, searches
