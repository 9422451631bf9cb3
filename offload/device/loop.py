"""The device loop: capture -> weak classifier -> metric -> policy -> (offload) -> log.

Python API (what ``offload-run`` and the ``--demo`` call)::

    from offload.device import RunConfig, make_config, run
    cfg = make_config(overrides={"video": "clip.avi", "server": "http://127.0.0.1:8080",
                                 "key": "secret", "labels": "labels.csv", "log": "frames.jsonl"})
    summary = run(cfg)          # -> dict, see offload.device.status

Per frame (docs/device.md has the details):

1. the source gives ``(frame_id, t, image, label)``;
2. the weak classifier runs under the watchdog (``--inference-timeout``);
3. entropy of the calibrated softmax, metric from the blob's table, standardised;
4. the frame is put in a time slot and the policy decides with the bucket;
5. an offload goes on the sender's queue (never waiting for the network);
   its record is written when the answer or the failure comes back, every
   other frame's record at once.

Slotting rule: with slot length ``S`` (``--slot-ms``) and ``t_0`` the first
decided frame's time stamp, frame ``k`` is in slot
``s_k = max(s_{k-1} + 1, round((t_k - t_0) / S))`` and its inter-arrival is
``i[k-1] = s_k - s_{k-1}`` slots (at least 1, as SPEC 1 needs). Rounding the
time since the first frame (not each gap) keeps slots from drifting away from
the clock; frames closer than one slot are pushed to the next slot, which
over-counts time, so choose ``--slot-ms`` no longer than the frame period.
"""

from __future__ import annotations

import contextlib
import math
import queue
import signal
import sys
import threading
import time
import warnings

import numpy as np

from offload import artifacts
from offload.blob import read_blob
from offload.device.capture import open_source
from offload.device.config import ConfigError, RunConfig, make_config, read_key
from offload.device.framelog import FrameLog
from offload.device.policy import FrameMetric, Policy
from offload.device.sender import Sender
from offload.device.status import Stats, StatusLine, format_summary
from offload.device.weak import AcceleratorWarning, Watchdog, open_weak

__all__ = ["run", "slot_of", "resolve_paths", "format_summary"]


def slot_of(t, t0, slot_s, prev_slot):
    """Slot index of a frame at time ``t`` (s): ``max(prev + 1, round((t - t0) / slot_s))``."""
    s = int(math.floor((t - t0) / slot_s + 0.5))
    return s if prev_slot is None else max(prev_slot + 1, s)


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


def _top(p, k):
    idx = np.argsort(-p, kind="stable")[:k]
    return [[int(i), round(float(p[i]), 5)] for i in idx]


def _ms(t0, t1):
    return round((t1 - t0) * 1e3, 4)


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
        The summary (``offload.device.status.Stats.summary``) plus ``warnings``
        (messages given), ``log`` (path) and ``overhead_us`` (mean per-frame
        time of each part of the loop, µs).

    Raises
    ------
    ValueError
        ``ConfigError``, ``SourceError``, ``BlobError``, ``ClassifierError``,
        ``EdgeTPUUnavailable`` (a ``RuntimeError``), ``WatchdogError``
        (``RuntimeError``): the run could not start or could not go on; the
        log then still has one record per frame seen.
    """
    cfg = config if isinstance(config, RunConfig) else make_config(overrides=dict(config))
    say_lines = []

    def say(msg):
        say_lines.append(msg)
        (echo or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    slot_s = cfg.slot_ms / 1000.0
    policy_path, model_path = resolve_paths(cfg)
    blob = read_blob(policy_path)
    key = read_key(cfg)
    if cfg.server and not key:
        raise ConfigError("key: --server needs --key or --key-file")

    metric_of = FrameMetric(blob)
    policy = Policy(blob)
    stats = Stats(bucket={"N": blob.N, "P": blob.P, "M": blob.M, "kind": blob.kind},
                  slot_ms=cfg.slot_ms, local_only=not cfg.server)
    P = blob.P
    # Open what the run holds; if a later step refuses, release the earlier ones.
    setup = contextlib.ExitStack()
    with setup:
        src = source if source is not None else open_source(cfg, slot_s)
        if hasattr(src, "close"):
            setup.callback(src.close)
        if make_classifier is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", AcceleratorWarning)
                first, spec = open_weak(model_path, cfg.accelerator, cfg.device, cfg.threads)
            for w in caught:
                say(f"warning: {w.message}")
            make = spec.make
            make_cpu = spec.make_cpu if spec.accelerator != "cpu" and spec.cpu_model else None
        else:
            make, make_cpu, first = make_classifier, make_cpu_classifier, None
        watchdog = Watchdog(make, cfg.inference_timeout, make_cpu=make_cpu, first=first)
        setup.callback(watchdog.close)
        log = FrameLog(cfg.log, cfg.log_max_bytes, cfg.log_backups) if cfg.log else None
        if log is not None:
            setup.callback(log.close)
        sender = None
        if cfg.server:
            sender = Sender(cfg.server, key, queue_size=cfg.queue_size,
                            connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                            image_format=cfg.image_format, jpeg_quality=cfg.jpeg_quality,
                            n_classes=watchdog.n_classes)
        setup.pop_all()   # all opened: the loop's own finally releases them from here on
    if not cfg.server:
        say("local-only: no --server given, no frame will be offloaded "
            "(the policy still decides and spends tokens; the weak answer stands)")
    status = StatusLine(status_stream, stats)
    stop = stop or threading.Event()
    signalled = []
    old_handlers = {}
    if install_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            signalled.append(signum)
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_signal)

    pending = {}       # frame id -> record waiting for the sender's result
    # Per-part time of the loop (s, summed over frames) for the summary's overhead_us.
    cost = dict.fromkeys(("capture", "weak", "metric", "policy", "record", "send", "stats", "log",
                          "other"), 0.0)
    frames_seen = 0
    top_k = cfg.top_k

    def finish(rec):
        t0 = time.perf_counter()
        stats.add(rec)
        t1 = time.perf_counter()
        if log is not None:
            log.write(rec)
        cost["stats"] += t1 - t0
        cost["log"] += time.perf_counter() - t1

    def complete(res):
        rec = pending.pop(res.frame_id, None)
        if rec is None:
            return
        rec["outcome"] = res.outcome
        ms = rec["ms"]
        ms["queue"] = None if res.queue_ms is None else round(res.queue_ms, 4)
        if res.transmission_ms is not None:
            ms["transmission"] = round(res.transmission_ms, 4)
        if res.answer is not None:
            a = res.answer
            rec["strong_top"] = [[c, round(s, 5)] for c, s in zip(a.classes[:top_k], a.scores[:top_k])]
            rec["strong_batch"] = a.batch_size
            ms["strong"] = round(a.inference_ms, 4)
            rec["final"], rec["final_source"] = a.top1, "strong"
        if res.error:
            rec["error"] = res.error
        finish(rec)

    def drain_results():
        if sender is None:
            return
        while True:
            try:
                res = sender.results.get_nowait()
            except queue.Empty:
                return
            complete(res)

    t_wall0 = time.monotonic()
    t_first = prev_slot = None
    error = current = None
    try:
        it = iter(src)
        while not stop.is_set():
            if cfg.max_frames is not None and frames_seen >= cfg.max_frames:
                break
            c0 = time.perf_counter()
            frame = next(it, None)
            c1 = time.perf_counter()
            cost["capture"] += c1 - c0
            if frame is None or stop.is_set():
                if frame is not None:
                    # captured after the stop: still logged, so nothing is lost silently
                    finish({"id": frame.frame_id, "t": round(frame.t, 6), "label": frame.label,
                            "offload": False, "outcome": "cancelled",
                            "error": "captured after the stop signal", "final": None,
                            "final_source": None, "ms": {}})
                    frames_seen += 1
                break
            frames_seen += 1
            if cfg.realtime and getattr(src, "replayable", False):
                wait = t_wall0 + frame.t - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    pass  # stopping: this frame is still handled, the next is not read
            rec = current = {"id": frame.frame_id, "t": round(frame.t, 6), "label": frame.label}
            w0 = time.perf_counter()
            out, event = watchdog.classify(frame.image)
            w1 = time.perf_counter()
            cost["weak"] += w1 - w0
            ms = {"weak": _ms(w0, w1)}
            rec["ms"] = ms
            if event:
                rec["event"] = event
            if out is None:
                rec.update(offload=False, outcome="weak-failed", final=None, final_source=None)
                current = None
                finish(rec)
                continue
            p, h, raw, m = metric_of(out.logits)
            w2 = time.perf_counter()
            cost["metric"] += w2 - w1
            if t_first is None:
                t_first = frame.t
            slot = slot_of(frame.t, t_first, slot_s, prev_slot)
            slots = 0 if prev_slot is None else slot - prev_slot
            prev_slot = slot
            a, n0, n1 = policy.decide(m, slots)
            w3 = time.perf_counter()
            cost["policy"] += w3 - w2
            ms["metric"], ms["policy"] = _ms(w1, w2), _ms(w2, w3)
            weak_top = _top(p, top_k)
            rec.update(slot=slot, slots=slots, weak_top=weak_top, entropy=round(h, 6),
                       metric=round(raw, 6), metric_std=float(m), n_before=int(n0),
                       n_after=int(n1), tokens_before=n0 / P, tokens_after=n1 / P,
                       offload=bool(a), final=weak_top[0][0], final_source="weak")
            w4 = time.perf_counter()
            cost["record"] += w4 - w3
            if not a:
                rec["outcome"] = "not-offloaded"
            elif sender is None:
                rec["outcome"] = "local-only"
            else:
                s0 = time.perf_counter()
                queued = sender.submit(frame.frame_id, frame.image)
                cost["send"] += time.perf_counter() - s0
                if queued:
                    pending[frame.frame_id] = rec
                else:
                    rec["outcome"] = "queue-full"
                    rec["error"] = f"send queue full ({cfg.queue_size} frames waiting)"
            current = None
            if "outcome" in rec:
                finish(rec)
            o0, booked = time.perf_counter(), cost["stats"] + cost["log"]
            drain_results()
            status.update()
            # answers that came back are finished here too: their stats/log time is booked there
            cost["other"] += time.perf_counter() - o0 - (cost["stats"] + cost["log"] - booked)
    except BaseException as e:
        error = e
        if current is not None and "outcome" not in current and current["id"] not in pending:
            # the frame in hand when the run failed is logged too
            current.update(outcome="error", error=f"{type(e).__name__}: {e}")
            current.setdefault("offload", False)
            current.setdefault("final", None)
            current.setdefault("final_source", None)
            finish(current)
        raise
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if sender is not None:
            sender.close(cfg.drain_timeout if error is None else 0.0)
            drain_results()
        for fid in list(pending):
            rec = pending.pop(fid)
            rec["outcome"] = "cancelled"
            rec["error"] = "no result before the run ended"
            finish(rec)
        watchdog.close()
        if log is not None:
            log.close()
        status.finish()
        if hasattr(src, "close"):
            with contextlib.suppress(Exception):
                src.close()
    summary = stats.summary(duration_s=time.monotonic() - t_wall0, interrupted=bool(signalled)
                            or stop.is_set())
    summary["signal"] = signal.Signals(signalled[0]).name if signalled else None
    summary["warnings"] = say_lines
    summary["log"] = cfg.log
    summary["policy"] = policy_path
    summary["model"] = model_path
    n = max(1, stats.frames)
    summary["overhead_us"] = {k: round(v / n * 1e6, 2) for k, v in cost.items()}
    if cfg.summary_json:
        from offload.atomic import atomic_write_json

        atomic_write_json(cfg.summary_json, summary)
    return summary

