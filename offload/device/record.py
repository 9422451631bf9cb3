"""What became of one frame: the :class:`Outcome` values and the :class:`FrameRecord`.

The loop builds one ``FrameRecord`` per frame, the sender reports an
``Outcome`` per offloaded frame, ``status.Stats`` counts them and the frame log
writes ``FrameRecord.as_dict()`` as one JSON line (docs/device.md lists the
keys). The dataclass's field order is the key order of a log line; a field
in ``_OMITTED_WHEN_NONE`` is left out of the line while it is ``None``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

__all__ = ["Outcome", "FrameRecord", "top_k"]


class Outcome(enum.Enum):
    """The final state of one frame (the log's ``outcome``)."""

    NOT_OFFLOADED = "not-offloaded"   # the policy kept the weak answer
    LOCAL_ONLY = "local-only"         # offload decided, but the run has no server
    SENT = "sent"                     # the server answered 200 with a valid answer
    QUEUE_FULL = "queue-full"         # offload decided, the send queue was full
    TIMEOUT = "timeout"               # no connection or no answer in time
    REFUSED = "refused"               # connection refused (no server listening)
    DISCONNECTED = "disconnected"     # the server closed the connection without an answer
    NET_ERROR = "net-error"           # any other network error
    TLS_ERROR = "tls-error"           # TLS refused: chain, host name, expiry, or no TLS at all
    HTTP = "http"                     # a non-200 status: logged as ``http-<status>``
    SWITCH_REFUSED = "switch-refused"  # a 429 from the link the device shares (the server's
                                       # switch), not from its own bucket: its token is spent
    REDIRECT = "redirect"             # a 3xx answer: not followed
    HELD_OFF = "held-off"             # not sent: Retry-After still running
    BAD_ANSWER = "bad-answer"         # a 200 answer that breaks the wire format
    BAD_FRAME = "bad-frame"           # the frame could not be encoded
    CANCELLED = "cancelled"           # still queued or in flight when the run ended
    WEAK_FAILED = "weak-failed"       # the weak inference failed (watchdog)
    ERROR = "error"                   # the run (or the sender) failed while this frame was in hand

    def label(self, http_status=None):
        """The text logged and counted: the value, or ``http-<status>`` for ``HTTP``."""
        return f"http-{http_status}" if self is Outcome.HTTP else self.value

    @property
    def is_failure(self):
        """True for an offload (or frame) that did not end as decided."""
        return self not in (Outcome.SENT, Outcome.NOT_OFFLOADED, Outcome.LOCAL_ONLY)


def top_k(p, k):
    """``[[class, probability], ...]`` of the ``k`` largest of ``p`` (ties: lower class first)."""
    idx = np.argsort(-p, kind="stable")[:k]
    return [[int(i), round(float(p[i]), 5)] for i in idx]


def _ms(seconds):
    return round(seconds * 1e3, 4)


@dataclass
class FrameRecord:
    """One frame's log record; see docs/device.md (Frame log) for each field's meaning.

    ``outcome`` is ``None`` while an offloaded frame waits for the sender;
    ``ms`` maps stage names to milliseconds (rounded to 0.1 µs).
    """

    id: int
    t: float
    label: Optional[int]
    ms: dict = field(default_factory=dict)
    event: Optional[str] = None
    slot: Optional[int] = None
    slots: Optional[int] = None
    weak_top: Optional[list] = None
    entropy: Optional[float] = None
    metric: Optional[float] = None
    metric_std: Optional[float] = None
    n_before: Optional[int] = None
    n_after: Optional[int] = None
    tokens_before: Optional[float] = None
    tokens_after: Optional[float] = None
    offload: bool = False
    final: Optional[int] = None
    final_source: Optional[str] = None
    outcome: Optional[Outcome] = None
    http_status: Optional[int] = None
    sent_bytes: Optional[int] = None
    strong_top: Optional[list] = None
    strong_batch: Optional[int] = None
    error: Optional[str] = None

    @classmethod
    def of(cls, frame):
        """The record of a captured ``capture.Frame`` (id, time stamp rounded to 1 µs, label)."""
        return cls(id=frame.frame_id, t=round(frame.t, 6), label=frame.label)

    @property
    def done(self):
        """True once the outcome is final (the record can be counted and logged)."""
        return self.outcome is not None

    @property
    def outcome_label(self):
        """The logged outcome text (``"sent"``, ``"http-429"``, ...)."""
        return self.outcome.label(self.http_status)

    def time(self, stage, seconds):
        """Book ``seconds`` as stage ``stage``'s time (``ms``)."""
        self.ms[stage] = _ms(seconds)

    def decided(self, *, slot, slots, probs, entropy, metric, metric_std, n_before, n_after,
                P, offload, k):
        """Fill in the decision: slot, weak top-``k``, metric, bucket counts (scaled tokens)."""
        weak_top = top_k(probs, k)
        self.slot, self.slots, self.weak_top = slot, slots, weak_top
        self.entropy, self.metric, self.metric_std = round(entropy, 6), round(metric, 6), float(metric_std)
        self.n_before, self.n_after = int(n_before), int(n_after)
        self.tokens_before, self.tokens_after = n_before / P, n_after / P
        self.offload, self.final, self.final_source = bool(offload), weak_top[0][0], "weak"

    def end(self, outcome, error=None):
        """Make ``outcome`` final (with ``error`` when given)."""
        self.outcome = outcome
        if error is not None:
            self.error = error

    def answered(self, result, k):
        """Take the sender's ``Result``: outcome, queue and network times, the strong answer."""
        self.outcome, self.http_status = result.outcome, result.http_status
        self.ms["queue"] = None if result.queue_ms is None else round(result.queue_ms, 4)
        if result.encode_ms is not None:
            self.ms["encode"] = round(result.encode_ms, 4)
        if result.request_bytes is not None:
            self.sent_bytes = int(result.request_bytes)
        if result.transmission_ms is not None:
            self.ms["transmission"] = round(result.transmission_ms, 4)
        a = result.answer
        if a is not None:
            self.strong_top = [[c, round(s, 5)] for c, s in zip(a.classes[:k], a.scores[:k])]
            self.strong_batch = a.batch_size
            self.ms["strong"] = round(a.inference_ms, 4)
            self.final, self.final_source = a.top1, "strong"
        if result.error:
            self.error = result.error

    def as_dict(self):
        """The JSON-lines record (docs/device.md): fields in order, optional ones only when set."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "http_status":
                continue          # part of the outcome's text
            if f.name == "outcome":
                out["outcome"] = None if v is None else self.outcome_label
            elif v is not None or f.name not in _OMITTED_WHEN_NONE:
                out[f.name] = v
        return out


#: Fields a record carries only when they apply (a decision, an answer, an event, an error).
_OMITTED_WHEN_NONE = frozenset({"event", "slot", "slots", "weak_top", "entropy", "metric",
                                "metric_std", "n_before", "n_after", "tokens_before",
                                "tokens_after", "sent_bytes", "strong_top", "strong_batch",
                                "error"})
