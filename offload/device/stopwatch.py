"""Per-part time of the device loop, for the summary's ``overhead_us`` and the records' ``ms``.

::

    watch = Stopwatch(("weak", "log", "other"))
    with watch.part("weak") as lap:
        out = classify(image)
    record.time("weak", lap.seconds)
    with watch.part("other"):
        drain()                       # a part timed inside ("log") is booked to itself
    watch.per_frame_us(frames)        # {"weak": µs, "log": µs, "other": µs}

A part timed inside another is booked to itself only: the enclosing part gets
its own time without the nested one, so the parts add up to the loop's time.
"""

from __future__ import annotations

import time

__all__ = ["Stopwatch"]


class _Lap:
    """One timed part; ``seconds`` (its whole time, nested parts included) once it ends."""

    __slots__ = ("watch", "name", "start", "nested", "seconds")

    def __init__(self, watch, name):
        self.watch, self.name = watch, name
        self.nested = self.seconds = 0.0

    def __enter__(self):
        self.watch._open.append(self)
        self.start = self.watch.clock()
        return self

    def __exit__(self, *exc):
        w = self.watch
        self.seconds = w.clock() - self.start
        w._open.pop()
        w.totals[self.name] += self.seconds - self.nested
        if w._open:
            w._open[-1].nested += self.seconds
        return False


class Stopwatch:
    """Sums the time of named parts (s); ``clock`` is any monotonic function (default ``perf_counter``)."""

    def __init__(self, parts, *, clock=time.perf_counter):
        self.totals = dict.fromkeys(parts, 0.0)
        self.clock = clock
        self._open = []

    def part(self, name):
        """A context manager timing one occurrence of part ``name`` (one of ``parts``)."""
        return _Lap(self, name)

    def per_frame_us(self, frames):
        """Mean time of each part per frame (µs, 2 decimals); ``frames`` at least 1 is used."""
        n = max(1, frames)
        return {k: round(v / n * 1e6, 2) for k, v in self.totals.items()}
