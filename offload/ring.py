"""History of standardised metrics and inter-arrival times: the DQN's input.

``HistoryRing`` (native) keeps the last ``H = T - 1`` values of each and writes
the input vector of SPEC section 6; ``window_reference`` is its numpy twin over a
whole sequence, used by training and by the tests.
"""

import numpy as np

from offload_native import HistoryRing

__all__ = ["HistoryRing", "window_reference", "input_size"]


def input_size(H, interarrival):
    """Length of the DQN input: ``H`` metrics, plus ``H`` inter-arrival times if used."""
    return 2 * H if interarrival else H


def window_reference(metrics, interarrival, k, H, use_interarrival=True):
    """The DQN input for image ``k`` of one sequence (numpy, float32).

    ``metrics[j]`` is the standardised metric of image ``j``; ``interarrival[j]``
    the slots between image ``j`` and ``j+1``. Returns
    ``m[k], ..., m[k-H+1]`` then (optionally) ``i[k-1], ..., i[k-H]``, with zeros
    for positions before the start.
    """
    out = np.zeros(input_size(H, use_interarrival), dtype=np.float32)
    for d in range(H):
        if k - d >= 0:
            out[d] = metrics[k - d]
        if use_interarrival and k - 1 - d >= 0:
            out[H + d] = interarrival[k - 1 - d]
    return out
