"""Stop a long run cleanly on SIGINT/SIGTERM: one helper for the device loop and the trainer.

::

    with StopOnSignal() as stop:
        while not stop.is_set():
            work()
    if stop.signal:
        print(f"stopped by {stop.signal}")

Entering installs handlers for the signals that only record the first signal
and set :attr:`StopOnSignal.event`; leaving restores the previous handlers.
Outside the main thread Python cannot install handlers: the helper then
installs none (Ctrl+C raises as usual) and the event still works, so another
thread can stop the run with ``stop.event.set()``. Torch-free, no imports
beyond the standard library.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopOnSignal"]


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set an event instead of raising ``KeyboardInterrupt``.

    Parameters
    ----------
    event : threading.Event, optional
        The event to set (a caller's own stop event); default: a new one.
    install : bool
        False: install no handler (the caller's host program handles
        signals), only the event stops the run.
    signals : tuple of signal.Signals
        The signals handled.

    Attributes
    ----------
    event : threading.Event
        Set by a handled signal (or by anyone holding it).
    signum : int or None
        The first signal received, if any.
    """

    def __init__(self, event=None, *, install=True, signals=(signal.SIGINT, signal.SIGTERM)):
        self.event = event if event is not None else threading.Event()
        self.install, self.signals = install, tuple(signals)
        self.signum = None
        self._old = {}

    @property
    def signal(self):
        """Name of the first signal received (``"SIGINT"``), or None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def is_set(self):
        """True once a signal arrived or the event was set otherwise."""
        return self.event.is_set()

    def _handle(self, signum, _frame):
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def __enter__(self):
        if self.install and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        while self._old:
            sig, old = self._old.popitem()
            signal.signal(sig, old)
        return False
