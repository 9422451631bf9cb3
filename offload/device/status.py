"""Run statistics: a live one-line status (TTY only) and the end-of-run summary.

``Stats.add(record)`` takes every finished :class:`offload.device.record.FrameRecord`
(the record the frame log gets). ``Stats.summary()`` returns a plain dict (JSON-ready):

* ``stages_ms``: per stage mean, std (population) and count, in ms, of the
  paper's Table I rows: ``weak`` (weak inference), ``policy`` (the decision:
  Decider or thresholds + bucket), ``transmission`` (request round trip minus
  the server's inference time), ``strong`` (server's ``inference_ms``); plus
  the device's own ``metric`` (entropy + table + standardise) and ``queue``
  (time an offloaded frame waited for the sender thread);
* ``shares``: fraction of frames offloaded (decision to offload) and not;
* ``outcomes``: frames per outcome; ``failures``: offload decisions that got
  no strong answer, by reason;
* ``loss`` (only with labels): top-1 error of weak-only (all labelled frames),
  of the policy's final answers (all labelled frames), of the strong model
  over the offloaded frames whose answer came back (with the weak error on
  the same frames beside it: that subset is chosen by the policy, so it is not
  the strong model's error on the stream), and over all frames only when
  every labelled frame got a strong answer.

``format_summary`` prints it as text; ``StatusLine`` redraws one line with
``\\r`` at most 4 times a second, only when the stream is a terminal.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from offload.device.record import Outcome

__all__ = ["Stats", "StatusLine", "format_summary", "STAGES"]

#: Stage keys of a record's ``ms`` field, in Table I order (then the device's own).
STAGES = ("weak", "policy", "transmission", "strong", "metric", "queue", "encode")
_TABLE_I = {"weak": "weak inference", "policy": "policy / decision",
            "transmission": "transmission", "strong": "strong inference",
            "metric": "metric (entropy, table)", "queue": "send queue wait",
            "encode": "frame resize + encode"}


class _Moments:
    """Running mean and variance (Welford) of one stage's times."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x):
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def as_dict(self):
        if not self.n:
            return {"mean": None, "std": None, "n": 0}
        return {"mean": round(self.mean, 4), "std": round(math.sqrt(self.m2 / self.n), 4),
                "n": self.n}


class Stats:
    """Aggregates finished frame records (see module docstring)."""

    def __init__(self, bucket=None, slot_ms=None, local_only=False):
        self.bucket, self.slot_ms, self.local_only = bucket, slot_ms, local_only
        self.frames = 0
        self.offload_decisions = 0
        self.outcomes = Counter()      # outcome label -> frames
        self.failures = Counter()      # the same, failures only (Outcome.is_failure)
        self.stages = {s: _Moments() for s in STAGES}
        self.events = Counter()
        self.labelled = 0
        self.weak_err = 0
        self.final_err = 0
        self.answered_labelled = 0
        self.strong_err_answered = 0
        self.weak_err_answered = 0
        self.tokens = None
        self.sent_bytes = 0            # request bodies put on the link
        self.requests = 0
        self.first_t = self.last_t = None
        self.t_start = time.monotonic()

    def add(self, rec):
        """Count one finished ``FrameRecord``."""
        self.frames += 1
        self.offload_decisions += bool(rec.offload)
        self.outcomes[rec.outcome_label] += 1
        if rec.outcome.is_failure:
            self.failures[rec.outcome_label] += 1
        for s, v in rec.ms.items():
            if v is not None and s in self.stages:
                self.stages[s].add(float(v))
        if rec.event:
            self.events[rec.event.split(":")[0]] += 1
        if rec.tokens_after is not None:
            self.tokens = rec.tokens_after
        if rec.sent_bytes is not None:
            self.sent_bytes += rec.sent_bytes
            self.requests += 1
        label = rec.label
        weak = rec.weak_top
        if label is not None:
            self.labelled += 1
            w1 = weak[0][0] if weak else None
            self.weak_err += w1 != label
            self.final_err += rec.final != label
            strong = rec.strong_top
            if strong:
                self.answered_labelled += 1
                self.strong_err_answered += strong[0][0] != label
                self.weak_err_answered += w1 != label

    def summary(self, duration_s=None, interrupted=False):
        """The end-of-run summary as a JSON-ready dict."""
        dur = time.monotonic() - self.t_start if duration_s is None else duration_s
        n = self.frames
        out = {
            "frames": n,
            "duration_s": round(dur, 3),
            "fps": round(n / dur, 2) if dur > 0 else None,
            "interrupted": interrupted,
            "local_only": self.local_only,
            "bucket": self.bucket,
            "slot_ms": self.slot_ms,
            "stages_ms": {s: m.as_dict() for s, m in self.stages.items()},
            "shares": {"offloaded": round(self.offload_decisions / n, 4) if n else None,
                       "not_offloaded": round(1 - self.offload_decisions / n, 4) if n else None},
            "offload_decisions": self.offload_decisions,
            "answered": self.outcomes.get(Outcome.SENT.value, 0),
            "outcomes": dict(sorted(self.outcomes.items())),
            "failures": dict(sorted(self.failures.items())),
            "weak_events": dict(self.events),
            "tokens_final": self.tokens,
            "sent_bytes": {"total": self.sent_bytes, "requests": self.requests,
                           "mean": round(self.sent_bytes / self.requests, 1)
                           if self.requests else None},
        }
        if self.labelled:
            L, A = self.labelled, self.answered_labelled
            loss = {
                "labelled_frames": L,
                "weak_only": round(self.weak_err / L, 4),
                "policy": round(self.final_err / L, 4),
                "answered_frames": A,
                "strong_on_answered": round(self.strong_err_answered / A, 4) if A else None,
                "weak_on_answered": round(self.weak_err_answered / A, 4) if A else None,
                "strong_only": round(self.strong_err_answered / L, 4) if A == L else None,
            }
            out["loss"] = loss
        return out

    def line(self, elapsed_s):
        """The live status line (no newline)."""
        n = self.frames
        fps = n / elapsed_s if elapsed_s > 0 else 0.0
        rate = self.offload_decisions / n if n else 0.0
        st = self.stages

        def ms(s):
            return f"{st[s].mean:.2f}" if st[s].n else "-"
        tok = "-" if self.tokens is None else f"{self.tokens:.2f}"
        fails = sum(self.failures.values())
        sent = self.outcomes.get(Outcome.SENT.value, 0)
        return (f"{n} frames {fps:.1f}/s | offload {rate:.1%} sent {sent}"
                f" failed {fails} | tokens {tok} | ms weak {ms('weak')} policy {ms('policy')}"
                f" tx {ms('transmission')} strong {ms('strong')}")


class StatusLine:
    """Redraws ``Stats.line`` on one terminal line (``\\r``), at most ``hz`` times a second."""

    def __init__(self, stream, stats, hz=4.0):
        self.stream, self.stats = stream, stats
        self.enabled = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.period = 1.0 / hz
        self._last = 0.0
        self._t0 = time.monotonic()
        self._width = 0

    def update(self, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        text = self.stats.line(now - self._t0)
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def finish(self):
        if self.enabled and self._width:
            self.update(force=True)
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def format_summary(s):
    """The summary dict as text: Table I, shares, outcomes, losses."""
    lines = []
    b = s.get("bucket") or {}
    head = f"{s['frames']} frames in {s['duration_s']:.2f} s ({_fmt(s['fps'], 1)} frames/s)"
    if b:
        head += (f"; bucket N={b.get('N')} P={b.get('P')} M={b.get('M')}, "
                 f"slot {s.get('slot_ms'):g} ms")
    if s.get("interrupted"):
        head += "; interrupted"
    lines.append(head)
    if s.get("local_only"):
        lines.append("local-only: no --server, nothing was sent; 'offloaded' counts the policy's "
                     "decisions (tokens spent) with the weak answer kept")
    lines.append("")
    lines.append(f"{'stage (Table I)':26s} {'mean ms':>9s} {'std ms':>9s} {'frames':>7s}")
    for key in STAGES:
        m = s["stages_ms"][key]
        lines.append(f"{_TABLE_I[key]:26s} {_fmt(m['mean'], 3):>9s} {_fmt(m['std'], 3):>9s} "
                     f"{m['n']:>7d}")
    sh = s["shares"]
    lines.append("")
    lines.append(f"offloaded {s['offload_decisions']} ({_fmt(sh['offloaded'] and 100 * sh['offloaded'], 1)}%), "
                 f"not offloaded {s['frames'] - s['offload_decisions']} "
                 f"({_fmt(sh['not_offloaded'] and 100 * sh['not_offloaded'], 1)}%), "
                 f"strong answers {s['answered']}")
    lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in s["outcomes"].items()))
    sent = s.get("sent_bytes") or {}
    if sent.get("requests"):
        lines.append(f"on the link: {sent['total']} bytes in {sent['requests']} requests "
                     f"({sent['mean']:.0f} bytes per offloaded frame)")
    if s["failures"]:
        lines.append("offload failures: " + ", ".join(f"{k} {v}" for k, v in s["failures"].items()))
    if s.get("weak_events"):
        lines.append("weak classifier events: "
                     + ", ".join(f"{k} {v}" for k, v in s["weak_events"].items()))
    loss = s.get("loss")
    if loss:
        lines.append("")
        lines.append(f"top-1 error over {loss['labelled_frames']} labelled frames:")
        lines.append(f"  weak only              {_fmt(loss['weak_only'], 4)}")
        lines.append(f"  policy (final answers) {_fmt(loss['policy'], 4)}")
        if loss["answered_frames"]:
            lines.append(f"  strong, on the {loss['answered_frames']} offloaded frames answered: "
                         f"{_fmt(loss['strong_on_answered'], 4)} (weak on the same frames "
                         f"{_fmt(loss['weak_on_answered'], 4)})")
        else:
            lines.append("  strong: no offloaded frame was answered")
        if loss["strong_only"] is not None:
            note = loss.get("strong_only_note", "every frame answered")
            lines.append(f"  strong only            {_fmt(loss['strong_only'], 4)} ({note})")
        else:
            lines.append("  strong only over all frames: unknown (only offloaded frames reach it)")
    return "\n".join(lines)
