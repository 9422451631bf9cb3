"""Compiled core of offload: token bucket, history ring, int8 MLP, policy loops, fleet loop.

Each piece has a numpy twin in ``offload`` that the tests compare it against.
Import the public names from ``offload.bucket``, ``offload.ring`` and
``offload.mlp`` (and ``offload.policies``) rather than from here.
"""

from ._bucket import TokenBucket
from ._ring import HistoryRing
from ._mlp import Int8MLP, decide
from ._decider import Decider
from ._loops import oracle_dp, simulate_thresholds, upper_hull, walk_block, window_block
from ._fleet import fleet_walk

__all__ = ["TokenBucket", "HistoryRing", "Int8MLP", "decide", "Decider",
           "oracle_dp", "simulate_thresholds", "upper_hull", "walk_block", "window_block",
           "fleet_walk"]
