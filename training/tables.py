"""Markdown tables of sweep results (``offload-train table``): one per grid part.

``markdown_tables`` turns a sweep's results table (``training.figures.read_results``)
into the tables docs/results.md and docs/dqn.md show: per point its varying
settings, the average loss of the int8 DQN, MDP and Baseline, the shares of
the metric oracle's gain over Baseline that MDP, the DQN, the belief policy
and the ceiling capture, the DQN's share of the belief policy's gain (its
share divided by the belief's), whether DQN < MDP < Baseline holds and by
how much against the sampling noise, and the DQN's training time.

The noise: every policy of a point runs on the same test streams, so the
difference of two policies' average losses has a paired standard error,
``std(d_s) / sqrt(S)`` over the per-stream differences ``d_s`` of their mean
rewards per image (``stream_reward``, in ``results.json`` only: ``results.csv``
and results written before it was recorded give the margins without one). A
value a table lacks (a policy an older sweep did not run, such as the belief
policy) is shown as ``-``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DQN", "markdown_tables", "point_summary", "paired_margin"]

#: The DQN a table reports: the int8 policy the device runs.
DQN = "dqn-int8"
_SHARE = "share_of_oracle-metric_gain"
_SETTINGS = ("rate", "depth", "choice", "sp", "rprob", "arrivals", "I1", "I2", "tprob1", "tprob2",
             "T", "interarrival", "train_choice", "seed")
_HEAD = {"rate": "r", "depth": "b", "rprob": "rprob", "sp": "sp", "train_choice": "trained on",
         "interarrival": "inter-arrival inputs"}


def _num(v):
    """A finite float, or ``None``."""
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _streams(v):
    """Per-stream rewards as a float array, or ``None`` (missing, or a CSV's text)."""
    if not isinstance(v, (list, tuple)) or not v:
        return None
    try:
        a = np.asarray(v, float)
    except (TypeError, ValueError):
        return None
    return a if a.ndim == 1 and np.all(np.isfinite(a)) else None


def paired_margin(worse, better):
    """``(margin, se)``: how much lower ``better``'s average loss is than ``worse``'s.

    ``worse``, ``better``: result rows of one point. ``margin`` is
    ``worse.avg_loss - better.avg_loss`` (positive: the order holds);
    ``se`` the paired standard error of it over the test streams (``None``
    without per-stream rewards for both, or with fewer than 2 streams).
    ``(None, None)`` when either average loss is missing.
    """
    if worse is None or better is None:
        return None, None
    a, b = _num(worse.get("avg_loss")), _num(better.get("avg_loss"))
    if a is None or b is None:
        return None, None
    sw, sb = _streams(worse.get("stream_reward")), _streams(better.get("stream_reward"))
    se = None
    if sw is not None and sb is not None and sw.size == sb.size and sw.size >= 2:
        d = sb - sw  # per stream: worse's loss minus better's = better's reward minus worse's
        se = float(np.std(d, ddof=1) / math.sqrt(d.size))
    return a - b, se


def point_summary(rows):
    """The figures of one point (its rows, one per policy) a table shows, as a dict.

    Keys: ``loss`` {policy: average loss}, ``share`` {policy: share of the
    metric oracle's gain}, ``dqn_of_belief`` and ``dqn_of_ceiling`` (the
    DQN's share divided by theirs), ``order`` (DQN < MDP < Baseline: True,
    False or None when a loss is missing), ``margins`` {"mdp-dqn",
    "baseline-mdp": (margin, se)}, ``train_seconds``, ``stopped_by``,
    ``seconds``. Missing values are ``None``.
    """
    by = {r.get("policy"): r for r in rows}
    loss = {p: _num(r.get("avg_loss")) for p, r in by.items()}
    share = {p: _num(r.get(_SHARE)) for p, r in by.items()}
    dqn = by.get(DQN, {})

    def of(ref):
        direct = _num(dqn.get(f"share_of_{ref}_gain"))
        if direct is not None:
            return direct
        s, r = share.get(DQN), share.get(ref)
        return s / r if s is not None and r not in (None, 0.0) else None

    m1 = paired_margin(by.get("mdp"), by.get(DQN))
    m2 = paired_margin(by.get("baseline"), by.get("mdp"))
    order = None if m1[0] is None or m2[0] is None else bool(m1[0] > 0 and m2[0] > 0)
    first = rows[0] if rows else {}
    return {"loss": loss, "share": share, "dqn_of_belief": of("belief"),
            "dqn_of_ceiling": of("ceiling"), "order": order,
            "margins": {"mdp-dqn": m1, "baseline-mdp": m2},
            "train_seconds": _num(first.get("train_seconds")),
            "stopped_by": first.get("stopped_by") or None, "seconds": _num(first.get("seconds"))}


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _loss(v):
    return "-" if v is None else f"{v:.4f}"


def _margin(m):
    margin, se = m
    if margin is None:
        return "-"
    text = f"{margin:+.5f}"
    if se is None:
        return text
    return text + (f" ({margin / se:+.1f} SE)" if se > 0 else " (SE 0)")


def _setting(v):
    if isinstance(v, float):
        return f"{v:g}"
    return "-" if v is None or v == "" else str(v)


def _secs(v):
    return "-" if v is None else f"{v:,.0f}"


def _varying(rows, keys):
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def markdown_tables(rows, meta=None):
    """Markdown text: a heading and a table per grid part, and a line on the ordering.

    ``rows, meta`` from ``training.figures.read_results`` (``meta['parts']``
    gives the parts; a CSV table is one part). Points without a finished
    result are left out; a failed point is listed under its table.
    """
    meta = meta or {}
    grid = meta.get("grid") or "sweep"
    parts = meta.get("parts") or [{"name": grid, "axes": None,
                                   "points": list(dict.fromkeys(r.get("point") for r in rows))}]
    out = []
    for part in parts:
        ids = list(part.get("points") or [])
        prow = [r for r in rows if r.get("point") in set(ids)]
        done = [r for r in prow if r.get("status") == "done"]
        failed = sorted({r.get("point") for r in prow if r.get("status") == "failed"})
        if not done and not failed:
            continue
        name = part.get("name") or grid
        out.append(f"### {grid}: {name}" if name != grid else f"### {grid}")
        out.append("")
        if meta.get("title"):
            out.append(f"{meta['title']}" + (f" ({meta['scale']} scale)" if meta.get("scale")
                                             else "") + ".")
            out.append("")
        settings = [k for k in (part.get("axes") or []) if k in _SETTINGS]
        settings += [k for k in _varying(done, _SETTINGS) if k not in settings]
        by_point = {}
        for r in done:
            by_point.setdefault(r.get("point"), []).append(r)
        first = {p: rs[0] for p, rs in by_point.items()}
        order = sorted(by_point, key=lambda p: ([_sort_key(first[p].get(k)) for k in settings],
                                                 ids.index(p) if p in ids else 0))
        head = ([_HEAD.get(k, k) for k in settings] or ["point"]) + [
            "DQN int8", "MDP", "Baseline", "MDP share", "DQN share", "belief share",
            "ceiling share", "DQN / belief", "DQN / ceiling", "DQN < MDP < Baseline",
            "MDP - DQN", "Baseline - MDP", "training s", "stopped by"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        holds = fails = 0
        failing = []
        for p in order:
            s = point_summary(by_point[p])
            cells = [_setting(first[p].get(k)) for k in settings] or [str(p)]
            if s["order"] is True:
                holds += 1
            elif s["order"] is False:
                fails += 1
                failing.append(", ".join(f"{_HEAD.get(k, k)} {_setting(first[p].get(k))}"
                                         for k in settings) or str(p))
            cells += [_loss(s["loss"].get(DQN)), _loss(s["loss"].get("mdp")),
                      _loss(s["loss"].get("baseline")), _pct(s["share"].get("mdp")),
                      _pct(s["share"].get(DQN)), _pct(s["share"].get("belief")),
                      _pct(s["share"].get("ceiling")), _pct(s["dqn_of_belief"]),
                      _pct(s["dqn_of_ceiling"]),
                      {True: "yes", False: "**no**", None: "-"}[s["order"]],
                      _margin(s["margins"]["mdp-dqn"]), _margin(s["margins"]["baseline-mdp"]),
                      _secs(s["train_seconds"]), s["stopped_by"] or "-"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        summary = f"DQN < MDP < Baseline at {holds} of {holds + fails} points"
        out.append(summary + (f"; not at: {'; '.join(failing)}." if failing else "."))
        if failed:
            out.append(f"Failed points (no result): {', '.join(failed)}.")
        out.append("")
    if out:
        out.append("Average loss (lower is better). Shares are of the metric oracle's gain in "
                   "reward over Baseline; DQN / belief and DQN / ceiling are the DQN's share "
                   "divided by theirs. Margins are differences of average loss, with the "
                   "paired standard error over the test streams where the results have "
                   "per-stream rewards. The DQN is the int8 policy.")
        out.append("")
    return "\n".join(out)
