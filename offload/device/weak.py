"""The weak classifier on the device: accelerator choice and an inference watchdog.

``open_weak(model, accelerator, device)`` resolves ``--accelerator``:

* ``cpu``: the model on LiteRT's CPU kernels. An Edge-TPU-compiled model
  (``*_edgetpu.tflite``, holding ``edgetpu-custom-op``) is refused with a
  message naming its CPU twin.
* ``edgetpu``: the Edge TPU delegate (``libedgetpu.so.1``, with the ``device``
  option ``usb``/``usb:N``/``pci``/``pci:N``) is required; no fallback.
* ``auto``: the Edge TPU when its delegate loads, else the CPU with one
  warning (and the CPU twin of a compiled model when that file exists).

:class:`Watchdog` runs every inference in a worker thread and waits at most
``timeout`` seconds. An inference that hangs (a wedged USB accelerator does)
is abandoned with its thread, the model is loaded again in a fresh thread
(also bounded by ``timeout``) and, if that hangs or fails, the CPU model is
used from then on. The loop records the event on the frame and goes on.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings

from offload.classifier import (ClassifierError, EdgeTPUUnavailable, WeakClassifier,
                                cpu_model_for, is_edgetpu_model)

__all__ = ["open_weak", "Watchdog", "WeakSpec", "WatchdogError", "AcceleratorWarning"]


class AcceleratorWarning(UserWarning):
    """``--accelerator auto`` fell back to the CPU."""


class WatchdogError(RuntimeError):
    """Even the CPU model could not be (re)loaded or hangs: the loop cannot classify."""


class WeakSpec:
    """How to build the weak classifier: ``make()`` for the chosen one, ``make_cpu()`` for the fallback.

    Attributes
    ----------
    model : str, the model file in use; cpu_model : str or None, the CPU fallback's file
    accelerator : "edgetpu" or "cpu" (what was resolved); device : str or None
    note : str or None, the one warning ``auto`` gave when it fell back
    """

    def __init__(self, model, accelerator, device=None, cpu_model=None, threads=None, note=None,
                 card=None):
        self.model, self.accelerator, self.device = model, accelerator, device
        self.cpu_model, self.threads, self.note = cpu_model, threads, note
        self.card = card

    def make(self):
        return WeakClassifier(self.model, edgetpu=self.accelerator == "edgetpu",
                              device=self.device, num_threads=self.threads, card=self.card)

    def make_cpu(self):
        if self.cpu_model is None:
            raise ClassifierError(f"no CPU model to fall back to for {self.model}")
        return WeakClassifier(self.cpu_model, edgetpu=False, num_threads=self.threads,
                              card=self.card)


def open_weak(model, accelerator="auto", device=None, threads=None, card=None):
    """Resolve the accelerator and load the weak classifier once.

    Returns ``(classifier, spec)``. ``auto`` emits exactly one
    :class:`AcceleratorWarning` when it falls back to the CPU. ``card``
    (a ModelCard, a TOML card file or a dict of fields) overrides the model's
    own card, as in :class:`offload.classifier.WeakClassifier`; the CPU
    fallback gets the same card.

    Raises
    ------
    ClassifierError
        Missing or unusable model file.
    EdgeTPUUnavailable
        ``edgetpu`` without a loadable delegate, or a compiled model with no
        delegate (message names the CPU model to use).
    """
    model = os.fspath(model)
    if not os.path.isfile(model):
        raise ClassifierError(f"weak model not found: {model}")
    compiled = is_edgetpu_model(model)
    twin = cpu_model_for(model) if compiled else model
    if accelerator == "cpu":
        if compiled:
            raise EdgeTPUUnavailable(
                f"{model} is compiled for the Edge TPU and cannot run with --accelerator cpu; "
                f"use its CPU model {twin or '(the uncompiled .tflite)'}")
        spec = WeakSpec(model, "cpu", cpu_model=model, threads=threads, card=card)
        return spec.make(), spec
    if accelerator == "edgetpu":
        spec = WeakSpec(model, "edgetpu", device, cpu_model=twin if twin and os.path.isfile(twin)
                        else None, threads=threads, card=card)
        return spec.make(), spec
    if accelerator != "auto":
        raise ValueError(f"accelerator must be auto, edgetpu or cpu, got {accelerator!r}")
    try:
        spec = WeakSpec(model, "edgetpu", device, threads=threads, card=card,
                        cpu_model=twin if twin and os.path.isfile(twin) else None)
        return spec.make(), spec
    except EdgeTPUUnavailable as e:
        reason = str(e.__cause__ or e).splitlines()[0]
    if compiled:
        if not (twin and os.path.isfile(twin)):
            raise EdgeTPUUnavailable(
                f"{model} is compiled for the Edge TPU, whose delegate is not available "
                f"({reason}); pass --model {twin or 'the uncompiled .tflite'} to run on the CPU")
        cpu = twin
    else:
        cpu = model
    note = (f"Edge TPU not available ({reason}); running the weak model {cpu} on the CPU")
    warnings.warn(note, AcceleratorWarning, stacklevel=2)
    spec = WeakSpec(cpu, "cpu", cpu_model=cpu, threads=threads, note=note, card=card)
    return spec.make(), spec


class _Worker:
    """One thread owning one classifier; jobs in, ``(ok, value)`` out per job."""

    def __init__(self):
        self.jobs = queue.Queue()
        self.done = queue.Queue()
        self.model = None
        self.thread = threading.Thread(target=self._run, name="offload-weak", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            kind, arg = job
            try:
                if kind == "load":
                    self.model = arg()
                    self.done.put((True, self.model))
                else:
                    self.done.put((True, self.model.classify(arg)))
            except BaseException as e:  # reported to the caller, never lost in the thread
                self.done.put((False, e))

    def call(self, kind, arg, timeout):
        """``(finished, ok, value)``: finished is False when ``timeout`` s passed first."""
        self.jobs.put((kind, arg))
        try:
            ok, value = self.done.get(timeout=timeout)
        except queue.Empty:
            return False, False, None
        return True, ok, value

    def stop(self):
        self.jobs.put(None)


class Watchdog:
    """Weak inference with a time limit, reload on a hang, CPU fallback.

    Parameters
    ----------
    make : callable () -> classifier
        Builds the classifier in use (the worker thread calls it). Any object
        with ``classify(image) -> WeakOutput`` and ``n_classes`` works
        (tests inject a hanging one).
    make_cpu : callable () -> classifier, optional
        The fallback when reloading ``make`` hangs or fails.
    timeout : float
        Seconds an inference (or a load) may take.
    first : classifier, optional
        An already-loaded classifier to start with (skips the first load).

    ``classify(image)`` returns ``(output or None, event or None)``; ``event``
    is ``None`` normally, else one of ``"hang-reloaded"``, ``"hang-cpu"``
    (the frame's inference was abandoned) or ``"error: ..."`` (it raised).
    ``events`` lists ``(frame_index, event)`` for the summary.
    """

    def __init__(self, make, timeout, make_cpu=None, first=None):
        self.make, self.make_cpu, self.timeout = make, make_cpu, float(timeout)
        self.events = []
        self.on_cpu_fallback = False
        self._calls = 0
        self._hangs = 0       # hangs of the model in use
        self._worker = _Worker()
        if first is not None:
            self._worker.model = first
        else:
            self._load(make, "load")
        self.n_classes = self._worker.model.n_classes

    def _load(self, factory, what):
        finished, ok, value = self._worker.call("load", factory, self.timeout)
        if not finished:
            self._worker = _Worker()  # the old thread is stuck in the load; leave it
            raise WatchdogError(f"{what}: loading the weak model took longer than "
                                f"{self.timeout:g} s")
        if not ok:
            raise WatchdogError(f"{what}: {value}")
        return value

    def classify(self, image):
        self._calls += 1
        finished, ok, value = self._worker.call("classify", image, self.timeout)
        if finished and ok:
            return value, None
        if finished:
            return None, f"error: {type(value).__name__}: {value}"
        # Hung: abandon the thread (Python cannot kill it; it is a daemon) and
        # load the model again in a fresh one. A second hang of the same model
        # (a device that keeps wedging), or a reload that hangs or fails, moves
        # to the CPU model for the rest of the run.
        self._worker.stop()
        self._worker = _Worker()
        self._hangs += 1
        can_fall_back = self.make_cpu is not None and not self.on_cpu_fallback
        first_error = None
        if self._hangs < 2 or not can_fall_back:
            try:
                self._load(self.make, "reload")
            except WatchdogError as e:
                if not can_fall_back:
                    raise WatchdogError(f"weak inference hung past {self.timeout:g} s and the "
                                        f"model could not be reloaded ({e})") from None
                first_error = e
            else:
                self.events.append((self._calls - 1, "hang-reloaded"))
                return None, "hang-reloaded"
        self._worker.stop()
        self._worker = _Worker()
        try:
            self._load(self.make_cpu, "CPU fallback")
        except WatchdogError as e:
            why = f"reload failed ({first_error})" if first_error else "it hung again"
            raise WatchdogError(f"weak inference hung past {self.timeout:g} s; {why} and the "
                                f"CPU model could not be loaded either ({e})") from None
        self.on_cpu_fallback = True
        self.make, self._hangs = self.make_cpu, 0
        self.events.append((self._calls - 1, "hang-cpu"))
        return None, "hang-cpu"

    def close(self):
        self._worker.stop()

