"""The time slot of each decided frame, and the inter-arrival the policy sees.

With slot length ``S`` and ``t_0`` the first decided frame's time stamp, frame
``k`` is in slot ``s_k = max(s_{k-1} + 1, slot_index(t_k, t_0, S))``
(:func:`offload.bucket.slot_index`: half-up rounding, the rule the server
shares) and its inter-arrival is ``s_k - s_{k-1}`` slots, at least 1 as SPEC 1
needs. Rounding the time since the first frame (not each gap) keeps slots from
drifting away from the clock; a frame closer than one slot to the previous one
is pushed to the next slot, which over-counts time.
"""

from __future__ import annotations

from offload.bucket import slot_index

__all__ = ["Slotter"]


class Slotter:
    """Places frames in strictly increasing slots of ``slot_s`` seconds."""

    def __init__(self, slot_s):
        self.slot_s = float(slot_s)
        self.t0 = self.prev = None

    def place(self, t):
        """``(slot, slots)`` of a frame stamped ``t`` (s): its slot, and slots since the previous
        placed frame (0 for the first)."""
        if self.t0 is None:
            self.t0 = t
        s = slot_index(t, self.t0, self.slot_s)
        if self.prev is None:
            self.prev = s
            return s, 0
        s = max(self.prev + 1, s)
        slots, self.prev = s - self.prev, s
        return s, slots
