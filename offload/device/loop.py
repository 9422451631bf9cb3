"""The device loop: capture -> weak classifier -> metric -> policy -> (offload) -> log.

Python API (what ``offload-run`` and the ``--demo`` call)::

    from offload.device import RunConfig, make_config, run
    cfg = make_config(overrides={"video": "clip.avi", "server": "http://127.0.0.1:8080",
                                 "key": "secret", "labels": "labels.csv", "log": "frames.jsonl"})
    summary = run(cfg)          # -> dict, see offload.device.status

Per frame (docs/device.md has the details), in :meth:`FrameLoop.run`:

1. the source gives ``(frame_id, t, image, label)``;
2. the weak classifier runs under the watchdog (``--inference-timeout``);
3. entropy of the calibrated softmax, metric from the blob's table, standardised;
4. the frame is put in a time slot (:class:`offload.device.slotter.Slotter`)
   and the policy decides with the bucket;
5. an offload goes on the sender's queue (never waiting for the network);
   its record is written when the answer or the failure comes back, every
   other frame's record at once.

Everything the run holds (source, watchdog, log, status line, sender, signal
handlers) is opened on one ``contextlib.ExitStack`` and released by it, in
reverse order, however the run ends.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import time
import warnings

from offload import artifacts
from offload.blob import read_blob
from offload.device.capture import open_source
from offload.device.config import ConfigError, RunConfig, make_config, read_key
from offload.device.framelog import FrameLog
from offload.device.payload import CARD_SIZE, card_box, parse_size, resolve_format
from offload.device.policy import FrameMetric, Policy
from offload.device.record import FrameRecord, Outcome
from offload.device.sender import Sender
from offload.device.slotter import Slotter
from offload.device.status import Stats, StatusLine, format_summary
from offload.device.stopwatch import Stopwatch
from offload.device.weak import AcceleratorWarning, Watchdog, open_weak
from offload.stopsignal import StopOnSignal

__all__ = ["run", "FrameLoop", "PARTS", "resolve_paths", "format_summary"]

#: The loop's parts, timed for the summary's ``overhead_us`` (µs per frame).
PARTS = ("capture", "weak", "metric", "policy", "record", "send", "stats", "log", "other")


def resolve_paths(cfg):
    """``(policy path, model path)``: the given ones, else the committed artifacts."""
    policy = cfg.policy or artifacts.find("policy.bin")
    if policy is None:
        raise ConfigError("policy: no --policy given and no committed policy.bin was found; "
                          "pass --policy FILE (a DQN blob such as docs/dqn/fig7.bin, or "
                          "offload-sim --write-blob mdp mdp.bin)")
    model = cfg.model or artifacts.find("weak_int8.tflite")
    if model is None:
        raise ConfigError("model: no --model given and no committed weak_int8.tflite was found")
    return policy, model


class FrameLoop:
    """One run's frame loop over opened parts; :meth:`run` is the loop itself.

    ``log`` and ``sender`` may be None (no log; local-only). Records of
    offloaded frames wait in ``pending`` (frame id -> record) for their result.
    """

    def __init__(self, cfg, blob, *, source, watchdog, log, sender, stats, status):
        self.cfg, self.P = cfg, blob.P
        self.source, self.watchdog, self.log, self.sender = source, watchdog, log, sender
        self.stats, self.status = stats, status
        self.metric_of, self.policy = FrameMetric(blob), Policy(blob)
        self.slotter = Slotter(cfg.slot_ms / 1000.0)
        self.watch = Stopwatch(PARTS)
        self.pending = {}
        self.in_hand = None        # the record of the frame being handled
        self.frames_seen = 0
        self.t_start = time.monotonic()

    def run(self, stop):
        """Handle frames until the source ends, ``max-frames`` or ``stop`` (an Event) is set."""
        self.t_start = time.monotonic()
        for frame in self.capture(stop):
            rec = self.in_hand = FrameRecord.of(frame)
            out = self.classify(frame, rec)
            if out is not None:
                self.decide(frame, out, rec)
                self.dispatch(frame, rec)
            self.in_hand = None
            if rec.done:
                self.finish(rec)
            self.between_frames()

    # ------------------------------------------------------------------ the parts

    def capture(self, stop):
        """Frames from the source, paced with ``realtime``; stops on ``stop`` or ``max-frames``."""
        it = iter(self.source)
        pace = self.cfg.realtime and getattr(self.source, "replayable", False)
        while not stop.is_set():
            if self.cfg.max_frames is not None and self.frames_seen >= self.cfg.max_frames:
                return
            with self.watch.part("capture"):
                frame = next(it, None)
            if frame is None:
                return
            self.frames_seen += 1
            if stop.is_set():
                # captured after the stop: still logged, so nothing is lost silently
                rec = FrameRecord.of(frame)
                rec.end(Outcome.CANCELLED, "captured after the stop signal")
                self.finish(rec)
                return
            if pace:
                wait = self.t_start + frame.t - time.monotonic()
                if wait > 0:
                    stop.wait(wait)   # a stop during the wait: this frame is still handled
            yield frame

    def classify(self, frame, rec):
        """The weak classifier's output under the watchdog; None when the inference failed."""
        with self.watch.part("weak") as lap:
            out, event = self.watchdog.classify(frame.image)
        rec.time("weak", lap.seconds)
        if event:
            rec.event = event
        if out is None:
            rec.end(Outcome.WEAK_FAILED)
        return out

    def decide(self, frame, out, rec):
        """Metric, slot and the policy's decision with the bucket, into ``rec``."""
        with self.watch.part("metric") as lap:
            p, h, raw, m = self.metric_of(out.logits)
        rec.time("metric", lap.seconds)
        with self.watch.part("policy") as lap:
            slot, slots = self.slotter.place(frame.t)
            a, n0, n1 = self.policy.decide(m, slots)
        rec.time("policy", lap.seconds)
        with self.watch.part("record"):
            rec.decided(slot=slot, slots=slots, probs=p, entropy=h, metric=raw, metric_std=m,
                        n_before=n0, n_after=n1, P=self.P, offload=a, k=self.cfg.top_k)

    def dispatch(self, frame, rec):
        """Keep the weak answer, or put the frame on the sender's queue (never waiting)."""
        if not rec.offload:
            rec.end(Outcome.NOT_OFFLOADED)
        elif self.sender is None:
            rec.end(Outcome.LOCAL_ONLY)
        else:
            with self.watch.part("send"):
                queued = self.sender.submit(frame.frame_id, frame.image)
            if queued:
                self.pending[frame.frame_id] = rec
            else:
                rec.end(Outcome.QUEUE_FULL,
                        f"send queue full ({self.cfg.queue_size} frames waiting)")

    def finish(self, rec):
        """Count a finished record and write it to the log."""
        with self.watch.part("stats"):
            self.stats.add(rec)
        if self.log is not None:
            with self.watch.part("log"):
                self.log.write(rec.as_dict())

    def between_frames(self):
        """Finish the offloads whose result came back; redraw the status line."""
        with self.watch.part("other"):
            self.drain()
            self.status.update()

    def drain(self):
        """Finish every offloaded frame whose result is on the sender's queue now."""
        if self.sender is None:
            return
        while True:
            try:
                res = self.sender.results.get_nowait()
            except queue.Empty:
                return
            rec = self.pending.pop(res.frame_id, None)
            if rec is not None:
                rec.answered(res, self.cfg.top_k)
                self.finish(rec)

    def wind_down(self, exc_type, exc, tb):
        """``ExitStack`` exit: log the frame in hand on an error, drain the sender, cancel the rest."""
        rec = self.in_hand
        if exc is not None and rec is not None and not rec.done and rec.id not in self.pending:
            rec.end(Outcome.ERROR, f"{type(exc).__name__}: {exc}")   # logged too
            self.finish(rec)
        if self.sender is not None:
            self.sender.close(self.cfg.drain_timeout if exc is None else 0.0)
            self.drain()
        for fid in list(self.pending):
            rec = self.pending.pop(fid)
            rec.end(Outcome.CANCELLED, "no result before the run ended")
            self.finish(rec)
        return False


# ---------------------------------------------------------------------- opening


def _close_quietly(thing):
    with contextlib.suppress(Exception):
        thing.close()


def _weak_factories(cfg, model_path, make_classifier, make_cpu_classifier, say):
    """``(make, make_cpu, first)`` for the watchdog: injected, or from ``--model``/``--accelerator``."""
    if make_classifier is not None:
        return make_classifier, make_cpu_classifier, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AcceleratorWarning)
        first, spec = open_weak(model_path, cfg.accelerator, cfg.device, cfg.threads)
    for w in caught:
        say(f"warning: {w.message}")
    make_cpu = spec.make_cpu if spec.accelerator != "cpu" and spec.cpu_model else None
    return spec.make, make_cpu, first


def _send_box(cfg):
    """``(send size, cover)`` for the v1 sender: ``WxH``, the server card's size, or none."""
    if cfg.send_size is None:
        return None, False
    if cfg.send_size == CARD_SIZE:
        try:
            return card_box(cfg.server_card)
        except ValueError as e:
            raise ConfigError(f"server-card: {e}") from None
    return parse_size(cfg.send_size), False


def _open_loop(stack, cfg, blob, key, stats, *, model_path, source, make_classifier,
               make_cpu_classifier, status_stream, say):
    """Open the run's parts on ``stack`` (each released by it) and the loop over them."""
    src = source if source is not None else open_source(cfg, cfg.slot_ms / 1000.0)
    if hasattr(src, "close"):
        stack.callback(_close_quietly, src)
    make, make_cpu, first = _weak_factories(cfg, model_path, make_classifier,
                                            make_cpu_classifier, say)
    watchdog = Watchdog(make, cfg.inference_timeout, make_cpu=make_cpu, first=first)
    stack.callback(watchdog.close)
    log = None
    if cfg.log:
        log = stack.enter_context(FrameLog(cfg.log, cfg.log_max_bytes, cfg.log_backups))
    status = StatusLine(status_stream, stats)
    stack.callback(status.finish)
    sender = None
    if cfg.server:
        protocol = None  # v1: the frame as an image
        send_size, cover = _send_box(cfg)
        if cfg.protocol == "v2":
            from offload.device.oipclient import V2Protocol

            protocol = V2Protocol.factory(model=cfg.server_model, binary=cfg.v2_binary,
                                          card=cfg.server_card, n_classes=watchdog.n_classes,
                                          warn=say)
        sender = Sender(cfg.server, key, queue_size=cfg.queue_size,
                        connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                        image_format=resolve_format(cfg.image_format, cfg.source[0]),
                        jpeg_quality=cfg.jpeg_quality,
                        send_size=send_size, send_cover=cover,
                        n_classes=watchdog.n_classes, ca_file=cfg.ca_file,
                        client_cert=cfg.client_cert, client_key=cfg.client_key, warn=say,
                        protocol=protocol)
    loop = FrameLoop(cfg, blob, source=src, watchdog=watchdog, log=log, sender=sender,
                     stats=stats, status=status)
    stack.push(loop.wind_down)   # first out after the signal handlers: drains while the log is open
    return loop


def run(config, *, source=None, make_classifier=None, make_cpu_classifier=None, stop=None,
        status_stream=None, echo=None, install_signals=True):
    """Run the device loop until the source ends, ``max-frames``, ``stop`` or SIGINT/SIGTERM.

    Parameters
    ----------
    config : RunConfig or dict
        A validated ``RunConfig`` (``make_config``), or a dict of keys for
        ``make_config(overrides=...)``.
    source : iterable of ``capture.Frame``, optional
        Frames to use instead of the configured source (e.g. ``MemorySource``).
    make_classifier, make_cpu_classifier : callable () -> classifier, optional
        Build the weak classifier (and its CPU fallback) instead of
        ``--model``/``--accelerator``; anything with ``classify(image)``
        returning ``offload.classifier.WeakOutput`` and ``n_classes``.
    stop : threading.Event, optional
        Set it (from any thread) to end the run as a signal would.
    status_stream : file, optional
        Where the live status line goes (only drawn when it is a TTY).
    echo : callable (str) -> None, optional
        Receives the run's messages (warnings, notes); default: stderr.
    install_signals : bool
        Handle SIGINT/SIGTERM (main thread only): stop capturing, drain, flush.

    Returns
    -------
    dict
        The summary (``offload.device.status.Stats.summary``) plus ``signal``
        (name or None), ``warnings`` (messages given), ``log`` (path),
        ``policy``, ``model`` (paths) and ``overhead_us`` (mean per-frame time
        of each part of the loop, µs, keys ``PARTS``).

    Raises
    ------
    ValueError
        ``ConfigError``, ``SourceError``, ``BlobError``, ``ClassifierError``,
        ``EdgeTPUUnavailable`` (a ``RuntimeError``), ``WatchdogError``
        (``RuntimeError``): the run could not start or could not go on; the
        log then still has one record per frame seen.
    """
    cfg = config if isinstance(config, RunConfig) else make_config(overrides=dict(config))
    said = []

    def say(msg):
        said.append(msg)
        (echo or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    policy_path, model_path = resolve_paths(cfg)
    blob = read_blob(policy_path)
    key = read_key(cfg)
    if cfg.server and not key:
        raise ConfigError("key: --server needs --key or --key-file")
    stats = Stats(bucket={"N": blob.N, "P": blob.P, "M": blob.M, "kind": blob.kind},
                  slot_ms=cfg.slot_ms, local_only=not cfg.server)
    with contextlib.ExitStack() as stack:
        loop = _open_loop(stack, cfg, blob, key, stats, model_path=model_path, source=source,
                          make_classifier=make_classifier,
                          make_cpu_classifier=make_cpu_classifier,
                          status_stream=status_stream, say=say)
        if not cfg.server:
            say("local-only: no --server given, no frame will be offloaded "
                "(the policy still decides and spends tokens; the weak answer stands)")
        stopper = stack.enter_context(StopOnSignal(stop, install=install_signals))
        loop.run(stopper.event)
    summary = stats.summary(duration_s=time.monotonic() - loop.t_start,
                            interrupted=stopper.is_set())
    summary.update(signal=stopper.signal, warnings=said, log=cfg.log, policy=policy_path,
                   model=model_path, overhead_us=loop.watch.per_frame_us(stats.frames))
    if cfg.summary_json:
        from offload.atomic import atomic_write_json

        atomic_write_json(cfg.summary_json, summary)
    return summary
