"""When validation has converged, and how soon it got there: pure functions of the curve.

The curve is ``Trainer.curve``: one record per validation, in order, each with
at least ``iteration``, ``seconds``, ``lr`` (the learning rate the iterations
before it ran at), ``dqn`` (the judged network's validation reward) and
``baseline`` (Baseline's). What both functions look at is the *gain over
Baseline*, ``dqn - baseline``, the quantity every share in the report
divides, and its running best (the checkpoint kept so far).

``plateau_action`` is the quick preset's stopping rule (docs/dqn.md, "When
training stops"): the running best gain has grown by less than ``tol`` of
itself over the last ``window`` validations at the current learning rate.
The first ``decays`` such plateaus decay the learning rate, the next one
stops. ``time_to_quality`` finds the first validation at which the gain
reached a share (99%) of the final best gain.
"""

from __future__ import annotations

__all__ = ["CONVERGED", "best_gains", "plateau_action", "time_to_quality"]

#: ``Trainer.stopped_by`` when ``plateau_action`` stopped training.
CONVERGED = "validation converged"


def best_gains(curve):
    """The running best gain over Baseline, ``max(dqn - baseline)`` up to each record."""
    out, best = [], -float("inf")
    for rec in curve:
        best = max(best, rec["dqn"] - rec["baseline"])
        out.append(best)
    return out


def _decays(curve):
    """Learning-rate changes seen along the curve, and the records since the last one."""
    changes, run = 0, 0
    for i, rec in enumerate(curve):
        if i and rec["lr"] != curve[i - 1]["lr"]:
            changes, run = changes + 1, 0
        run += 1
    return changes, run


def plateau_action(curve, window, tol, decays):
    """``"stop"``, ``"decay"`` or ``None``: what the stopping rule says after the last record.

    A plateau: at least ``window`` validations at the current learning rate,
    a positive best gain ``G`` and ``G - G_window_ago < tol * G``, where
    ``G_window_ago`` is the running best ``window`` validations earlier (with
    exactly ``window`` records at this rate, the best before the last
    change). On a plateau the answer is ``"decay"`` while the curve shows
    fewer than ``decays`` learning-rate changes, else ``"stop"``. A gain that
    never beat Baseline is not a plateau (a relative tolerance means nothing
    there). ``window`` 0 turns the rule off.
    """
    if window <= 0 or len(curve) <= window:
        return None
    changes, run = _decays(curve)
    if run < window:
        return None
    g = best_gains(curve)
    if not g[-1] > 0 or g[-1] - g[-1 - window] >= tol * g[-1]:
        return None
    return "decay" if changes < decays else "stop"


def time_to_quality(curve, share=0.99):
    """When validation first reached ``share`` of the final best gain over Baseline.

    Returns ``{"share", "iteration", "seconds", "gain", "final_gain"}``: the
    first record whose gain ``dqn - baseline`` is at least ``share`` times
    the best gain of the whole curve (``final_gain``, the kept checkpoint's),
    its iteration and training seconds; ``iteration``, ``seconds`` and
    ``gain`` are ``None`` for an empty curve or one that never beat Baseline.
    """
    out = {"share": share, "iteration": None, "seconds": None, "gain": None,
           "final_gain": None}
    if not curve:
        return out
    final = best_gains(curve)[-1]
    out["final_gain"] = final
    if not final > 0:
        return out
    for rec in curve:
        gain = rec["dqn"] - rec["baseline"]
        if gain >= share * final:
            out.update(iteration=rec["iteration"], seconds=rec["seconds"], gain=gain)
            break
    return out
