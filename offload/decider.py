"""The per-frame DQN decision the device runs, built from a policy blob.

``Decider`` (native) fuses history ring, int8 network, decision rule and token
bucket into one call per frame; ``decide_sequence_reference`` is its numpy twin
over a whole sequence.
"""

import numpy as np

from offload.bucket import TokenBucket
from offload.mlp import decide_reference, forward_int8
from offload.ring import HistoryRing, window_reference
from offload_native import Decider

__all__ = ["Decider", "from_policy", "decide_sequence_reference"]


def from_policy(policy):
    """A ``Decider`` for a DQN ``offload.blob.Policy`` (bucket full, history empty)."""
    if policy.kind != "dqn":
        raise ValueError(f"a Decider runs DQN policies, this one is {policy.kind!r}")
    return Decider(policy.qmlp.native(), HistoryRing(policy.H, policy.interarrival),
                   TokenBucket(*policy.bucket))


def decide_sequence_reference(qmlp, metrics, interarrival, bucket, *, H, use_interarrival=True):
    """Numpy reference: decisions (bool) and token states for one sequence.

    ``metrics[k]`` standardised metric of image ``k``; ``interarrival[k]`` slots
    from image ``k`` to ``k+1``; ``bucket`` an ``offload.bucket.Bucket``. Bucket
    starts full, history empty.
    """
    n = bucket.M
    decisions, states = [], []
    for k in range(len(metrics)):
        x = window_reference(metrics, interarrival, k, H, use_interarrival)
        q = forward_int8(qmlp, x)[0]
        a = decide_reference(q, n, bucket)
        decisions.append(a)
        states.append(n)
        n = bucket.step(n, a, int(interarrival[k]))
    return np.array(decisions), np.array(states)
